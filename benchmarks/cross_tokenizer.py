"""What cross-tokenizer distillation costs a step, on the real pair (`python benchmarks/real_model.py prepare
--cross-teacher` first).

    python benchmarks/cross_tokenizer.py                 # 6 steps per row, batch 4, 48 tokens, 2 threads
    python benchmarks/cross_tokenizer.py --steps 10 --threads 1

The student is the 8-layer pruned SmolLM2 (`pruned-8`); the prompts are the real-model benchmark's train prompts,
with the SmolLM2 teacher's cached greedy answers as completions for the supervised rows (`lmbda=0`). Rows, each with
`lmbda=0` (a step is the loss) and `lmbda=1` (a step is mostly the student's sampling):

* `KDTrainer`, SmolLM2 teacher, one tokenizer: the reference;
* the same teacher with `cross_tokenizer=True`: what the alignment and the span loss add, everything else equal;
* Gemma 3 270M (vocabulary 262,144) with `cross_tokenizer=True`: what a user of a teacher of another family pays
  (a bigger teacher with a 5x wider vocabulary as well).

Per row: the median optimizer step (the first dropped) and its ratio to the reference at the same `lmbda`, all in
one run. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_kd import KDConfig, KDTrainer  # noqa: E402
from trl_kd.scripts.default import cache_base  # noqa: E402

from timing import StepTimer  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=48, help="max_completion_length")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--root", default=None, help="the real-model cache folder (default: <trl-kd cache>/real-v1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    root = Path(args.root) if args.root else Path(cache_base()) / "real-v1"
    folders = {name: root / name for name in ("teacher", "cross-teacher", "students/pruned-8")}
    missing = [str(f) for f in folders.values() if not (f / "config.json").exists()]
    if missing:
        raise SystemExit(f"missing {missing}: run `python benchmarks/real_model.py prepare --cross-teacher` first")
    answers = [json.loads(line) for line in (root / "answers" / "train-greedy.jsonl").read_text().splitlines()]
    rows = answers[: args.batch * (args.steps + 1)]
    dataset = Dataset.from_dict({"prompt": [r["prompt"] for r in rows], "completion": [r["text"] for r in rows]})
    student_tokenizer = AutoTokenizer.from_pretrained(folders["students/pruned-8"])
    cases = [
        ("SmolLM2 teacher, one tokenizer (reference)", "teacher", False),
        ("SmolLM2 teacher, cross_tokenizer=True", "teacher", True),
        ("Gemma 3 270M teacher, cross_tokenizer=True", "cross-teacher", True),
    ]
    print(
        f"Real pair, student pruned-8; batch {args.batch}, up to {args.tokens} completion tokens, {args.steps} steps "
        f"(median after the first), fp32, {args.threads} threads, {torch.__version__}\n"
    )
    print("| lmbda | teacher | s/step | vs reference |")
    print("| --- | --- | --- | --- |")
    for lmbda in (0.0, 1.0):
        reference = None
        for label, teacher_name, cross in cases:
            teacher = AutoModelForCausalLM.from_pretrained(folders[teacher_name], dtype=torch.float32)
            config = KDConfig(
                output_dir="/tmp/trl-kd-cross-bench",
                cross_tokenizer=cross,
                lmbda=lmbda,
                max_steps=args.steps,
                per_device_train_batch_size=args.batch,
                max_completion_length=args.tokens,
                learning_rate=1e-6,
                report_to="none",
                use_cpu=True,
                bf16=False,
                save_strategy="no",
                disable_tqdm=True,
                seed=0,
            )
            trainer = KDTrainer(
                model=str(folders["students/pruned-8"]),
                teacher_model=teacher,
                args=config,
                train_dataset=dataset,
                processing_class=student_tokenizer,
                teacher_processing_class=AutoTokenizer.from_pretrained(folders[teacher_name]),
            )
            trainer.remove_callback(PrinterCallback)
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            step = statistics.median(timer.times[1:] or timer.times)
            reference = reference or step
            print(f"| {lmbda:g} | {label} | {step:.2f} | {step / reference:.2f}x |", flush=True)
            del trainer, teacher


if __name__ == "__main__":
    main()
