"""The block-verify engine against the token-by-token reference and against plain `generate`."""

import math
from collections import Counter

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trl_kd.sampler import (
    DivergenceThresholdRule,
    OnPolicyRule,
    SamplingParams,
    StopStrings,
    TeacherOnlyRule,
    TopKRule,
    block_verify_sample,
    reference_sample,
)
from trl_kd.testing import build_model


GREEDY = SamplingParams(greedy=True)
RULES = {
    "on_policy": OnPolicyRule,
    "teacher_only": TeacherOnlyRule,
    "top_k": lambda: TopKRule(k=3),
    "threshold": lambda: DivergenceThresholdRule(lambda t: 0.62 * torch.exp(-0.01 * t.float())),
    "handoff": lambda: DivergenceThresholdRule(lambda t: 0.64 * torch.exp(-0.02 * t.float()), handoff=True),
    "adaptive": lambda: DivergenceThresholdRule(lambda t: torch.full_like(t.float(), 0.62), adaptive_factor=1.05),
}


@pytest.fixture(scope="module", params=["qwen2", "gpt2"])
def pair(request, tokenizer):
    arch = request.param
    student = build_model(arch, tokenizer, "student", seed=0, initializer_range=0.4).eval()
    teacher = build_model(arch, tokenizer, "teacher", seed=1, initializer_range=0.4).eval()
    return student, teacher


def prompts(tokenizer):
    texts = ["reverse: a b c\n", "sort: d c b a e f g h\n", "copy: x\n", "count: from 3 to 9\n"]
    return [tokenizer(t)["input_ids"] for t in texts]


def kwargs(tokenizer, **extra):
    return dict(
        max_new_tokens=12, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id, **extra
    )


@pytest.mark.parametrize("gamma", [1, 2, 5, 8])
@pytest.mark.parametrize("rule", list(RULES))
def test_greedy_equals_token_by_token_reference(pair, tokenizer, gamma, rule):
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY)
    ours = block_verify_sample(student, teacher, prompts(tokenizer), RULES[rule](), num_draft_tokens=gamma, **common)
    ref = reference_sample(student, teacher, prompts(tokenizer), RULES[rule](), **common)
    assert ours.completion_ids == ref.completion_ids
    assert ours.teacher_mask == ref.teacher_mask
    for key in ("accepted", "replaced", "drafted"):
        assert ours.counts[key] == ref.counts[key]


@pytest.mark.parametrize("gamma", [1, 3, 5])
@pytest.mark.parametrize("rule", ["on_policy", "top_k", "threshold"])
def test_stop_strings_end_rows_as_a_post_hoc_cut_would(pair, tokenizer, gamma, rule):
    """A stop string spanning two tokens, taken from the middle of a greedy completion: block-verify with it equals
    the reference with it, and both equal the unstopped completions cut after the first occurrence."""
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY)
    free = reference_sample(student, teacher, prompts(tokenizer), RULES[rule](), **common)
    text = next(
        tokenizer.decode(ids[i : i + 2])
        for ids in free.completion_ids
        for i in range(3, len(ids) - 2)
        if "\ufffd" not in tokenizer.decode(ids[i : i + 2])
    )
    stop = StopStrings(tokenizer, [text])
    ours = block_verify_sample(
        student, teacher, prompts(tokenizer), RULES[rule](), num_draft_tokens=gamma, stop=stop, **common
    )
    ref = reference_sample(student, teacher, prompts(tokenizer), RULES[rule](), stop=stop, **common)
    cut = [stop.cut(ids) for ids in free.completion_ids]
    assert ours.completion_ids == ref.completion_ids == cut
    assert ours.teacher_mask == ref.teacher_mask == [m[: len(c)] for m, c in zip(free.teacher_mask, cut)]
    assert cut != free.completion_ids  # at least one row was cut


def test_stop_strings_find_the_token_that_completes_the_first_occurrence(tokenizer):
    ids = tokenizer("count: 1 2 3 4 5 6", add_special_tokens=False)["input_ids"]
    stop = StopStrings(tokenizer, ["3 4", "6"])
    end = stop.end(ids)
    assert tokenizer.decode(ids[:end]).endswith("3 4") and "3 4" not in tokenizer.decode(ids[: end - 1])
    assert stop.cut(ids) == ids[:end]
    assert StopStrings(tokenizer, ["7"]).cut(ids) == ids


def test_rules_make_a_difference(pair, tokenizer):
    """Guards the test above: the rules write different tokens on this pair, so equality is not vacuous."""
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY)
    outs = {
        name: reference_sample(student, teacher, prompts(tokenizer), make(), **common) for name, make in RULES.items()
    }
    assert outs["on_policy"].completion_ids != outs["teacher_only"].completion_ids
    for name in ("threshold", "handoff", "adaptive"):
        mixed = [m for row in outs[name].teacher_mask for m in row]
        assert 0 < sum(mixed) < len(mixed), name
    # handoff: some row switches to the teacher mid-response and never back
    handoff_rows = outs["handoff"].teacher_mask
    assert any(0 < sum(row) < len(row) for row in handoff_rows)
    assert all(row == sorted(row) for row in handoff_rows)
    assert any(row != sorted(row) for row in outs["threshold"].teacher_mask)


def test_on_policy_and_teacher_only_equal_generate(pair, tokenizer):
    student, teacher = pair
    for model, rule, expect_teacher in [(student, OnPolicyRule(), False), (teacher, TeacherOnlyRule(), True)]:
        out = block_verify_sample(
            student,
            teacher,
            prompts(tokenizer),
            rule,
            num_draft_tokens=4,
            **kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY),
        )
        for ids, completion, mask in zip(prompts(tokenizer), out.completion_ids, out.teacher_mask):
            generated = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                do_sample=False,
                max_new_tokens=12,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )[0, len(ids) :].tolist()
            assert completion == generated[: len(completion)]
            assert len(completion) == len(generated) or completion[-1] == tokenizer.eos_token_id
            assert all(m == expect_teacher for m in mask)


def chi2_quantile(df: int, p: float = 0.999) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile."""
    z = {0.999: 3.090232}[p]
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def tiny_vocab_pair(vocab=4):
    def make(seed, hidden):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=vocab,
            hidden_size=hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            initializer_range=0.5,
            pad_token_id=0,
            eos_token_id=vocab - 1,
            bos_token_id=None,
        )
        return Qwen2ForCausalLM(config).eval()

    return make(0, 16), make(1, 32)


@pytest.mark.parametrize("rule", ["top_k", "threshold"])
def test_sampled_sequences_have_the_reference_distribution(rule):
    """Two-sample chi-square test over all sequences of length <= 3 on a 4-token vocabulary: block-verify (gamma=3)
    and the reference must not differ at the 0.1% level (fixed seed, 6000 samples each)."""
    student, teacher = tiny_vocab_pair()
    make_rule = {
        "top_k": lambda: TopKRule(k=2),
        "threshold": lambda: DivergenceThresholdRule(lambda t: 0.0805 + 0 * t),
    }[rule]
    common = dict(
        max_new_tokens=3,
        eos_token_ids=[3],
        pad_token_id=0,
        student_params=SamplingParams(temperature=1.0),
        teacher_params=SamplingParams(temperature=1.0),
    )
    torch.manual_seed(1234)
    batch = [[1, 2]] * 1000
    ours, ref, teacher_tokens, tokens = Counter(), Counter(), 0, 0
    for _ in range(6):
        out = block_verify_sample(student, teacher, batch, make_rule(), num_draft_tokens=3, **common)
        ours.update(tuple(c) for c in out.completion_ids)
        teacher_tokens += sum(m for row in out.teacher_mask for m in row)
        tokens += sum(len(row) for row in out.teacher_mask)
        ref.update(tuple(c) for c in reference_sample(student, teacher, batch, make_rule(), **common).completion_ids)
    outcomes = set(ours) | set(ref)
    stat = sum((ours[o] - ref[o]) ** 2 / (ours[o] + ref[o]) for o in outcomes)
    assert len(outcomes) > 10
    assert 0.05 < teacher_tokens / tokens < 0.95  # both models write tokens, so the test covers the mixing
    assert stat < chi2_quantile(len(outcomes) - 1), (stat, len(outcomes))


def test_top_k_extremes(pair, tokenizer):
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY)
    everything = block_verify_sample(student, teacher, prompts(tokenizer), TopKRule(k=len(tokenizer)), **common)
    assert not any(m for row in everything.teacher_mask for m in row)
    nothing = block_verify_sample(student, teacher, prompts(tokenizer), TopKRule(k=0), **common)
    assert all(m for row in nothing.teacher_mask for m in row)


def test_sampling_params_warp():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = SamplingParams(top_p=0.7).log_probs(logits).exp()
    full = logits.softmax(-1)
    assert probs[0, 2:].sum() == 0 and probs[0, :2].sum() == pytest.approx(1.0)  # 0.64 < 0.7 so two tokens kept
    assert full[0, 0] < 0.7 < full[0, :2].sum()
    assert SamplingParams(top_k=1).log_probs(logits).exp()[0, 0] == pytest.approx(1.0)
    cold = SamplingParams(temperature=0.5).log_probs(logits).exp()
    torch.testing.assert_close(cold, (logits / 0.5).softmax(-1))
