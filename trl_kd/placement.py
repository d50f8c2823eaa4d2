"""Where the teacher lives: loaded once, frozen, and placed beside the student (replicated, or sharded and offloaded
with DeepSpeed ZeRO-3 or FSDP2), next to the planner that estimates each placement's memory (`trl_kd.planner`).
Also the FSDP2 counterpart of ZeRO-3's gather for generation (`fsdp2_gathered`), and the two small collectives the
trainers decide with (`any_process`, `smallest_over_processes`)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models import prepare_deepspeed, unwrap_model_for_generation
from trl.trainer.utils import create_model_from_path

from ._compat import fsdp2_lazy_init, fsdp2_reshards_after_forward, zero3_init_disabled


if TYPE_CHECKING:
    from .kd.config import KDConfig


def any_process(accelerator: Accelerator, flag: bool) -> bool:
    """`flag` on any process; with several processes a collective, so every process must call it."""
    if accelerator.num_processes == 1:
        return flag
    return bool(accelerator.gather(torch.tensor([flag], device=accelerator.device)).any())


def smallest_over_processes(accelerator: Accelerator, value: int) -> int:
    """The smallest `value` over all processes (a collective)."""
    return int(accelerator.gather(torch.tensor([value], device=accelerator.device)).min())


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 or FSDP2 partitioned `model`'s parameters (running it is then a collective)."""
    return any(hasattr(p, "ds_id") for p in model.parameters()) or bool(fsdp2_units(model))


def fsdp2_units(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The FSDP2 units (`fully_shard`ed modules) of `model`, root first; empty when it is not under FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return [module for module in model.modules() if isinstance(module, FSDPModule)]


@contextlib.contextmanager
def fsdp2_gathered(model: torch.nn.Module, gather: bool = True) -> Iterator[torch.nn.Module]:
    """Unshard every FSDP2 unit of `model` once and keep it whole for the duration, then reshard: FSDP2's counterpart
    of ZeRO-3's `GatheredParameters` for a rollout, which runs many forwards (and reads the head directly). A
    collective: every process enters it. With `gather=False` each unit is gathered in each forward by FSDP2's hooks
    instead. Either way the model is marked as transformers marks the FSDP2 models it shards itself, so its
    `generate` runs every process until all are done (`synced_gpus`). A model not under FSDP2 is yielded as is."""
    units = fsdp2_units(model)
    if units:
        fsdp2_lazy_init(units[0])  # the root first: a rollout may call the backbone, never the root's forward
        model._is_fsdp_managed_module = True  # accelerate's sharding doesn't set it
    if not units or not gather:
        yield model
        return
    reshards = [fsdp2_reshards_after_forward(unit) for unit in units]
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield model
    finally:
        for unit, reshard in zip(units, reshards):
            unit.set_reshard_after_forward(reshard, recurse=False)
            unit.reshard()


@contextlib.contextmanager
def unwrapped_for_generation(
    model: torch.nn.Module, accelerator: Accelerator, gather: bool, **kwargs
) -> Iterator[torch.nn.Module]:
    """The bare module of a wrapped `model` for a rollout's many forwards: TRL's `unwrap_model_for_generation`
    (ZeRO-3 parameters gathered when `gather`; `kwargs` go to it) and [`fsdp2_gathered`] for an FSDP2 model."""
    with (
        unwrap_model_for_generation(model, accelerator, gather_deepspeed3_params=gather, **kwargs) as unwrapped,
        fsdp2_gathered(model, gather),
    ):
        yield unwrapped


def load_teacher(name_or_path: str | PreTrainedModel, args: KDConfig) -> PreTrainedModel:
    """The teacher named by `name_or_path`, loaded with `teacher_model_init_kwargs` and `teacher_model_revision`. Under
    a ZeRO-3 launch with `teacher_zero_stage=0` it is loaded whole (not partitioned by `zero.Init`). A model already
    loaded comes back as it is, and `teacher_model_init_kwargs` is then refused (it would be silently ignored)."""
    if not isinstance(name_or_path, str):
        if args.teacher_model_init_kwargs is not None:  # TRL's error
            raise ValueError(
                "You passed teacher_model_init_kwargs to the config, but your teacher_model is already instantiated. "
                "Pass the teacher by name or path to have it loaded with these kwargs, or unset "
                "teacher_model_init_kwargs (and e.g. call `teacher.to(torch.float16)` yourself)."
            )
        return name_or_path
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ("auto", None) or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED", "FSDP"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if args.teacher_zero_stage == 0 and is_deepspeed_zero3_enabled():
        # a replicated teacher must not be created partitioned by ZeRO-3's `zero.Init`
        with zero3_init_disabled():
            return create_model_from_path(name_or_path, **kwargs)
    return create_model_from_path(name_or_path, **kwargs)


def check_distributed_backend(accelerator: Accelerator, args: KDConfig) -> None:
    """Refuse, before anything is placed or trained, what trl-kd cannot run: FSDP1, and teacher placement fields
    that the launch's backend does not read."""
    deepspeed = accelerator.state.deepspeed_plugin is not None
    fsdp = getattr(accelerator.state, "fsdp_plugin", None)
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise ValueError(
            "trl-kd runs FSDP as FSDP2 only (the samplers and the chunked loss read each model's parameters between "
            "forwards, which FSDP1's flat parameters don't allow): set `fsdp_version: 2` in the accelerate config "
            "(e.g. `trl-kd <method> --accelerate_config fsdp2`), or `fsdp_config={'version': 2}`."
        )
    if args.teacher_zero_stage is not None and not deepspeed:
        raise ValueError(
            "`teacher_zero_stage` places the teacher with DeepSpeed: launch with a DeepSpeed config (e.g. `trl-kd "
            "<method> --accelerate_config zero2 ...`)"
            + (", or use `teacher_fsdp` under FSDP2." if fsdp is not None else ", or unset it.")
        )
    if args.teacher_fsdp is not None and fsdp is None:
        raise ValueError(
            "`teacher_fsdp` places the teacher with FSDP2: launch with an FSDP2 config (e.g. `trl-kd <method> "
            "--accelerate_config fsdp2 ...`)"
            + (", or use `teacher_zero_stage` under DeepSpeed." if deepspeed else ", or unset it.")
        )
    if args.teacher_offload and not deepspeed and fsdp is None:
        raise ValueError(
            "`teacher_offload` offloads a sharded teacher (DeepSpeed ZeRO-3 or FSDP2): launch with a sharded config "
            "(e.g. `--accelerate_config zero3` or `fsdp2`) or unset it."
        )
    if args.teacher_offload and fsdp is not None and args.teacher_fsdp is False:
        raise ValueError("`teacher_offload` needs a sharded teacher: unset `teacher_fsdp=False` or `teacher_offload`.")


def prepare_teacher(teacher: PreTrainedModel, accelerator: Accelerator, args: KDConfig) -> torch.nn.Module:
    """Freeze `teacher` and place it: under DeepSpeed with `prepare_deepspeed_teacher`, under FSDP2 with
    `prepare_fsdp2_teacher` (unless `teacher_fsdp=False`), else as accelerate places an evaluation model. The
    trainer has refused placements its backend can't run (`check_distributed_backend`)."""
    teacher.requires_grad_(False)
    teacher.eval()
    if accelerator.state.deepspeed_plugin is not None:
        placed = prepare_deepspeed_teacher(teacher, accelerator, args)
    elif getattr(accelerator.state, "fsdp_plugin", None) is not None and args.teacher_fsdp is not False:
        placed = prepare_fsdp2_teacher(teacher, accelerator, args)
    else:
        placed = accelerator.prepare_model(teacher, evaluation_mode=True)
    placed.eval()
    return placed


def prepare_fsdp2_teacher(teacher: PreTrainedModel, accelerator: Accelerator, args: KDConfig) -> torch.nn.Module:
    """Shard the teacher with FSDP2 as accelerate shards the student (its plugin: wrap policy, mixed precision,
    `cpu_ram_efficient_loading`), except that every unit reshards after its forward (a frozen model has no backward
    to keep weights for), the layer classes are the teacher's own, and `teacher_offload` asks for CPU offload. TRL's
    distillation trainers leave the teacher whole on every process under FSDP."""
    from accelerate.utils.fsdp_utils import fsdp2_prepare_model
    from torch.distributed.fsdp import CPUOffloadPolicy

    plugin = accelerator.state.fsdp_plugin
    # the wrap policy is resolved against the model it wraps (and stored on the plugin): the teacher's layer classes
    # for the teacher, and the plugin left as it was for the student, which accelerate wraps when training starts
    overrides = {
        "reshard_after_forward": True,
        "transformer_cls_names_to_wrap": list(getattr(teacher, "_no_split_modules", None) or []) or None,
        "auto_wrap_policy": plugin.auto_wrap_policy,
    }
    if args.teacher_offload:
        overrides["cpu_offload"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    saved = {name: getattr(plugin, name) for name in overrides}
    for name, value in overrides.items():
        setattr(plugin, name, value)
    try:
        teacher = fsdp2_prepare_model(accelerator, teacher)
    finally:
        for name, value in saved.items():
            setattr(plugin, name, value)
    teacher.set_reshard_after_forward(True)  # accelerate keeps the embeddings-head unit whole after forward
    fsdp2_lazy_init(teacher)  # the teacher's root is its first state to run, whichever entry point runs first
    # transformers' `generate` keeps processes in step (`synced_gpus`) from the start, also before any rollout
    # (`fsdp2_gathered` marks it too), e.g. in the evaluation callback's first scoring
    teacher._is_fsdp_managed_module = True
    return teacher


def prepare_deepspeed_teacher(teacher: PreTrainedModel, accelerator: Accelerator, args: KDConfig) -> torch.nn.Module:
    """Wrap the teacher in an inference DeepSpeed engine: TRL's placement (sharded like a ZeRO-3 student, else
    replicated), or `teacher_zero_stage` / `teacher_offload` when set."""
    student_stage = accelerator.state.deepspeed_plugin.zero_stage
    if args.teacher_zero_stage is None and not args.teacher_offload:
        return prepare_deepspeed(teacher, accelerator)
    import deepspeed

    stage = args.teacher_zero_stage if args.teacher_zero_stage is not None else (3 if student_stage == 3 else 0)
    if stage == 0 and is_partitioned(teacher):
        raise ValueError(
            "teacher_zero_stage=0 asks for a replicated teacher, but the teacher passed in was created "
            "partitioned (under ZeRO-3's `zero3_init_flag`). Pass the teacher by name or path so trl-kd loads it "
            "whole, or leave teacher_zero_stage unset."
        )
    if args.teacher_offload and stage != 3:
        raise ValueError(
            f"teacher_offload needs a sharded teacher, but the student runs ZeRO-{student_stage} and "
            "teacher_zero_stage is unset: set teacher_zero_stage=3."
        )
    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    # inference only: no optimizer, scheduler or optimizer offload (as TRL's prepare_deepspeed)
    config.pop("optimizer", None)
    config.pop("scheduler", None)
    zero = config.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    zero["stage"] = stage
    if args.teacher_offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    elif stage != 3:
        zero.pop("offload_param", None)
    engine, *_ = deepspeed.initialize(model=teacher, config=config)
    engine.eval()
    return engine
