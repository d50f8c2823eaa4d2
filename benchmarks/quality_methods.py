"""The quality benchmark's methods (every method registered with `trl_kd.register_method` gets a row, at its
defaults unless listed here), its diagnostic variants and the papers' claims it judges."""

from __future__ import annotations

import trl_kd
from trl_kd import get_method


def method(name: str, overrides: dict) -> tuple:
    """`(trainer, config, overrides)` of a method registered with `trl_kd.register_method`."""
    registered = get_method(name)
    return registered.trainer, registered.config, overrides


# name -> (trainer, config, overrides); None = plain SFT on the references
METHODS: dict[str, tuple | None] = {
    "SFT on references": None,
    "Supervised KD (lmbda 0, FKL)": method("gkd", {"lmbda": 0.0, "beta": 0.0}),
    "SeqKD (teacher samples, FKL)": method("gkd", {"lmbda": 0.0, "seq_kd": True, "beta": 0.0}),
    "GKD on-policy (lmbda 1, JSD 0.5)": method("gkd", {"lmbda": 1.0, "beta": 0.5}),
    "GKD mixed (lmbda 0.5, JSD 0.1)": method("gkd", {"lmbda": 0.5, "beta": 0.1}),
    "On-policy reverse KL (lmbda 1, beta 1)": method("gkd", {"lmbda": 1.0, "beta": 1.0}),
    "SKD (K=25, FKL)": method("skd", {}),
    "SWITCH (target 50% teacher tokens, held)": method("switch", {"target_teacher_fraction": 0.5}),
    "PromptKD (paper init text)": method("promptkd", {}),
    "PromptKD (in-distribution init)": method("promptkd", {"prompt_init_text": None}),
}
# run only when named with --methods, to diagnose a result (e.g. SKD when the teacher accepts every student token)
DIAGNOSTIC_METHODS: dict[str, tuple] = {
    "On-policy FKL (lmbda 1, beta 0)": method("gkd", {"lmbda": 1.0, "beta": 0.0}),
    "SKD (K=3, FKL)": method("skd", {"acceptance_top_k": 3}),
    # SKD drafts at the paper's temperature 0.5 / top-p 0.5: on open-ended text, is that what hurts?
    "SKD (K=25, FKL, drafts at temperature 1)": method("skd", {"temperature": 1.0, "top_p": 1.0}),
    # SWITCH's exp schedule hands the late tokens (the end of the answer) to the teacher: is that why its students
    # stop less often on long answers?
    "SWITCH (constant threshold, target 50%, held)": method(
        "switch", {"target_teacher_fraction": 0.5, "switch_schedule": "constant"}
    ),
    # SWITCH sits between supervised KD (teacher-written prefixes) and on-policy GKD (the student's own): does its
    # score follow the share of tokens the teacher writes?
    "SWITCH (target 25% teacher tokens, held)": method("switch", {"target_teacher_fraction": 0.25}),
    "SWITCH (target 75% teacher tokens, held)": method("switch", {"target_teacher_fraction": 0.75}),
    # supervised KD from an offline top-k cache of the teacher (trl-kd cache-teacher), no teacher in training: how
    # much does k cost against the live teacher?
    "Supervised KD from a top-8 teacher cache (FKL)": method("gkd", {"lmbda": 0.0, "beta": 0.0, "cache_k": 8}),
    "Supervised KD from a top-64 teacher cache (FKL)": method("gkd", {"lmbda": 0.0, "beta": 0.0, "cache_k": 64}),
}
# a method registered with `trl_kd.register_method` that no row above runs gets a row at its defaults, so a new
# method is benchmarked without an edit here
_LISTED = {spec[0] for spec in {**METHODS, **DIAGNOSTIC_METHODS}.values() if spec is not None}
METHODS.update(
    {f"{m.title} (defaults)": method(m.name, {}) for m in trl_kd.METHODS.values() if m.trainer not in _LISTED}
)
ALL_METHODS = {**METHODS, **DIAGNOSTIC_METHODS}
SFT_BASELINE, GKD_BASELINE = "SFT on references", "GKD on-policy (lmbda 1, JSD 0.5)"
# the papers' claims, as (claim, method, baseline) comparisons of the primary metric
CLAIMS = [
    ("SKD beats supervised KD (SKD paper)", "SKD (K=25, FKL)", "Supervised KD (lmbda 0, FKL)"),
    ("SKD beats on-policy KD (SKD paper)", "SKD (K=25, FKL)", GKD_BASELINE),
    (
        "PromptKD beats on-policy reverse KL (PromptKD paper)",
        "PromptKD (paper init text)",
        "On-policy reverse KL (lmbda 1, beta 1)",
    ),
    (
        "... with an in-distribution prompt init",
        "PromptKD (in-distribution init)",
        "On-policy reverse KL (lmbda 1, beta 1)",
    ),
    ("On-policy GKD beats supervised KD (GKD paper)", GKD_BASELINE, "Supervised KD (lmbda 0, FKL)"),
    (
        "SWITCH beats on-policy GKD (SWITCH paper; its length claim needs the long setting)",
        "SWITCH (target 50% teacher tokens, held)",
        GKD_BASELINE,
    ),
]
QUICK_METHODS = (
    "SFT on references",
    "Supervised KD (lmbda 0, FKL)",
    GKD_BASELINE,
    "SKD (K=25, FKL)",
    "SWITCH (target 50% teacher tokens, held)",
    "PromptKD (paper init text)",
)

# `long` is for SWITCH's length claim: its baselines and the other method whose teacher writes tokens of the
# response. Its runs cost 4-8x those of `exact`; the other claims are judged in the three other settings.
LONG_METHODS = (
    "SFT on references",
    "Supervised KD (lmbda 0, FKL)",
    GKD_BASELINE,
    "SWITCH (target 50% teacher tokens, held)",
    "SKD (K=25, FKL)",
)
