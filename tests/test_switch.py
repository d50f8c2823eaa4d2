"""SwitchTrainer: the threshold rule and its schedules, extremes, position dependence, calibration, resume."""

import math

import pytest
import torch

from trl_kd import SwitchConfig, SwitchTrainer
from trl_kd.sampler import DivergenceThresholdRule, OnPolicyRule, Proposal, TeacherOnlyRule
from trl_kd.testing import build_model, make_dataset

from helpers import assert_changed, logged, make_args, make_trainer, params, rollout_with_seed


def switch_trainer(tmp_path, tokenizer, n=16, sharp=False, **overrides):
    """`sharp`: models with large random weights, whose per-token JSD is spread around 0.6 (0.55-0.64 for 80% of
    positions; TVD around 0.93, KL around 6) instead of about 0.005 for the default near-uniform models."""
    overrides.setdefault("max_completion_length", 12)
    models = {}
    if sharp:
        models = {
            "student": build_model("qwen2", tokenizer, "student", seed=0, initializer_range=0.4),
            "teacher": build_model("qwen2", tokenizer, "teacher", seed=1, initializer_range=0.4),
        }
    return make_trainer(
        tmp_path,
        tokenizer,
        make_dataset("conversational_prompt_only", n),
        trainer_class=SwitchTrainer,
        **models,
        **overrides,
    )


PROMPTS = ("reverse: a b c\n", "sort: d c b a\n", "copy: x y\n", "count: from 2 to 5\n")


class FixedDivergences(DivergenceThresholdRule):
    """The rule's decision logic on preset divergences, indexed by response position."""

    def __init__(self, values, **kwargs):
        super().__init__(lambda t: torch.full_like(t, 0.4, dtype=torch.float), **kwargs)
        self.values = torch.tensor(values)

    def divergences(self, proposal):
        return self.values[proposal.positions.long()]


def block(positions):
    positions = torch.tensor([positions])
    zeros = torch.zeros(1, positions.shape[1], 3)
    return Proposal(zeros, zeros, torch.zeros_like(positions), positions, torch.zeros(1, dtype=torch.long))


@pytest.mark.parametrize(
    "values,handoff,expected",
    [
        # tau_0 = 0.4 at t=0, then 2 x the mean of the earlier divergences
        ([0.5, 0.2, 0.9, 0.3, 0.1], False, [True, False, True, False, False]),
        ([0.1, 0.2, 0.9, 0.3, 0.1], True, [False, False, True, True, True]),
    ],
)
def test_adaptive_rule_matches_a_hand_computation(values, handoff, expected):
    one_by_one = FixedDivergences(values, adaptive_factor=2.0, handoff=handoff)
    one_by_one.start(1, 5)
    decisions = []
    for t in range(5):
        proposal = block([t])
        decisions.append(bool(one_by_one.reject(proposal)[0, 0]))
        one_by_one.update(proposal, torch.tensor([1]))
    assert decisions == expected
    # a whole block judged at once agrees up to the first rejection (the engine drops the rest)
    whole = FixedDivergences(values, adaptive_factor=2.0, handoff=handoff)
    whole.start(1, 5)
    first = expected.index(True)
    assert whole.reject(block(list(range(5))))[0, : first + 1].tolist() == expected[: first + 1]


def test_schedules(tmp_path, tokenizer):
    positions = torch.tensor([[0, 5, 10, 20]])
    expected = {
        ("exp", "token"): [0.2 * math.exp(-0.1 * t) for t in (0, 5, 10, 20)],
        ("linear", "token"): [0.2 * max(0.0, 1 - 0.1 * t) for t in (0, 5, 10, 20)],
        ("constant", "token"): [0.2] * 4,
        ("exp", "fraction"): [0.2 * math.exp(-0.1 * t / 12) for t in (0, 5, 10, 20)],
    }
    for (schedule, unit), values in expected.items():
        trainer = switch_trainer(tmp_path, tokenizer, switch_schedule=schedule, switch_decay_unit=unit)
        got = trainer.threshold_schedule(trainer.switch_scale)(positions)[0].tolist()
        assert got == pytest.approx(values), (schedule, unit)


@pytest.mark.parametrize(
    "threshold,reference_rule,teacher_fraction", [(math.inf, OnPolicyRule(), 0.0), (0.0, TeacherOnlyRule(), 1.0)]
)
def test_extreme_thresholds_are_on_policy_or_teacher_only(
    tmp_path, tokenizer, threshold, reference_rule, teacher_fraction
):
    trainer = switch_trainer(tmp_path, tokenizer, switch_threshold=threshold)
    prompt_ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    switch = rollout_with_seed(trainer, prompt_ids)
    reference = rollout_with_seed(trainer, prompt_ids, reference_rule)
    assert switch.completion_ids == reference.completion_ids
    assert all(all(m == bool(teacher_fraction) for m in mask) for mask in switch.teacher_mask)
    trainer.train()
    assert logged(trainer, "teacher_token_fraction") == [teacher_fraction] * 2


def fraction_by_position(trainer, prompt_ids, length):
    out = rollout_with_seed(trainer, prompt_ids)
    teacher, total = torch.zeros(length), torch.zeros(length)
    for mask in out.teacher_mask:
        teacher[: len(mask)] += torch.tensor(mask, dtype=torch.float)
        total[: len(mask)] += 1
    return teacher, total


def test_exp_schedule_gives_the_teacher_more_tokens_later_in_the_response(tmp_path, tokenizer):
    length = 24
    prompt_ids = [tokenizer(t)["input_ids"] for t in PROMPTS] * 8
    thirds = {}
    for schedule in ("exp", "constant"):
        trainer = switch_trainer(
            tmp_path,
            tokenizer,
            sharp=True,
            switch_schedule=schedule,
            switch_threshold=0.66,
            switch_decay=0.005,
            max_completion_length=length,
        )
        teacher, total = fraction_by_position(trainer, prompt_ids, length)
        assert total[-1] > 0  # enough responses reach the last positions
        thirds[schedule] = [(teacher[i : i + 8].sum() / total[i : i + 8].sum()).item() for i in (0, 8, 16)]
    early, middle, late = thirds["exp"]
    assert early < middle < late and late - early > 0.15, thirds
    # the growth comes from the schedule: with a constant threshold the fraction stays much flatter
    assert (thirds["constant"][2] - thirds["constant"][0]) < (late - early) / 2, thirds


@pytest.mark.parametrize("schedule", ["exp", "linear", "constant", "adaptive"])
@pytest.mark.parametrize("divergence", ["jsd", "tvd", "fkl", "rkl"])
def test_every_schedule_and_divergence_mixes_sources(tmp_path, tokenizer, schedule, divergence):
    threshold = {"jsd": 0.6, "tvd": 0.93, "fkl": 6.0, "rkl": 7.0}[divergence]
    trainer = switch_trainer(
        tmp_path,
        tokenizer,
        sharp=True,
        switch_schedule=schedule,
        switch_divergence=divergence,
        switch_threshold=threshold,
        switch_decay=0.01,
        switch_adaptive_factor=1.0,
        max_completion_length=16,
    )
    out = rollout_with_seed(trainer, [tokenizer(t)["input_ids"] for t in PROMPTS] * 4)
    flags = [m for mask in out.teacher_mask for m in mask]
    assert 0 < sum(flags) < len(flags)


def test_handoff_mode_keeps_the_teacher_once_it_intervened(tmp_path, tokenizer):
    trainer = switch_trainer(
        tmp_path, tokenizer, sharp=True, switch_mode="handoff", switch_threshold=0.66, switch_decay=0.01
    )
    out = rollout_with_seed(trainer, [tokenizer(t)["input_ids"] for t in PROMPTS] * 4)
    assert all(mask == sorted(mask) for mask in out.teacher_mask)  # False..False, True..True
    assert any(0 < sum(mask) < len(mask) for mask in out.teacher_mask)


def test_teacher_greedy_writes_the_teachers_argmax(tmp_path, tokenizer):
    trainer = switch_trainer(tmp_path, tokenizer, switch_threshold=0.0, teacher_greedy=True)
    prompt_ids = [tokenizer(t)["input_ids"] for t in PROMPTS]
    out = rollout_with_seed(trainer, prompt_ids)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    for ids, completion in zip(prompt_ids, out.completion_ids):
        generated = teacher.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=len(completion),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        assert generated[0, len(ids) :].tolist() == completion


def test_calibration_meets_the_target_fraction(tmp_path, tokenizer):
    target = 0.5
    trainer = switch_trainer(
        tmp_path,
        tokenizer,
        n=32,
        sharp=True,
        per_device_train_batch_size=32,
        max_completion_length=16,
        max_steps=1,
        target_teacher_fraction=target,
        calibration_rounds=10,
        calibration_tolerance=0.03,
        learning_rate=0.0,
    )
    trainer.train()
    assert trainer.calibrated and trainer.switch_scale != trainer.args.switch_threshold
    # the training batch right after calibration was sampled at the calibrated threshold (fresh samples: 0.08 slack)
    assert logged(trainer, "switch_threshold") == [trainer.switch_scale]
    assert abs(logged(trainer, "teacher_token_fraction")[0] - target) <= 0.08


def test_schedule_from_control_keeps_tau0_within_the_divergence_range(tmp_path, tokenizer):
    trainer = switch_trainer(tmp_path, tokenizer, switch_decay=0.2)
    cap = math.log(2)
    assert trainer.scale_cap == cap
    assert trainer.schedule_from_control(math.log(0.3)) == pytest.approx((0.3, 0.2))
    assert trainer.schedule_from_control(math.log(cap) + math.log(4)) == pytest.approx((cap, 0.05))
    tvd = switch_trainer(tmp_path / "tvd", tokenizer, switch_divergence="tvd")
    assert tvd.schedule_from_control(1.0) == pytest.approx((1.0, 0.1 / math.e))
    assert switch_trainer(tmp_path / "kl", tokenizer, switch_divergence="fkl").schedule_from_control(1.0)[0] == math.e


def test_calibration_lowers_the_decay_when_the_target_needs_a_threshold_above_ln2(tmp_path, tokenizer):
    """Sharp models (JSD about 0.6 everywhere) with a strong per-token decay: even at tau_0 = ln 2 the teacher writes
    nearly every token after the first, so a 20% target cannot be met by tau_0 (it used to climb to 1.6 and more,
    where JSD can never reach it). tau_0 stops at ln 2 and the decay is calibrated instead."""
    target = 0.2
    trainer = switch_trainer(
        tmp_path,
        tokenizer,
        n=32,
        sharp=True,
        per_device_train_batch_size=32,
        max_completion_length=16,
        max_steps=1,
        switch_decay=1.0,
        target_teacher_fraction=target,
        calibration_rounds=12,
        learning_rate=0.0,
    )
    prompt_ids = [tokenizer(t)["input_ids"] for t in PROMPTS] * 8
    at_cap = trainer._teacher_fraction(trainer._switch_rollout(prompt_ids, math.log(2)))
    assert at_cap > target + 0.3
    trainer.train()
    assert trainer.switch_scale <= math.log(2)
    assert trainer.switch_scale == pytest.approx(math.log(2)) and trainer.switch_decay < 1.0
    assert logged(trainer, "switch_threshold") == [pytest.approx(math.log(2))]
    assert abs(logged(trainer, "teacher_token_fraction")[0] - target) <= 0.08


def control_value(threshold, decay, base_decay=0.1):
    """The controller's state from the logged schedule (see `SwitchTrainer.schedule_from_control`)."""
    if threshold < math.log(2) - 1e-12:
        return math.log(threshold)
    return math.log(math.log(2)) + math.log(base_decay / decay)


def test_controller_moves_the_threshold_by_gain_times_the_fraction_error(tmp_path, tokenizer):
    """After calibration, each training batch moves the control by gain x (measured fraction - target); with gain 0
    the calibrated schedule stays."""
    common = dict(
        sharp=True,
        max_steps=5,
        target_teacher_fraction=0.4,
        calibration_rounds=4,
        max_completion_length=16,
    )
    trainer = switch_trainer(tmp_path, tokenizer, switch_controller_gain=2.0, **common)
    trainer.train()
    thresholds, decays = logged(trainer, "switch_threshold"), logged(trainer, "switch_decay")
    fractions = logged(trainer, "teacher_token_fraction")
    controls = [control_value(t, d) for t, d in zip(thresholds, decays)] + [trainer.switch_control]
    for step, fraction in enumerate(fractions):
        # the logged fraction is a float32 (0.4 reads 0.4 + 6e-9), the controller's a float64
        assert controls[step + 1] - controls[step] == pytest.approx(2.0 * (fraction - 0.4), abs=1e-6)
    assert len(set(controls)) > 1
    fixed = switch_trainer(tmp_path / "fixed", tokenizer, switch_controller_gain=0.0, **common)
    fixed.train()
    assert len(set(zip(logged(fixed, "switch_threshold"), logged(fixed, "switch_decay")))) == 1


def test_training_changes_the_student_only(tmp_path, tokenizer):
    trainer = switch_trainer(tmp_path, tokenizer, sharp=True, switch_threshold=0.6, max_steps=3)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    student_before, teacher_before = params(trainer.model), params(teacher)
    trainer.train()
    assert_changed(student_before, trainer.model)
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    fractions = logged(trainer, "teacher_token_fraction")
    assert len(fractions) == 3 and all(0.0 < f < 1.0 for f in fractions)
    assert all(len(logged(trainer, f"teacher_token_fraction/bucket_{b}_of_4")) == 3 for b in range(1, 5))


def test_resume_restores_the_calibrated_threshold_exactly(tmp_path, tokenizer):
    overrides = dict(
        sharp=True,
        max_steps=3,
        save_strategy="steps",
        save_steps=1,
        target_teacher_fraction=0.4,
        calibration_rounds=3,
    )
    full = switch_trainer(tmp_path / "full", tokenizer, **overrides)
    full.train()
    interrupted = switch_trainer(tmp_path / "resumed", tokenizer, **overrides)
    interrupted.train()
    resumed = switch_trainer(tmp_path / "resumed", tokenizer, **overrides)
    assert not resumed.calibrated
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-1"))
    assert resumed.calibrated and resumed.switch_scale == full.switch_scale
    # the controller moved the threshold after every batch; its state resumed exactly
    assert len(set(zip(logged(full, "switch_threshold"), logged(full, "switch_decay")))) > 1
    assert (resumed.switch_control, resumed.switch_decay) == (full.switch_control, full.switch_decay)
    for name, value in params(full.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"switch_schedule": "cosine"}, "switch_schedule"),
        ({"switch_decay_unit": "step"}, "switch_decay_unit"),
        ({"switch_divergence": "kl"}, "switch_divergence"),
        ({"switch_mode": "sequence"}, "switch_mode"),
        ({"switch_threshold": -0.1}, "switch_threshold"),
        ({"target_teacher_fraction": 1.5}, "target_teacher_fraction"),
        ({"target_teacher_fraction": float("nan")}, "target_teacher_fraction"),
        ({"switch_decay": float("nan")}, "switch_decay"),
        ({"switch_adaptive_factor": float("inf")}, "switch_adaptive_factor"),
        ({"switch_controller_gain": -1.0}, "switch_controller_gain"),
        ({"switch_controller_gain": float("nan")}, "switch_controller_gain"),
        ({"use_vllm": True}, "use_vllm"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, SwitchConfig, **overrides)
