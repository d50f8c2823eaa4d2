from __future__ import annotations

from dataclasses import dataclass, field

from ..kd.config import KDConfig


ACCEPTANCE_ON = ("raw", "warped")
ACCEPTANCE_TESTS = ("drafted", "fresh_sample")
DRAFT_SAMPLING = ("student", "teacher")


@dataclass
class SpeculativeKDConfig(KDConfig):
    r"""Configuration for [`SpeculativeKDTrainer`][trl_kd.SpeculativeKDTrainer] (Speculative KD, Xu et al., ICLR 2025,
    arXiv 2410.11325).

    Defaults follow the paper and, where the paper is silent, the official code (google-research `speculative_kd`):
    the student drafts at temperature/top-p 0.5/0.5, a drafted token outside the teacher's top-25 is replaced by a
    teacher sample at 0.2/0.5, the loss is forward KL averaged per sequence (Eq. 1), AdamW at 1e-5 (eps 1e-6) with a
    linear decay, no warm-up and clipping at 1.0. Where the official code does something else than the paper, the
    paper is the default and the code is one field away (`draft_sampling`, `acceptance_test`, `acceptance_on`); the
    SKD docs page has the table. Everything of [`KDConfig`][trl_kd.KDConfig] applies; `temperature`/`top_p`/`top_k`
    are the student's sampling settings.

    Parameters:
        acceptance_top_k (int):
            K: a drafted token is kept iff it is among the teacher's K most likely tokens at its position. `0`
            rejects every token (the teacher writes everything, i.e. supervised KD on teacher samples); a value at
            least the vocabulary size accepts every token (on-policy KD).
        acceptance_on (str):
            Which teacher distribution the top-K is taken over. `"raw"`: the unwarped distribution (the paper's
            Algorithm 1). `"warped"`: the official code's test, `torch.topk` of the teacher's probabilities after
            `teacher_temperature`/`teacher_top_p`; when the nucleus holds fewer than K tokens the other slots are
            zero-probability tokens (in `torch.topk`'s tie order, which differs between CPU and CUDA) and a drafted
            token in one of them is accepted.
        acceptance_test (str):
            `"drafted"`: the drafted token is tested (the paper). `"fresh_sample"`: a fresh sample from the student
            at that position is tested and the drafted token kept or replaced on its result (the official code), so
            the kept tokens follow `A * q(v) + (1 - A) * p(v)`, `A` being the student's mass on the teacher's top-K.
        draft_sampling (str):
            Whose sampling settings the student drafts with. `"student"`: `temperature`/`top_p`/`top_k` (the paper,
            0.5/0.5). `"teacher"`: `teacher_temperature`/`teacher_top_p`/`teacher_top_k`, as the official code runs
            (its candidate generator copies the teacher's generation config).
        num_draft_tokens (int):
            Tokens the student drafts per teacher forward (gamma of the official code). The sampled sequences have the
            same distribution for every value; it only trades student forwards against teacher forwards.
        lmbda (float):
            Probability that a row is an SKD sample; the other rows train on their dataset completion (the official
            code's `mixed_skd` uses 0.5). `1.0` is pure SKD.
        beta (float):
            Generalized JSD interpolation; `0.0` is forward KL(teacher || student), SKD's loss.
        loss_normalization (str):
            `"sequences"`: each response's mean divergence, then the mean over responses (Eq. 1 and the official
            code); `"tokens"` averages over all response tokens of the batch.
        temperature (float):
            Student sampling temperature for drafting.
        top_p (float):
            Student nucleus for drafting.
        teacher_temperature (float):
            Temperature of the teacher's replacement tokens.
        teacher_top_p (float):
            Nucleus of the teacher's replacement tokens.
        learning_rate (float):
            The official code's 1e-5 (TRL's distillation default is 1e-6).
        adam_epsilon (float):
            The official code's AdamW epsilon, 1e-6.
    """

    cross_tokenizer_refusal = (
        "its teacher judges and replaces the student's tokens one at a time from one vocabulary; across tokenizers "
        "that needs span-level drafting and verification (the design is in the Cross-tokenizer guide)."
    )

    acceptance_top_k: int = field(
        default=25, metadata={"help": "Keep a drafted token iff in the teacher's top-K (0 = teacher writes all)."}
    )
    acceptance_on: str = field(
        default="raw",
        metadata={
            "help": "Top-K over the teacher's 'raw' distribution (paper) or its 'warped' one (official code).",
            "choices": list(ACCEPTANCE_ON),
        },
    )
    acceptance_test: str = field(
        default="drafted",
        metadata={
            "help": "Test the 'drafted' token (paper) or a 'fresh_sample' of the student (official code).",
            "choices": list(ACCEPTANCE_TESTS),
        },
    )
    draft_sampling: str = field(
        default="student",
        metadata={
            "help": "Draft with the 'student' sampling settings (paper) or the 'teacher' ones (official code).",
            "choices": list(DRAFT_SAMPLING),
        },
    )
    num_draft_tokens: int = field(default=5, metadata={"help": "Student tokens drafted per teacher forward (gamma)."})
    lmbda: float = field(default=1.0, metadata={"help": "Probability a row is an SKD sample, else its dataset row."})
    beta: float = field(default=0.0, metadata={"help": "Generalized JSD interpolation; 0 = forward KL (SKD)."})
    loss_normalization: str = field(
        default="sequences",
        metadata={"help": "Per-sequence mean (SKD's Eq. 1) or per-token mean.", "choices": ["tokens", "sequences"]},
    )
    temperature: float = field(default=0.5, metadata={"help": "Student sampling temperature."})
    top_p: float = field(default=0.5, metadata={"help": "Student top-p."})
    teacher_temperature: float = field(default=0.2, metadata={"help": "Teacher replacement temperature."})
    teacher_top_p: float = field(default=0.5, metadata={"help": "Teacher replacement top-p."})
    learning_rate: float = field(default=1e-5, metadata={"help": "AdamW learning rate (official code: 1e-5)."})
    adam_epsilon: float = field(default=1e-6, metadata={"help": "AdamW epsilon (official code: 1e-6)."})

    def __post_init__(self):
        super().__post_init__()
        if self.acceptance_top_k < 0:
            raise ValueError(f"acceptance_top_k must be >= 0, got {self.acceptance_top_k}.")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}.")
        self.check_teacher_in_the_loop("SpeculativeKDTrainer")
