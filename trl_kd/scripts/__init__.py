"""The distillation script behind `examples/*.py` and the `trl-kd <method>` command."""

from .distill import main


__all__ = ["main"]
