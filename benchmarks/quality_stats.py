"""Statistics for the quality benchmark: paired bootstrap intervals over prompts and seeds.

A method and a baseline are scored on the same held-out prompts, once per seed. Their difference on prompt ``j``
for seed ``i`` is ``d[i, j]``. The paired bootstrap resamples seeds and prompts with replacement (the same prompt
draw for every seed) and takes the mean of ``d`` over the resampled grid; the 2.5th and 97.5th percentiles of that
mean are the 95% interval. Pairing removes the prompt-to-prompt and seed-to-seed variation the two runs share, which
is what lets small differences be called.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A mean difference and its bootstrap interval."""

    mean: float
    low: float
    high: float

    @property
    def excludes_zero(self) -> bool:
        """The difference is called only when its interval excludes 0."""
        return self.low > 0 or self.high < 0

    def verdict(self) -> str:
        """``"better"``, ``"worse"`` or ``"tie"`` (the interval holds 0)."""
        if not self.excludes_zero:
            return "tie"
        return "better" if self.mean > 0 else "worse"

    def __str__(self) -> str:
        # one decimal for scores in points; three for differences under 1 (cross-entropy and KL, in nats)
        digits = 1 if max(abs(self.mean), abs(self.low), abs(self.high)) >= 1 else 3
        return f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}]"


def paired_bootstrap(
    scores: np.ndarray, baseline: np.ndarray, resamples: int = 4000, level: float = 0.95, seed: int = 0
) -> Interval:
    """Mean of ``scores - baseline`` and its percentile interval, resampling seeds and prompts.

    Args:
        scores: ``(seeds, prompts)`` per-prompt scores of a method, one row per seed.
        baseline: the same shape, the baseline's scores on the same prompts (row ``i`` paired with row ``i``).
        resamples: bootstrap draws.
        level: coverage of the interval.
        seed: seed of the resampling (the interval is reproducible).
    """
    scores, baseline = np.asarray(scores, dtype=float), np.asarray(baseline, dtype=float)
    if scores.shape != baseline.shape or scores.ndim != 2:
        raise ValueError(f"scores and baseline must both be (seeds, prompts), got {scores.shape} and {baseline.shape}")
    diff = scores - baseline
    n_seeds, n_prompts = diff.shape
    rng = np.random.default_rng(seed)
    seed_draws = rng.integers(0, n_seeds, size=(resamples, n_seeds))
    prompt_draws = rng.integers(0, n_prompts, size=(resamples, n_prompts))
    # mean over the resampled grid = mean over resampled seeds of (mean over resampled prompts of that seed's row)
    per_seed = diff[:, prompt_draws].mean(axis=2)  # (seeds, resamples): each seed's row under each prompt draw
    means = np.take_along_axis(per_seed.T, seed_draws, axis=1).mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return Interval(float(diff.mean()), float(low), float(high))


def per_prompt_matrix(records: list[dict], metric: str) -> np.ndarray:
    """``(seeds, prompts)`` scores of ``metric`` from run records, one row per seed in seed order (a record holds one
    seed's ``per_prompt`` scores, or several seeds' ``per_prompt_by_seed``)."""
    rows = []
    for r in sorted(records, key=lambda r: r["seed"]):
        seeds = r["per_prompt_by_seed"] if "per_prompt_by_seed" in r else [r["per_prompt"]]
        rows += [s[metric] for s in seeds]
    return np.array(rows, dtype=float)


def paired_runs(runs: list[dict], baseline_runs: list[dict], metric: str, sign: int = 1) -> Interval:
    """[`paired_bootstrap`] of two methods' runs on the same prompts, their seeds paired in order (as many as both
    have), signed so that + favours ``runs`` when ``sign`` is 1 and higher is better; prompts where either has no
    score (NaN, e.g. the second half of a one-token answer) are left out."""
    ours, theirs = per_prompt_matrix(runs, metric), per_prompt_matrix(baseline_runs, metric)
    n = min(len(ours), len(theirs))
    ours, theirs = ours[:n], theirs[:n]
    kept = ~(np.isnan(ours).any(0) | np.isnan(theirs).any(0))
    return paired_bootstrap(sign * ours[:, kept], sign * theirs[:, kept])


def mean_and_interval(scores: np.ndarray, resamples: int = 4000, level: float = 0.95, seed: int = 0) -> Interval:
    """A method's own mean score with the same bootstrap (its difference from zero)."""
    scores = np.asarray(scores, dtype=float)
    return paired_bootstrap(scores, np.zeros_like(scores), resamples, level, seed)


def choose_rate(scores_by_rate: dict[float, list[float]], higher_is_better: bool) -> float:
    """The grid rule shared by the benchmarks: every rate is run with the same seeds (at least two, so that one lucky
    seed cannot pick the rate) and the rate with the best mean score over them is chosen; ties go to the smaller
    rate."""
    if not scores_by_rate:
        raise ValueError("no grid scores to choose a rate from")
    sign = 1.0 if higher_is_better else -1.0
    return max(sorted(scores_by_rate), key=lambda lr: sign * float(np.mean(scores_by_rate[lr])))


def rate_sensitive(differences: list[float]) -> bool:
    """Whether a claim's mean difference changes sign across the learning rates it was measured at (zero counts as
    neither sign)."""
    return any(d > 0 for d in differences) and any(d < 0 for d in differences)
