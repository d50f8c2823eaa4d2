"""Every private TRL / transformers / DeepSpeed / FSDP2 API trl-kd relies on, in one place.

`SEAMS` lists the private hooks the trainers override or call, with the parameters they are called with, and
`INSTANCE_ATTRIBUTES` the private attributes they read, each with what trl-kd relies on. `tests/test_compat.py`
checks every one against the installed versions, so lifting the `trl` pin starts with one failing test per changed
seam instead of a read of the whole package.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Seam:
    """A private attribute of `owner` (a dotted path) that trl-kd overrides or calls with `parameters`."""

    owner: str
    name: str
    parameters: tuple[str, ...]
    relies_on: str


SEAMS = (
    Seam(
        "trl.DistillationTrainer",
        "_generate_single_turn",
        ("prompt_ids", "images", "multimodal_fields"),
        "called once per generation batch with the prompt ids; returns one completion id list per prompt. "
        "Overridden: who writes each completion (KDTrainer.rollout).",
    ),
    Seam(
        "trl.DistillationTrainer",
        "_generate_and_score_completions",
        ("inputs",),
        "receives the batch rows (with `completion`) before `_generate_single_turn` runs and returns the padded "
        "`prompt_ids/prompt_mask/completion_ids/completion_mask` dict the loss reads.",
    ),
    Seam(
        "trl.DistillationTrainer",
        "_compute_loss",
        ("unwrapped_student", "inputs", "num_items_in_batch"),
        "the loss of one micro-batch, returning `(loss, entropy_sum, num_tokens)`; called inside "
        "`_forward_redirection` so ZeRO-3 gathers apply. Overridden: KDTrainer.distillation_loss.",
    ),
    Seam(
        "trl.DistillationTrainer",
        "_tokenize_prompts",
        ("prompts",),
        "tokenizes prompt rows (chat template applied) as TRL does for training; `[0]` is the list of id lists. "
        "Used by the prompt-length check so it counts what training will see.",
    ),
    Seam(
        "transformers.Trainer",
        "_get_grad_norm",
        ("model", "grad_norm"),
        "returns the gradient norm after clipping is computed; overridden to refuse a non-finite one.",
    ),
    Seam(
        "transformers.Trainer",
        "_save_checkpoint",
        ("model", "trial"),
        "writes one checkpoint folder, `trainer_state.json` last; overridden to write the method state first.",
    ),
    Seam(
        "transformers.Trainer",
        "_load_optimizer_and_scheduler",
        ("checkpoint",),
        "called on resume with the checkpoint folder; overridden to restore the method state.",
    ),
    Seam(
        "transformers.Trainer",
        "_get_output_dir",
        ("trial",),
        "the run's output folder, where checkpoint folders are written.",
    ),
    Seam(
        "transformers.Trainer",
        "_set_signature_columns_if_needed",
        (),
        "sets `self._signature_columns`, the dataset columns kept; overridden to keep `prompt` and `completion`.",
    ),
    Seam(
        "trl.kernels.chunked_logprob",
        "_use_triton",
        ("device",),
        "whether TRL's fused chunked JSD kernel can run on `device` (Triton on CUDA).",
    ),
    Seam(
        "transformers.integrations.deepspeed",
        "_hf_deepspeed_config_weak_ref",
        (),
        "a module-level weak reference to the active `HfDeepSpeedConfig`, so ZeRO-3's `zero.Init` can be switched "
        "off while a replicated teacher loads, and back on after.",
    ),
    Seam(
        "torch.distributed.fsdp.FSDPModule",
        "_get_fsdp_state",
        (),
        "an FSDP2 unit's state: its `_lazy_init()` and its `_fsdp_param_groups`, whose `post_forward_mesh_info` is "
        "`None` when the unit keeps its parameters gathered after forward (`fsdp2_lazy_init`, "
        "`fsdp2_reshards_after_forward`).",
    ),
    Seam(
        "torch.distributed.fsdp._fully_shard._fsdp_state.FSDPState",
        "_lazy_init",
        (),
        "makes the state the root of its FSDP2 tree (FSDP2 otherwise picks the first unit to run forward).",
    ),
    Seam(
        "transformers.distributed.fsdp",
        "is_fsdp_managed_module",
        ("module",),
        "true for a module with `_is_fsdp_managed_module = True`; `generate` then defaults to `synced_gpus`. trl-kd "
        "sets the flag on accelerate's FSDP2 models.",
    ),
)


# instance attributes of TRL's trainer (set in its `__init__`) that trl-kd reads, and what it relies on
INSTANCE_ATTRIBUTES = {
    "_forward_redirection": "`self._forward_redirection(wrapper, unwrapped, method, *args)` runs `method` through a "
    "DeepSpeed/FSDP wrapper's forward so its parameters are gathered (the teacher's hidden states).",
    "_metrics": "`self._metrics[mode][key]` is a list of floats TRL averages and logs at each logging step.",
    "_tokenizer": "the text tokenizer behind `processing_class` (a processor's `.tokenizer`).",
    "_signature_columns": "the dataset columns the data collator keeps.",
}


def resolve(path: str):
    """The object a dotted path names, e.g. `"trl.DistillationTrainer"`."""
    import importlib

    module, _, attribute = path.rpartition(".")
    try:
        return importlib.import_module(path)
    except ModuleNotFoundError:
        return getattr(importlib.import_module(module), attribute)


# --------------------------------------------------------------------------------------------------- transformers
@functools.lru_cache(maxsize=None)
def _forward_cache_argument(forward_owner: type) -> str:
    parameters = inspect.signature(forward_owner.forward).parameters  # follows `deprecate_kwarg`'s __wrapped__
    return "cache" if "cache" in parameters else "past_key_values"


def cache_argument(model: torch.nn.Module) -> str:
    """The keyword a model's `forward` takes its KV cache by: `cache` from transformers 5.24 on (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` before. PEFT wrappers are looked
    through to the model they wrap."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return _forward_cache_argument(type(model))


def checkpointing_field() -> str:
    """The `TrainingArguments` field of activation (gradient) checkpointing: `activation_checkpointing` from
    transformers 5.24 on, where `gradient_checkpointing` is its deprecated alias, else `gradient_checkpointing`."""
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    return "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"


# ------------------------------------------------------------------------------------------------------ DeepSpeed
@contextlib.contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Load models whole under a ZeRO-3 launch: transformers' global `HfDeepSpeedConfig` reference is unset for the
    duration (so `from_pretrained` skips `zero.Init`) and restored after."""
    from transformers.integrations import deepspeed as hf_deepspeed

    reference = hf_deepspeed._hf_deepspeed_config_weak_ref
    config = reference() if reference is not None else None
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if config is not None:
            hf_deepspeed.set_hf_deepspeed_config(config)


# ---------------------------------------------------------------------------------------------------------- FSDP2
def fsdp2_lazy_init(root: torch.nn.Module) -> None:
    """Make `root` the root of its FSDP2 tree now. FSDP2 picks the root as the first unit whose forward runs, and the
    samplers and PromptKD call a model's backbone or embeddings directly, never the root."""
    state = root._get_fsdp_state()
    state._lazy_init()


def fsdp2_reshards_after_forward(unit: torch.nn.Module) -> bool:
    """Whether an FSDP2 unit frees its gathered parameters after each forward (there is no public getter)."""
    groups = unit._get_fsdp_state()._fsdp_param_groups
    return any(group.post_forward_mesh_info is not None for group in groups)


# ------------------------------------------------------------------------------------------------------------ TRL
def trl_triton_available(device: torch.device) -> bool:
    """Whether TRL's fused chunked-divergence kernel runs on `device`."""
    from trl.kernels.chunked_logprob import _use_triton

    return _use_triton(device)


# transformers 5.24 renamed gradient checkpointing to activation checkpointing; TRL 1.16's
# `unwrap_model_for_generation` still toggles it under the old names, so every generation warned three times about
# a call the user never made and cannot change.
CHECKPOINTING_ALIAS_WARNING = r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated"


@contextlib.contextmanager
def quiet_checkpointing_aliases() -> Iterator[None]:
    """Silence exactly transformers' FutureWarnings about the gradient-checkpointing aliases TRL calls while it
    generates; every other warning passes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=CHECKPOINTING_ALIAS_WARNING, category=FutureWarning)
        yield


class HandOver(dict):
    """Values a hook leaves for a hook TRL calls inside it, which TRL passes no argument for (the batch rows to
    `_generate_single_turn`, the teacher mask back from it; the loss sums from `_compute_loss`)."""

    @contextlib.contextmanager
    def scope(self, **values) -> Iterator[HandOver]:
        """Set `values` on entry; whatever was added inside (by the inner hook too) is removed when the outer hook
        returns, even on an error, so nothing reaches another step."""
        before = set(self)
        self.update(values)
        try:
            yield self
        finally:
            for key in set(self) - before:
                del self[key]
