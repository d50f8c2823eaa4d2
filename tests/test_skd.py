"""SpeculativeKDTrainer: the top-K rule, its extremes, raw vs warped acceptance, training."""

import pytest
import torch

from trl_kd import SpeculativeKDConfig, SpeculativeKDTrainer
from trl_kd.sampler import OnPolicyRule, Proposal, SamplingParams, TeacherOnlyRule, TopKRule
from trl_kd.testing import build_model, make_dataset

from helpers import (
    assert_changed,
    logged,
    make_args,
    make_trainer,
    params,
    rollout_with_seed,
)


def skd_trainer(tmp_path, tokenizer, sharp=False, **overrides):
    """`sharp`: models with large random weights, whose argmax tokens differ (the default near-uniform pair agrees on
    its argmax almost everywhere)."""
    overrides.setdefault("max_completion_length", 12)
    if sharp:
        overrides["student"] = build_model("qwen2", tokenizer, "student", seed=0, initializer_range=0.4)
        overrides["teacher"] = build_model("qwen2", tokenizer, "teacher", seed=1, initializer_range=0.4)
    return make_trainer(
        tmp_path,
        tokenizer,
        make_dataset("conversational_prompt_only", 16),
        trainer_class=SpeculativeKDTrainer,
        **overrides,
    )


def one_position(teacher_logits, drafted):
    teacher = torch.tensor([teacher_logits])[:, None]  # (B=1, K=1, V)
    return Proposal(torch.zeros_like(teacher), teacher, torch.tensor([[drafted]]), torch.zeros(1, 1), torch.zeros(1))


def test_defaults_follow_the_paper_and_official_code(tmp_path):
    args = SpeculativeKDConfig(output_dir=str(tmp_path), bf16=False)
    assert (args.acceptance_top_k, args.num_draft_tokens, args.acceptance_on) == (25, 5, "raw")
    assert (args.acceptance_test, args.draft_sampling) == ("drafted", "student")  # the paper's rule
    assert (args.temperature, args.top_p, args.teacher_temperature, args.teacher_top_p) == (0.5, 0.5, 0.2, 0.5)
    assert (args.lmbda, args.beta, args.loss_normalization) == (1.0, 0.0, "sequences")
    # the official optimiser: AdamW 1e-5 (eps 1e-6), linear decay, no warm-up, clipping at 1.0
    assert (args.learning_rate, args.adam_epsilon, args.warmup_steps, args.max_grad_norm) == (1e-5, 1e-6, 0, 1.0)
    assert args.lr_scheduler_type == "linear"


def test_student_sampling_settings_do_not_leak_into_the_teachers(tmp_path, tokenizer):
    trainer = skd_trainer(tmp_path, tokenizer, top_k=10)
    assert trainer.student_sampling_params == SamplingParams(temperature=0.5, top_p=0.5, top_k=10)
    assert trainer.teacher_sampling_params == SamplingParams(temperature=0.2, top_p=0.5, top_k=0)
    assert trainer.teacher_generation_config.top_k == 0
    official = skd_trainer(tmp_path / "official", tokenizer, top_k=10, draft_sampling="teacher", teacher_top_k=4)
    assert official.student_sampling_params == official.teacher_sampling_params == SamplingParams(0.2, 0.5, 4)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"acceptance_top_k": -1}, "acceptance_top_k"),
        ({"acceptance_on": "nucleus"}, "acceptance_on"),
        ({"num_draft_tokens": 0}, "num_draft_tokens"),
        ({"repetition_penalty": 1.2}, "repetition_penalty"),
        ({"min_p": 0.1}, "min_p"),
        ({"teacher_top_p": 0.0}, "teacher_top_p"),
        ({"teacher_top_k": -1}, "teacher_top_k"),
        ({"acceptance_test": "fresh"}, "acceptance_test"),
        ({"draft_sampling": "both"}, "draft_sampling"),
        ({"loss_normalization": "rows"}, "loss_normalization"),
        ({"stop_strings": [""]}, "stop_strings"),
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


def official_warper(params):
    """The transformers logits warpers the official SKD code samples and ranks with (temperature, then top-p)."""
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

    return LogitsProcessorList([TemperatureLogitsWarper(params.temperature), TopPLogitsWarper(params.top_p)])


def official_in_top_k(teacher_logits, token, k, params):
    """The official acceptance test, re-implemented: `torch.topk` of the warped teacher probabilities."""
    probs = official_warper(params)(None, teacher_logits[None].float()).softmax(-1)
    return token in torch.topk(probs, k).indices[0].tolist()


def test_raw_and_warped_acceptance_on_a_hand_built_position():
    # teacher probabilities 0.6 / 0.3 / 0.1: with top_p=0.5 the nucleus is token 0 alone
    logits = torch.tensor([0.6, 0.3, 0.1]).log()
    nucleus = SamplingParams(temperature=1.0, top_p=0.5)
    raw, warped = TopKRule(2, on="raw"), TopKRule(2, on="warped", teacher_params=nucleus)
    accepted_raw = [not raw.reject(one_position(logits.tolist(), t)).item() for t in range(3)]
    accepted_warped = [not warped.reject(one_position(logits.tolist(), t)).item() for t in range(3)]
    assert accepted_raw == [True, True, False]
    # the official test: the top-2 of (1, 0, 0) holds token 0 and one zero-probability token, which is accepted
    assert accepted_warped == [official_in_top_k(logits, t, 2, nucleus) for t in range(3)]
    assert accepted_warped[0] and sum(accepted_warped) == 2


def test_fresh_sample_test_keeps_the_drafted_token_on_the_fresh_samples_result():
    # the student is sure of token 2 (outside the teacher's top-1) but drafted token 0: the paper keeps the draft,
    # the official code tests a fresh student sample (token 2) and replaces the draft
    student = torch.tensor([[[-30.0, -30.0, 30.0]]])
    teacher = torch.tensor([[[5.0, 1.0, 0.0]]])
    proposal = Proposal(student, teacher, torch.tensor([[0]]), torch.zeros(1, 1), torch.zeros(1))
    assert not TopKRule(1).reject(proposal).item()
    assert TopKRule(1, test="fresh_sample").reject(proposal).item()


def official_skd_reference(student, teacher, prompt_ids, k, params, max_new_tokens, eos, vocab):
    """The official SKD loop as run, re-implemented token by token without caches: the student drafts with the
    teacher's warper, a fresh student sample is tested against `torch.topk` of the warped teacher, and a rejected
    position gets a teacher sample from the warped teacher."""
    warp = official_warper(params)
    completions, masks = [], []
    for ids in prompt_ids:
        sequence, completion, mask = list(ids), [], []
        for _ in range(max_new_tokens):
            with torch.no_grad():
                x = torch.tensor([sequence])
                q = warp(x, student(x).logits[:, -1, :vocab].float()).softmax(-1)
                p = warp(x, teacher(x).logits[:, -1, :vocab].float()).softmax(-1)
            drafted, fresh = torch.multinomial(q, 1).item(), torch.multinomial(q, 1).item()
            rejected = fresh not in torch.topk(p, k).indices[0].tolist()
            token = torch.multinomial(p, 1).item() if rejected else drafted
            sequence.append(token)
            completion.append(token)
            mask.append(rejected)
            if token == eos:
                break
        completions.append(completion)
        masks.append(mask)
    return completions, masks


def test_official_reproduction_equals_an_independent_reimplementation(tmp_path, tokenizer):
    """`draft_sampling="teacher"`, `acceptance_test="fresh_sample"`, `acceptance_on="warped"` against the official
    rule re-implemented with transformers' warpers. Deterministic settings (a one-token nucleus), so the sequences
    must be identical; K=200 exceeds the nucleus, so most accepted tokens sit in `torch.topk`'s zero-probability
    padding, the official quirk."""
    trainer = skd_trainer(
        tmp_path,
        tokenizer,
        sharp=True,
        acceptance_top_k=200,
        acceptance_on="warped",
        acceptance_test="fresh_sample",
        draft_sampling="teacher",
        teacher_temperature=0.2,
        teacher_top_p=1e-6,
        max_completion_length=12,
    )
    prompt_ids = [tokenizer(t)["input_ids"] for t in ("reverse: a b c\n", "sort: d c b a\n", "copy: x y\n")]
    ours = rollout_with_seed(trainer, prompt_ids)
    student = trainer.accelerator.unwrap_model(trainer.model)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    completions, masks = official_skd_reference(
        student,
        teacher,
        prompt_ids,
        200,
        trainer.teacher_sampling_params,
        12,
        tokenizer.eos_token_id,
        trainer.kd_vocab_size,
    )
    assert ours.completion_ids == completions
    assert ours.teacher_mask == masks
    flat = [m for row in masks for m in row]
    assert 0 < sum(flat) < len(flat)  # both models wrote tokens
    # the paper's rule on the same settings keeps fewer tokens: the padding acceptance is what differs
    paper = rollout_with_seed(trainer, prompt_ids, TopKRule(200, teacher_params=trainer.teacher_sampling_params))
    assert paper.teacher_mask != ours.teacher_mask


def test_fresh_sample_acceptance_has_the_official_output_distribution():
    """One position on a 4-token vocabulary, 6000 samples: with the official fresh-sample test the kept token follows
    A * q + (1 - A) * p (A = the student's mass on the teacher's top-2); chi-square goodness of fit at the 0.1% level.
    The paper's rule, q * 1[top-2] + (1 - A) * p, must fail the same test (the test has power)."""
    from test_sampler import chi2_quantile, tiny_vocab_pair

    from trl_kd.sampler import block_verify_sample

    student, teacher = tiny_vocab_pair()
    prompt = [1, 2]
    with torch.no_grad():
        q = student(torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
        p = teacher(torch.tensor([prompt])).logits[0, -1].float().softmax(-1)
    top = p.topk(2).indices
    in_top = torch.zeros(4, dtype=torch.bool).index_fill(0, top, True)
    accept = q[in_top].sum()
    official = accept * q + (1 - accept) * p
    assert (official - (q * in_top + (1 - accept) * p)).abs().max() > 0.05  # the two rules differ here

    def counts(test):
        torch.manual_seed(99)
        rule = TopKRule(2, test=test, student_params=SamplingParams())
        out = block_verify_sample(
            student,
            teacher,
            [prompt] * 6000,
            rule,
            max_new_tokens=1,
            eos_token_ids=[3],
            pad_token_id=0,
            num_draft_tokens=1,
        )
        return torch.bincount(torch.tensor([c[0] for c in out.completion_ids]), minlength=4).double()

    def chi2(observed):
        expected = official.double() * observed.sum()
        return ((observed - expected) ** 2 / expected).sum().item()

    assert chi2(counts("fresh_sample")) < chi2_quantile(3)
    assert chi2(counts("drafted")) > chi2_quantile(3)


@pytest.mark.parametrize(
    "k,reference_rule,teacher_fraction",
    [(331, OnPolicyRule(), 0.0), (10_000, OnPolicyRule(), 0.0), (0, TeacherOnlyRule(), 1.0)],
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
    # K = 60 of 331 tokens: random models accept about one drafted token in six, so every step has both writers
    trainer = skd_trainer(tmp_path, tokenizer, acceptance_top_k=60, max_steps=3)
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
        tmp_path,
        tokenizer,
        make_dataset("prompt_completion", 16),
        trainer_class=SpeculativeKDTrainer,
        lmbda=0.5,
        max_steps=4,
    )
    trainer.train()
    fractions = logged(trainer, "on_policy_fraction")
    assert 0.0 < sum(fractions) / len(fractions) < 1.0
