from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kd.config import KDConfig


@dataclass
class PromptKDConfig(KDConfig):
    r"""Configuration for [`PromptKDTrainer`][trl_kd.PromptKDTrainer] (PromptKD, Kim et al., Findings of EMNLP 2024,
    arXiv 2402.12842).

    Defaults follow the official code (`gmkim-ai/PromptKD`, its GPT-2 base scripts): 7 soft-prompt tokens initialised
    from the teacher's tokens of "Suppose you are a student." (special tokens included), the prompt trained with its
    own AdamW at the student's learning rate, once per optimizer step, the student trained with reverse KL on its own
    samples at temperature 1 (no top-k/top-p), both at 5e-5 with 100 warm-up steps then a constant rate, weight decay
    0.01 and clipping at 1.0. Everything of [`KDConfig`][trl_kd.KDConfig] applies.

    Parameters:
        num_prompt_tokens (int):
            Virtual tokens of the soft prompt prepended to the teacher's input.
        prompt_init_text (str | None):
            The prompt starts as the teacher's embeddings of this text's tokens, tiled or truncated to
            `num_prompt_tokens`. `None` starts from random vectors with the scale of the teacher's embeddings.
        prompt_init_special_tokens (bool):
            Tokenize `prompt_init_text` with the tokenizer's special tokens, as the official code does (for OPT and
            LLaMA the first virtual token is then BOS); `False` uses the text's own tokens only.
        prompt_learning_rate (float | None):
            Learning rate of the prompt's AdamW; `None` uses `learning_rate`. `0` freezes the prompt, which reduces
            PromptKD to on-policy reverse-KL distillation.
        prompt_weight_decay (float):
            Weight decay of the prompt's AdamW.
        prompt_reg_coef (float):
            Initial weight of the regulariser `KL(prompted teacher || teacher)`; it decays linearly to 0 over
            training (`coef * (1 - step / max_steps)`), so the prompt may move the teacher further later on.
        lmbda (float):
            PromptKD trains on student samples only.
        beta (float):
            The student's loss: `1.0` is reverse KL `KL(student || prompted teacher)`, PromptKD's.
        learning_rate (float):
            The student's (and, by default, the prompt's) rate: the official GPT-2 base value, 5e-5 (1e-5 for GPT-2
            medium, 5e-6 for GPT-2 large, OPT and LLaMA students).
        lr_scheduler_type (str):
            `"constant_with_warmup"`, the official schedule of the student and the prompt.
        warmup_steps (int):
            100 warm-up steps, as in the official scripts.
        weight_decay (float):
            The student's AdamW weight decay, 0.01 as in the official code.
    """

    cross_tokenizer_refusal = (
        "its soft prompt is trained through the teacher on the student's tokens, and the reward compares the two "
        "models token by token; use a teacher of the student's family."
    )

    num_prompt_tokens: int = field(default=7, metadata={"help": "Soft-prompt tokens prepended to the teacher."})
    prompt_init_text: str | None = field(
        default="Suppose you are a student.", metadata={"help": "Initialise the prompt from this text; None = random."}
    )
    prompt_init_special_tokens: bool = field(
        default=True, metadata={"help": "Tokenize the init text with special tokens (e.g. BOS), as the official code."}
    )
    prompt_learning_rate: float | None = field(
        default=None, metadata={"help": "Learning rate of the prompt; None = learning_rate, 0 = frozen prompt."}
    )
    prompt_weight_decay: float = field(default=0.01, metadata={"help": "Weight decay of the prompt's AdamW."})
    prompt_reg_coef: float = field(
        default=1.0, metadata={"help": "Initial weight of KL(prompted teacher || teacher); decays linearly to 0."}
    )
    lmbda: float = field(default=1.0, metadata={"help": "PromptKD trains on student samples (1.0)."})
    beta: float = field(default=1.0, metadata={"help": "1.0 = reverse KL(student || prompted teacher)."})
    learning_rate: float = field(default=5e-5, metadata={"help": "Student learning rate (official GPT-2 base: 5e-5)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup",
        metadata={"help": "Schedule of the student and the prompt (official: warm-up, then constant)."},
    )
    warmup_steps: float = field(default=100, metadata={"help": "Warm-up steps of both schedules (official: 100)."})
    weight_decay: float = field(default=0.01, metadata={"help": "Student AdamW weight decay (official: 0.01)."})

    def __post_init__(self):
        super().__post_init__()
        if self.teacher_cache is not None:
            raise ValueError(
                "PromptKD tunes a prompt through the live teacher at every step, so it cannot read the teacher from "
                "an offline cache: unset `teacher_cache`."
            )
        if self.num_prompt_tokens < 1:
            raise ValueError(f"num_prompt_tokens must be >= 1, got {self.num_prompt_tokens}.")
        if self.prompt_learning_rate is not None and not 0 <= self.prompt_learning_rate < math.inf:
            raise ValueError(
                f"prompt_learning_rate must be a finite number >= 0 or None, got {self.prompt_learning_rate}."
            )
        if not 0 <= self.prompt_weight_decay < math.inf:
            raise ValueError(f"prompt_weight_decay must be a finite number >= 0, got {self.prompt_weight_decay}.")
        if not 0 <= self.prompt_reg_coef < math.inf:
            raise ValueError(f"prompt_reg_coef must be a finite number >= 0, got {self.prompt_reg_coef}.")
        if not isinstance(self.prompt_init_special_tokens, bool):
            raise ValueError(
                f"prompt_init_special_tokens must be True or False, got {self.prompt_init_special_tokens!r}."
            )
        if self.prompt_init_text is not None and not self.prompt_init_text.strip():
            raise ValueError("prompt_init_text must be a non-empty text or None (random initialisation).")
