from __future__ import annotations

from dataclasses import dataclass, field

from ..kd.config import KDConfig


@dataclass
class SpeculativeKDConfig(KDConfig):
    r"""Configuration for [`SpeculativeKDTrainer`][trl_kd.SpeculativeKDTrainer] (Speculative KD, Xu et al., ICLR 2025,
    arXiv 2410.11325).

    Defaults follow the paper and its official code: the student drafts at temperature/top-p 0.5/0.5, a drafted token
    outside the teacher's top-25 is replaced by a teacher sample at 0.2/0.5, and the loss is forward KL. Everything of
    [`KDConfig`][trl_kd.KDConfig] applies; `temperature`/`top_p`/`top_k` are the student's sampling settings.

    Parameters:
        acceptance_top_k (int):
            K: a drafted token is kept iff it is among the teacher's K most likely tokens at its position. `0`
            rejects every token (the teacher writes everything, i.e. supervised KD on teacher samples); a value at
            least the vocabulary size accepts every token (on-policy KD).
        acceptance_on (str):
            Which teacher distribution the top-K is taken over. `"raw"`: the unwarped distribution, as in the paper's
            Algorithm 1. `"warped"`: the distribution after `teacher_temperature`/`teacher_top_p`, as in the official
            code, so a token outside the teacher's nucleus is rejected even when it ranks within K.
        num_draft_tokens (int):
            Tokens the student drafts per teacher forward (gamma of the official code). The sampled sequences have the
            same distribution for every value; it only trades student forwards against teacher forwards.
        lmbda (float):
            Probability that a row is an SKD sample; the other rows train on their dataset completion (the official
            code's `mixed_skd` uses 0.5). `1.0` is pure SKD.
        beta (float):
            Generalized JSD interpolation; `0.0` is forward KL(teacher || student), SKD's loss.
        temperature (float):
            Student sampling temperature for drafting.
        top_p (float):
            Student nucleus for drafting.
        teacher_temperature (float):
            Temperature of the teacher's replacement tokens.
        teacher_top_p (float):
            Nucleus of the teacher's replacement tokens.
    """

    acceptance_top_k: int = field(
        default=25, metadata={"help": "Keep a drafted token iff in the teacher's top-K (0 = teacher writes all)."}
    )
    acceptance_on: str = field(
        default="raw",
        metadata={"help": "Top-K over the teacher's 'raw' distribution (paper) or its 'warped' one (official code)."},
    )
    num_draft_tokens: int = field(default=5, metadata={"help": "Student tokens drafted per teacher forward (gamma)."})
    lmbda: float = field(default=1.0, metadata={"help": "Probability a row is an SKD sample, else its dataset row."})
    beta: float = field(default=0.0, metadata={"help": "Generalized JSD interpolation; 0 = forward KL (SKD)."})
    temperature: float = field(default=0.5, metadata={"help": "Student sampling temperature."})
    top_p: float = field(default=0.5, metadata={"help": "Student top-p."})
    teacher_temperature: float | None = field(default=0.2, metadata={"help": "Teacher replacement temperature."})
    teacher_top_p: float | None = field(default=0.5, metadata={"help": "Teacher replacement top-p."})

    def __post_init__(self):
        super().__post_init__()
        if self.acceptance_top_k < 0:
            raise ValueError(f"acceptance_top_k must be >= 0, got {self.acceptance_top_k}.")
        if self.acceptance_on not in ("raw", "warped"):
            raise ValueError(f"acceptance_on must be 'raw' or 'warped', got {self.acceptance_on!r}.")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}.")
        self.check_teacher_in_the_loop("SpeculativeKDTrainer")
