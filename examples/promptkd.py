"""Distil with PromptKD (see docs/promptkd.md). With no arguments: the embedded default, on a laptop CPU.

accelerate launch examples/promptkd.py
accelerate launch examples/promptkd.py --config examples/recipes/promptkd.yaml
python examples/promptkd.py --help
"""

from trl_kd.scripts import main


if __name__ == "__main__":
    main("promptkd")
