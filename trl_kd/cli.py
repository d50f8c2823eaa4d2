"""The `trl-kd` command, mirroring `trl sft`:

trl-kd switch|skd|promptkd|gkd [--config recipe.yaml] <flags>   run a distillation (no flags: embedded default);
                                                                the methods are those of `trl_kd.registry`
trl-kd switch --accelerate_config zero3 --num_processes 8 ...   the same through `accelerate launch`
trl-kd plan --student ... --teacher ... --gpus N --gpu-memory GiB   per-GPU memory of each placement
trl-kd cache-teacher --teacher ... --dataset_name ... --output_dir ...   an offline teacher top-k cache
trl-kd env                                                      versions for bug reports
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

from .errors import first_line, missing_model, one_line_errors, read_as


ACCELERATE_CONFIGS = Path(__file__).parent / "accelerate_configs"
# `accelerate launch` flags `trl-kd <method> --accelerate_config ...` passes on to the launcher
LAUNCH_FLAGS = ("--num_processes", "--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port")


def accelerate_config_path(name: str) -> str:
    """The accelerate config `--accelerate_config` names: one shipped with trl-kd (`ddp`, `zero2`, `zero3`,
    `zero3_offload`, `fsdp2`; package data in `trl_kd/accelerate_configs/`), else a file's path."""
    shipped = ACCELERATE_CONFIGS / f"{name}.yaml"
    if shipped.is_file():
        return str(shipped)
    if os.path.isfile(name):
        return name
    names = ", ".join(sorted(p.stem for p in ACCELERATE_CONFIGS.glob("*.yaml")))
    raise ValueError(f"--accelerate_config {name}: no such file, and not one of the shipped configs ({names})")


def launch_command(method: str, argv: list[str]) -> list[str] | None:
    """The `accelerate launch` command that runs `trl-kd <method> <argv>` when `argv` has `--accelerate_config`
    (as `trl sft --accelerate_config zero3` does); `None` without it. The launcher's flags (`LAUNCH_FLAGS`) go to
    `accelerate launch`, everything else to the method."""
    if not any(a == "--accelerate_config" or a.startswith("--accelerate_config=") for a in argv):
        return None
    launcher, rest, i = [], [], 0
    while i < len(argv):
        flag, has_value, value = argv[i].partition("=")
        if flag == "--accelerate_config" or flag in LAUNCH_FLAGS:
            if not has_value:
                if i + 1 >= len(argv):
                    raise ValueError(f"{flag} needs a value")
                value, i = argv[i + 1], i + 1
            launcher += (
                ["--config_file", accelerate_config_path(value)] if flag == "--accelerate_config" else [flag, value]
            )
        else:
            rest.append(argv[i])
        i += 1
    return [sys.executable, "-m", "accelerate.commands.launch", *launcher, "-m", "trl_kd.cli", method, *rest]


def _env(_: argparse.Namespace) -> None:
    import torch

    print(f"- platform: {platform.platform()}")
    print(f"- python: {platform.python_version()}")
    from .model_card import framework_versions

    for package, installed in framework_versions().items():
        print(f"- {package}: {installed or 'not installed'}")
    print(f"- GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def _positive(kind: type):
    """An argparse type: a finite number > 0 (`int` or `float`)."""

    def parse(text: str):
        value = kind(text)  # a ValueError reads "invalid int value: 'two'"
        if not (math.isfinite(value) and value > 0):
            raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
        return value

    parse.__name__ = kind.__name__
    return parse


def _plan(args: argparse.Namespace) -> None:
    from .planner import BACKENDS, ModelSpec, plan

    kwargs = {"trust_remote_code": args.trust_remote_code}
    models = {}
    for flag, name in (("--student", args.student), ("--teacher", args.teacher)):
        problem = missing_model(name)
        if problem:
            args.parser.error(f"{flag} {name}: {problem}")
        try:
            models[flag] = ModelSpec.from_pretrained(name, **kwargs)
        except (OSError, ValueError) as error:  # no such folder or Hub id, no config.json, not a causal LM, ...
            args.parser.error(f"{flag} {name}: cannot read its config ({first_line(error)})")
    student, teacher = models["--student"], models["--teacher"]
    result = plan(
        student,
        teacher,
        num_gpus=args.gpus,
        gpu_memory_gib=args.gpu_memory,
        dtype=args.dtype,
        batch_size=args.batch_size,
        prompt_length=args.prompt_length,
        completion_length=args.completion_length,
        gradient_checkpointing=not args.no_gradient_checkpointing,
        lora=args.lora,
        gather_for_generation=not args.no_gather_for_generation,
        backends=BACKENDS if args.backend == "all" else (args.backend,),
    )
    print(
        f"Student {student.name}: {student.num_params / 1e9:.2f}B parameters; teacher {teacher.name}: "
        f"{teacher.num_params / 1e9:.2f}B. {args.gpus} GPU(s) of {args.gpu_memory:g} GiB, {args.dtype}, batch "
        f"{args.batch_size} per GPU, {args.prompt_length}+{args.completion_length} tokens. Per-GPU GiB:\n"
    )
    print(result.table())


def _cache_teacher(args: argparse.Namespace) -> None:
    import torch
    from accelerate import PartialState
    from datasets import load_dataset, load_from_disk
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .sampler import SamplingParams
    from .teacher_cache import cache_teacher

    for flag, name in (("--teacher", args.teacher), ("--tokenizer", args.tokenizer)):
        problem = missing_model(name) if name else None
        if problem:
            args.parser.error(f"{flag} {name}: {problem}")
    name = args.dataset_name
    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
            dataset = load_from_disk(name)  # a `Dataset.save_to_disk` folder
        else:
            dataset = load_dataset(name, args.dataset_config, split=args.dataset_split)
    except (OSError, ValueError) as error:  # not found, offline, no loader for its files, ...
        args.parser.error(f"--dataset_name {name}: {read_as(name)}, and it cannot be loaded: {first_line(error)}")
    # one process, or each process of `accelerate launch` / torchrun (gloo processes on a machine without a GPU)
    state = PartialState(cpu=not torch.cuda.is_available())
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.teacher)
    dtype = {"auto": "auto", "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    teacher = AutoModelForCausalLM.from_pretrained(args.teacher, dtype=dtype[args.dtype]).to(state.device).eval()
    generation = None
    if args.seq_kd:
        generation = SamplingParams(temperature=args.teacher_temperature, top_p=args.teacher_top_p).generation_config()
    manifest = cache_teacher(
        teacher,
        tokenizer,
        dataset,
        args.output_dir,
        k=args.k,
        temperature=args.temperature,
        max_completion_length=args.max_completion_length,
        batch_size=args.batch_size,
        shard_rows=args.shard_rows,
        value_dtype=args.value_dtype,
        seq_kd=args.seq_kd,
        generation_config=generation,
        process_index=state.process_index,
        num_processes=state.num_processes,
    )
    state.wait_for_everyone()
    if state.is_main_process:
        print(
            f"Cached the teacher's top-{manifest.k} over {manifest.num_rows} rows in {manifest.num_shards} shards: "
            f"{args.output_dir}. Train on it with `--teacher_cache {args.output_dir}`."
        )


def build_parser() -> argparse.ArgumentParser:
    from . import METHODS  # the registry, filled by importing the package's trainers

    parser = one_line_errors(
        argparse.ArgumentParser(
            prog="trl-kd",
            description="trl-kd: knowledge distillation on TRL.",
            epilog=f"Distillation: trl-kd {{{','.join(METHODS)}}} [--config recipe.yaml] <flags>; "
            "add --help after the method for its flags.",
        )
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for method in METHODS.values():  # listed for --help; dispatched in `main`
        paper = f", arXiv {method.paper}" if method.paper else ""
        commands.add_parser(
            method.name,
            aliases=list(method.aliases),
            help=f"run a {method.title} distillation{paper} (see `trl-kd {method.name} --help`)",
        )

    env = one_line_errors(commands.add_parser("env", help="print the versions to paste in a bug report"))
    env.set_defaults(func=_env)

    p = one_line_errors(
        commands.add_parser(
            "plan", help="estimate per-GPU memory of each placement (DDP, ZeRO, offload, FSDP2) and recommend one"
        )
    )
    p.add_argument("--student", required=True, help="Hub id or local folder of the student (only config.json is read)")
    p.add_argument("--teacher", required=True, help="Hub id or local folder of the teacher")
    p.add_argument("--gpus", type=_positive(int), required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", type=_positive(float), required=True, help="memory of one GPU in GiB, e.g. 80")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument(
        "--batch-size", type=_positive(int), default=4, help="per-GPU micro-batch (per_device_train_batch_size)"
    )
    p.add_argument("--prompt-length", type=_positive(int), default=512)
    p.add_argument("--completion-length", type=_positive(int), default=512, help="max_completion_length")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--lora", action="store_true", help="the student trains LoRA adapters only")
    p.add_argument("--no-gather-for-generation", action="store_true", help="ds3_gather_for_generation=False")
    p.add_argument(
        "--backend",
        choices=["all", "deepspeed", "fsdp2"],
        default="all",
        help="plan DeepSpeed's placements, FSDP2's, or both (DDP always); the recommendation is among them",
    )
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_plan, parser=p)

    c = one_line_errors(
        commands.add_parser(
            "cache-teacher",
            help="write the teacher's top-k log-probabilities over a dataset's completions (an offline teacher)",
        )
    )
    c.add_argument("--teacher", required=True, help="Hub id or local folder of the teacher")
    c.add_argument("--dataset_name", required=True, help="a Hub dataset, a local dataset folder or files' loader")
    c.add_argument("--dataset_config", default=None)
    c.add_argument("--dataset_split", default="train")
    c.add_argument("--output_dir", required=True, help="the cache folder (a rerun resumes it)")
    c.add_argument("--k", type=_positive(int), default=64, help="top tokens kept per position")
    c.add_argument("--temperature", type=_positive(float), default=1.0, help="the loss_temperature training uses")
    c.add_argument("--max_completion_length", type=_positive(int), default=256)
    c.add_argument("--batch_size", type=_positive(int), default=8, help="rows per teacher forward")
    c.add_argument("--shard_rows", type=_positive(int), default=512, help="rows per shard")
    c.add_argument("--value_dtype", choices=["float16", "float32"], default="float16")
    c.add_argument("--dtype", choices=["auto", "bfloat16", "float16", "float32"], default="auto")
    c.add_argument("--tokenizer", default=None, help="the shared tokenizer (default: the teacher's)")
    c.add_argument("--seq_kd", action="store_true", help="cache the teacher's own samples instead")
    c.add_argument("--teacher_temperature", type=_positive(float), default=1.0, help="sampling, with --seq_kd")
    c.add_argument("--teacher_top_p", type=_positive(float), default=1.0, help="sampling, with --seq_kd")
    c.set_defaults(func=_cache_teacher, parser=c)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .registry import method_names

    if argv and argv[0] in method_names(aliases=True):  # everything after the method goes to its TrlParser
        try:
            command = launch_command(argv[0], argv[1:])
        except ValueError as error:
            one_line_errors(argparse.ArgumentParser(prog=f"trl-kd {argv[0]}")).error(str(error))
        if command is not None:
            print(f"Launching: {shlex.join(command)}", flush=True)
            raise SystemExit(subprocess.call(command))
        from .scripts import main as distill

        distill(argv[0], argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
