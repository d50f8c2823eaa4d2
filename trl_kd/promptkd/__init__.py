from ..registry import register_method
from .config import PromptKDConfig
from .trainer import PromptKDTrainer


register_method("promptkd", PromptKDTrainer, PromptKDConfig, example="examples/promptkd.py")

__all__ = ["PromptKDConfig", "PromptKDTrainer"]
