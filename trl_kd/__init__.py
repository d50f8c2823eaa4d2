"""trl-kd: knowledge distillation trainers for Hugging Face TRL.

``KDTrainer`` (GKD, arXiv 2306.13649) is the base the method trainers build on.
"""

from .kd import KDConfig, KDTrainer, Rollout
from .losses import LMHead, chunked_kd_loss, divergence

__version__ = "0.1.0.dev0"

__all__ = ["KDConfig", "KDTrainer", "LMHead", "Rollout", "chunked_kd_loss", "divergence", "__version__"]
