"""Distil with SWITCH (see docs/switch.md). With no arguments: the embedded default, on a laptop CPU.

accelerate launch examples/switch.py
accelerate launch examples/switch.py --config examples/recipes/switch.yaml
python examples/switch.py --help
"""

from trl_kd.scripts import main


if __name__ == "__main__":
    main("switch")
