"""trl-kd: knowledge distillation trainers for Hugging Face TRL.

``KDTrainer`` (GKD, arXiv 2306.13649) is the base the method trainers build on: ``SpeculativeKDTrainer`` (SKD, arXiv
2410.11325), ``SwitchTrainer`` (SWITCH, arXiv 2410.19503) and ``PromptKDTrainer`` (PromptKD, arXiv 2402.12842).
"""

from .kd import KDConfig, KDTrainer, Rollout
from .losses import LMHead, chunked_kd_loss, divergence
from .promptkd import PromptKDConfig, PromptKDTrainer
from .registry import METHODS, Method, get_method, register_method
from .skd import SpeculativeKDConfig, SpeculativeKDTrainer
from .switch import SwitchConfig, SwitchTrainer


__version__ = "0.1.0.dev0"

__all__ = [
    "KDConfig",
    "KDTrainer",
    "LMHead",
    "METHODS",
    "Method",
    "PromptKDConfig",
    "PromptKDTrainer",
    "Rollout",
    "SpeculativeKDConfig",
    "SpeculativeKDTrainer",
    "SwitchConfig",
    "SwitchTrainer",
    "chunked_kd_loss",
    "divergence",
    "get_method",
    "register_method",
    "__version__",
]
