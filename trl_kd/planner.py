"""Pre-flight memory estimate: will this teacher/student pair fit, and under which placement?

A first-order model of per-GPU memory for each placement trl-kd supports (DDP, ZeRO-2, ZeRO-2 with a sharded
teacher, ZeRO-3, ZeRO-3 with CPU offload, and FSDP2 with the teacher sharded or replicated): weights, gradients and
AdamW states of the student, the teacher's weights, the KV caches of both models while sampling, the student's
activations, and the chunked loss. It is meant to pick a config before launching, not to replace a measurement: it
ignores fragmentation and allocator caches (a fixed
`overhead_gib` stands for them and the CUDA context).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig


GIB = 2**30
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelSpec:
    """The shapes the estimate needs. Build with [`ModelSpec.from_config`][trl_kd.planner.ModelSpec.from_config] or
    [`ModelSpec.from_pretrained`][trl_kd.planner.ModelSpec.from_pretrained]."""

    name: str
    num_params: int
    num_layers: int
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    largest_layer_params: int

    @classmethod
    def from_config(cls, config: PretrainedConfig, name: str | None = None) -> ModelSpec:
        """Count parameters exactly by building the model on the meta device (no memory, no download)."""
        text = config.get_text_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        num_params = sum(p.numel() for p in model.parameters())
        blocks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList)]
        per_block = max((sum(p.numel() for p in b[0].parameters()) for b in blocks if len(b)), default=0)
        embedding = model.get_input_embeddings().weight.numel()
        heads = text.num_attention_heads
        return cls(
            name=name or getattr(config, "_name_or_path", "") or text.model_type,
            num_params=num_params,
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            vocab_size=text.vocab_size,
            largest_layer_params=max(per_block, embedding),
        )

    @classmethod
    def from_pretrained(cls, name_or_path: str, **kwargs) -> ModelSpec:
        """From a Hub id or a local folder: only `config.json` is read."""
        return cls.from_config(AutoConfig.from_pretrained(name_or_path, **kwargs), name=name_or_path)


@dataclass(frozen=True)
class Placement:
    """One way to lay a teacher and a student out on the GPUs (see `PLACEMENTS`).

    Attributes:
        name: shown in the plan's table.
        config: the `trl-kd <method>` flags that run it (a shipped accelerate config, and trl-kd fields).
        student_stage: the student's ZeRO stage; 0 is DDP.
        teacher_sharded: the teacher is partitioned across GPUs (ZeRO-3) instead of replicated.
        offload: parameters and optimizer states live in CPU memory between uses.
        fsdp: sharded by FSDP2 (`student_stage` 3: weights, gradients and optimizer states), whose trainable weights
            stay in fp32 under bf16 mixed precision (accelerate upcasts them; there is no separate master copy).
    """

    name: str
    config: str
    student_stage: int  # 0 = DDP
    teacher_sharded: bool
    offload: bool = False
    fsdp: bool = False

    @property
    def backend(self) -> str:
        """`"ddp"`, `"deepspeed"` or `"fsdp2"`."""
        return "fsdp2" if self.fsdp else "deepspeed" if self.student_stage else "ddp"


# in order of speed within each backend; DDP, then DeepSpeed's, then FSDP2's
PLACEMENTS = (
    Placement("DDP (everything replicated)", "--accelerate_config ddp", 0, False),
    Placement("ZeRO-2", "--accelerate_config zero2", 2, False),
    Placement("ZeRO-2 + sharded teacher", "--accelerate_config zero2 --teacher_zero_stage 3", 2, True),
    Placement("ZeRO-3", "--accelerate_config zero3", 3, True),
    Placement("ZeRO-3 + CPU offload", "--accelerate_config zero3_offload", 3, True, offload=True),
    Placement("FSDP2 + replicated teacher", "--accelerate_config fsdp2 --teacher_fsdp false", 3, False, fsdp=True),
    Placement("FSDP2", "--accelerate_config fsdp2", 3, True, fsdp=True),
)
BACKENDS = ("deepspeed", "fsdp2")


@dataclass
class PlacementEstimate:
    """The per-GPU memory estimate of one placement, in GiB.

    Attributes:
        placement: the placement estimated.
        parts_gib: each component: student and teacher weights, student gradients, optimizer states, activations +
            loss, KV caches.
        train_peak_gib: peak of the training step (forward and backward of the loss).
        sampling_peak_gib: peak while sampling the completions (generation, teacher in the loop).
    """

    placement: Placement
    parts_gib: dict[str, float] = field(default_factory=dict)
    train_peak_gib: float = 0.0
    sampling_peak_gib: float = 0.0

    @property
    def peak_gib(self) -> float:
        return max(self.train_peak_gib, self.sampling_peak_gib)


@dataclass
class Plan:
    """The result of `plan()`: every placement's estimate, fastest first, and the one to use.

    Attributes:
        estimates: one per placement of `PLACEMENTS` (of the chosen backends), in that order.
        gpu_memory_gib: the memory of one GPU.
        headroom: the fraction of it a placement may use to count as fitting.
    """

    estimates: list[PlacementEstimate]
    gpu_memory_gib: float
    headroom: float

    @property
    def recommended(self) -> PlacementEstimate | None:
        """The first (fastest) placement whose peak fits in `headroom` of the GPU's memory."""
        return next((e for e in self.estimates if e.peak_gib <= self.headroom * self.gpu_memory_gib), None)

    def table(self) -> str:
        """A markdown table of the estimates and the recommendation (what `trl-kd plan` prints)."""
        keys = list(self.estimates[0].parts_gib)
        lines = [
            "| placement | " + " | ".join(keys) + " | train peak | sampling peak | fits |",
            "| --- | " + " | ".join("---" for _ in keys) + " | --- | --- | --- |",
        ]
        budget = self.headroom * self.gpu_memory_gib
        for e in self.estimates:
            cells = " | ".join(f"{e.parts_gib[k]:.1f}" for k in keys)
            fits = "yes" if e.peak_gib <= budget else "no"
            peaks = f"{e.train_peak_gib:.1f} | {e.sampling_peak_gib:.1f}"
            lines.append(f"| {e.placement.name} | {cells} | {peaks} | {fits} |")
        best = self.recommended
        lines.append("")
        lines.append(
            f"Recommended: {best.placement.name} ({best.placement.config})."
            if best
            else f"Nothing fits in {budget:.0f} GiB per GPU: use more GPUs, LoRA, a shorter completion or a smaller "
            "batch."
        )
        return "\n".join(lines)


def plan(
    student: ModelSpec,
    teacher: ModelSpec,
    num_gpus: int,
    gpu_memory_gib: float,
    dtype: str = "bf16",
    batch_size: int = 4,
    prompt_length: int = 512,
    completion_length: int = 512,
    gradient_checkpointing: bool = True,
    lora: bool = False,
    gather_for_generation: bool = True,
    loss_tile_mib: float = 64.0,
    overhead_gib: float = 1.5,
    headroom: float = 0.9,
    backends: tuple[str, ...] = BACKENDS,
) -> Plan:
    """Estimate the per-GPU memory (GiB) of every placement, in order of speed.

    Args:
        backends: the sharding backends to plan for, of `"deepspeed"` and `"fsdp2"` (DDP is always planned).
        batch_size: sequences per GPU per micro-batch (`per_device_train_batch_size`).
        gradient_checkpointing: the student recomputes activations (one hidden state per layer is kept).
        lora: the student's base weights are frozen; gradients and optimizer states are about 1% of its parameters.
        gather_for_generation: `ds3_gather_for_generation` (default on): under ZeRO-3 both models are gathered whole
            while sampling, so the sampling peak holds both full models; off, only the largest layer.
        headroom: the fraction of GPU memory a placement may use to count as fitting.
    """
    if num_gpus < 1 or not (math.isfinite(gpu_memory_gib) and gpu_memory_gib > 0):
        raise ValueError(
            f"num_gpus must be >= 1 and gpu_memory_gib a finite number > 0, got {num_gpus} and {gpu_memory_gib}."
        )
    if min(batch_size, prompt_length, completion_length) < 1:
        raise ValueError("batch_size, prompt_length and completion_length must be >= 1.")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPE_BYTES)}, got {dtype!r}.")
    if not backends or not set(backends) <= set(BACKENDS):
        raise ValueError(f"backends must be some of {BACKENDS}, got {backends!r}.")
    b = _DTYPE_BYTES[dtype]
    n = num_gpus
    seq = prompt_length + completion_length
    trainable = student.num_params // 100 if lora else student.num_params
    # AdamW with mixed precision: fp32 master weights + two fp32 moments (12 bytes); in fp32, the moments only (8)
    optimizer_bytes = 12 if b == 2 else 8

    def kv_cache(m: ModelSpec) -> float:
        return 2 * m.num_layers * m.num_kv_heads * m.head_dim * seq * batch_size * b

    if gradient_checkpointing:
        activations = (
            student.num_layers * seq * batch_size * student.hidden_size * b
            + 34 * seq * batch_size * student.hidden_size
        )
    else:  # about 34 bytes per token and hidden unit per layer with flash attention (Korthikanti et al., 2022)
        activations = 34 * student.num_layers * seq * batch_size * student.hidden_size
    teacher_hidden = seq * batch_size * teacher.hidden_size * b
    loss = 4 * loss_tile_mib * 2**20  # logits, probabilities and gradients of one tile per model

    estimates = []
    for p in PLACEMENTS:
        if p.backend != "ddp" and p.backend not in backends:
            continue
        if n == 1 and p.student_stage == 0:  # one process: nothing to replicate
            p = Placement("Single GPU (one process)", "python examples/<method>.py, no accelerate config", 0, False)
        shard_student = n if p.student_stage == 3 else 1
        shard_states = n if p.student_stage >= 2 else 1
        shard_teacher = n if p.teacher_sharded else 1
        weights = student.num_params * b
        grads, optimizer = trainable * b, trainable * optimizer_bytes
        if p.fsdp and b == 2:  # trainable weights (and so their gradients) in fp32; the moments only in the optimizer
            weights += trainable * (4 - b)
            grads, optimizer = trainable * 4, trainable * 8
        parts = {
            "student weights": 0.0 if p.offload else weights / shard_student,
            "student grads": grads / shard_states,
            "optimizer": 0.0 if p.offload else optimizer / shard_states,
            "teacher weights": 0.0 if p.offload else teacher.num_params * b / shard_teacher,
            "activations + loss": activations + teacher_hidden + loss,
            "KV caches": kv_cache(student) + kv_cache(teacher),
        }
        static = parts["student weights"] + parts["teacher weights"] + parts["optimizer"]
        # layers gathered on the fly by ZeRO-3 (the largest of each sharded model)
        working = (student.largest_layer_params * b if shard_student > 1 or p.offload else 0) + (
            teacher.largest_layer_params * b if shard_teacher > 1 or p.offload else 0
        )
        train = static + parts["student grads"] + parts["activations + loss"] + working
        if gather_for_generation and p.student_stage == 3 and p.fsdp:
            # FSDP2 gathers a full copy in the compute dtype beside each process's shard
            gathered = student.num_params * b + (teacher.num_params * b if p.teacher_sharded else 0)
        elif gather_for_generation and p.student_stage == 3:
            gathered = student.num_params * b - parts["student weights"]
            gathered += teacher.num_params * b - parts["teacher weights"]
        else:
            gathered = working
        sampling = static + parts["student grads"] + parts["KV caches"] + gathered
        estimates.append(
            PlacementEstimate(
                p,
                {k: v / GIB for k, v in parts.items()},
                train / GIB + overhead_gib,
                sampling / GIB + overhead_gib,
            )
        )
    return Plan(estimates, gpu_memory_gib, headroom)
