"""GKD-style base trainer: mixed on/off-policy rows, sequence-level KD, and the package's divergences."""

from .config import KDConfig
from .trainer import KDTrainer, Rollout


__all__ = ["KDConfig", "KDTrainer", "Rollout"]
