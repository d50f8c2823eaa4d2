from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any

import torch

from ..kd.trainer import KDTrainer, Rollout
from ..sampler import DivergenceThresholdRule, SamplingParams
from .config import SwitchConfig


# the decision divergence, as (loss type, beta) of `trl_kd.losses.divergence`, and its largest value in nats
_DIVERGENCES = {"jsd": ("jsd", 0.5), "fkl": ("jsd", 0.0), "rkl": ("jsd", 1.0), "tvd": ("tvd", 0.5)}
_DIVERGENCE_MAX = {"jsd": math.log(2), "tvd": 1.0, "fkl": math.inf, "rkl": math.inf}


class SwitchTrainer(KDTrainer):
    r"""SWITCH: Studying with Teacher for knowledge distillation.

    From *SWITCH: Studying with Teacher for Knowledge Distillation of Large Language Models* (Koo et al., Findings of
    NAACL 2025, arXiv 2410.19503). The student writes the training responses, but at every position the divergence
    between the teacher's and the student's next-token distributions on the shared prefix is measured first; when it
    exceeds a threshold `tau_t = tau_0 * exp(-lambda * t)` the teacher writes that token instead. The threshold decays
    along the response, so the teacher steps in more where long student outputs drift. The student is then trained
    on the mixed responses with the package's divergence (`loss_type`, `beta`).

    The decision depends only on the shared prefix, so sampling runs in blocks like speculative decoding
    ([`trl_kd.sampler.block_verify_sample`][trl_kd.sampler.block_verify_sample]) with exactly the token-by-token
    distribution.

    The paper's full text and code were not available; each unknown is a [`SwitchConfig`][trl_kd.SwitchConfig] field:
    the schedule and its unit, the decision divergence, per-token decisions or a hand-off to the teacher, teacher
    sampling or argmax, AdaSwitch's adaptive threshold (arXiv 2510.07842), and a target teacher-token fraction:
    calibrated on the first batch, with tau_0 kept within the divergence's range (the decay is calibrated past it),
    then held during training by a proportional controller whose state is saved in checkpoints.

    Metrics logged besides [`KDTrainer`][trl_kd.KDTrainer]'s: `teacher_token_fraction` and its value by quarter of the
    response, `switch_threshold` and `switch_decay` (the schedule in use; `switch_adaptive_factor` for the adaptive
    schedule) and the sampler's counters `rollout/*`.

    Example:

    ```python
    from trl_kd import SwitchConfig, SwitchTrainer

    trainer = SwitchTrainer(
        model="openai-community/gpt2",
        teacher_model="openai-community/gpt2-xl",
        args=SwitchConfig(output_dir="gpt2-switch", target_teacher_fraction=0.5),
        train_dataset=dataset,  # "prompt" [+ "completion"] or "messages"
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-kd", "distillation", "switch"]
    _name = "SWITCH"
    _paper = {
        "title": "SWITCH: Studying with Teacher for Knowledge Distillation of Large Language Models",
        "id": "2410.19503",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{koo2025switch,
                title        = {{SWITCH: Studying with Teacher for Knowledge Distillation of Large Language Models}},
                author       = {Jahyun Koo and Yerin Hwang and Yongil Kim and Taegwan Kang and Hyunkyung Bae and
                                Kyomin Jung},
                year         = 2025,
                booktitle    = {Findings of the Association for Computational Linguistics: NAACL 2025},
                pages        = {3733--3746},
                url          = {https://arxiv.org/abs/2410.19503},
            }"""),
    }
    config_class = SwitchConfig
    position_buckets = 4

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        adaptive = self.args.switch_schedule == "adaptive"
        self.switch_scale = self.args.switch_adaptive_factor if adaptive else self.args.switch_threshold
        self.switch_decay = self.args.switch_decay
        self.calibrated = self.args.target_teacher_fraction is None
        # the calibrated and controlled state: log of the scale, continued past the cap as log-decrease of the decay
        self.switch_control: float | None = None

    # ------------------------------------------------------------------------------------------------------ sampling
    @property
    def scale_cap(self) -> float:
        """The largest useful tau_0: the decision divergence's maximum (ln 2 for JSD, 1 for TVD; KL is unbounded).
        A threshold above it never fires until the decay brings it below. The adaptive factor has no cap."""
        if self.args.switch_schedule == "adaptive":
            return math.inf
        return _DIVERGENCE_MAX[self.args.switch_divergence]

    def schedule_from_control(self, control: float) -> tuple[float, float]:
        """`(scale, decay)` for a control value: `scale = exp(control)` up to `scale_cap`; past the cap the scale
        stays at the cap and the decay shrinks by `exp(cap - control)` instead (exp and linear schedules), so a
        larger control always means fewer teacher tokens and tau_0 never leaves the divergence's range."""
        cap = math.log(self.scale_cap)
        decay = self.args.switch_decay
        if control <= cap:
            return math.exp(control), decay
        decays = self.args.switch_schedule in ("exp", "linear")
        return self.scale_cap, decay * math.exp(cap - control) if decays else decay

    def _set_control(self, control: float) -> None:
        self.switch_control = control
        self.switch_scale, self.switch_decay = self.schedule_from_control(control)

    def threshold_schedule(self, scale: float, decay: float | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
        """tau(t) for response positions `t`; `scale` is tau_0 (for `adaptive`, the first position's threshold is
        `switch_threshold` and `scale` is the factor K, applied by the rule); `decay` defaults to `switch_decay`."""
        args = self.args
        decay = args.switch_decay if decay is None else decay
        if args.switch_schedule == "adaptive":
            scale = args.switch_threshold
        unit = args.max_completion_length if args.switch_decay_unit == "fraction" else 1

        def schedule(positions: torch.Tensor) -> torch.Tensor:
            t = positions.float() / unit
            if math.isinf(scale) or args.switch_schedule in ("constant", "adaptive"):
                return torch.full_like(t, scale)
            if args.switch_schedule == "exp":
                return scale * torch.exp(-decay * t)
            return scale * (1 - decay * t).clamp(min=0)

        return schedule

    def switch_rule(self, scale: float, decay: float | None = None) -> DivergenceThresholdRule:
        """The SWITCH decision rule at schedule scale `scale` (tau_0, or K for the adaptive schedule)."""
        divergence, beta = _DIVERGENCES[self.args.switch_divergence]
        return DivergenceThresholdRule(
            self.threshold_schedule(scale, decay),
            divergence=divergence,
            beta=beta,
            handoff=self.args.switch_mode == "handoff",
            adaptive_factor=scale if self.args.switch_schedule == "adaptive" else None,
        )

    @property
    def teacher_sampling_params(self) -> SamplingParams:
        if self.args.teacher_greedy:
            return SamplingParams(greedy=True)
        return super().teacher_sampling_params

    def _switch_rollout(self, prompt_ids: list[list[int]], control: float | None = None) -> Rollout:
        if control is None:
            scale, decay = self.switch_scale, self.switch_decay
        else:
            scale, decay = self.schedule_from_control(control)
        return self.teacher_in_the_loop_rollout(prompt_ids, self.switch_rule(scale, decay), self.args.num_draft_tokens)

    def rollout(self, prompt_ids: list[list[int]]) -> Rollout:
        """The student writes, the teacher takes over positions where the divergence exceeds the threshold. With
        `target_teacher_fraction`, the first training batch calibrates the schedule and every later one feeds the
        controller that holds the fraction."""
        training = self.model.training
        if training and not self.calibrated:
            self.calibrate(prompt_ids)
        mode = "train" if training else "eval"
        if self.args.switch_schedule == "adaptive":
            self._metrics[mode]["switch_adaptive_factor"].append(self.switch_scale)
        else:
            self._metrics[mode]["switch_threshold"].append(self.switch_scale)
            self._metrics[mode]["switch_decay"].append(self.switch_decay)
        rollout = self._switch_rollout(prompt_ids)
        if training and self.args.target_teacher_fraction is not None and self.args.switch_controller_gain > 0:
            error = self._teacher_fraction(rollout) - self.args.target_teacher_fraction
            self._set_control(self.switch_control + self.args.switch_controller_gain * error)
        return rollout

    # --------------------------------------------------------------------------------------------------- calibration
    def _teacher_fraction(self, rollout: Rollout) -> float:
        local = torch.tensor(
            [sum(map(sum, rollout.teacher_mask)), sum(map(len, rollout.teacher_mask))], dtype=torch.float64
        )
        total = self.accelerator.reduce(local.to(self.accelerator.device), "sum").cpu()
        return (total[0] / total[1].clamp(min=1)).item()

    def calibrate(self, prompt_ids: list[list[int]]) -> float:
        """Set the schedule so that `target_teacher_fraction` of the tokens sampled for `prompt_ids` are the
        teacher's: the control value (log tau_0, then, past the divergence's maximum, the log-decrease of the decay;
        see [`schedule_from_control`][trl_kd.SwitchTrainer.schedule_from_control]) is bracketed geometrically from
        the configured tau_0 and bisected, in at most `calibration_rounds` sampling passes. Every process reaches the
        same value (fractions are global). Returns tau_0 (K for the adaptive schedule)."""
        args = self.args
        target = args.target_teacher_fraction
        start = self.switch_scale if 0 < self.switch_scale < math.inf else 0.1
        control = math.log(min(start, self.scale_cap))
        low, high = None, None  # controls known to give too many / too few teacher tokens
        best = (math.inf, control)
        for _ in range(args.calibration_rounds):
            fraction = self._teacher_fraction(self._switch_rollout(prompt_ids, control))
            best = min(best, (abs(fraction - target), control))
            if abs(fraction - target) <= args.calibration_tolerance:
                break
            if fraction > target:  # threshold too low: the teacher writes too much
                low = control
                control = (low + high) / 2 if high is not None else control + math.log(4)
            else:
                high = control
                control = (low + high) / 2 if low is not None else control - math.log(4)
        self._set_control(best[1])
        self.calibrated = True
        return self.switch_scale

    # ------------------------------------------------------------------------------------------------------ state
    def method_state_dict(self) -> dict[str, Any]:
        return {
            "switch_scale": self.switch_scale,
            "switch_decay": self.switch_decay,
            "switch_control": self.switch_control,
            "calibrated": self.calibrated,
        }

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        self.switch_scale, self.calibrated = state["switch_scale"], state["calibrated"]
        self.switch_decay = state.get("switch_decay", self.args.switch_decay)
        self.switch_control = state.get("switch_control")
        if self.switch_control is None and self.calibrated and self.args.target_teacher_fraction is not None:
            self.switch_control = math.log(self.switch_scale)  # a checkpoint from before the controller existed
