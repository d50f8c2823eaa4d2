"""The quality benchmark's report, from its records alone: per-method tables with intervals, the learning-rate grid,
paired differences, the papers' claims, length buckets, PromptKD's prompted teacher and the learning curves."""

from __future__ import annotations

import os

import numpy as np

from plotting import pyplot
from quality_methods import ALL_METHODS, CLAIMS, GKD_BASELINE, METHODS, SFT_BASELINE
from quality_records import load_records
from quality_settings import Setting
from quality_stats import (
    choose_rate,
    mean_and_interval,
    paired_bootstrap,
    paired_runs,
    per_prompt_matrix,
    rate_sensitive,
)


def _final_runs(final: dict, grid: dict, setting: Setting) -> dict[str, list[dict]]:
    """Each method's final runs at the rate its grid chose (else the budget and rate with the most seeds); final
    runs at any other rate are diagnostics, listed after the methods as "<method> at lr <rate>"."""
    better = setting.higher_is_better[setting.primary]
    chosen, extra = {}, {}
    for method in ALL_METHODS:
        if method not in final:
            continue
        key = max(final[method], key=lambda k: len(final[method][k]))
        on_grid = grid.get(method, {}).items()
        scored = {k: [r["metrics"][setting.primary] for r in runs] for k, runs in on_grid if k[0] == key[0]}
        if scored:
            best = choose_rate(scored, better)
            key = best if best in final[method] else key
        chosen[method] = final[method][key]
        for other, runs in final[method].items():
            if other != key:
                extra[f"{method} at lr {other[1]:g}"] = runs
    return {**chosen, **extra}


def report(setting: Setting, root: str, plots: str | None) -> list[str]:
    """The markdown tables of one setting, from its records."""
    records = load_records(root, setting.name)
    final, grid = {}, {}
    for r in records:
        if r.get("phase") in ("final", "grid") and r["method"] in ALL_METHODS:
            by_phase = final if r["phase"] == "final" else grid
            by_phase.setdefault(r["method"], {}).setdefault((r["steps"], r["lr"]), []).append(r)
    refs = {r["method"]: r for r in records if r.get("phase") == "reference"}
    final = _final_runs(final, grid, setting)
    metrics = list(setting.higher_is_better)
    lines = [f"**{setting.name}**: {setting.describe}", ""]
    header = "| method | lr | seeds | " + " | ".join(metrics) + " | wall s/run |"
    lines += [header, "|" + " --- |" * (len(metrics) + 4)]
    for name, r in refs.items():
        cells = [
            f"{mean_and_interval(per_prompt_matrix([r], k)).mean:.2f}" if k in r["metrics"] else "–" for k in metrics
        ]
        seeds = len(r.get("per_prompt_by_seed", []))
        lines.append(f"| {name} | – | {seeds} | " + " | ".join(cells) + " | – |")
    for method, runs in final.items():
        cells = []
        for k in metrics:
            interval = mean_and_interval(per_prompt_matrix(runs, k))
            cells.append(f"{interval.mean:.2f} [{interval.low:.2f}, {interval.high:.2f}]")
        wall = np.mean([r["wall_time"] for r in runs])
        lines.append(f"| {method} | {runs[0]['lr']:g} | {len(runs)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    if grid:
        rates = sorted({lr for by_key in grid.values() for _, lr in by_key})
        some_run = next(iter(next(iter(grid.values())).values()))[0]
        lines += [
            "",
            f"Learning-rate grid ({setting.primary} on {len(some_run['per_prompt'][setting.primary])} "
            "validation prompts; the mean over the grid seeds, their number in brackets):",
            "",
            "| method | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
            "|" + " --- |" * (len(rates) + 1),
        ]
        for method in METHODS:
            if method in grid:
                by_lr = {lr: [r["metrics"][setting.primary] for r in runs] for (_, lr), runs in grid[method].items()}
                cells = [f"{np.mean(by_lr[lr]):.2f} ({len(by_lr[lr])})" if lr in by_lr else "–" for lr in rates]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Differences in {setting.primary} (paired bootstrap over prompts and seeds, 95%; "
        f"{'higher' if setting.higher_is_better[setting.primary] else 'lower'} is better):",
        "",
        "| method | vs student before | vs SFT on references | vs GKD on-policy |",
        "| --- | --- | --- | --- |",
    ]
    before = refs.get("Student before distillation")
    for method, runs in final.items():
        scores = per_prompt_matrix(runs, setting.primary)
        cells = []
        for baseline in (before, final.get(SFT_BASELINE), final.get(GKD_BASELINE)):
            if baseline is None:
                cells.append("–")
                continue
            base = per_prompt_matrix(baseline if isinstance(baseline, list) else [baseline], setting.primary)
            n = min(len(base), len(scores))
            cells.append(str(paired_bootstrap(scores[:n], base[:n])))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The papers' claims on this setting, in {setting.primary} (the difference is signed so that + "
        "favours the claim; confirmed or refuted only when the interval excludes 0), at each method's chosen rate "
        'and on the validation prompts at every grid rate both methods ran; "rate-sensitive": the sign of the '
        "difference changes across those rates:",
        "",
        "| claim | difference | at each grid rate (validation) | verdict |",
        "| --- | --- | --- | --- |",
    ]
    lines += claim_rows(setting, final, setting.primary, grid)
    if setting.generation_metric:
        lines += [
            "",
            f"The same claims judged on {setting.generation_metric} (the student's own samples; "
            f"{'higher' if setting.higher_is_better[setting.generation_metric] else 'lower'} is better; the "
            "difference is signed so that + favours the claim):",
            "",
            "| claim | difference | at each grid rate (validation) | verdict |",
            "| --- | --- | --- | --- |",
        ]
        lines += claim_rows(setting, final, setting.generation_metric, grid)
    lines += length_buckets(setting, final)
    lines += prompted_teacher_table(setting, records, refs.get("Teacher"))
    if plots:
        plot_curves(setting, final, refs, os.path.join(plots, f"quality_{setting.name}.png"))
    return lines


def claim_rows(setting: Setting, final: dict, metric: str, grid: dict | None = None) -> list[str]:
    """One table row per paper claim whose two methods ran: the paired difference in `metric` at the chosen rates,
    signed so that + favours the claim, the same difference at every grid rate both methods ran (validation prompts,
    the grid seeds paired), and the verdict, "rate-sensitive" where the sign changes across those rates."""
    sign = 1 if setting.higher_is_better[metric] else -1
    verdicts = {"better": "confirmed", "worse": "refuted", "tie": "inconclusive at this power"}
    rows = []
    for claim, method, baseline in CLAIMS:
        if method in final and baseline in final:
            chosen = paired_runs(final[method], final[baseline], metric, sign)
            at_rates = {}
            for key in sorted(set((grid or {}).get(method, {})) & set((grid or {}).get(baseline, {}))):
                if key[0] == final[method][0].get("steps", key[0]) and all(
                    metric in r["per_prompt"] for r in grid[method][key] + grid[baseline][key]
                ):
                    at_rates[key[1]] = paired_runs(grid[method][key], grid[baseline][key], metric, sign)
            verdict = verdicts[chosen.verdict()]
            if rate_sensitive([chosen.mean] + [i.mean for i in at_rates.values()]):
                verdict += ", rate-sensitive"
            per_rate = "; ".join(f"{lr:g}: {i}" for lr, i in at_rates.items()) or "–"
            rows.append(f"| {claim} | {chosen} | {per_rate} | {verdict} |")
    return rows


def prompted_teacher_table(setting: Setting, records: list[dict], teacher: dict | None) -> list[str]:
    """PromptKD's diagnostic runs: the teacher with the initial and with the learned soft prompt, beside the plain
    teacher, on the test prompts (seed 0)."""
    runs = [r for r in records if r.get("phase") == "diagnostic" and "prompted_teacher_after" in r]
    if not runs or teacher is None:
        return []
    k = setting.primary
    lines = [
        "",
        f"PromptKD's prompted teacher ({k} on the test prompts, seed 0; the plain teacher: "
        f"{teacher['metrics'][k]:.2f}):",
        "",
        "| method | lr | initial prompt | learned prompt | student after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(runs, key=lambda r: r["method"]):
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['prompted_teacher_before'][k]:.2f} | "
            f"{r['prompted_teacher_after'][k]:.2f} | {r['metrics'][k]:.2f} |"
        )
    return lines


def length_buckets(setting: Setting, final: dict, buckets: int = 3) -> list[str]:
    """The primary metric by reference length (tertiles of the test prompts' reference tokens), and each method's
    difference from on-policy GKD in every bucket: SWITCH's claim is that its gain grows with length."""
    first = next(iter(final.values()), [None])[0]
    if first is None or "reference_tokens" not in first["per_prompt"] or GKD_BASELINE not in final:
        return []
    lengths = np.array(first["per_prompt"]["reference_tokens"])
    edges = np.quantile(lengths, np.linspace(0, 1, buckets + 1))
    which = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, buckets - 1)
    names = [f"{int(lengths[which == b].min())}-{int(lengths[which == b].max())} tokens" for b in range(buckets)]
    gkd = per_prompt_matrix(final[GKD_BASELINE], setting.primary)
    lines = [
        "",
        f"{setting.primary} by reference length (test prompts split at the length quantiles into {buckets} "
        "buckets; the difference from GKD on-policy with its paired 95% interval):",
        "",
        "| method | " + " | ".join(names) + " |",
        "|" + " --- |" * (buckets + 1),
    ]
    for method, runs in final.items():
        scores = per_prompt_matrix(runs, setting.primary)
        cells = []
        for b in range(buckets):
            cell = f"{scores[:, which == b].mean():.1f}"
            if method != GKD_BASELINE:
                n = min(len(scores), len(gkd))
                cell += f" ({paired_bootstrap(scores[:n, which == b], gkd[:n, which == b])})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(setting: Setting, final: dict, refs: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, runs in final.items():
        steps = [p["step"] for p in runs[0]["curve"]]
        values = np.array([[p[setting.primary] for p in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
        if not len(values):
            continue
        mean = values.mean(0)
        ax.plot(steps, mean, label=method)
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    for name, r in refs.items():
        if setting.primary in r["metrics"]:
            ax.axhline(r["metrics"][setting.primary], linestyle="--", linewidth=0.8, color="gray")
            ax.text(
                0.01,
                r["metrics"][setting.primary],
                name,
                fontsize=7,
                color="gray",
                va="bottom",
                transform=ax.get_yaxis_transform(),
            )
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{setting.primary} (validation prompts; band: min-max over seeds)")
    ax.set_title(f"Learning curves, {setting.name}: {setting.describe}")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
