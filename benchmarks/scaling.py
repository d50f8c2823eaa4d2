"""Cost curves on the real pair: how each trainer's step grows with the answer length and the batch, against
`trl.DistillationTrainer` at the same cell, and where an SKD step goes. Prints markdown tables for
docs/benchmarks.md and plots generated tokens per second against the answer length.

    python benchmarks/real_model.py prepare                 # once: the teacher, the pruned students, the prompts
    python benchmarks/scaling.py                             # 64/256/1024 tokens x batch 1/4/16 (hours; resumable)
    python benchmarks/scaling.py --lengths 64,256 --batches 4 --trainers kdtrainer-on-policy-jsd-0-5
    python benchmarks/scaling.py --report                    # the tables and the plot from the records alone
    python benchmarks/scaling.py --tiny                      # the tiny pair of trl_kd.testing: the harness, fast

Every (trainer, answer length, batch) cell runs in a fresh process, so its peak RSS is its own: one warm-up step, then
``--steps`` timed optimizer steps, on-policy (the student writes every answer; the teacher corrects it where the method
says so). The untrained `pruned-8` student never stops early, so its answers run to the length asked for; `pruned-24`
(24 of the teacher's 30 layers) is the student close to the teacher, whose tokens SKD's teacher accepts most of the
time, and `pruned-24-sft` is it after the real-model benchmark's SFT on the teacher's answers, at the rate that run's
grid chose (``real_model.py run --student pruned-24 --methods sft-on-teacher-answers-seqkd`` first). Per cell: seconds
per optimizer step (median), generated tokens per step and per second, teacher forwards (calls of its decoder) per
generated token, acceptance and teacher-token fraction, peak RSS, and where the step goes (sampling split into the two
models' forwards, the loss with its teacher forward, backward, optimizer). Ratios compare seconds per generated token
with `trl.DistillationTrainer`'s at the same cell and student, since a teacher that intervenes changes the answers'
lengths. A finished cell is a JSON record under ``--records`` and is not run again.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from quality_records import git_commit, read_record, slug, write_record  # noqa: E402
from timing import PROFILE_PARTS  # noqa: E402


REFERENCE = "trl.DistillationTrainer (on-policy, JSD 0.5)"
# label -> (student, method name in trl_kd.METHODS or "trl", config overrides); "V" stands for the vocabulary size
TRAINERS: dict[str, tuple[str, str, dict]] = {
    REFERENCE: ("pruned-8", "trl", {"beta": 0.5, "temperature": 1.0}),  # always on-policy
    "KDTrainer on-policy (JSD 0.5)": ("pruned-8", "gkd", {"lmbda": 1.0, "beta": 0.5, "temperature": 1.0}),
    "SKD, every draft accepted (K = V)": (
        "pruned-8",
        "skd",
        {"acceptance_top_k": "V", "temperature": 1.0, "top_p": 1.0, "beta": 0.5},
    ),
    # the first block as long as the ceiling: fewer verification rounds in a short answer
    "SKD, every draft accepted (K = V), first block 16": (
        "pruned-8",
        "skd",
        {"acceptance_top_k": "V", "temperature": 1.0, "top_p": 1.0, "beta": 0.5, "num_draft_tokens": 16},
    ),
    "SKD, every draft accepted (K = V), blocks up to 64": (
        "pruned-8",
        "skd",
        {"acceptance_top_k": "V", "temperature": 1.0, "top_p": 1.0, "beta": 0.5, "max_draft_tokens": 64},
    ),
    # the loss's tiles projected again in the backward (activation checkpointing), as before loss_gradient_in_forward
    "KDTrainer on-policy (JSD 0.5), tiles recomputed": (
        "pruned-8",
        "gkd",
        {"lmbda": 1.0, "beta": 0.5, "temperature": 1.0, "loss_gradient_in_forward": False},
    ),
    "SKD, every draft accepted (K = V), tiles recomputed": (
        "pruned-8",
        "skd",
        {"acceptance_top_k": "V", "temperature": 1.0, "top_p": 1.0, "beta": 0.5, "loss_gradient_in_forward": False},
    ),
    "SKD, K=25 (paper defaults)": ("pruned-8", "skd", {}),
    "SWITCH, never switching": ("pruned-8", "switch", {"switch_threshold": float("inf")}),
    "SWITCH (defaults)": ("pruned-8", "switch", {}),
    "PromptKD (defaults)": ("pruned-8", "promptkd", {}),
    REFERENCE + ", pruned-24": ("pruned-24", "trl", {"beta": 0.5, "temperature": 1.0}),
    "SKD, K=25 (paper defaults), pruned-24": ("pruned-24", "skd", {}),
    REFERENCE + ", pruned-24 after SFT": ("pruned-24-sft", "trl", {"beta": 0.5, "temperature": 1.0}),
    "SKD, K=25 (paper defaults), pruned-24 after SFT": ("pruned-24-sft", "skd", {}),
}
# a student trained by the real-model benchmark: (base student, method) of its run at the chosen rate, seed 0
TRAINED_STUDENTS = {"pruned-24-sft": ("pruned-24", "SFT on teacher answers (SeqKD)")}


def reference_for(label: str) -> str:
    """`trl.DistillationTrainer`'s label with the same student."""
    student = TRAINERS[label][0]
    return next(name for name, spec in TRAINERS.items() if spec[0] == student and spec[1] == "trl")


def student_folder(student: str) -> Path:
    """A pruned student from `real_model.py prepare`, or a student the real-model benchmark trained (its run at the
    rate its grid chose, seed 0)."""
    from real_model import cache_root, chosen_rate, run_dir

    if student not in TRAINED_STUDENTS:
        folder = cache_root() / "students" / student
        if not (folder / "config.json").exists():
            raise SystemExit(f"No student {student} in {folder}: run `python benchmarks/real_model.py prepare` first.")
        return folder
    base, method = TRAINED_STUDENTS[student]
    lr = chosen_rate(Path(__file__).resolve().parent / "records" / "real" / base, method)
    if lr is None:
        raise SystemExit(
            f"No complete grid of {method!r} on {base} in the records: run `python benchmarks/real_model.py run "
            f"--student {base} --methods {slug(method)}` first."
        )
    folder = run_dir(method, lr, 0, base)
    if not (folder / "config.json").exists():
        grid_record = f"benchmarks/records/real/{base}/real/{slug(method)}/grid-*-lr{lr:g}-seed0.json"
        raise SystemExit(
            f"The records have {method!r} on {base} but its model is not in {folder}: only a grid run keeps its "
            f"model. Move {grid_record} aside and run `python benchmarks/real_model.py run --student {base} "
            f"--methods {slug(method)}` again (it reruns that one grid run), then put the record back."
        )
    return folder


# ------------------------------------------------------------------------------------------------- the pair and data
def load_pair(tiny: bool, student: str):
    """The tokenizer, the teacher and the student `pruned-8` or `pruned-24`: the real pair from `real_model.py
    prepare`, or (`tiny`) the tiny Qwen2 pair of `trl_kd.testing` with a copy of the teacher as the close student."""
    if tiny:
        from trl_kd.testing import build_model, build_tokenizer

        tokenizer = build_tokenizer()
        teacher = build_model("qwen2", tokenizer, "teacher", seed=1, context_length=2048).eval()
        if student.startswith("pruned-24"):
            return tokenizer, teacher, copy.deepcopy(teacher)
        return tokenizer, teacher, build_model("qwen2", tokenizer, "student", seed=0, context_length=2048)
    from transformers import AutoModelForCausalLM

    from real_model import load_teacher

    teacher, tokenizer = load_teacher()
    return tokenizer, teacher, AutoModelForCausalLM.from_pretrained(student_folder(student), dtype=torch.float32)


def prompts(tiny: bool, n: int):
    """``n`` chat prompts with no answer (every row on-policy): first turns of ShareGPT, or the tiny task's."""
    from datasets import Dataset

    if tiny:
        from trl_kd.testing import make_dataset

        return make_dataset("conversational_prompt_only", n)
    from real_model import cache_root

    texts = json.loads((cache_root() / "prompts.json").read_text())["train"]
    return Dataset.from_list([{"prompt": [{"role": "user", "content": texts[i % len(texts)]}]} for i in range(n)])


# ------------------------------------------------------------------------------------------------------ one cell
def run_cell(label: str, length: int, batch: int, steps: int, tiny: bool, threads: int) -> dict:
    """One trainer at one answer length and batch, in this process: ``steps`` timed steps after one warm-up step."""
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DistillationConfig, DistillationTrainer

    import trl_kd

    from real_model import Clock, count_generation, logged_mean, peak_rss_mib
    from speed import _bench_args
    from timing import PhaseProfiler, StepTimer

    torch.set_num_threads(threads)
    student_name, method, overrides = TRAINERS[label]
    tokenizer, teacher, student = load_pair(tiny, student_name)
    overrides = {k: len(tokenizer) if v == "V" else v for k, v in overrides.items()}
    if method == "trl":
        trainer_class, config_class = DistillationTrainer, DistillationConfig
    else:
        trainer_class, config_class = trl_kd.METHODS[method].trainer, trl_kd.METHODS[method].config
    args = config_class(**{**_bench_args(steps + 1, batch, length), **overrides})
    trainer = trainer_class(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=prompts(tiny, batch * (steps + 1)),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)

    clock = Clock()
    count_generation(trainer, clock)  # wraps the rollout: installed before the profiler so that it is timed inside
    profiler = PhaseProfiler(trainer, skip_steps=1)  # the warm-up step is not counted
    timer = StepTimer()
    warm = {}

    class WarmUp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                warm.update(tokens=clock.generated_tokens)

    trainer.add_callback(timer)
    trainer.add_callback(WarmUp())
    trainer.train()

    step = statistics.median(timer.times[1:])
    mean_step = statistics.mean(timer.times[1:])
    phases = profiler.phases(steps, mean_step)
    tokens = clock.generated_tokens - warm["tokens"]
    history = trainer.state.log_history
    return {
        "trainer": label,
        "student": student_name,
        "length": length,
        "batch": batch,
        "steps": steps,
        "threads": threads,
        "seconds_per_step": step,
        "generated_tokens_per_step": tokens / steps,
        "generated_tokens_per_second": tokens / (mean_step * steps),
        "teacher_forwards_per_token": profiler.teacher_forwards / max(tokens, 1),
        "acceptance": logged_mean(history, "acceptance_rate"),
        "teacher_token_fraction": logged_mean(history, "teacher_token_fraction"),
        "peak_rss_mib": peak_rss_mib(),
        "phases": phases,
    }


# -------------------------------------------------------------------------------------------------- the grid
def record_file(root: Path, pair: str, label: str, length: int, batch: int) -> Path:
    return root / pair / slug(label) / f"length{length}-batch{batch}.json"


def run_grid(args) -> None:
    pair = "tiny" if args.tiny else "real"
    root = Path(args.records)
    labels = [label for label in TRAINERS if not args.trainers or slug(label) in args.trainers]
    for length in args.lengths:
        for batch in args.batches:
            for label in labels:
                path = record_file(root, pair, label, length, batch)
                if read_record(path) is not None:
                    continue
                cell = json.dumps([label, length, batch, args.steps, args.tiny, args.threads])
                begin = time.perf_counter()
                proc = subprocess.run(
                    [sys.executable, __file__, "--cell", cell], capture_output=True, text=True, check=False
                )
                if proc.returncode != 0:
                    raise SystemExit(f"{label}, {length} tokens, batch {batch} failed:\n{proc.stderr[-4000:]}")
                result = json.loads(proc.stdout.strip().splitlines()[-1])
                machine = (
                    f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
                )
                write_record(path, {"metrics": result, "wall_seconds": time.perf_counter() - begin, "machine": machine,
                                    "commit": git_commit()})  # fmt: skip
                print(
                    f"[{time.strftime('%H:%M:%S')}] {label}, {length} tokens, batch {batch}: "
                    f"{result['seconds_per_step']:.2f} s/step, {result['generated_tokens_per_second']:.1f} tok/s",
                    flush=True,
                )


# ---------------------------------------------------------------------------------------------------- the report
def load_cells(root: Path, pair: str) -> dict[tuple[str, int, int], dict]:
    cells = {}
    for path in sorted((root / pair).glob("*/*.json")):
        record = read_record(path)  # a record holds the cell's measurements as its "metrics"
        if record is not None and record["metrics"]["trainer"] in TRAINERS:
            cell = {**record["metrics"], "machine": record.get("machine")}
            cells[cell["trainer"], cell["length"], cell["batch"]] = cell
    return cells


def seconds_per_token(cell: dict) -> float:
    """Over the timed steps: their mean time over their mean tokens (the step's median would pair a typical step
    with the mean answer length, which differ where answers stop early)."""
    return 1.0 / max(cell["generated_tokens_per_second"], 1e-9)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


NO_INTERVENTION = ("KDTrainer on-policy (JSD 0.5)", "SKD, every draft accepted (K = V)", "SWITCH, never switching")


def ratio(cells: dict, label: str, length: int, batch: int) -> float | None:
    """Seconds per generated token against `DistillationTrainer`'s at the same cell and student."""
    cell, ref = cells.get((label, length, batch)), cells.get((reference_for(label), length, batch))
    return None if cell is None or ref is None else seconds_per_token(cell) / seconds_per_token(ref)


def sampler_over_floor(cells: dict, label: str, length: int, batch: int) -> float | None:
    """The sampler's seconds per generated token against its floor: `DistillationTrainer`'s student generation plus
    its one teacher forward (in the loss), per token, with the same student at the same cell."""
    cell, ref = cells.get((label, length, batch)), cells.get((reference_for(label), length, batch))
    if cell is None or ref is None:
        return None
    sampler = cell["phases"]["sampling: student"] + cell["phases"]["sampling: teacher"]
    floor = ref["phases"]["sampling: student"] + ref["phases"]["teacher forward (loss)"]
    return (sampler / cell["generated_tokens_per_step"]) / (floor / ref["generated_tokens_per_step"])


def targets(cells: dict) -> list[str]:
    """The performance issue's targets, each against the cells measured: the worst cell, and whether it is met."""
    keys = sorted(cells, key=lambda key: (key[1], key[2]))

    def worst(values: list[tuple[float, str]], limit: float, where: str, unit: str = "{:.2f}x") -> str:
        if not values:
            return f"| {where} | – | not measured |"
        value, cell = max(values)
        return f"| {where} | {unit.format(value)} ({cell}) | {'met' if value <= limit else '**not met**'} |"

    def at(key) -> str:
        return f"{key[0]}, {key[1]} tok, batch {key[2]}"

    close = [k for k in keys if k[0].startswith("SKD, K=25") and (cells[k]["acceptance"] or 0) >= 0.8]
    rows = [
        worst([(r, at(k)) for k in keys if k[0] in NO_INTERVENTION and (r := ratio(cells, *k))], 1.0,
              "no-intervention rows: s/token ≤ 1.00x at every cell"),
        worst([(cells[k]["peak_rss_mib"] / cells[(reference_for(k[0]), k[1], k[2])]["peak_rss_mib"], at(k))
               for k in keys if k[0] in NO_INTERVENTION and (reference_for(k[0]), k[1], k[2]) in cells], 1.1,
              "no-intervention rows: peak RSS ≤ 1.10x"),
        worst([(r, at(k)) for k in close if k[1] <= 64 and (r := ratio(cells, *k))], 1.3,
              "SKD at ≥ 80% acceptance: ≤ 1.30x at 64 tokens"),
        worst([(r, at(k)) for k in close if k[1] >= 256 and (r := ratio(cells, *k))], 1.15,
              "SKD at ≥ 80% acceptance: ≤ 1.15x at 256 tokens and beyond"),
        worst([(r, at(k)) for k in close if k[1] == 256 and (r := sampler_over_floor(cells, *k))], 1.3,
              "SKD at ≥ 80% acceptance: sampler ≤ 1.30x its floor at 256 tokens"),
    ]  # fmt: skip
    forwards = [(cells[k]["teacher_forwards_per_token"], at(k)) for k in close]
    rows.append(worst(forwards, 0.3, "SKD at ≥ 80% acceptance: ≤ 0.3 teacher forwards per token", unit="{:.3f}"))
    # growth with the answer length: the ratio at the longest length measured against the shortest, per row and batch
    growth = []
    for label in dict.fromkeys(k[0] for k in keys if k[0] in NO_INTERVENTION or k[0] in {c[0] for c in close}):
        for batch in sorted({k[2] for k in keys}):
            series = [(k[1], r) for k in keys if k[0] == label and k[2] == batch and (r := ratio(cells, *k))]
            if len(series) >= 2:
                growth.append(
                    (series[-1][1] / series[0][1], f"{label}, batch {batch}: {series[0][0]} → {series[-1][0]} tok")
                )
    rows.append(worst(growth, 1.0, "cost per token grows no faster with length than DistillationTrainer's "
                                   "(ratio at the longest length / at the shortest)"))  # fmt: skip
    return [
        "Targets (ratios of seconds per generated token to trl.DistillationTrainer's at the same cell and student; "
        "the worst cell measured):",
        "",
        "| target | worst | |",
        "| --- | --- | --- |",
        *rows,
    ]


def report(root: Path, pair: str, plot_path: str | None) -> str:
    cells = load_cells(root, pair)
    if not cells:
        return f"No records under {root / pair}: run the grid first."
    lengths = sorted({length for _, length, _ in cells})
    batches = sorted({batch for _, _, batch in cells})
    labels = [label for label in TRAINERS if any(key[0] == label for key in cells)]
    some = next(iter(cells.values()))
    lines = [
        f"Machine: {some.get('machine', '?')}; {some['threads']} threads, fp32, {some['steps']} timed steps per cell "
        "after a warm-up step, each cell in a fresh process.",
        "",
        "Seconds per generated token against trl.DistillationTrainer's at the same cell and student (below 1.00x: "
        "faster):",
        "",
        "| trainer | " + " | ".join(f"{t} tok, batch {b}" for t in lengths for b in batches) + " |",
        "| --- | " + " | ".join("---" for _ in lengths for _ in batches) + " |",
    ]
    for label in labels:
        ratios = [ratio(cells, label, length, batch) for length in lengths for batch in batches]
        row = ["–" if r is None else f"{r:.2f}x" for r in ratios]
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    lines += [
        "",
        "Per cell: seconds per optimizer step (median), generated tokens per step and per second, teacher forwards "
        "per generated token, acceptance, teacher-token fraction, peak RSS (and its ratio to DistillationTrainer's):",
        "",
        "| trainer | tokens | batch | s/step | tokens/step | tokens/s | teacher fwd/token | acceptance | teacher "
        "tokens | peak RSS MiB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for length in lengths:
        for batch in batches:
            for label in labels:
                cell = cells.get((label, length, batch))
                if cell is None:
                    continue
                ref = cells.get((reference_for(label), length, batch))
                rss = f"{cell['peak_rss_mib']:.0f}" + (
                    f" ({cell['peak_rss_mib'] / ref['peak_rss_mib']:.2f}x)" if ref and ref is not cell else ""
                )
                lines.append(
                    f"| {label} | {length} | {batch} | {cell['seconds_per_step']:.2f} | "
                    f"{cell['generated_tokens_per_step']:.0f} | {cell['generated_tokens_per_second']:.1f} | "
                    f"{cell['teacher_forwards_per_token']:.3f} | {_fmt(cell['acceptance'])} | "
                    f"{_fmt(cell['teacher_token_fraction'])} | {rss} |"
                )
    lines += ["", *targets(cells)]
    lines += [
        "",
        "Where a step goes (seconds per optimizer step, and its share), SKD and the reference, at each length "
        f"(batch {batches[len(batches) // 2]}):",
        "",
        "| trainer | tokens | step | " + " | ".join(PROFILE_PARTS) + " |",
        "| --- | --- | --- | " + " | ".join("---" for _ in PROFILE_PARTS) + " |",
    ]
    batch = batches[len(batches) // 2]
    for label in [label for label in labels if "SKD" in label or label.startswith(REFERENCE)]:
        for length in lengths:
            cell = cells.get((label, length, batch))
            if cell is None:
                continue
            total = sum(cell["phases"].values())
            parts = " | ".join(
                f"{cell['phases'][p]:.2f} ({100 * cell['phases'][p] / total:.0f}%)" for p in PROFILE_PARTS
            )
            lines.append(f"| {label} | {length} | {total:.2f} | {parts} |")
    if plot_path:
        plot_tokens_per_second(cells, labels, lengths, batches, plot_path)
        lines += [
            "",
            f"![Generated tokens per second against the answer length]({os.path.relpath(plot_path, 'docs')})",
        ]
    return "\n".join(lines)


def plot_tokens_per_second(cells, labels, lengths, batches, path: str) -> None:
    from plotting import pyplot

    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, len(batches), figsize=(4.5 * len(batches), 4), squeeze=False)
    for ax, batch in zip(axes[0], batches):
        for label in labels:
            points = [
                (t, cells[label, t, batch]["generated_tokens_per_second"])
                for t in lengths
                if (label, t, batch) in cells
            ]
            if points:
                style = "--" if label.startswith(REFERENCE) else "-"
                ax.plot(*zip(*points), style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("answer length (tokens)")
        ax.set_title(f"batch {batch}", fontsize=10)
    axes[0][0].set_ylabel("generated tokens per second")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="64,256,1024", help="answer lengths (max_completion_length)")
    parser.add_argument("--batches", default="1,4,16")
    parser.add_argument("--trainers", default=None, help=f"comma-separated slugs of {[slug(t) for t in TRAINERS]}")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per cell, after one warm-up")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--records", default="benchmarks/records/scaling")
    parser.add_argument("--plots", default="docs/img", help="where the plot goes ('' for none)")
    parser.add_argument("--tiny", action="store_true", help="the tiny pair of trl_kd.testing (the harness, fast)")
    parser.add_argument("--report", action="store_true", help="only the tables and the plot, from the records")
    parser.add_argument("--cell", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cell:
        print(json.dumps(run_cell(*json.loads(args.cell))))
        return
    args.lengths = [int(x) for x in args.lengths.split(",")]
    args.batches = [int(x) for x in args.batches.split(",")]
    args.trainers = args.trainers.split(",") if args.trainers else None
    unknown = set(args.trainers or ()) - {slug(t) for t in TRAINERS}
    if unknown:
        raise SystemExit(f"Unknown trainers {sorted(unknown)}; choose from {[slug(t) for t in TRAINERS]}.")
    if not args.report:
        run_grid(args)
    pair = "tiny" if args.tiny else "real"
    plot = os.path.join(args.plots, f"scaling_{pair}.png") if args.plots else None
    print(report(Path(args.records), pair, plot))


if __name__ == "__main__":
    main()
