from ..registry import register_method
from .config import SpeculativeKDConfig
from .trainer import SpeculativeKDTrainer


register_method("skd", SpeculativeKDTrainer, SpeculativeKDConfig, example="examples/skd.py")

__all__ = ["SpeculativeKDConfig", "SpeculativeKDTrainer"]
