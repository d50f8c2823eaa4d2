"""Distil with GKD, on-policy and mixed (see docs/kd_trainer.md). With no arguments: the embedded default, on a
laptop CPU.

accelerate launch examples/gkd.py
accelerate launch examples/gkd.py --config examples/recipes/gkd.yaml
python examples/gkd.py --help
"""

from trl_kd.scripts import main


if __name__ == "__main__":
    main("gkd")
