from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from typing import Any

import torch

from ..kd.trainer import KDTrainer, Rollout
from ..sampler import DivergenceThresholdRule, SamplingParams
from .config import SwitchConfig


# the decision divergence, as (loss type, beta) of `trl_kd.losses.divergence`
_DIVERGENCES = {"jsd": ("jsd", 0.5), "fkl": ("jsd", 0.0), "rkl": ("jsd", 1.0), "tvd": ("tvd", 0.5)}


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
    sampling or argmax, AdaSwitch's adaptive threshold (arXiv 2510.07842), and a calibration of tau_0 to a target
    teacher-token fraction.

    Metrics logged besides [`KDTrainer`][trl_kd.KDTrainer]'s: `teacher_token_fraction` and its value by quarter of the
    response, `switch_threshold` (tau_0 in use; `switch_adaptive_factor` for the adaptive schedule) and the sampler's
    counters `rollout/*`.

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
        self.calibrated = self.args.target_teacher_fraction is None

    # ------------------------------------------------------------------------------------------------------ sampling
    def threshold_schedule(self, scale: float) -> Callable[[torch.Tensor], torch.Tensor]:
        """tau(t) for response positions `t`; `scale` is tau_0 (for `adaptive`, the first position's threshold is
        `switch_threshold` and `scale` is the factor K, applied by the rule)."""
        args = self.args
        if args.switch_schedule == "adaptive":
            scale = args.switch_threshold
        unit = args.max_completion_length if args.switch_decay_unit == "fraction" else 1

        def schedule(positions: torch.Tensor) -> torch.Tensor:
            t = positions.float() / unit
            if math.isinf(scale) or args.switch_schedule in ("constant", "adaptive"):
                return torch.full_like(t, scale)
            if args.switch_schedule == "exp":
                return scale * torch.exp(-args.switch_decay * t)
            return scale * (1 - args.switch_decay * t).clamp(min=0)

        return schedule

    def switch_rule(self, scale: float) -> DivergenceThresholdRule:
        """The SWITCH decision rule at schedule scale `scale` (tau_0, or K for the adaptive schedule)."""
        divergence, beta = _DIVERGENCES[self.args.switch_divergence]
        return DivergenceThresholdRule(
            self.threshold_schedule(scale), divergence=divergence, beta=beta,
            handoff=self.args.switch_mode == "handoff",
            adaptive_factor=scale if self.args.switch_schedule == "adaptive" else None,
        )

    @property
    def teacher_sampling_params(self) -> SamplingParams:
        if self.args.teacher_greedy:
            return SamplingParams(greedy=True)
        return super().teacher_sampling_params

    def _switch_rollout(self, prompt_ids: list[list[int]], scale: float) -> Rollout:
        return self.teacher_in_the_loop_rollout(prompt_ids, self.switch_rule(scale), self.args.num_draft_tokens)

    def rollout(self, prompt_ids: list[list[int]]) -> Rollout:
        """The student writes, the teacher takes over positions where the divergence exceeds the threshold."""
        if self.model.training and not self.calibrated:
            self.calibrate(prompt_ids)
        mode = "train" if self.model.training else "eval"
        name = "switch_adaptive_factor" if self.args.switch_schedule == "adaptive" else "switch_threshold"
        self._metrics[mode][name].append(self.switch_scale)
        return self._switch_rollout(prompt_ids, self.switch_scale)

    # --------------------------------------------------------------------------------------------------- calibration
    def _teacher_fraction(self, rollout: Rollout) -> float:
        local = torch.tensor(
            [sum(map(sum, rollout.teacher_mask)), sum(map(len, rollout.teacher_mask))], dtype=torch.float64
        )
        total = self.accelerator.reduce(local.to(self.accelerator.device), "sum").cpu()
        return (total[0] / total[1].clamp(min=1)).item()

    def calibrate(self, prompt_ids: list[list[int]]) -> float:
        """Set the schedule's scale so that `target_teacher_fraction` of the tokens sampled for `prompt_ids` are the
        teacher's: geometric bracketing from the configured value, then bisection in log space, at most
        `calibration_rounds` sampling passes. Every process reaches the same value (fractions are global)."""
        args = self.args
        target = args.target_teacher_fraction
        scale = self.switch_scale if 0 < self.switch_scale < math.inf else 0.1
        low, high = None, None  # scales known to give too many / too few teacher tokens
        best = (math.inf, scale)
        for _ in range(args.calibration_rounds):
            fraction = self._teacher_fraction(self._switch_rollout(prompt_ids, scale))
            best = min(best, (abs(fraction - target), scale))
            if abs(fraction - target) <= args.calibration_tolerance:
                break
            if fraction > target:  # threshold too low: the teacher writes too much
                low = scale
                scale = math.sqrt(low * high) if high is not None else scale * 4
            else:
                high = scale
                scale = math.sqrt(low * high) if low is not None else scale / 4
        self.switch_scale, self.calibrated = best[1], True
        return self.switch_scale

    # ------------------------------------------------------------------------------------------------------ state
    def method_state_dict(self) -> dict[str, Any]:
        return {"switch_scale": self.switch_scale, "calibrated": self.calibrated}

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        self.switch_scale, self.calibrated = state["switch_scale"], state["calibrated"]
