"""The block-verify engine against the token-by-token reference and against plain `generate`."""

import math
from collections import Counter

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from trl_kd.losses import backbone
from trl_kd.sampler import (
    DivergenceThresholdRule,
    OnPolicyRule,
    Rule,
    SamplingParams,
    StopStrings,
    TeacherOnlyRule,
    TopKRule,
    block_verify_sample,
    cheapest_draft_length,
    expected_tokens_per_round,
    next_draft_length,
    nucleus_mask,
    reference_sample,
)
from trl_kd.testing import build_model

from helpers import assert_close_to_rounding


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
    common = dict(max_new_tokens=12, eos_token_ids=[tokenizer.eos_token_id], pad_token_id=tokenizer.pad_token_id)
    return {**common, **extra}


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


@pytest.mark.parametrize("schedule", ["expected_cost", "heuristic"])
@pytest.mark.parametrize("gamma", [1, 3])
@pytest.mark.parametrize("rule", list(RULES))
def test_adaptive_draft_length_writes_the_fixed_length_tokens_under_greedy(pair, tokenizer, gamma, rule, schedule):
    """The adaptive draft length changes the rounds, never the tokens: greedy completions, teacher masks and counts
    equal the fixed-length sampler's and the token-by-token reference's."""
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY, max_new_tokens=20)
    run = lambda **extra: block_verify_sample(  # noqa: E731
        student, teacher, prompts(tokenizer), RULES[rule](), num_draft_tokens=gamma, **common, **extra
    )
    adaptive, fixed = run(adaptive_draft=True, max_draft_tokens=9, draft_schedule=schedule), run()
    ref = reference_sample(student, teacher, prompts(tokenizer), RULES[rule](), **common)
    assert adaptive.completion_ids == fixed.completion_ids == ref.completion_ids
    assert adaptive.teacher_mask == fixed.teacher_mask == ref.teacher_mask
    for key in ("accepted", "replaced", "drafted"):
        assert adaptive.counts[key] == ref.counts[key]


@pytest.mark.parametrize("schedule", ["expected_cost", "heuristic"])
def test_adaptive_draft_length_follows_acceptance(pair, tokenizer, schedule):
    """Everything accepted: the draft grows and fewer rounds (teacher forwards) are needed than at the start
    length; everything rejected: it shrinks to 1, so fewer tokens are drafted in vain."""
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY, max_new_tokens=40, eos_token_ids=[])
    for rule, better in ((OnPolicyRule, "rounds"), (TeacherOnlyRule, "proposed")):
        fixed = block_verify_sample(student, teacher, prompts(tokenizer), rule(), num_draft_tokens=3, **common)
        adaptive = block_verify_sample(
            student,
            teacher,
            prompts(tokenizer),
            rule(),
            num_draft_tokens=3,
            adaptive_draft=True,
            draft_schedule=schedule,
            **common,
        )
        assert adaptive.completion_ids == fixed.completion_ids
        assert adaptive.counts[better] < fixed.counts[better], (rule, adaptive.counts, fixed.counts)


def test_adaptive_draft_length_is_reproducible_from_the_seed(pair, tokenizer):
    """Sampled, with rejections: the draft lengths follow the draws, so the same seed gives the same sequences and
    rounds, and another seed other ones."""
    student, teacher = pair
    common = kwargs(tokenizer, student_params=SamplingParams(temperature=1.5), max_new_tokens=20)

    def run(seed):
        torch.manual_seed(seed)
        out = block_verify_sample(
            student, teacher, prompts(tokenizer), TopKRule(k=len(tokenizer) // 2), adaptive_draft=True, **common
        )
        return out.completion_ids, out.teacher_mask, out.counts

    first = run(0)
    assert 0 < first[2]["replaced"] and first[2]["accepted"] > 0
    assert run(0) == first and run(1) != first


class RejectFirstRow(Rule):
    """The teacher writes every token of the batch's first row and none of the others'."""

    def reject(self, proposal):
        return (proposal.rows == 0)[:, None].expand_as(proposal.draft)


def test_expected_cost_schedule_follows_the_slowest_row(pair, tokenizer):
    """One row rejected everywhere, three never: the batch lasts as long as that row, one token a round, so the
    expected-cost schedule drafts one token a round, where the heuristic follows the majority to long blocks that
    the slow row throws away. Same tokens either way."""
    student, teacher = pair
    common = kwargs(tokenizer, student_params=GREEDY, teacher_params=GREEDY, max_new_tokens=30, eos_token_ids=[])
    runs = {
        schedule: block_verify_sample(
            student,
            teacher,
            prompts(tokenizer),
            RejectFirstRow(),
            adaptive_draft=True,
            draft_schedule=schedule,
            **common,
        )
        for schedule in ("expected_cost", "heuristic")
    }
    cost, heuristic = runs["expected_cost"], runs["heuristic"]
    assert cost.completion_ids == heuristic.completion_ids
    assert cost.teacher_mask == heuristic.teacher_mask and all(cost.teacher_mask[0])
    assert cost.counts["rounds"] == heuristic.counts["rounds"] == 30  # the first row writes one token a round
    # a draft costs c teacher forwards (0.22-0.26 here); two drafts a round beat one, (2c + 1) / (1 + a) < c + 1,
    # while the slow row's add-one acceptance estimate a = 1 / (n + 2) after n rejections exceeds c / (1 + c)
    draft_cost = sum(p.numel() for p in student.parameters()) / sum(p.numel() for p in teacher.parameters())
    twos = sum(1 / (n + 2) > draft_cost / (1 + draft_cost) for n in range(1, 30))
    assert twos in (2, 3)
    # the prompt's prefill, the first round's 5 drafts, then 2 a round while they pay, then 1
    assert cost.counts["student_forwards"] == 1 + 5 + 2 * twos + (29 - twos)
    assert heuristic.counts["student_forwards"] > 2 * cost.counts["student_forwards"]


def test_expected_tokens_per_round_against_the_outcomes():
    """``(1 - a^g) / (1 - a)`` against the sum over outcomes: first rejection at slot ``j`` (``j`` kept drafts and the
    replacement) with probability ``a^j (1 - a)``, or the whole block with ``a^g``."""
    for acceptance in (0.0, 0.3, 0.53, 0.95):
        for gamma in (1, 2, 5, 16):
            outcomes = sum(acceptance**j * (1 - acceptance) * (j + 1) for j in range(gamma))
            outcomes += acceptance**gamma * gamma
            assert math.isclose(expected_tokens_per_round(acceptance, gamma), outcomes, rel_tol=1e-12)
    assert expected_tokens_per_round(1.0, 7) == 7.0
    assert expected_tokens_per_round(0.5, 3) == 1.75


def test_cheapest_draft_length():
    # every draft kept: a round of g costs g/2 + 1 for g tokens, cheaper per token the longer it is
    assert cheapest_draft_length([1.0], [40], draft_cost=0.5, largest=16) == 16
    assert cheapest_draft_length([1.0], [40], draft_cost=0.5, largest=3) == 3
    # every draft rejected: one token a round whatever g, so the shortest
    assert cheapest_draft_length([0.0], [40], draft_cost=0.5, largest=16) == 1
    # a row at acceptance 0.5 sets the length: 40 tokens cost 60 at g=1, 53.3 at g=2, 57.1 at g=3
    assert cheapest_draft_length([1.0, 0.5], [40, 40], draft_cost=0.5, largest=16) == 2
    # ... unless it is nearly done: two tokens left take it at most two rounds
    assert cheapest_draft_length([1.0, 0.5], [40, 2], draft_cost=0.5, largest=16) == 16
    # equal costs (acceptance 0.5, a draft as dear as the teacher: 2 per token at g = 1 and 2): the shorter
    assert cheapest_draft_length([0.5], [40], draft_cost=1.0, largest=16) == 1


def test_next_draft_length():
    assert next_draft_length(5, fully_accepted=3, judged=4, largest=16) == 7
    assert next_draft_length(5, fully_accepted=2, judged=4, largest=16) == 4  # half is not more than half
    assert next_draft_length(1, fully_accepted=0, judged=4, largest=16) == 1
    assert next_draft_length(15, fully_accepted=4, judged=4, largest=16) == 16
    assert next_draft_length(9, fully_accepted=4, judged=4, largest=3) == 3  # never past the remaining budget
    assert next_draft_length(5, fully_accepted=0, judged=0, largest=16) == 5  # nothing judged: unchanged
    # one row: transformers' heuristic (+2 on a fully accepted block, -1 otherwise)
    assert [next_draft_length(4, f, 1, 99) for f in (1, 0)] == [6, 3]


def test_sampler_refuses_unsynchronised_adaptive_draft(pair, tokenizer):
    student, teacher = pair
    with pytest.raises(ValueError, match="sync_draft_length"):
        block_verify_sample(
            student,
            teacher,
            prompts(tokenizer),
            OnPolicyRule(),
            adaptive_draft=True,
            sync_continue=bool,
            **kwargs(tokenizer),
        )


def full_forward_teacher_hidden(teacher, prompt_ids, completions):
    """The teacher's final hidden states at each completion's positions from one forward over prompt + completion
    (the state predicting token t sits at the position before it)."""
    states = []
    for prompt, completion in zip(prompt_ids, completions):
        ids = torch.tensor([list(prompt) + list(completion)])
        hidden = backbone(teacher)(input_ids=ids).last_hidden_state[0]
        states.append(hidden[len(prompt) - 1 : len(prompt) - 1 + len(completion)])
    return states


@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("rule", ["top_k", "threshold", "handoff"])
def test_kept_teacher_hidden_states_equal_a_full_teacher_forward(pair, tokenizer, rule, adaptive):
    """Left padding and mixed prompt lengths, rows that end on EOS and leave the batch, rows cut by the length
    budget, accepted and replaced tokens, sampled: the states the sampler keeps are the teacher's at every
    response position, to fp32 rounding."""
    student, teacher = pair
    common = kwargs(
        tokenizer,
        max_new_tokens=10,
        eos_token_ids=list(range(40, 64)),  # about one token in fourteen ends a row
        student_params=SamplingParams(temperature=1.5),
        teacher_params=SamplingParams(temperature=1.5),
    )
    torch.manual_seed(0)
    batch = prompts(tokenizer) * 3
    make_rule = {**RULES, "top_k": lambda: TopKRule(k=len(tokenizer) // 2)}[rule]  # K = V/2 mixes the writers
    out = block_verify_sample(
        student,
        teacher,
        batch,
        make_rule(),
        num_draft_tokens=3,
        adaptive_draft=adaptive,
        keep_teacher_hidden=True,
        **common,
    )
    lengths = [len(c) for c in out.completion_ids]
    ended_on_eos = [bool(c) and c[-1] in common["eos_token_ids"] for c in out.completion_ids]
    assert any(ended_on_eos) and 10 in lengths  # both ways of ending are covered
    mask = [m for row in out.teacher_mask for m in row]
    assert 0 < sum(mask) < len(mask)  # both models wrote tokens
    with torch.no_grad():
        expected = full_forward_teacher_hidden(teacher, batch, out.completion_ids)
    for kept, reference, n in zip(out.teacher_hidden, expected, lengths):
        assert kept.shape == (n, teacher.config.hidden_size)
        assert_close_to_rounding(kept, reference)


def test_keeping_teacher_states_does_not_change_the_samples(pair, tokenizer):
    student, teacher = pair
    common = kwargs(tokenizer, student_params=SamplingParams(temperature=1.5), num_draft_tokens=3)
    outs = []
    for keep in (False, True):
        torch.manual_seed(0)
        outs.append(
            block_verify_sample(
                student, teacher, prompts(tokenizer), TopKRule(k=3), keep_teacher_hidden=keep, **common
            )
        )
    assert outs[0].completion_ids == outs[1].completion_ids and outs[0].teacher_hidden is None


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


@pytest.mark.parametrize("schedule", [None, "heuristic", "expected_cost"])
@pytest.mark.parametrize("rule", ["top_k", "threshold"])
def test_sampled_sequences_have_the_reference_distribution(rule, schedule):
    """Two-sample chi-square test over all sequences of length <= 3 on a 4-token vocabulary: block-verify (gamma=3,
    fixed or adaptive by either schedule) and the reference must not differ at the 0.1% level (fixed seed, 6000
    samples each)."""
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
        out = block_verify_sample(
            student,
            teacher,
            batch,
            make_rule(),
            num_draft_tokens=3,
            adaptive_draft=schedule is not None,
            draft_schedule=schedule or "heuristic",
            **common,
        )
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


def naive_nucleus(probs: list[float], top_p: float) -> tuple[set[int], float]:
    """The nucleus by hand, in float64: walk the tokens from the most probable, keep one while the mass before it is
    below top_p, then every token tied with the last kept one. Also returns how close the walk came to top_p (the
    smallest gap between a running mass and top_p), where float32 rounding could decide otherwise."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, before, closest = [], 0.0, math.inf
    for i in order:
        closest = min(closest, abs(before - top_p))
        if before >= top_p and kept:
            break
        kept.append(i)
        before += probs[i]
    cutoff = probs[kept[-1]]
    return {i for i, p in enumerate(probs) if p >= cutoff}, closest


def test_nucleus_matches_a_hand_walk_and_keeps_ties():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 1000, generator=generator) * torch.linspace(0.5, 8.0, 64)[:, None]
    checked = 0
    for top_p in (0.3, 0.5, 0.9):
        mask = nucleus_mask(logits, top_p)
        probs = logits.softmax(-1)
        for row in range(len(logits)):
            want, closest = naive_nucleus(probs[row].double().tolist(), top_p)
            # float32 running sums over up to 1,000 tokens are off by at most ~1,000 ulps of 1.0
            if closest > 1000 * torch.finfo(torch.float32).eps:
                assert set(mask[row].nonzero().squeeze(1).tolist()) == want
                checked += 1
    assert checked > 0.9 * 3 * len(logits)
    # three tokens tied at 0.32 each: the mass before the second is already above 0.3, yet all three are kept
    tied = torch.tensor([[2.0, 2.0, 2.0, 0.0]])
    assert nucleus_mask(tied, 0.3).tolist() == [[True, True, True, False]]
    assert nucleus_mask(tied, 0.3, prefilter=0).tolist() == [[True, True, True, False]]
    assert nucleus_mask(tied, 1e-9).tolist() == [[True, True, True, False]]  # at least the top token and its ties


def test_nucleus_prefilter_is_the_full_sort_bit_for_bit():
    """The partial sort (a top-k, then a full sort only for a nucleus wider than it) keeps exactly the full sort's
    tokens, both when every row's nucleus fits the prefilter and when one row's does not."""
    generator = torch.Generator().manual_seed(1)
    peaked = torch.randn(8, 4096, generator=generator) * 12.0  # nuclei of a few tokens
    flat = torch.randn(2, 4096, generator=generator) * 0.1  # nuclei of thousands of tokens
    for logits in (peaked, torch.cat([peaked, flat])):
        for top_p in (0.1, 0.5, 0.9, 0.99):
            full = nucleus_mask(logits, top_p, prefilter=0)
            for prefilter in (1, 8, 64, 4095):
                assert torch.equal(nucleus_mask(logits, top_p, prefilter=prefilter), full)
    assert nucleus_mask(flat, 0.5).sum(-1).min() > 64  # so the fallback really ran for the mixed batch
    params = SamplingParams(temperature=0.5, top_p=0.5)
    draws = [params.sample(peaked, torch.Generator().manual_seed(s)) for s in range(5)]
    kept = nucleus_mask(peaked / 0.5, 0.5, prefilter=0)
    assert all(kept.gather(-1, d[:, None]).all() for d in draws)
