"""The `trl-kd` command, mirroring `trl sft`:

    trl-kd switch|skd|promptkd|gkd [--config recipe.yaml] <flags>   run a distillation (no flags: embedded default)
    trl-kd plan --student ... --teacher ... --gpus N --gpu-memory GiB   per-GPU memory of each placement
    trl-kd env                                                      versions for bug reports
"""

from __future__ import annotations

import argparse
import platform
import sys


def _env(_: argparse.Namespace) -> None:
    import torch

    print(f"- platform: {platform.platform()}")
    print(f"- python: {platform.python_version()}")
    from .model_card import framework_versions

    for package, installed in framework_versions().items():
        print(f"- {package}: {installed or 'not installed'}")
    print(f"- GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")


def _plan(args: argparse.Namespace) -> None:
    from .planner import ModelSpec, plan

    kwargs = {"trust_remote_code": args.trust_remote_code}
    student = ModelSpec.from_pretrained(args.student, **kwargs)
    teacher = ModelSpec.from_pretrained(args.teacher, **kwargs)
    result = plan(
        student, teacher, num_gpus=args.gpus, gpu_memory_gib=args.gpu_memory, dtype=args.dtype,
        batch_size=args.batch_size, prompt_length=args.prompt_length, completion_length=args.completion_length,
        gradient_checkpointing=not args.no_gradient_checkpointing, lora=args.lora,
        gather_for_generation=not args.no_gather_for_generation,
    )
    print(f"Student {student.name}: {student.num_params / 1e9:.2f}B parameters; teacher {teacher.name}: "
          f"{teacher.num_params / 1e9:.2f}B. {args.gpus} GPU(s) of {args.gpu_memory:g} GiB, {args.dtype}, batch "
          f"{args.batch_size} per GPU, {args.prompt_length}+{args.completion_length} tokens. Per-GPU GiB:\n")
    print(result.table())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="trl-kd", description="trl-kd: knowledge distillation on TRL.",
        epilog="Distillation: trl-kd {gkd,skd,switch,promptkd} [--config recipe.yaml] <flags>; "
        "add --help after the method for its flags.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    for method in ("gkd", "skd", "switch", "promptkd"):  # listed for --help; dispatched in `main`
        commands.add_parser(method, help=f"run a {method} distillation (see `trl-kd {method} --help`)")

    env = commands.add_parser("env", help="print the versions to paste in a bug report")
    env.set_defaults(func=_env)

    p = commands.add_parser(
        "plan", help="estimate per-GPU memory of each placement (DDP, ZeRO-2, ZeRO-3, offload) and recommend one"
    )
    p.add_argument("--student", required=True, help="Hub id or local folder of the student (only config.json is read)")
    p.add_argument("--teacher", required=True, help="Hub id or local folder of the teacher")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--gpu-memory", type=float, required=True, help="memory of one GPU in GiB, e.g. 80")
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default="bf16")
    p.add_argument("--batch-size", type=int, default=4, help="per-GPU micro-batch (per_device_train_batch_size)")
    p.add_argument("--prompt-length", type=int, default=512)
    p.add_argument("--completion-length", type=int, default=512, help="max_completion_length")
    p.add_argument("--no-gradient-checkpointing", action="store_true")
    p.add_argument("--lora", action="store_true", help="the student trains LoRA adapters only")
    p.add_argument("--no-gather-for-generation", action="store_true", help="ds3_gather_for_generation=False")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_plan)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    from .scripts import METHODS

    if argv and argv[0] in METHODS:  # everything after the method goes to its TrlParser
        from .scripts import main as distill

        distill(argv[0], argv[1:])
        return
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    sys.exit(main())
