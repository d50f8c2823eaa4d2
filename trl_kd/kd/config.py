from __future__ import annotations

from dataclasses import dataclass, field

from trl import DistillationConfig

from .._compat import checkpointing_field
from ..guards import check_choices, check_finite_fields
from ..losses import LOSS_TYPES
from ..sampler import DRAFT_SCHEDULES


LOSS_NORMALIZATIONS = ("tokens", "sequences")


@dataclass
class KDConfig(DistillationConfig):
    r"""Configuration for [`KDTrainer`][trl_kd.KDTrainer]: generalized knowledge distillation (GKD, arXiv 2306.13649).

    Everything of `trl.DistillationConfig` applies (generation settings, `max_completion_length`, `beta`, vLLM,
    teacher loading); this class adds what GKD has beyond on-policy distillation, and the package's divergences.
    TRL's `temperature` (default `1.0`, GKD samples at 1), `top_p` and `top_k` are the student's sampling settings
    only; the teacher's are `teacher_temperature`, `teacher_top_p` and `teacher_top_k`, which never follow the
    student's.

    Parameters:
        lmbda (float):
            Per-row probability that a row is trained on a completion sampled from the student (on-policy) rather
            than its dataset completion (GKD's λ). `0.0` is supervised KD, `1.0` on-policy KD. Rows without a
            `completion` are always sampled from the student.
        seq_kd (bool):
            Off-policy rows use a completion sampled from the teacher instead of the dataset's (sequence-level KD).
        loss_type (str):
            Token-level divergence: `"jsd"` (generalized JSD, uses `beta`: `0` = forward KL, `1` = reverse KL),
            `"skew_fkl"` / `"skew_rkl"` (DistiLLM's skew KLs, use `skew_alpha`) or `"tvd"` (total variation).
        beta (float):
            Interpolation of the generalized JSD, TRL's convention: `0.0` is exactly `KL(teacher || student)`, `1.0`
            exactly `KL(student || teacher)`. (GKD's default; `trl.DistillationConfig` defaults to `1.0`.)
        skew_alpha (float):
            Skew of `skew_fkl`/`skew_rkl`, in `(0, 1)`.
        loss_temperature (float):
            Softmax temperature applied to both models' logits inside the loss. Kept apart from the sampling
            `temperature` (TRL's `DistillationTrainer` uses one value for both): methods such as SKD sample at 0.5
            but distil the untempered distributions.
        loss_chunk_size (int | None):
            Tokens projected to vocabulary logits at once by the losses that don't run on TRL's kernel. `None` picks
            a tile of about 64 MiB (e.g. 512 tokens at a 32k vocabulary).
        loss_gradient_in_forward (bool):
            Take the chunked loss's gradient tile by tile while computing it, so the backward pass does not project
            every token through both LM heads a second time (as activation checkpointing of the tiles would): the
            same loss and gradients, one student-head-sized gradient held from the loss to its backward. `False`
            recomputes instead. Not used where TRL's kernel runs or the student's head is ZeRO-3-partitioned.
        max_prompt_length (int | None):
            Longest prompt accepted, in tokens; a longer prompt is an error when the trainer is built. `None` uses the
            student's context length minus `max_completion_length`.
        loss_normalization (str):
            How token divergences are averaged. `"tokens"`: over every response token of the global batch (GKD and
            TRL). `"sequences"`: each sequence's mean over its own response tokens, then the mean over the sequences
            of the global batch (SKD's Eq. 1 and its official code), so short and long responses weigh the same. Both
            are invariant to micro-batch size, gradient accumulation and the number of processes.
        stop_strings (list[str] | None):
            Generated completions (student, teacher or both) end after the token that completes the first occurrence
            of any of these strings, which may span several tokens (e.g. `["\\n\\n"]`, as the official SKD code
            cuts GSM8K answers); tokens after it are neither generated nor trained on. Dataset completions are not
            cut. `None` stops at EOS and `max_completion_length` only.
        teacher_temperature (float):
            Sampling temperature of the teacher wherever it writes tokens (`seq_kd`, SKD and SWITCH replacements).
        teacher_top_p (float):
            Nucleus of the teacher's sampling.
        teacher_top_k (int):
            Top-k of the teacher's sampling; `0` disables it.
        teacher_zero_stage (int | None):
            DeepSpeed placement of the teacher, independent of the student's stage: `3` shards it across processes
            (e.g. a big teacher beside a ZeRO-2 student), `0` replicates it on every process. `None` follows TRL:
            sharded when the student runs ZeRO-3, replicated otherwise. Needs a DeepSpeed launch.
        teacher_offload (bool):
            Keep the sharded teacher's parameters in CPU memory between uses (ZeRO-3 parameter offload, or FSDP2's
            `CPUOffloadPolicy`). Needs a sharded teacher: at stage 3 (`teacher_zero_stage=3`, or a ZeRO-3 student)
            under DeepSpeed, not `teacher_fsdp=False` under FSDP2.
        teacher_fsdp (bool | None):
            FSDP2 placement of the teacher: `True` or `None` (the default) shard it across processes like the
            student, every unit resharded after its forward; `False` replicates it on every process (TRL's
            placement under FSDP; for a teacher small enough that gathering it costs more than it saves). Needs an
            FSDP2 launch (`--accelerate_config fsdp2`); FSDP1 is refused.
        check_teacher_tokenizer (bool):
            When the trainer is built, compare the teacher's tokenizer (passed as `teacher_processing_class`, or
            loaded from the teacher's path) with the student's: a probe text must encode to the same ids and every
            special token of the student's must have the same id, or the trainer refuses the pair, since the teacher's
            distributions would be over other tokens. `False` skips it, for tokenizers that differ on purpose but
            assign the same ids.
        teacher_cache (str | None):
            A folder written by `trl-kd cache-teacher` (the "Offline teacher" guide): the teacher's top-k
            log-probabilities for every completion of the training dataset. Rows trained on their dataset completion
            (or, for a cache of teacher samples, on the cached sample) read the teacher from it, with the sparse
            top-k losses, instead of running it; with `lmbda=0` no teacher is loaded at all. The cache's tokenizer,
            temperature (`loss_temperature`) and dataset must match the run's.
        cross_tokenizer (bool):
            The teacher has another tokenizer (another model family): each row is re-tokenized for the teacher (its
            chat template for conversations), the two token sequences are aligned by the characters they cover, and
            the loss compares the two models over the aligned spans (TRL's GOLD combination: `loss_type` over the
            shared vocabulary, ULD over the rest; see the "Cross-tokenizer" guide). The teacher's tokenizer is
            `teacher_processing_class`, else the one saved with the teacher. `KDTrainer` only, with dataset rows,
            student samples and teacher samples (`seq_kd`: the teacher samples from its own prompt and its text is
            re-tokenized for the student); not with a `teacher_cache` or `loss_normalization="sequences"`.
        cross_tokenizer_matched_weight (float | None):
            Weight of the divergence over the shared vocabulary. `None` (with `cross_tokenizer_unmatched_weight`
            `None`): GOLD's adaptive weights, the shared part's share of the teacher's vocabulary, and the rest for
            ULD.
        cross_tokenizer_unmatched_weight (float | None):
            Weight of ULD over the tokens outside the shared vocabulary (set both weights, or neither).
        cross_tokenizer_span_weight (float):
            Weight of the span term `0.5 * (log p_student(span) - log p_teacher(span))^2`; `0` (GOLD) leaves it out.
        reuse_teacher_states (bool):
            Rows sampled with the teacher in the loop (SKD, SWITCH) keep the teacher's final hidden states from the
            sampler, and the loss projects those instead of running the teacher over the sequence again. Same loss
            (the states differ only by floating-point order, KV cache against full forward); `False` recomputes
            them. Other rows always get a teacher forward.
        adaptive_draft (bool):
            The teacher-in-the-loop sampler's draft length adapts per round, starting at `num_draft_tokens`, by
            `draft_schedule`, up to `max_draft_tokens`. Speed only: the sequences' distribution does not change.
            `False` keeps `num_draft_tokens`.
        max_draft_tokens (int):
            Ceiling of the adaptive draft length.
        draft_schedule (str):
            How `adaptive_draft` chooses each round's length. `"heuristic"`: `+2` when more than half of the batch's
            rows kept the whole block, `-1` otherwise (`transformers`' assisted-generation heuristic, which is this
            rule at one row). `"expected_cost"`: the length that finishes the batch at the lowest expected cost, from
            each row's acceptance so far and remaining budget, a student forward costing the student's parameter
            count over the teacher's (the batch waits for its slowest row, so that row's acceptance sets the length;
            faster when such a row also runs to the length limit, no faster when it stops early). Speed only.
        gradient_checkpointing (bool | None):
            The deprecated alias (transformers >= 5.24) of `activation_checkpointing`. TRL's default, on, is set on
            `activation_checkpointing` when neither is given, so a default config raises no deprecation warning;
            passing this name still works, with transformers' warning.
    """

    cross_tokenizer_refusal = None  # why a method cannot distil across tokenizers

    _VALID_DICT_FIELDS = DistillationConfig._VALID_DICT_FIELDS
    # float fields where +inf means something ("never clip"); every other float must be finite
    _INF_ALLOWED = ("max_grad_norm",)

    # TRL's default (on) is set on the field transformers >= 5.24 reads, `activation_checkpointing`, so a default
    # config prints no deprecation warning; passing the old name still works (with transformers' warning)
    gradient_checkpointing: bool | None = field(
        default=None,
        metadata={"help": "Deprecated alias of `activation_checkpointing` (transformers >= 5.24); default on."},
    )
    lmbda: float = field(
        default=0.5,
        metadata={"help": "Probability that a row is trained on a student sample instead of its dataset completion."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Use teacher samples instead of dataset completions for the off-policy rows."},
    )
    loss_type: str = field(
        default="jsd",
        metadata={
            "help": "Divergence: 'jsd' (uses beta), 'skew_fkl', 'skew_rkl' (use skew_alpha) or 'tvd'.",
            "choices": list(LOSS_TYPES),
        },
    )
    beta: float = field(
        default=0.5,
        metadata={"help": "Generalized JSD interpolation: 0 = forward KL(teacher||student), 1 = reverse KL."},
    )
    skew_alpha: float = field(default=0.1, metadata={"help": "Skew of the skew KL losses, in (0, 1)."})
    loss_temperature: float = field(
        default=1.0, metadata={"help": "Softmax temperature of both models inside the loss."}
    )
    loss_chunk_size: int | None = field(
        default=None, metadata={"help": "Tokens per logits tile in the chunked loss; None = about 64 MiB tiles."}
    )
    loss_gradient_in_forward: bool = field(
        default=True,
        metadata={"help": "Take the chunked loss's gradient in its forward pass instead of recomputing the tiles."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={"help": "Longest prompt in tokens; None = context length minus max_completion_length."},
    )
    loss_normalization: str = field(
        default="tokens",
        metadata={
            "help": "Average the divergence over the batch's 'tokens' or per sequence ('sequences').",
            "choices": list(LOSS_NORMALIZATIONS),
        },
    )
    stop_strings: list[str] | None = field(
        default=None, metadata={"help": "Generated completions end after the first occurrence of any of these."}
    )
    teacher_temperature: float = field(default=1.0, metadata={"help": "Teacher sampling temperature."})
    teacher_top_p: float = field(default=1.0, metadata={"help": "Teacher top-p."})
    teacher_top_k: int = field(default=0, metadata={"help": "Teacher top-k (0 = off)."})
    teacher_zero_stage: int | None = field(
        default=None,
        metadata={"help": "DeepSpeed stage of the teacher: 3 = sharded, 0 = replicated, None = TRL's default."},
    )
    teacher_offload: bool = field(
        default=False, metadata={"help": "Offload the sharded (ZeRO-3 or FSDP2) teacher's parameters to CPU memory."}
    )
    teacher_fsdp: bool | None = field(
        default=None,
        metadata={"help": "FSDP2 placement of the teacher: True/None = sharded like the student, False = replicated."},
    )
    check_teacher_tokenizer: bool = field(
        default=True,
        metadata={"help": "Refuse a teacher whose tokenizer encodes a probe text or the special tokens differently."},
    )
    teacher_cache: str | None = field(
        default=None,
        metadata={
            "help": "Folder of an offline teacher cache (trl-kd cache-teacher) for the dataset-completion rows."
        },
    )
    cross_tokenizer: bool = field(
        default=False,
        metadata={"help": "The teacher has another tokenizer: align by characters, GOLD's cross-tokenizer loss."},
    )
    cross_tokenizer_matched_weight: float | None = field(
        default=None, metadata={"help": "Weight of the shared-vocabulary divergence (None: GOLD's adaptive weights)."}
    )
    cross_tokenizer_unmatched_weight: float | None = field(
        default=None, metadata={"help": "Weight of ULD over the rest of the vocabularies (None: GOLD's adaptive)."}
    )
    cross_tokenizer_span_weight: float = field(
        default=0.0, metadata={"help": "Weight of the span log-probability term (0: off, as in GOLD)."}
    )
    reuse_teacher_states: bool = field(
        default=True,
        metadata={"help": "The loss reuses the teacher states the teacher-in-the-loop sampler computed."},
    )
    adaptive_draft: bool = field(
        default=True,
        metadata={"help": "Adapt the sampler's draft length to the acceptance (from num_draft_tokens)."},
    )
    max_draft_tokens: int = field(default=16, metadata={"help": "Ceiling of the adaptive draft length."})
    draft_schedule: str = field(
        default="heuristic",
        metadata={
            "help": "How the adaptive draft length is chosen: transformers' +2/-1 heuristic (heuristic) or the "
            "lowest expected cost for the batch's slowest row (expected_cost).",
            "choices": list(DRAFT_SCHEDULES),
        },
    )

    def __post_init__(self):
        # first: NaN slips through comparisons such as `loss_temperature <= 0`
        check_finite_fields(self, self._INF_ALLOWED)
        check_choices(self)  # every subclass's fields too: one place for all `choices`
        checkpointing = checkpointing_field()
        if self.gradient_checkpointing is None and getattr(self, checkpointing) is None:
            setattr(self, checkpointing, True)
        super().__post_init__()
        if not 0.0 <= self.lmbda <= 1.0:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}.")
        if not 0.0 < self.skew_alpha < 1.0:
            raise ValueError(f"skew_alpha must be in (0, 1), got {self.skew_alpha}.")
        if self.loss_temperature <= 0:
            raise ValueError(f"loss_temperature must be > 0, got {self.loss_temperature}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (sampling temperature), got {self.temperature}.")
        if self.loss_chunk_size is not None and self.loss_chunk_size < 1:
            raise ValueError(
                f"loss_chunk_size must be a positive number of tokens or None, got {self.loss_chunk_size}."
            )
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be a positive integer, got {self.max_completion_length}.")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be positive or None, got {self.max_prompt_length}.")
        if not self.teacher_temperature > 0:
            raise ValueError(f"teacher_temperature must be > 0, got {self.teacher_temperature}.")
        if self.top_k is not None and self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}.")
        if self.teacher_top_k < 0:
            raise ValueError(f"teacher_top_k must be >= 0 (0 = off), got {self.teacher_top_k}.")
        if isinstance(self.stop_strings, str):
            self.stop_strings = [self.stop_strings]
        if self.stop_strings is not None and (
            not self.stop_strings or not all(isinstance(s, str) and s for s in self.stop_strings)
        ):
            raise ValueError(
                f"stop_strings must be a non-empty list of non-empty strings or None, got {self.stop_strings!r}."
            )
        if self.max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {self.max_draft_tokens}.")
        if self.teacher_zero_stage not in (None, 0, 3):
            raise ValueError(
                f"teacher_zero_stage must be 0 (replicated), 3 (sharded) or None, got {self.teacher_zero_stage}: a "
                "frozen teacher has no gradients or optimizer states for stages 1 and 2 to shard."
            )
        if self.teacher_offload and self.teacher_zero_stage == 0:
            raise ValueError(
                "teacher_offload needs a sharded teacher: set teacher_zero_stage=3 (or leave it None "
                "under a ZeRO-3 launch)."
            )
        if self.teacher_offload and self.teacher_fsdp is False:
            raise ValueError(
                "teacher_offload needs a sharded teacher, and teacher_fsdp=False replicates it: leave teacher_fsdp "
                "None (sharded under FSDP2) or unset teacher_offload."
            )
        if self.teacher_zero_stage is not None and self.teacher_fsdp is not None:
            raise ValueError(
                "teacher_zero_stage (DeepSpeed) and teacher_fsdp (FSDP2) place the teacher under different backends: "
                "set the one your accelerate config launches."
            )
        self._check_cross_tokenizer()
        for name in ("top_p", "teacher_top_p"):
            value = getattr(self, name)
            if value is None or not 0.0 < value <= 1.0:
                raise ValueError(f"{name} must be in (0, 1], got {value}.")

    def _check_cross_tokenizer(self) -> None:
        weights = (self.cross_tokenizer_matched_weight, self.cross_tokenizer_unmatched_weight)
        if (weights[0] is None) != (weights[1] is None):
            raise ValueError(
                "Set both cross_tokenizer_matched_weight and cross_tokenizer_unmatched_weight, or neither (GOLD's "
                f"adaptive weights); got {weights}."
            )
        if any(w is not None and w < 0 for w in weights) or self.cross_tokenizer_span_weight < 0:
            raise ValueError("The cross_tokenizer_*_weight fields must be >= 0.")
        if not self.cross_tokenizer:
            return
        if self.cross_tokenizer_refusal:
            method = type(self).__name__.removesuffix("Config")
            raise ValueError(f"{method} does not support cross_tokenizer=True: {self.cross_tokenizer_refusal}")
        conflicts = {
            "teacher_cache": self.teacher_cache is not None,
            'loss_normalization="sequences"': self.loss_normalization == "sequences",
        }
        bad = [name for name, is_set in conflicts.items() if is_set]
        if bad:
            raise ValueError(
                f"cross_tokenizer=True does not support {', '.join(f'`{b}`' for b in bad)} yet: a teacher cache is "
                "over the teacher's tokens, and spans are weighed per token. Unset them."
            )

    def check_teacher_in_the_loop(self, method: str) -> None:
        """Refuse generation settings that token-by-token teacher-in-the-loop sampling (SKD, SWITCH) cannot honour."""
        unsupported = {
            "use_vllm": self.use_vllm,
            "min_p": self.min_p is not None,
            "repetition_penalty": self.repetition_penalty != 1.0,
            "generation_kwargs": bool(self.generation_kwargs),
        }
        bad = [name for name, is_set in unsupported.items() if is_set]
        if bad:
            raise ValueError(
                f"{method} samples with trl-kd's teacher-in-the-loop sampler, which supports `temperature`, `top_p`, "
                f"`top_k`, `stop_strings` and the `teacher_*` sampling fields only; unset "
                f"{', '.join(f'`{b}`' for b in bad)}."
            )
