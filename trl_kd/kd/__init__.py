"""GKD-style base trainer: mixed on/off-policy rows, sequence-level KD, and the package's divergences."""

from ..registry import register_method
from .config import KDConfig
from .trainer import KDTrainer, Rollout


# the base method: GKD (on-policy when lmbda=1); `kd` is its older name
register_method("gkd", KDTrainer, KDConfig, example="examples/gkd.py", aliases=("kd",))

__all__ = ["KDConfig", "KDTrainer", "Rollout"]
