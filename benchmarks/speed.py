"""Speed and memory of the trl-kd trainers and losses. Prints markdown tables for docs/benchmarks.md.

    python benchmarks/speed.py                      # everything
    python benchmarks/speed.py --only loss          # peak memory of the loss at vocab 32k/128k x 2048 positions
    python benchmarks/speed.py --only loss --vocabs 49152 --positions 1024 --hidden 576   # the real pair's heads
    python benchmarks/speed.py --only trainers      # step time of each trainer vs trl.DistillationTrainer
    python benchmarks/speed.py --only trainers-sft  # the same after fine-tuning both models on the task
    python benchmarks/speed.py --only positions     # who writes each part of the response (SKD, SWITCH)
    python benchmarks/speed.py --only trainers --match PromptKD "beta=1"   # chosen rows, with the reference runs
    python benchmarks/speed.py --only trainers --repeat 3                  # medians of 3 interleaved runs
    python benchmarks/speed.py --only guards        # time in the finite-value guards, per trainer step
    python benchmarks/speed.py --only profile       # where a step of every trainer goes (sampling, teacher, ...)
    python benchmarks/speed.py --only memory        # peak memory with the sampler's teacher states reused or not
    python benchmarks/speed.py --only sampling      # one sampled token over a 49k vocabulary: nucleus by partial sort
    python benchmarks/speed.py --only operations    # operations and host reads per token: generate vs the sampler
    python benchmarks/speed.py --only schedule      # the draft-length schedules on the real pair (after `prepare`)

Plots go to `docs/img/` (`--plot-dir`) when matplotlib is installed.

Loss memory is the peak of one forward+backward above what the inputs already hold: `torch.cuda.max_memory_allocated`
on GPU, the growth of the process's peak RSS on CPU (each case in a fresh subprocess).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402

from plotting import pyplot  # noqa: E402
from timing import PROFILE_PARTS, PhaseProfiler, StepTimer  # noqa: E402


LOSS_CASES = [
    ("dense full-logit JSD (reference)", "dense", "jsd"),
    ("trl-kd chunked JSD (TRL kernel where Triton runs)", "chunked", "jsd"),
    ("trl-kd chunked JSD, tiles recomputed in the backward", "recompute", "jsd"),
    ("trl-kd chunked skew RKL", "chunked", "skew_rkl"),
    ("trl-kd chunked skew RKL, tiles recomputed in the backward", "recompute", "skew_rkl"),
    ("trl-kd chunked TVD", "chunked", "tvd"),
]


def _loss_case(mode: str, loss_type: str, vocab: int, positions: int, hidden: int, device: str) -> dict:

    from trl_kd.losses import LMHead, chunked_kd_loss, divergence

    torch.manual_seed(0)
    h_s = torch.randn(1, positions, hidden, device=device, requires_grad=True)
    h_t = torch.randn(1, positions, hidden, device=device)
    w_s = (torch.randn(vocab, hidden, device=device) * 0.02).requires_grad_(True)
    w_t = torch.randn(vocab, hidden, device=device) * 0.02
    mask = torch.ones(1, positions, dtype=torch.long, device=device)

    def step() -> float:
        if mode == "dense":
            loss = divergence(h_s @ w_s.t(), h_t @ w_t.t(), loss_type, beta=0.5).mean()
        else:
            in_forward = mode == "chunked"  # "recompute": activation checkpointing of the tiles, as before
            heads = LMHead(w_s), LMHead(w_t)
            loss = chunked_kd_loss(h_s, h_t, *heads, mask, vocab, loss_type, beta=0.5, gradient_in_forward=in_forward)[
                0
            ]
        loss.backward()
        return loss.item()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    sync()
    if device == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    value = step()
    sync()
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    times = []
    for _ in range(3):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return {"peak_bytes": peak, "loss": value, "seconds": statistics.median(times)}


def bench_loss(vocabs=(32000, 128256), positions=2048, hidden=1024) -> str:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    lines = [
        f"Peak memory of one loss forward+backward above the inputs, and its time (median of 3), {positions} "
        f"positions, hidden {hidden}, fp32 inputs, on {device}.",
        "",
        "| loss | vocab | peak (MiB) | vs dense | fwd+bwd (ms) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for vocab in vocabs:
        dense_peak = None
        for label, mode, loss_type in LOSS_CASES:
            case = json.dumps([mode, loss_type, vocab, positions, hidden, device])
            args = [sys.executable, __file__, "--loss-case", case]
            out = subprocess.run(args, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
            result = json.loads(out)
            peak = result["peak_bytes"] / 2**20
            dense_peak = dense_peak or peak
            lines.append(
                f"| {label} | {vocab} | {peak:,.0f} | {peak / dense_peak:.2f}x | {result['seconds'] * 1000:,.0f} |"
            )
    return "\n".join(lines)


# the teacher-in-the-loop speed-ups off: a fixed draft length and a second teacher forward for the loss
_OFF = {"adaptive_draft": False, "reuse_teacher_states": False}
_BEFORE = "fixed draft, teacher recomputed"


def _tiny_pair(pair: str, teacher_steps: int = 400, answer_items: tuple[int, int] = (2, 6)):
    """The tiny Qwen2 student (~30k parameters) and teacher (~130k) of `trl_kd.testing`; `pair="sft"` fine-tunes both
    on the synthetic task first (`sft_on_task`: the teacher `teacher_steps`, the student 150 steps) with answers of
    `answer_items` letters."""
    from trl_kd.testing import build_model, build_tokenizer, sft_on_task

    torch.set_num_threads(2)
    tokenizer = build_tokenizer()
    student, teacher = build_model("qwen2", tokenizer, "student"), build_model("qwen2", tokenizer, "teacher", seed=1)
    if pair == "sft":
        lo, hi = answer_items
        sft_on_task(teacher, tokenizer, steps=teacher_steps, min_len=lo, max_len=hi)
        sft_on_task(student, tokenizer, steps=150, seed=1, min_len=lo, max_len=hi)
    return tokenizer, student, teacher


def _bench_args(steps: int, batch: int, completion: int, **extra) -> dict:
    """Training arguments every timed run shares: fp32, untracked, no checkpoints, no activation checkpointing, a log
    row per step."""
    from trl_kd._compat import checkpointing_field

    return dict(
        **{checkpointing_field(): False},
        output_dir="/tmp/trl-kd-bench",
        per_device_train_batch_size=batch,
        max_steps=steps,
        max_completion_length=completion,
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-5,
        use_cpu=not torch.cuda.is_available(),
        **extra,
    )


def _logged_mean(history: list[dict], key: str) -> float | None:
    """Mean of a metric over a run's log rows; `None` when it was never logged."""
    values = [row[key] for row in history if key in row]
    return statistics.mean(values) if values else None


def _cell(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def plot_step_times(title: str, results: list[tuple[str, float]], path: str) -> None:
    """Horizontal bars: each trainer's median step time relative to `trl.DistillationTrainer`."""
    plt = pyplot()
    if plt is None:
        return
    labels, ratios = [label for label, _ in results][::-1], [ratio for _, ratio in results][::-1]
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(labels) + 1.2))
    colors = ["tab:gray" if label.startswith("trl.") else "tab:blue" for label in labels]
    ax.barh(labels, ratios, color=colors)
    ax.axvline(1.0, color="black", linewidth=0.8)
    for y, ratio in enumerate(ratios):
        ax.text(ratio, y, f" {ratio:.2f}x", va="center", fontsize=8)
    ax.set_xlabel("median step time / trl.DistillationTrainer's")
    ax.set_title(title, fontsize=10)
    ax.tick_params(axis="y", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def bench_trainers(
    steps: int = 20,
    batch: int = 4,
    completion: int = 32,
    pair: str = "random",
    plot_path: str | None = None,
    match: list[str] | None = None,
    repeat: int = 1,
) -> str:
    """Step time of every trainer on the same tiny models. `pair="sft"`: teacher and student first fine-tuned on the
    synthetic task (`trl_kd.testing.sft_on_task`), so the acceptance rates are those of an SFT-initialised student.
    `repeat`: run the whole list this many times, interleaved, and report each row's median over the runs (the
    shared CPU drifts within a table)."""
    import copy

    from transformers.trainer_callback import PrinterCallback
    from trl import DistillationConfig, DistillationTrainer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from trl_kd import (
        KDConfig,
        KDTrainer,
        PromptKDConfig,
        PromptKDTrainer,
        SpeculativeKDConfig,
        SpeculativeKDTrainer,
        SwitchConfig,
        SwitchTrainer,
    )
    from trl_kd.testing import make_dataset

    tokenizer, student, teacher = _tiny_pair(pair)
    dataset = make_dataset("conversational_prompt_completion", 256)
    messages = make_dataset("messages", 256)  # the same rows in the format GKDTrainer needs
    common = _bench_args(steps, batch, completion, temperature=1.0, beta=0.5)
    cases = [
        ("trl.DistillationTrainer (on-policy, JSD)", DistillationTrainer, DistillationConfig, {}),
        (
            "trl.DistillationTrainer, student at SKD's temperature/top-p 0.5/0.5",
            DistillationTrainer,
            DistillationConfig,
            {"temperature": 0.5, "top_p": 0.5},
        ),
        ("trl.experimental.gkd.GKDTrainer lmbda=1 (full logits)", GKDTrainer, GKDConfig, {"lmbda": 1.0}),
        ("trl.experimental.gkd.GKDTrainer lmbda=0.5 (full logits)", GKDTrainer, GKDConfig, {"lmbda": 0.5}),
        ("KDTrainer lmbda=1 (on-policy, JSD)", KDTrainer, KDConfig, {"lmbda": 1.0}),
        ("KDTrainer lmbda=0.5 (mixed, JSD)", KDTrainer, KDConfig, {"lmbda": 0.5}),
        ("KDTrainer lmbda=1, skew RKL", KDTrainer, KDConfig, {"lmbda": 1.0, "loss_type": "skew_rkl"}),
        ("KDTrainer lmbda=0, seq_kd", KDTrainer, KDConfig, {"lmbda": 0.0, "seq_kd": True}),
        ("SpeculativeKDTrainer, K=25 (paper defaults)", SpeculativeKDTrainer, SpeculativeKDConfig, {"beta": 0.0}),
        ("SwitchTrainer, tau_0=inf (never switches)", SwitchTrainer, SwitchConfig, {"switch_threshold": float("inf")}),
        (
            "SwitchTrainer, calibrated to 50% teacher tokens",
            SwitchTrainer,
            SwitchConfig,
            {"target_teacher_fraction": 0.5},
        ),
        ("KDTrainer lmbda=1, beta=1 (on-policy reverse KL)", KDTrainer, KDConfig, {"lmbda": 1.0, "beta": 1.0}),
        ("PromptKDTrainer (defaults)", PromptKDTrainer, PromptKDConfig, {"beta": 1.0}),
        # the reference again: the ratios use the mean of both runs, and their gap shows the machine's drift
        ("trl.DistillationTrainer (on-policy, JSD), run again last", DistillationTrainer, DistillationConfig, {}),
    ]
    if pair == "random":
        # random models rank tokens almost at random: acceptance is about K / V, so K sets it
        at = next(i for i, case in enumerate(cases) if case[1] is SpeculativeKDTrainer)
        every = {"acceptance_top_k": len(tokenizer), "temperature": 1.0, "top_p": 1.0, "beta": 0.5}
        most = {**every, "acceptance_top_k": int(0.85 * len(tokenizer))}
        cases[at:at] = [
            ("SpeculativeKDTrainer, K=V (every token accepted)", SpeculativeKDTrainer, SpeculativeKDConfig, every),
            ("SpeculativeKDTrainer, K=V, " + _BEFORE, SpeculativeKDTrainer, SpeculativeKDConfig, {**every, **_OFF}),
            ("SpeculativeKDTrainer, K=0.85 V", SpeculativeKDTrainer, SpeculativeKDConfig, most),
            (
                "SpeculativeKDTrainer, K=0.85 V, " + _BEFORE,
                SpeculativeKDTrainer,
                SpeculativeKDConfig,
                {**most, **_OFF},
            ),
        ]
        at = next(i for i, case in enumerate(cases) if "tau_0=inf" in case[0]) + 1
        never = {"switch_threshold": float("inf"), **_OFF}
        cases[at:at] = [("SwitchTrainer, tau_0=inf, " + _BEFORE, SwitchTrainer, SwitchConfig, never)]
    if match:  # the reference runs, and the rows whose label contains one of `match`
        cases = [c for i, c in enumerate(cases) if i in (0, len(cases) - 1) or any(m in c[0] for m in match)]
    runs: dict[str, list[float]] = {label: [] for label, *_ in cases}
    columns: dict[str, tuple[str, str]] = {}
    for _ in range(repeat):
        for label, trainer_cls, config_cls, extra in cases:
            config = {**common, **extra}
            if trainer_cls is GKDTrainer:
                config["max_new_tokens"] = config.pop("max_completion_length")
            trainer = trainer_cls(
                model=copy.deepcopy(student),
                teacher_model=copy.deepcopy(teacher),
                args=config_cls(**config),
                train_dataset=messages if trainer_cls is GKDTrainer else dataset,
                processing_class=tokenizer,
            )
            trainer.remove_callback(PrinterCallback)
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            runs[label].append(statistics.median(timer.times[2:]))  # the first steps warm up
            history = trainer.state.log_history
            extra_cols = " | ".join(
                _cell(_logged_mean(history, key), 2) for key in ("acceptance_rate", "teacher_token_fraction")
            )
            columns[label] = (_cell(_logged_mean(history, "completions/mean_length"), 1), extra_cols)
    results = [(label, statistics.median(runs[label]), *columns[label]) for label, *_ in cases]
    reference = (results[0][1] + results[-1][1]) / 2
    rows = [
        f"| {label} | {median * 1000:.0f} | {median / reference:.2f}x | {length} | {extra_cols} |"
        for label, median, length, extra_cols in results
    ]
    ratios = [(label, median / reference) for label, median, _, _ in results[:-1]]
    models = "SFT on the task (teacher 400 steps, student 150)" if pair == "sft" else "random-init"
    header = [
        f"Median step time, tiny Qwen2 student (~30k params) and teacher (~130k), {models}, batch {batch}, up to "
        f"{completion} new tokens, fp32, {torch.get_num_threads()} threads, {steps} steps (first 2 dropped)"
        + (f", median of {repeat} interleaved runs" if repeat > 1 else "")
        + ". Ratios are to the mean of the two trl.DistillationTrainer runs (first and last). "
        "Acceptance and teacher-token fraction are means over the run.",
        "",
        "| trainer | step (ms) | vs DistillationTrainer | mean completion length | acceptance | teacher tokens |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    if plot_path:
        plot_step_times(f"Step time by trainer, tiny models ({models.split(' (')[0]}), 2-core CPU", ratios, plot_path)
    return "\n".join(header + rows)


def bench_positions(
    steps: int = 10, batch: int = 8, completion: int = 40, buckets: int = 8, plot_path: str | None = None
) -> str:
    """Fraction of response tokens the teacher wrote in each of `buckets` equal parts of the responses, for SWITCH
    (decaying vs constant threshold) and SKD, on the random pair and on a pair fine-tuned on long answers (10-16
    letters: about 30 tokens), so that every eighth of a response holds a few tokens."""
    import copy

    from transformers.trainer_callback import PrinterCallback

    from trl_kd import SpeculativeKDConfig, SpeculativeKDTrainer, SwitchConfig, SwitchTrainer
    from trl_kd.testing import make_dataset

    dataset = make_dataset("conversational_prompt_completion", 256, min_len=10, max_len=16)
    common = _bench_args(steps, batch, completion, seed=0)
    cases = [
        ("SWITCH exp schedule, calibrated to 0.5", SwitchTrainer, SwitchConfig, {"target_teacher_fraction": 0.5}),
        (
            "SWITCH constant threshold, calibrated to 0.5",
            SwitchTrainer,
            SwitchConfig,
            {"target_teacher_fraction": 0.5, "switch_schedule": "constant"},
        ),
        ("SKD, K=25 (paper defaults)", SpeculativeKDTrainer, SpeculativeKDConfig, {}),
    ]
    rows, curves = [], {}
    for pair in ("random", "sft"):
        tokenizer, student, teacher = _tiny_pair(pair, teacher_steps=1500, answer_items=(10, 16))
        for label, trainer_cls, config_cls, extra in cases:
            trainer = trainer_cls(
                model=copy.deepcopy(student),
                teacher_model=copy.deepcopy(teacher),
                args=config_cls(**common, **extra),
                train_dataset=dataset,
                processing_class=tokenizer,
            )
            trainer.position_buckets = buckets
            trainer.remove_callback(PrinterCallback)
            trainer.train()
            history = trainer.state.log_history
            fractions = [
                _logged_mean(history, f"teacher_token_fraction/bucket_{b + 1}_of_{buckets}") for b in range(buckets)
            ]
            thresholds = [row["switch_threshold"] for row in history if "switch_threshold" in row]
            tau = f"{thresholds[-1]:.3g}" if thresholds else "–"
            models = "SFT on long answers" if pair == "sft" else "random-init"
            curves[f"{label}, {models}"] = fractions
            rows.append(
                f"| {label} | {models} | {tau} | {_cell(_logged_mean(history, 'teacher_token_fraction'), 2)} | "
                + " | ".join(_cell(f, 2) for f in fractions)
                + f" | {_cell(_logged_mean(history, 'completions/mean_length'), 1)} |"
            )
    header = [
        f"Teacher-token fraction by eighth of the response: mean over a {steps}-step run (batch {batch}, up to "
        f"{completion} new tokens, answers of 10-16 letters), tiny Qwen2 pair, random-init and SFT-initialised.",
        "",
        "| method | models | tau_0 | teacher tokens | "
        + " | ".join(f"{b + 1}/{buckets}" for b in range(buckets))
        + " | mean length |",
        "| --- " * (buckets + 5) + "|",
    ]
    if plot_path:
        plot_positions(curves, buckets, plot_path)
    return "\n".join(header + rows)


def plot_positions(curves: dict[str, list[float]], buckets: int, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6), sharey=True)
    centres = [(b + 0.5) / buckets for b in range(buckets)]
    for ax, models in zip(axes, ("random-init", "SFT on long answers"), strict=True):
        for label, fractions in curves.items():
            if label.endswith(models):
                values = [float("nan") if f is None else f for f in fractions]  # an empty eighth: a gap
                ax.plot(centres, values, marker="o", label=label.rsplit(", ", 1)[0])
        ax.set_title(f"{models} pair", fontsize=10)
        ax.set_xlabel("position in the response (fraction of its length)")
        ax.set_ylim(-0.03, 1.03)
    axes[0].set_ylabel("teacher-written tokens")
    axes[1].legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def bench_guards(steps: int = 20, batch: int = 4, completion: int = 32) -> str:
    """Share of each trainer's step spent in the finite-value guards (`trl_kd.guards`): every guard call is timed
    inside real steps of the tiny random pair, where the guards weigh most against the models' own work."""
    import copy
    from collections import defaultdict

    from transformers.trainer_callback import PrinterCallback

    import trl_kd
    import trl_kd.kd.trainer
    import trl_kd.promptkd.trainer
    import trl_kd.sampler
    from trl_kd.testing import make_dataset

    spent = defaultdict(float)

    def timed(module, name):
        original = getattr(module, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        setattr(module, name, wrapper)

    for module, names in (
        (trl_kd.sampler, ["check_sampling_probs"]),
        (trl_kd.kd.trainer, ["finite_flags", "check_grad_norm"]),
        (trl_kd.promptkd.trainer, ["finite_flags", "check_grad_norm"]),
    ):
        for name in names:
            timed(module, name)
    tokenizer, student, teacher = _tiny_pair("random")
    dataset = make_dataset("conversational_prompt_completion", 256)
    common = _bench_args(steps, batch, completion, temperature=1.0)
    # every registered method at its defaults, except where a default would not exercise its machinery
    extras = {
        "gkd": ({"lmbda": 1.0}, "on-policy, JSD"),
        "switch": ({"target_teacher_fraction": 0.5}, "calibrated to 50% teacher tokens"),
    }
    cases = []
    for method in trl_kd.METHODS.values():
        extra, note = extras.get(method.name, ({}, "defaults"))
        cases.append((f"{method.trainer.__name__} ({note})", method.trainer, method.config, extra))
    rows = []
    for label, trainer_cls, config_cls, extra in cases:
        trainer = trainer_cls(
            model=copy.deepcopy(student),
            teacher_model=copy.deepcopy(teacher),
            args=config_cls(**common, **extra),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer()
        trainer.add_callback(timer)
        spent.clear()
        trainer.train()
        step = statistics.mean(timer.times)
        guard = sum(spent.values()) / steps
        rows.append(f"| {label} | {step * 1000:.1f} | {guard * 1000:.3f} | {100 * guard / step:.2f}% |")
    header = [
        f"Time in the finite-value guards per optimizer step, tiny Qwen2 pair (random-init), batch {batch}, up to "
        f"{completion} new tokens, fp32, {torch.get_num_threads()} threads, {steps} steps (means).",
        "",
        "| trainer | step (ms) | guards (ms/step) | share |",
        "| --- | --- | --- | --- |",
    ]
    return "\n".join(header + rows)


def bench_profile(steps: int = 12, batch: int = 4, completion: int = 32) -> str:
    """Where one optimizer step of every trainer goes, on the tiny random pair, as `timing.PhaseProfiler` splits it:
    sampling (the two models' forwards apart), the loss (the teacher's forward there apart), the backward, the
    optimizer step, and the rest as bookkeeping (TRL's batch assembly, padding, metric reductions, logging)."""
    import copy

    from transformers.trainer_callback import PrinterCallback
    from trl import DistillationConfig, DistillationTrainer

    import trl_kd
    from trl_kd.testing import make_dataset

    tokenizer, student, teacher = _tiny_pair("random")
    dataset = make_dataset("conversational_prompt_completion", 256)
    common = _bench_args(steps, batch, completion, temperature=1.0, beta=0.5)
    vocab = len(tokenizer)
    cases = [("trl.DistillationTrainer (on-policy, JSD)", DistillationTrainer, DistillationConfig, {})]
    settings = {
        "gkd": [("on-policy", {"lmbda": 1.0})],
        "skd": [
            ("K=V (every token accepted)", {"acceptance_top_k": vocab, "temperature": 1.0, "top_p": 1.0}),
            ("K=0.85 V", {"acceptance_top_k": int(0.85 * vocab), "temperature": 1.0, "top_p": 1.0}),
        ],
        "switch": [("tau_0=inf (never switches)", {"switch_threshold": float("inf")})],
        "promptkd": [("defaults", {"beta": 1.0})],
    }
    for method in trl_kd.METHODS.values():
        for note, extra in settings.get(method.name, [("defaults", {})]):
            cases.append((f"{method.trainer.__name__}, {note}", method.trainer, method.config, extra))

    rows = []
    for label, trainer_cls, config_cls, extra in cases:
        trainer = trainer_cls(
            model=copy.deepcopy(student),
            teacher_model=copy.deepcopy(teacher),
            args=config_cls(**{**common, **extra}),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer()
        trainer.add_callback(timer)
        profiler = PhaseProfiler(trainer)
        trainer.train()
        step = sum(timer.times) / steps
        parts = profiler.phases(steps, step)
        cells = " | ".join(f"{1000 * parts[p]:.0f} ({100 * parts[p] / step:.0f}%)" for p in PROFILE_PARTS)
        rows.append(f"| {label} | {1000 * step:.0f} | {cells} |")
    header = [
        f"Where a step goes (ms per optimizer step, and its share), tiny Qwen2 pair (random-init), batch {batch}, up "
        f'to {completion} new tokens, fp32, {torch.get_num_threads()} threads, {steps} steps (means). "sampling: '
        "student\" is all of sampling except the teacher's forwards (the student's forwards, the rule, bookkeeping).",
        "",
        "| trainer | step (ms) | " + " | ".join(PROFILE_PARTS) + " |",
        "| --- | --- | " + " | ".join("---" for _ in PROFILE_PARTS) + " |",
    ]
    return "\n".join(header + rows)


MEMORY_CASES = [
    ("SpeculativeKDTrainer, K=V", "skd", {"temperature": 1.0, "top_p": 1.0}),  # K set to V below
    ("SwitchTrainer, tau_0=inf", "switch", {"switch_threshold": float("inf")}),
]


def _memory_case(method: str, extra: dict, reuse: bool) -> dict:
    """Peak RSS growth (bytes) over a short training run in this process, and the teacher forwards of its losses."""
    import copy

    from transformers import Qwen2Config, Qwen2ForCausalLM
    from transformers.trainer_callback import PrinterCallback

    import trl_kd
    from trl_kd.testing import build_tokenizer, make_dataset

    torch.set_num_threads(2)
    tokenizer = build_tokenizer()

    def model(hidden: int, layers: int, seed: int) -> Qwen2ForCausalLM:
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=len(tokenizer),
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=8,
            num_key_value_heads=2,
            intermediate_size=3 * hidden,
            max_position_embeddings=1024,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return Qwen2ForCausalLM(config)

    student, teacher = model(256, 4, 0), model(1024, 8, 1)
    if method == "skd":
        extra = {**extra, "acceptance_top_k": len(tokenizer)}  # every draft accepted: the rounds are the same
    method = trl_kd.METHODS[method]
    args = method.config(**_bench_args(3, 8, 64, beta=0.5, reuse_teacher_states=reuse, adaptive_draft=False, **extra))
    trainer = method.trainer(
        model=copy.deepcopy(student),
        teacher_model=copy.deepcopy(teacher),
        args=args,
        train_dataset=make_dataset("conversational_prompt_completion", 64),
        processing_class=tokenizer,
    )
    trainer.remove_callback(PrinterCallback)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainer.train()
    return {"peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before}


def bench_memory() -> str:
    """Peak memory of training with the sampler's teacher states reused against recomputed, each run in a fresh
    process: the growth of peak RSS over 3 steps (CPU), batch 8, 64 new tokens, a 256x4 student and a 1024x8
    teacher (Qwen2 shapes, fp32), fixed draft length."""
    rows = [
        "Peak RSS growth over 3 training steps (fresh process per run), Qwen2 student 256x4 and teacher 1024x8, fp32, "
        "batch 8, up to 64 new tokens, fixed draft length; MiB.",
        "",
        "| trainer | teacher states reused | recomputed | reused / recomputed |",
        "| --- | --- | --- | --- |",
    ]
    for label, method, extra in MEMORY_CASES:
        peaks = []
        for reuse in (True, False):
            out = subprocess.run(
                [sys.executable, __file__, "--memory-case", json.dumps([method, extra, reuse])],
                capture_output=True,
                text=True,
                check=True,
            )
            peaks.append(json.loads(out.stdout.strip().splitlines()[-1])["peak"] / 2**20)
        rows.append(f"| {label} | {peaks[0]:.0f} | {peaks[1]:.0f} | {peaks[0] / peaks[1]:.2f} |")
    return "\n".join(rows)


SAMPLING_SETTINGS = [  # (label, temperature, top_p)
    ("T 1.0, no nucleus (DistillationTrainer)", 1.0, 1.0),
    ("T 0.5, top-p 0.5 (SKD's student)", 0.5, 0.5),
    ("T 0.2, top-p 0.5 (SKD's teacher)", 0.2, 0.5),
    ("T 1.0, top-p 0.9", 1.0, 0.9),
    ("T 1.0, top-p 0.95", 1.0, 0.95),
]


def bench_sampling(rows: int = 4, vocab: int = 49152, repeats: int = 50) -> str:
    """Milliseconds to draw one token per row (`SamplingParams.sample`) and to cut its nucleus from the partial sort
    (`nucleus_mask`, the default) against a full sort of the vocabulary, on logits shaped like a language model's:
    ``-slope * log(rank)`` over a random order, a peaked row (slope 2, top token 61%) and a flat one (slope 1.2,
    top token 18%)."""

    from trl_kd.sampler import NUCLEUS_PREFILTER, SamplingParams, nucleus_mask

    def timed(fn) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1e3

    generator = torch.Generator().manual_seed(0)
    ranks = torch.arange(1, vocab + 1, dtype=torch.float32).log()
    out = [
        f"One token per row, {rows} rows x {vocab:,} logits, fp32, {torch.get_num_threads()} threads, mean of "
        f"{repeats} calls; nucleus size is the mean over rows; the partial sort takes the top {NUCLEUS_PREFILTER}.",
        "",
        "| logits | setting | nucleus size | sample (ms) | nucleus, partial sort (ms) | nucleus, full sort (ms) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for shape, slope in (("peaked (slope 2)", 2.0), ("flat (slope 1.2)", 1.2)):
        order = torch.stack([torch.randperm(vocab, generator=generator) for _ in range(rows)])
        logits = -slope * ranks[order]
        for label, temperature, top_p in SAMPLING_SETTINGS:
            params = SamplingParams(temperature=temperature, top_p=top_p)
            warm = logits / temperature
            sample_ms = timed(lambda: params.sample(logits))
            if top_p < 1.0:
                size = f"{nucleus_mask(warm, top_p).sum(-1).float().mean():.0f}"
                partial = f"{timed(lambda: nucleus_mask(warm, top_p)):.2f}"
                full = f"{timed(lambda: nucleus_mask(warm, top_p, prefilter=0)):.2f}"
            else:
                size, partial, full = f"{vocab:,}", "–", "–"
            out.append(f"| {shape} | {label} | {size} | {sample_ms:.2f} | {partial} | {full} |")
    return "\n".join(out)


def bench_operations(batch: int = 4, prompt: int = 32, completion: int = 32) -> str:
    """Operations the CPU dispatches (`torch.profiler` events, each a kernel launch or more on a GPU), values read
    back to the host (`aten::_local_scalar_dense`, a synchronisation on a GPU) and the wall time of one batch of
    answers, on the real pair's shapes (SmolLM2-135M and its close 24-layer student, random weights,
    `gpu.close_pair`; bf16 on a GPU, fp32 on CPU): the student's `generate` against the teacher-in-the-loop sampler,
    with every draft kept and with SKD's rule. On a launch-bound GPU the time per operation is about the same in
    every row, so these counts, not the arithmetic, set a small model's sampling time."""
    from transformers import GenerationConfig

    from trl_kd.sampler import OnPolicyRule, SamplingParams, TopKRule, block_verify_sample

    from gpu import build_pair

    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    _, _, teacher, student = build_pair("smollm2", tiny=False, dtype=dtype)
    student.eval().to(device)
    teacher.eval().to(device)
    vocab = teacher.config.vocab_size
    prompts = torch.randint(3, vocab, (batch, prompt), generator=torch.Generator().manual_seed(0)).tolist()

    def generate() -> dict:
        ids = torch.tensor(prompts, device=device)
        config = GenerationConfig(
            do_sample=True, max_new_tokens=completion, min_new_tokens=completion, pad_token_id=0, eos_token_id=1
        )
        with torch.no_grad():
            student.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=config)
        return {"student_forwards": completion, "teacher_forwards": 0}

    def sampler(rule, params, schedule) -> callable:
        def run() -> dict:
            rollout = block_verify_sample(
                student,
                teacher,
                prompts,
                rule,
                max_new_tokens=completion,
                eos_token_ids=[],
                pad_token_id=0,
                student_params=params,
                teacher_params=SamplingParams(0.2, 0.5),
                adaptive_draft=True,
                draft_schedule=schedule,
            )
            by_row = [1 - sum(mask) / max(len(mask), 1) for mask in rollout.teacher_mask]
            return {**rollout.counts, "row_acceptance": (min(by_row), max(by_row))}

        return run

    def timed(run) -> float:
        """Median wall seconds of three runs from the same seed (after one untimed warm-up run)."""
        times = []
        for _ in range(4):
            torch.manual_seed(0)
            sync()
            start = time.perf_counter()
            run()
            sync()
            times.append(time.perf_counter() - start)
        return statistics.median(times[1:])

    cases = [
        ("student `generate` (what DistillationTrainer samples with)", generate),
        ("sampler, every draft kept (on-policy rule)", sampler(OnPolicyRule(), SamplingParams(), "heuristic")),
        (
            'sampler, SKD\'s rule (K=25, student T 0.5 / top-p 0.5), `draft_schedule="heuristic"`',
            sampler(TopKRule(25), SamplingParams(0.5, 0.5), "heuristic"),
        ),
        (
            'sampler, SKD\'s rule, `draft_schedule="expected_cost"`',
            sampler(TopKRule(25), SamplingParams(0.5, 0.5), "expected_cost"),
        ),
    ]
    out = [
        f"Real pair's shapes, random weights, {'bf16 on ' + torch.cuda.get_device_name() if cuda else 'fp32 on CPU'}, "
        f"batch {batch}, {prompt} prompt + {completion} new tokens; counts for the whole batch; time: median of 3 "
        "runs after a warm-up.",
        "",
        "| sampling | ms | operations | µs per operation | host reads | student forwards | teacher forwards | "
        "acceptance (rows: lowest–highest) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, run in cases:
        seconds = timed(run)
        print(f"{label}: {seconds:.2f} s per batch; counting operations", file=sys.stderr, flush=True)
        torch.manual_seed(0)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            counts = run()
        events = prof.key_averages()
        operations = sum(e.count for e in events if e.key.startswith("aten::"))
        reads = sum(e.count for e in events if e.key == "aten::_local_scalar_dense")
        drafted = counts.get("drafted")  # positions written: accepted drafts and teacher replacements
        acceptance = "–"
        if drafted:
            low, high = counts["row_acceptance"]
            acceptance = f"{counts['accepted'] / drafted:.2f} ({low:.2f}–{high:.2f})"
        out.append(
            f"| {label} | {1000 * seconds:.0f} | {operations:,} | {1e6 * seconds / operations:.1f} | {reads} | "
            f"{counts['student_forwards']} | {counts['teacher_forwards']} | {acceptance} |"
        )
    return "\n".join(out)


def bench_schedule(batch: int = 4, completion: int = 64, batches: int = 8, student: str = "pruned-24") -> str:
    """The adaptive draft length's two schedules (`draft_schedule`) on the real pair from `real_model.py prepare`:
    SKD's rule at the paper's settings over ``batches`` batches of held-out prompts, each batch sampled by both
    schedules from the same seed. Rows that stop at EOS make the lengths differ between the two, so the table is per
    generated token; the forwards are counted exactly, the seconds on a shared CPU are noisy."""
    from scaling import load_pair

    from trl_kd.sampler import DRAFT_SCHEDULES, SamplingParams, TopKRule, block_verify_sample

    from real_model import cache_root

    torch.set_num_threads(1)
    tokenizer, teacher, student_model = load_pair(False, student)
    teacher.eval()
    student_model.eval()
    draft_cost = sum(p.numel() for p in student_model.parameters()) / sum(p.numel() for p in teacher.parameters())
    texts = json.loads((cache_root() / "prompts.json").read_text())["test"]
    keys = ("tokens", "seconds", "student_forwards", "teacher_forwards", "accepted", "drafted")
    totals = {name: dict.fromkeys(keys, 0.0) for name in DRAFT_SCHEDULES}
    for first in range(0, batches * batch, batch):
        prompt_ids = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for text in texts[first : first + batch]
        ]
        for name, total in totals.items():
            torch.manual_seed(first)
            start = time.perf_counter()
            rollout = block_verify_sample(
                student_model,
                teacher,
                prompt_ids,
                TopKRule(25),
                max_new_tokens=completion,
                eos_token_ids=[tokenizer.eos_token_id],
                pad_token_id=tokenizer.pad_token_id,
                vocab_size=len(tokenizer),
                student_params=SamplingParams(0.5, 0.5),
                teacher_params=SamplingParams(0.2, 0.5),
                adaptive_draft=True,
                draft_schedule=name,
            )
            total["seconds"] += time.perf_counter() - start
            total["tokens"] += sum(len(ids) for ids in rollout.completion_ids)
            for key in keys[2:]:
                total[key] += rollout.counts[key]
    out = [
        f"Real pair (SmolLM2-135M-Instruct, student {student}), SKD's rule (K = 25, student T/top-p 0.5/0.5), "
        f"{batches} batches of {batch} held-out prompts, up to {completion} new tokens, fp32, 1 thread; a draft "
        f"costs {draft_cost:.2f} teacher forwards (parameters).",
        "",
        "| draft_schedule | tokens | acceptance | student forwards / token | teacher forwards / token | "
        "forward cost / token | ms / token |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, total in totals.items():
        tokens = total["tokens"]
        cost = (draft_cost * total["student_forwards"] + total["teacher_forwards"]) / tokens
        out.append(
            f"| {name} | {tokens:.0f} | {total['accepted'] / total['drafted']:.2f} | "
            f"{total['student_forwards'] / tokens:.2f} | {total['teacher_forwards'] / tokens:.3f} | {cost:.2f} | "
            f"{1000 * total['seconds'] / tokens:.0f} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--only",
        choices=[
            "loss",
            "trainers",
            "trainers-sft",
            "positions",
            "guards",
            "profile",
            "memory",
            "sampling",
            "operations",
            "schedule",
        ],
    )
    parser.add_argument("--plot-dir", default="docs/img", help="Where the PNG plots go ('' for none).")
    parser.add_argument("--match", nargs="+", help="Time only the trainer rows whose labels contain one of these.")
    parser.add_argument("--repeat", type=int, default=1, help="Interleaved runs of the trainer tables (medians).")
    parser.add_argument("--batch", type=int, default=4, help="Answers per batch (--only operations, schedule).")
    parser.add_argument(
        "--completion", type=int, default=None, help="New tokens per answer (32 operations, 64 schedule)."
    )
    parser.add_argument("--batches", type=int, default=8, help="Batches of prompts (--only schedule).")
    parser.add_argument("--vocabs", default="32000,128256", help="Vocabulary sizes, comma-separated (--only loss).")
    parser.add_argument("--positions", type=int, default=2048, help="Response positions (--only loss).")
    parser.add_argument("--hidden", type=int, default=1024, help="Hidden size of both heads (--only loss).")
    parser.add_argument("--loss-case", help=argparse.SUPPRESS)
    parser.add_argument("--memory-case", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loss_case:
        print(json.dumps(_loss_case(*json.loads(args.loss_case))))
        return
    if args.memory_case:
        print(json.dumps(_memory_case(*json.loads(args.memory_case))))
        return
    print(
        f"Machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}\n"
    )
    if args.only in (None, "loss"):
        vocabs = tuple(int(v) for v in args.vocabs.split(","))
        print(bench_loss(vocabs, args.positions, args.hidden) + "\n")
    plot = (lambda name: os.path.join(args.plot_dir, name)) if args.plot_dir else (lambda name: None)
    if args.only in (None, "trainers"):
        random_plot = None if args.match else plot("step_time_random.png")
        print(bench_trainers(plot_path=random_plot, match=args.match, repeat=args.repeat) + "\n")
    if args.only in (None, "trainers-sft"):
        sft_plot = None if args.match else plot("step_time_sft.png")
        print(bench_trainers(pair="sft", plot_path=sft_plot, match=args.match, repeat=args.repeat) + "\n")
    if args.only in (None, "positions"):
        print(bench_positions(plot_path=plot("teacher_fraction_by_position.png")) + "\n")
    if args.only in (None, "guards"):
        print(bench_guards() + "\n")
    if args.only in (None, "profile"):
        print(bench_profile() + "\n")
    if args.only in (None, "memory"):
        print(bench_memory() + "\n")
    if args.only in (None, "sampling"):
        print(bench_sampling() + "\n")
    if args.only in (None, "operations"):
        print(bench_operations(batch=args.batch, completion=args.completion or 32) + "\n")
    if args.only == "schedule":  # needs `real_model.py prepare`: not part of the default run
        print(bench_schedule(batch=args.batch, completion=args.completion or 64, batches=args.batches) + "\n")


if __name__ == "__main__":
    main()
