"""Where the teacher lives: loaded once, frozen, and placed beside the student (replicated, or sharded and offloaded
with DeepSpeed), next to the planner that estimates each placement's memory (`trl_kd.planner`)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from accelerate import Accelerator
from transformers import PreTrainedModel
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.models import prepare_deepspeed
from trl.trainer.utils import create_model_from_path

from ._compat import zero3_init_disabled


if TYPE_CHECKING:
    from .kd.config import KDConfig


def is_partitioned(model: torch.nn.Module) -> bool:
    """Whether ZeRO-3 partitioned `model`'s parameters (they must be gathered to run it)."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def load_teacher(name_or_path: str, args: KDConfig) -> PreTrainedModel:
    """The teacher named by `name_or_path`, loaded with `teacher_model_init_kwargs` and `teacher_model_revision`. Under
    a ZeRO-3 launch with `teacher_zero_stage=0` it is loaded whole (not partitioned by `zero.Init`)."""
    kwargs = dict(args.teacher_model_init_kwargs or {})
    dtype = kwargs.get("dtype")
    kwargs["dtype"] = dtype if dtype in ("auto", None) or isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    if args.teacher_model_revision is not None:
        kwargs.setdefault("revision", args.teacher_model_revision)
    if args.distributed_state.distributed_type in ("MULTI_GPU", "DEEPSPEED"):
        kwargs["device_map"] = None
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    if args.teacher_zero_stage == 0 and is_deepspeed_zero3_enabled():
        # a replicated teacher must not be created partitioned by ZeRO-3's `zero.Init`
        with zero3_init_disabled():
            return create_model_from_path(name_or_path, **kwargs)
    return create_model_from_path(name_or_path, **kwargs)


def prepare_teacher(teacher: PreTrainedModel, accelerator: Accelerator, args: KDConfig) -> torch.nn.Module:
    """Freeze `teacher` and place it: under DeepSpeed with `prepare_deepspeed_teacher`, else as accelerate places an
    evaluation model. `teacher_zero_stage`/`teacher_offload` without a DeepSpeed launch are refused."""
    teacher.requires_grad_(False)
    teacher.eval()
    if accelerator.state.deepspeed_plugin is not None:
        placed = prepare_deepspeed_teacher(teacher, accelerator, args)
    elif args.teacher_zero_stage is not None or args.teacher_offload:
        raise ValueError(
            "`teacher_zero_stage` and `teacher_offload` place the teacher with DeepSpeed: launch with a DeepSpeed "
            "config (e.g. `trl-kd <method> --accelerate_config zero2 ...`) or unset them."
        )
    else:
        placed = accelerator.prepare_model(teacher, evaluation_mode=True)
    placed.eval()
    return placed


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
