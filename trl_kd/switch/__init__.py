from .config import SwitchConfig
from .trainer import SwitchTrainer


__all__ = ["SwitchConfig", "SwitchTrainer"]
