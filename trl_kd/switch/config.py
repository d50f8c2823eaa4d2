from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..kd.config import KDConfig


SCHEDULES = ("exp", "linear", "constant", "adaptive")
DECAY_UNITS = ("token", "fraction")
SWITCH_DIVERGENCES = ("jsd", "tvd", "fkl", "rkl")
SWITCH_MODES = ("token", "handoff")


@dataclass
class SwitchConfig(KDConfig):
    r"""Configuration for [`SwitchTrainer`][trl_kd.SwitchTrainer] (SWITCH, Koo et al., Findings of NAACL 2025, arXiv
    2410.19503).

    The student writes the response and the teacher takes over a token whenever the divergence between their next-token
    distributions exceeds a threshold that decays along the response. No official code exists; the fields below make
    each unknown of the paper a setting (see the SWITCH docs page). Everything of [`KDConfig`][trl_kd.KDConfig]
    applies: the loss is `loss_type`/`beta`, `temperature`/`top_p`/`top_k` are the student's sampling settings and
    `teacher_temperature`/`teacher_top_p` the teacher's.

    Parameters:
        switch_threshold (float):
            tau_0, the threshold at the first response position, in nats of `switch_divergence` (JSD lies in
            `[0, ln 2]`). `inf` never switches (on-policy KD); `0` lets the teacher write every token on which the two
            models differ at all. No paper value exists: set `target_teacher_fraction` to calibrate it.
        switch_decay (float):
            lambda of the schedule: `exp` is `tau_0 * exp(-decay * t)`, `linear` is `tau_0 * max(0, 1 - decay * t)`.
            The paper's "decay factor of 1/10".
        switch_decay_unit (str):
            What `t` counts: `"token"` (the 0-based response position) or `"fraction"` (position divided by
            `max_completion_length`, so `exp` with `switch_decay=ln(10)` ends at tau_0/10).
        switch_schedule (str):
            `"exp"` (the paper's), `"linear"`, `"constant"` (the paper's ablations) or `"adaptive"` (AdaSwitch, arXiv
            2510.07842: from the second position on the threshold is `switch_adaptive_factor` times the mean
            divergence over the response's earlier positions; tau_0 is used at the first position).
        switch_adaptive_factor (float):
            K of the `adaptive` schedule. AdaSwitch publishes no value; 2 means "twice the running mean".
        switch_divergence (str):
            Divergence of the decision: `"jsd"` (Jensen-Shannon, beta 0.5, as in the paper), `"tvd"`, `"fkl"`
            (KL(teacher || student)) or `"rkl"` (KL(student || teacher)).
        switch_mode (str):
            `"token"`: the decision is taken again at every position (the teacher writes single tokens). `"handoff"`:
            once the teacher intervenes it writes the rest of the response (the reading some summaries give, and
            AdaSwitch's).
        teacher_greedy (bool):
            The teacher's tokens are its argmax instead of samples at `teacher_temperature`/`teacher_top_p`.
        target_teacher_fraction (float | None):
            When set, the schedule is calibrated on the first training batch so that this fraction of response tokens
            is written by the teacher (the paper reports about 0.53 as an outcome of its decay, not as a target), then
            held by a controller. The calibrated value is tau_0 (`switch_adaptive_factor` for `adaptive`), kept at or
            below the divergence's maximum (ln 2 for JSD, 1 for TVD): where the target needs a higher threshold, tau_0
            stays at the maximum and `switch_decay` is lowered instead. Logged as `switch_threshold` and
            `switch_decay`, saved with checkpoints.
        switch_controller_gain (float):
            After calibration, every training batch moves the log of the threshold by this gain times (measured
            teacher fraction − target), so the fraction stays at the target as the student changes (past the
            divergence's maximum it moves the decay instead). `0` calibrates once only.
        calibration_rounds (int):
            Most sampling passes the calibration spends on the first batch (geometric bracketing, then bisection).
        calibration_tolerance (float):
            The calibration stops once the measured fraction is this close to the target.
        num_draft_tokens (int):
            Tokens the student drafts per teacher forward in the block-verify sampler; speed only.
        lmbda (float):
            Probability that a row is a SWITCH sample; the other rows train on their dataset completion. The paper
            trains on student-generated outputs only (`1.0`); whether it mixes in ground truth is unknown.
    """

    cross_tokenizer_refusal = (
        "its teacher decides token by token whether to write the next token, from one vocabulary; across "
        "tokenizers that needs span-level switching (the design is in the Cross-tokenizer guide)."
    )

    _INF_ALLOWED = (*KDConfig._INF_ALLOWED, "switch_threshold")  # inf: never switch

    switch_threshold: float = field(default=0.2, metadata={"help": "tau_0: the threshold at the first position."})
    switch_decay: float = field(default=0.1, metadata={"help": "lambda of the exp/linear schedule."})
    switch_decay_unit: str = field(
        default="token", metadata={"help": "t counts 'token's or a 'fraction' of max.", "choices": list(DECAY_UNITS)}
    )
    switch_schedule: str = field(default="exp", metadata={"help": "Threshold schedule.", "choices": list(SCHEDULES)})
    switch_adaptive_factor: float = field(default=2.0, metadata={"help": "K of the adaptive schedule."})
    switch_divergence: str = field(
        default="jsd", metadata={"help": "Decision divergence.", "choices": list(SWITCH_DIVERGENCES)}
    )
    switch_mode: str = field(
        default="token", metadata={"help": "'token' (decide per token) or 'handoff'.", "choices": list(SWITCH_MODES)}
    )
    teacher_greedy: bool = field(default=False, metadata={"help": "Teacher tokens are its argmax."})
    target_teacher_fraction: float | None = field(
        default=None, metadata={"help": "Calibrate the threshold on the first batch to meet this teacher fraction."}
    )
    switch_controller_gain: float = field(
        default=1.0, metadata={"help": "Per-batch log-threshold step per unit of fraction error (0 = off)."}
    )
    calibration_rounds: int = field(default=8, metadata={"help": "Most sampling passes spent calibrating."})
    calibration_tolerance: float = field(default=0.03, metadata={"help": "Calibration stops this close to target."})
    num_draft_tokens: int = field(default=4, metadata={"help": "Student tokens drafted per teacher forward."})
    lmbda: float = field(default=1.0, metadata={"help": "Probability a row is a SWITCH sample, else its dataset row."})

    def __post_init__(self):
        super().__post_init__()
        if math.isnan(self.switch_threshold) or self.switch_threshold < 0:
            raise ValueError(f"switch_threshold must be >= 0 (inf allowed), got {self.switch_threshold}.")
        if not 0 <= self.switch_decay < math.inf:
            raise ValueError(f"switch_decay must be a finite number >= 0, got {self.switch_decay}.")
        if not 0 < self.switch_adaptive_factor < math.inf:
            raise ValueError(f"switch_adaptive_factor must be a finite number > 0, got {self.switch_adaptive_factor}.")
        if not 0 <= self.switch_controller_gain < math.inf:
            raise ValueError(
                f"switch_controller_gain must be a finite number >= 0, got {self.switch_controller_gain}."
            )
        if self.target_teacher_fraction is not None and not 0.0 < self.target_teacher_fraction < 1.0:
            raise ValueError(f"target_teacher_fraction must be in (0, 1) or None, got {self.target_teacher_fraction}.")
        if self.calibration_rounds < 1:
            raise ValueError(f"calibration_rounds must be >= 1, got {self.calibration_rounds}.")
        if not 0.0 < self.calibration_tolerance < 1.0:
            raise ValueError(f"calibration_tolerance must be in (0, 1), got {self.calibration_tolerance}.")
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}.")
        self.check_teacher_in_the_loop("SwitchTrainer")
