from ..registry import register_method
from .config import SwitchConfig
from .trainer import SwitchTrainer


register_method("switch", SwitchTrainer, SwitchConfig, example="examples/switch.py")

__all__ = ["SwitchConfig", "SwitchTrainer"]
