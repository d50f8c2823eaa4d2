"""Distil with Speculative KD (see docs/skd.md). With no arguments: the embedded default, on a laptop CPU.

accelerate launch examples/skd.py
accelerate launch examples/skd.py --config examples/recipes/skd.yaml
python examples/skd.py --help
"""

from trl_kd.scripts import main


if __name__ == "__main__":
    main("skd")
