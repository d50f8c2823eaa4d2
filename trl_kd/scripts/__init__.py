"""The distillation script behind `examples/*.py` and the `trl-kd <method>` command."""

from ..registry import METHODS
from .distill import main


__all__ = ["METHODS", "main"]
