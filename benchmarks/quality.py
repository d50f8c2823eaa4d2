"""Does each method make a better student? Every trainer on the same budget, in settings where distillation works.

    python benchmarks/quality.py --quick                                   # a few minutes: the harness end to end
    python benchmarks/quality.py --settings exact                          # one setting (each fits in a session)
    python benchmarks/quality.py --settings text --text-file ../shared/data/tinyshakespeare.txt
    python benchmarks/quality.py --report                                  # tables and plots from the records only

Settings (each has its own teacher, trained here and cached under the trl-kd cache folder, keyed by its recipe):

* ``exact``: `trl_kd.testing`'s synthetic instructions with exact answers (reverse, sort, copy, count; 2-6 items).
* ``multi``: "pick two of these items": many correct answers, and the reference is one of them at random, so the
  teacher's distribution carries more than the reference. Scored by validity, not by overlap with the reference.
* ``long``: copy, reverse or sort 64-72 letters: answers of 64 tokens and more, for SWITCH's length claim, scored by
  response-length bucket too.
* ``text``: continuation of real text that no one here wrote (``--text-file``, e.g. Shakespeare): a teacher
  pre-trained on the file, a 4-8x smaller student; prompts are passages, completions the next 64 tokens. Metrics: the
  student's cross-entropy on held-out text, forward and reverse KL to the teacher there, the teacher's NLL of the
  student's samples and distinct-2 of those samples (collapse shows as a low distinct-2).

Every setting starts each method from the same student, SFT'd to at most about half the teacher's score, and also
reports how far a long SFT run of that student gets (its capacity). Each method's learning rate is picked from a small
grid on a validation split (``--grid-seeds`` seeds per rate, the best mean), then the method runs ``--seeds`` seeds at
that rate and is scored on held-out test prompts. Every run writes a JSON record (``--records``); finished runs are
skipped when the script is started again, and ``--report`` rebuilds the tables, the paired-bootstrap intervals (over
prompts and seeds, against SFT and against on-policy GKD) and the learning-curve plots from the records alone. PromptKD
also gets a diagnostic run that scores its prompted teacher; ``DIAGNOSTIC_METHODS`` run only when named with
``--methods``.

The parts: `quality_methods` (the method list and the claims), `quality_settings` (the tasks and their cached models),
`quality_metrics`, `quality_report` (tables and plots from the records), `quality_records` and `quality_stats`;
this file trains and drives.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_kd import PromptKDTrainer  # noqa: E402
from trl_kd._compat import checkpointing_field  # noqa: E402
from trl_kd.teacher_cache import cache_teacher  # noqa: E402

from quality_methods import ALL_METHODS, METHODS, QUICK_METHODS  # noqa: E402
from quality_metrics import evaluate, summary  # noqa: E402
from quality_records import foreign_records, git_commit, load_records, record_path, run_once, slug  # noqa: E402
from quality_report import report  # noqa: E402
from quality_settings import SETTINGS, Example, Setting, Task, cache_root, fingerprint, sft  # noqa: E402
from quality_stats import choose_rate  # noqa: E402


# --------------------------------------------------------------------------------------------------------- one run
class CurveCallback(TrainerCallback):
    def __init__(self, record_at: Callable[[int], None]):
        self.record_at = record_at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.record_at(state.global_step)


def train_one(
    task: Task,
    method: str,
    lr: float,
    seed: int,
    steps: int,
    examples: list[Example],
    curve_examples: list[Example],
    phase: str,
) -> dict:
    """Train a copy of the base student with ``method`` and return its record (scores on ``examples``)."""
    setting, tokenizer = task.setting, task.tokenizer
    student = copy.deepcopy(task.student)
    curve_at = {max(1, round(steps * f)) for f in (0.25, 0.5, 0.75, 1.0)}
    curve: list[dict] = []
    extra: dict[str, dict] = {}

    def record_at(step: int, model=None) -> None:
        if step in curve_at:
            metrics = summary(evaluate(task, model or student, curve_examples, seed, quick_curve=True))
            curve.append({"step": step, **metrics})

    begin = time.perf_counter()
    spec = ALL_METHODS[method]
    rows = task.train_rows(steps * setting.batch, seed=21 + seed)
    if spec is None:
        examples_train = [Example(r["prompt"], r["completion"]) for r in rows]
        sft(
            student,
            tokenizer,
            examples_train,
            steps,
            setting.batch,
            lr,
            seed,
            callback=record_at,
            schedule=setting.schedule,
        )
    else:
        trainer_class, config_class, overrides = spec
        overrides, teacher = dict(overrides), copy.deepcopy(task.teacher)
        cache_k = overrides.pop("cache_k", None)
        if cache_k is not None:  # the teacher runs once, over these rows, before training; training never loads it
            name = f"{setting.name}-{fingerprint(teacher)}-steps{steps}-seed{seed}-k{cache_k}"
            folder = cache_root() / "teacher-caches" / name
            cache_teacher(
                teacher, tokenizer, rows, str(folder), k=cache_k, max_completion_length=setting.max_new_tokens,
                batch_size=64, shard_rows=4096, progress=False,
            )  # fmt: skip
            overrides["teacher_cache"], teacher = str(folder), None
        args = config_class(
            **{
                "output_dir": str(cache_root() / "runs"),
                "per_device_train_batch_size": setting.batch,
                "max_steps": steps,
                "learning_rate": lr,
                "lr_scheduler_type": setting.schedule,
                "warmup_steps": 0,
                "max_completion_length": setting.max_new_tokens,
                "report_to": "none",
                "bf16": False,
                "use_cpu": not torch.cuda.is_available(),
                "save_strategy": "no",
                "logging_steps": max(1, steps // 10),
                "disable_tqdm": True,
                checkpointing_field(): False,
                "seed": seed,
                **overrides,
            }
        )
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        model = trainer.accelerator.unwrap_model(trainer.model)

        def at_step(step):
            model.eval()
            record_at(step, model)
            model.train()

        trainer.add_callback(CurveCallback(at_step))
        score_prompted_teacher = phase == "diagnostic" and isinstance(trainer, PromptKDTrainer)
        if score_prompted_teacher:
            extra["prompted_teacher_before"] = prompted_teacher_scores(task, trainer, examples, seed)
        trainer.train()
        student = model
        if score_prompted_teacher:
            extra["prompted_teacher_after"] = prompted_teacher_scores(task, trainer, examples, seed)
        logs = [row for row in trainer.state.log_history if "teacher_token_fraction" in row]
        teacher_fraction = [row["teacher_token_fraction"] for row in logs]
    wall = time.perf_counter() - begin
    scores = evaluate(task, student.eval(), examples, seed)
    return {
        "setting": setting.name,
        "method": method,
        "phase": phase,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "batch": setting.batch,
        "schedule": setting.schedule,
        "metrics": summary(scores),
        "per_prompt": scores,
        "curve": curve,
        "wall_time": wall,
        "teacher_token_fraction": teacher_fraction if spec is not None else [],
        **provenance(task),
        **extra,
    }


def prompted_teacher_scores(task: Task, trainer: PromptKDTrainer, examples: list[Example], seed: int) -> dict:
    """The teacher with PromptKD's current soft prompt, scored like a student (through the PEFT adapter the trainer
    exports): does the prompt the student learns from keep the teacher's skill?"""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        trainer.save_prompt_adapter(folder)
        prompted = PeftModel.from_pretrained(copy.deepcopy(task.teacher), folder).eval()
        return summary(evaluate(task, prompted, examples, seed, quick_curve=True))


def reference_record(task: Task, name: str, model, examples, seeds: int) -> dict:
    per_seed = [evaluate(task, model, examples, seed) for seed in range(seeds)]
    return {
        "setting": task.setting.name,
        "method": name,
        "phase": "reference",
        "seed": -1,
        "lr": 0.0,
        "steps": 0,
        "metrics": summary(per_seed[0]),
        "per_prompt_by_seed": per_seed,
        "curve": [],
        "wall_time": 0.0,
        **provenance(task),
    }


def provenance(task: Task) -> dict:
    return {"git_commit": git_commit(), "models": task.models, "threads": torch.get_num_threads()}


def check_records_match(task: Task, root: str) -> None:
    """Refuse to add runs to records made with another teacher or base student (a cache rebuilt elsewhere, or with
    another ``--threads``, trains other weights). Records from before fingerprints are checked by re-scoring the
    teacher on the recorded test prompts."""
    setting = task.setting
    records = load_records(root, setting.name)
    foreign = foreign_records(records, task.models)
    teacher = next((r for r in records if r["method"] == "Teacher" and r.get("phase") == "reference"), None)
    if teacher is not None and "models" not in teacher:
        rescored = evaluate(task, task.teacher, task.test, 0)[setting.primary]
        if rescored != teacher["per_prompt_by_seed"][0][setting.primary]:
            foreign.append(teacher)
    if foreign:
        raise SystemExit(
            f"{len(foreign)} record(s) under {Path(root) / setting.name} were made with another teacher or base "
            f"student than the cached ones ({task.models}): the models were retrained (another machine or thread "
            "count?). Write to a new --records folder, or remove that setting's records to redo it."
        )


# ----------------------------------------------------------------------------------------------------- the driver
def run_setting(setting: Setting, args, log=print) -> None:
    task = Task(setting, n_test=args.prompts, n_val=args.val_prompts, log=log)
    root, better = args.records, setting.higher_is_better[setting.primary]
    check_records_match(task, root)
    steps = args.steps or setting.steps
    methods = [m for m in ALL_METHODS if slug(m) in args.methods] if args.methods else list(setting.methods or METHODS)
    # references: the teacher, the base student, and the base student after a long SFT (its capacity)
    for name, make in (("Teacher", lambda: task.teacher), ("Student before distillation", lambda: task.student)):
        run_once(
            record_path(root, setting.name, name, 0, 0.0, "reference"),
            lambda make=make, name=name: reference_record(task, name, make(), task.test, args.seeds),
        )

    capacity_steps = setting.capacity_steps if args.capacity_steps is None else args.capacity_steps
    capacity_batch = setting.capacity_batch

    def capacity():
        model = copy.deepcopy(task.student)
        sft(
            model,
            task.tokenizer,
            task.examples(capacity_steps * capacity_batch, seed=77),
            capacity_steps,
            capacity_batch,
            3e-3,
            seed=0,
        )
        name = f"Student capacity ({capacity_steps} SFT steps of batch {capacity_batch})"
        return reference_record(task, name, model, task.test, 1)

    if capacity_steps:
        run_once(
            record_path(root, setting.name, f"capacity-{capacity_steps}x{capacity_batch}", 0, 0.0, "reference"),
            capacity,
        )
    for method in methods:
        scored: dict[float, list[float]] = {}  # validation scores of each grid rate, one per grid seed
        for lr in args.lr_grid if len(args.lr_grid) > 1 else []:
            for seed in range(args.grid_seeds):
                path = record_path(root, setting.name, method, seed, lr, "grid", steps)
                record, computed = run_once(
                    path,
                    lambda lr=lr, method=method, seed=seed: train_one(
                        task, method, lr, seed, steps, task.val, task.val[:32], "grid"
                    ),
                )
                scored.setdefault(lr, []).append(record["metrics"][setting.primary])
                if computed:
                    log(
                        f"[{setting.name}] grid {method} lr {lr:g} seed {seed}: {setting.primary} {scored[lr][-1]:.2f}"
                    )
        best_lr = choose_rate(scored, better) if scored else args.lr_grid[0]
        for seed in range(args.seeds):
            path = record_path(root, setting.name, method, seed, best_lr, "final", steps)
            record, computed = run_once(
                path,
                lambda seed=seed, method=method: train_one(
                    task, method, best_lr, seed, steps, task.test, task.val[:32], "final"
                ),
            )
            if computed:
                log(
                    f"[{setting.name}] {method} seed {seed} (lr {best_lr:g}): {setting.primary} "
                    f"{record['metrics'][setting.primary]:.2f} in {record['wall_time']:.0f}s"
                )
        if ALL_METHODS[method] is not None and ALL_METHODS[method][0] is PromptKDTrainer:
            # one more seed-0 run that also scores the prompted teacher the student learns from
            run_once(
                record_path(root, setting.name, method, 0, best_lr, "diagnostic", steps),
                lambda method=method: train_one(task, method, best_lr, 0, steps, task.test, [], "diagnostic"),
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="exact,multi,long,text")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated method slugs, e.g. sft-on-references,skd-k-25-fkl (default: all)",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=256, help="held-out test prompts")
    parser.add_argument("--val-prompts", type=int, default=64, help="validation prompts (learning-rate grid)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: per setting)")
    parser.add_argument("--lr-grid", default="3e-4,1e-3,3e-3")
    parser.add_argument(
        "--grid-seeds", type=int, default=2, help="seeds per grid rate; the rate with the best mean is chosen"
    )
    parser.add_argument("--capacity-steps", type=int, default=None, help="default: per setting; 0 skips it")
    parser.add_argument(
        "--student-steps",
        type=int,
        default=None,
        help="SFT steps of the base student (default: per setting), e.g. to test a stronger start",
    )
    parser.add_argument(
        "--schedule",
        choices=("constant", "linear"),
        default=None,
        help="learning-rate schedule of every method's runs (default: per setting)",
    )
    parser.add_argument("--text-file", default=None, help="a plain-text corpus for the text setting")
    parser.add_argument("--records", default="benchmarks/records/quality")
    parser.add_argument("--plots", default="docs/img")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and plots from the records")
    parser.add_argument("--quick", action="store_true", help="a few minutes: few steps, prompts, seeds and methods")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 lets two settings run side by side)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.prompts, args.val_prompts, args.steps = 2, 32, 16, args.steps or 30
        args.lr_grid, args.capacity_steps = "1e-3", 200
        args.methods = args.methods or ",".join(slug(m) for m in QUICK_METHODS)
        args.records = args.records.rstrip("/") + "-quick"
        if args.settings == parser.get_default("settings"):
            args.settings = "exact"
    args.lr_grid = [float(x) for x in args.lr_grid.split(",")]
    args.methods = args.methods.split(",") if args.methods else None
    unknown = set(args.methods or ()) - {slug(m) for m in ALL_METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {[slug(m) for m in ALL_METHODS]}")
    torch.set_num_threads(args.threads)
    for name in args.settings.split(","):
        setting = copy.copy(SETTINGS[name])
        setting.text_file = args.text_file if name == "text" else None
        setting.student_steps = args.student_steps or setting.student_steps
        setting.schedule = args.schedule or setting.schedule
        if args.quick:
            setting.teacher_steps, setting.student_steps = min(setting.teacher_steps, 300), 30
        if not args.report:
            run_setting(setting, args)
        print("\n".join(report(setting, args.records, args.plots)) + "\n", flush=True)


if __name__ == "__main__":
    main()
