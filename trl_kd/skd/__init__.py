from .config import SpeculativeKDConfig
from .trainer import SpeculativeKDTrainer


__all__ = ["SpeculativeKDConfig", "SpeculativeKDTrainer"]
