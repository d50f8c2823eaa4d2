"""The distillation script behind `examples/*.py` and the `trl-kd <method>` command."""

from .distill import METHODS, main


__all__ = ["METHODS", "main"]
