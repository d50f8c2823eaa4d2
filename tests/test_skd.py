"""SpeculativeKDTrainer: the top-K rule, its extremes, raw vs warped acceptance, training."""

import pytest
import torch

from trl_kd import SpeculativeKDConfig, SpeculativeKDTrainer
from trl_kd.sampler import OnPolicyRule, Proposal, SamplingParams, TeacherOnlyRule, TopKRule
from trl_kd.testing import build_model, make_dataset

from helpers import (
    assert_changed,
    assert_lora_student_trains,
    logged,
    make_args,
    make_trainer,
    params,
    rollout_with_seed,
)


def skd_trainer(tmp_path, tokenizer, **overrides):
    overrides.setdefault("max_completion_length", 12)
    return make_trainer(
        tmp_path, tokenizer, make_dataset("conversational_prompt_only", 16), trainer_class=SpeculativeKDTrainer,
        **overrides,
    )


def one_position(teacher_logits, drafted):
    teacher = torch.tensor([teacher_logits])[:, None]  # (B=1, K=1, V)
    return Proposal(torch.zeros_like(teacher), teacher, torch.tensor([[drafted]]), torch.zeros(1, 1), torch.zeros(1))


def test_defaults_follow_the_paper_and_official_code(tmp_path):
    args = SpeculativeKDConfig(output_dir=str(tmp_path), bf16=False)
    assert (args.acceptance_top_k, args.num_draft_tokens, args.acceptance_on) == (25, 5, "raw")
    assert (args.temperature, args.top_p, args.teacher_temperature, args.teacher_top_p) == (0.5, 0.5, 0.2, 0.5)
    assert (args.lmbda, args.beta) == (1.0, 0.0)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"acceptance_top_k": -1}, "acceptance_top_k"),
        ({"acceptance_on": "nucleus"}, "acceptance_on"),
        ({"num_draft_tokens": 0}, "num_draft_tokens"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"min_p": 0.1}, "min_p"),
        ({"teacher_top_p": 0.0}, "teacher_top_p"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, SpeculativeKDConfig, **overrides)


@pytest.mark.parametrize("k,accepted", [(1, False), (2, False), (3, True), (10, True)])
def test_top_k_rule_on_a_hand_built_position(k, accepted):
    # the drafted token 2 ranks third in the teacher's logits
    proposal = one_position([5.0, 4.0, 3.0, 2.0, 1.0], drafted=2)
    assert TopKRule(k).reject(proposal).item() is (not accepted)


def test_top_k_zero_rejects_even_the_teachers_favourite():
    assert TopKRule(0).reject(one_position([9.0, 0.0, 0.0], drafted=0)).item() is True


def test_raw_and_warped_acceptance_differ_only_outside_the_teachers_nucleus():
    # teacher probabilities 0.6 / 0.3 / 0.1: with top_p=0.5 the nucleus is token 0 alone
    logits = torch.tensor([0.6, 0.3, 0.1]).log().tolist()
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    raw, warped = TopKRule(2, on="raw"), TopKRule(2, on="warped", teacher_params=nucleus)
    assert not raw.reject(one_position(logits, 1)).item() and warped.reject(one_position(logits, 1)).item()
    for token, rejected in ((0, False), (2, True)):  # in the nucleus / outside the top-2: both agree
        assert raw.reject(one_position(logits, token)).item() is rejected
        assert warped.reject(one_position(logits, token)).item() is rejected


@pytest.mark.parametrize(
    "k,reference_rule,teacher_fraction", [(331, OnPolicyRule(), 0.0), (10_000, OnPolicyRule(), 0.0), (0, TeacherOnlyRule(), 1.0)]
)
def test_extreme_k_is_on_policy_or_teacher_only(tmp_path, tokenizer, k, reference_rule, teacher_fraction):
    trainer = skd_trainer(tmp_path, tokenizer, acceptance_top_k=k, max_steps=2)
    assert trainer.kd_vocab_size == 331
    prompt_ids = [tokenizer(t)["input_ids"] for t in ("reverse: a b c\n", "sort: d c b a\n", "copy: x y\n")]
    skd = rollout_with_seed(trainer, prompt_ids)
    reference = rollout_with_seed(trainer, prompt_ids, reference_rule)
    assert skd.completion_ids == reference.completion_ids
    assert all(all(m == bool(teacher_fraction) for m in mask) for mask in skd.teacher_mask)
    trainer.train()
    assert logged(trainer, "teacher_token_fraction") == [teacher_fraction] * 2
    assert logged(trainer, "acceptance_rate") == [1.0 - teacher_fraction] * 2


def test_training_changes_the_student_only_and_logs_skd_metrics(tmp_path, tokenizer):
    trainer = skd_trainer(tmp_path, tokenizer, acceptance_top_k=5, max_steps=3)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    student_before, teacher_before = params(trainer.model), params(teacher)
    trainer.train()
    assert_changed(student_before, trainer.model)
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    fractions, rates = logged(trainer, "teacher_token_fraction"), logged(trainer, "acceptance_rate")
    assert len(rates) == 3
    # every response token was judged once: kept (student) or replaced (teacher)
    assert all(f == pytest.approx(1 - r) for f, r in zip(fractions, rates))
    assert all(0.0 < f < 1.0 for f in fractions)  # random tiny models disagree on some tokens, not all
    quarters = [logged(trainer, f"teacher_token_fraction/bucket_{b}_of_4") for b in range(1, 5)]
    assert all(len(q) == 3 for q in quarters)


def test_lmbda_mixes_dataset_completions(tmp_path, tokenizer):
    trainer = make_trainer(
        tmp_path, tokenizer, make_dataset("prompt_completion", 16), trainer_class=SpeculativeKDTrainer,
        lmbda=0.5, max_steps=4,
    )
    trainer.train()
    fractions = logged(trainer, "on_policy_fraction")
    assert 0.0 < sum(fractions) / len(fractions) < 1.0


def test_lora_student_trains(tmp_path, tokenizer):
    args = make_args(tmp_path, SpeculativeKDConfig, max_completion_length=12)
    assert_lora_student_trains(SpeculativeKDTrainer, tokenizer, args, make_dataset("prompt_only", 16))


def test_wrong_config_class_is_refused(tmp_path, tokenizer):
    from trl_kd import KDConfig

    with pytest.raises(TypeError, match="SpeculativeKDConfig"):
        SpeculativeKDTrainer(
            model=build_model("qwen2", tokenizer, "student"), teacher_model=build_model("qwen2", tokenizer, "teacher"),
            args=make_args(tmp_path, KDConfig), train_dataset=make_dataset("prompt_only", 4), processing_class=tokenizer,
        )


def test_model_card_cites_the_paper(tmp_path, tokenizer):
    trainer = skd_trainer(tmp_path, tokenizer)
    trainer.create_model_card(model_name="tiny-skd")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2410.11325" in card and "Speculative Knowledge Distillation" in card
