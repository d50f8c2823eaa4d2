from .config import PromptKDConfig
from .trainer import PromptKDTrainer


__all__ = ["PromptKDConfig", "PromptKDTrainer"]
