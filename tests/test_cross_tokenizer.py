"""Cross-tokenizer alignment and losses (`trl_kd.cross_tokenizer`) against naive references, on two tokenizers of
different families trained here: the package's byte-level BPE and a Metaspace BPE ("▁" for spaces, SentencePiece's
convention)."""

import math
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from trl_kd import KDTrainer, PromptKDTrainer, SpeculativeKDTrainer, SwitchTrainer
from trl_kd.cross_tokenizer import (
    CrossTokenizerLoss,
    CrossTokenizerTeacher,
    SharedVocabulary,
    align_spans,
    encode_with_ends,
    token_ends,
    token_texts,
)
from trl_kd.losses import divergence_from_log_probs
from trl_kd.testing import build_metaspace_tokenizer, build_model, build_tokenizer, make_dataset

from helpers import assert_changed, assert_close_to_rounding, logged, make_args, make_trainer, params


TEXTS = [
    "reverse: a b c d\nd c b a",
    "sort: q w e r t y -> e q r t w y",
    "Distillation, step 1: 12345 + 0.5 = ? naïve café",
    "count: from 3 to 9\n3 4 5 6 7 8 9",
]


@pytest.fixture(scope="module")
def byte_level():
    return build_tokenizer()


@pytest.fixture(scope="module")
def metaspace():
    return build_metaspace_tokenizer(alphabet_texts=tuple(TEXTS))


def test_token_ends_give_each_token_its_characters(byte_level):
    text = "naïve 日本 café 🙂 end"  # multi-byte characters that byte-level BPE splits into byte tokens
    ids = byte_level(text, add_special_tokens=False)["input_ids"]
    decoded, ends = token_ends(byte_level, ids)
    assert decoded == text and len(ends) == len(ids) and ends[-1] == len(text)
    assert ends == sorted(ends)
    # a token ends where its prefix's decoding ends, once the prefix is whole characters
    for k in range(len(ids)):
        prefix = byte_level.decode(ids[: k + 1], clean_up_tokenization_spaces=False)
        if "\ufffd" not in prefix:
            assert ends[k] == len(prefix), k


@pytest.mark.parametrize("side", ["byte_level", "metaspace"])
def test_encode_with_ends_covers_the_text(side, request):
    tokenizer = request.getfixturevalue(side)
    for text in TEXTS:
        ids, ends = encode_with_ends(tokenizer, text)
        assert len(ids) == len(ends) and ends[-1] == len(text) and ends == sorted(ends)
        pieces = [text[a:b] for a, b in zip([0] + ends[:-1], ends)]
        assert "".join(pieces) == text
        for token, piece in zip(ids, pieces):  # each token's own text, where it is whole characters
            alone = tokenizer.decode([token], clean_up_tokenization_spaces=False)
            if piece and "\ufffd" not in alone and "<unk>" not in alone:
                assert alone.replace("▁", " ") == piece, (token, alone, piece)


def naive_spans(student_ends, teacher_ends):
    """Split at every character where both sides have a token ending; a span takes the tokens ending after the
    previous split and up to this one."""
    spans, s, t = [], 0, 0
    for boundary in sorted(set(student_ends) & set(teacher_ends)):
        s_stop = sum(1 for e in student_ends if e <= boundary)
        t_stop = sum(1 for e in teacher_ends if e <= boundary)
        spans.append(((s, s_stop), (t, t_stop)))
        s, t = s_stop, t_stop
    return spans


def test_align_spans_matches_the_naive_split_on_random_cuts():
    rng = random.Random(0)
    for _ in range(300):
        length = rng.randint(1, 40)

        def cuts():
            ends = sorted(rng.sample(range(1, length), rng.randint(0, length - 1)) + [length])
            ends += [ends[rng.randrange(len(ends))] for _ in range(rng.randint(0, 3))]  # zero-width tokens
            return sorted(ends)

        student, teacher = cuts(), cuts()
        assert align_spans(student, teacher) == naive_spans(student, teacher), (student, teacher)


def test_spans_of_two_tokenizers_cover_the_same_text(byte_level, metaspace):
    for text in TEXTS:
        s_ids, s_ends = encode_with_ends(byte_level, text)
        t_ids, t_ends = encode_with_ends(metaspace, text)
        spans = align_spans(s_ends, t_ends)
        assert spans[0][0][0] == 0 and spans[0][1][0] == 0
        assert spans[-1][0][1] == len(s_ids) and spans[-1][1][1] == len(t_ids)
        for ((s0, s1), (t0, t1)), ((n0, _), (m0, _)) in zip(spans, spans[1:] + [((len(s_ids), 0), (len(t_ids), 0))]):
            assert s1 == n0 and t1 == m0 and s1 > s0 and t1 > t0  # contiguous, never empty
            start_s, start_t = (s_ends[s0 - 1] if s0 else 0), (t_ends[t0 - 1] if t0 else 0)
            assert text[start_s : s_ends[s1 - 1]] == text[start_t : t_ends[t1 - 1]]
        # the tokenizers differ, so some spans merge several tokens
        assert any(s1 - s0 > 1 or t1 - t0 > 1 for (s0, s1), (t0, t1) in spans)


def test_shared_vocabulary_pairs_tokens_of_the_same_text(byte_level, metaspace):
    shared = SharedVocabulary.build(byte_level, metaspace, extra_pairs=[(byte_level.eos_token_id, 1)])
    s_texts, t_texts = token_texts(byte_level), token_texts(metaspace)
    assert 0 < len(shared) < min(len(byte_level), len(metaspace))
    assert len(set(shared.student_ids.tolist())) == len(shared) == len(set(shared.teacher_ids.tolist()))
    pairs = dict(zip(shared.student_ids.tolist(), shared.teacher_ids.tolist()))
    assert pairs[byte_level.eos_token_id] == 1
    for s, t in pairs.items():
        if s != byte_level.eos_token_id:
            assert s_texts[s] == t_texts[t] is not None
    # " the"-style tokens match across the two space conventions
    assert any(text and text.startswith(" ") and len(text) > 1 for text in (s_texts[s] for s in pairs))
    # with itself, every token of whole characters pairs with itself (the first of equal texts)
    same = SharedVocabulary.build(byte_level, byte_level)
    assert all(s == t for s, t in zip(same.student_ids.tolist(), same.teacher_ids.tolist()))


def naive_span_loss(config, s_logits, s_ids, t_logits, t_ids, spans, shared):
    """One span at a time, in float64, from the formulas in the module docstring."""
    s_logp = torch.log_softmax(s_logits.double() / config.temperature, -1)
    t_logp = torch.log_softmax(t_logits.double() / config.temperature, -1)
    s_map, t_map = shared.student_ids.tolist(), shared.teacher_ids.tolist()
    matched_weight, unmatched_weight = config.weights(shared)
    losses = []
    for (s0, s1), (t0, t1) in spans:
        s_rest = sum(s_logp[k, s_ids[k]] for k in range(s0 + 1, s1))
        t_rest = sum(t_logp[k, t_ids[k]] for k in range(t0 + 1, t1))
        s_merged, t_merged = s_logp[s0] + s_rest, t_logp[t0] + t_rest
        loss = 0.0
        if matched_weight:
            a = torch.log_softmax(s_merged[s_map], -1)
            b = torch.log_softmax(t_merged[t_map], -1)
            loss = loss + matched_weight * divergence_from_log_probs(a, b, config.loss_type, config.beta)
        if unmatched_weight:
            keep_s = [v for v in range(s_logits.shape[-1]) if v not in set(s_map)]
            keep_t = [v for v in range(t_logits.shape[-1]) if v not in set(t_map)]
            ps = sorted(s_merged.exp()[keep_s].tolist(), reverse=True)
            pt = sorted(t_merged.exp()[keep_t].tolist(), reverse=True)
            width = max(len(ps), len(pt))
            ps, pt = ps + [0.0] * (width - len(ps)), pt + [0.0] * (width - len(pt))
            # as a tensor expression so that the gradient flows: same sort order, recomputed
            s_sorted = s_merged.exp()[keep_s].sort(descending=True).values
            s_sorted = torch.cat([s_sorted, s_sorted.new_zeros(width - len(keep_s))])
            loss = loss + unmatched_weight * (s_sorted - torch.tensor(pt, dtype=torch.float64)).abs().sum()
            assert math.isclose(float((s_sorted.detach() - torch.tensor(ps, dtype=torch.float64)).abs().sum()), 0.0)
        if config.span_weight:
            s_span = sum(s_logp[k, s_ids[k]] for k in range(s0, s1))
            t_span = sum(t_logp[k, t_ids[k]] for k in range(t0, t1))
            loss = loss + config.span_weight * 0.5 * (s_span - t_span) ** 2
        losses.append(loss)
    return torch.stack([torch.as_tensor(x, dtype=torch.float64) for x in losses])


@pytest.mark.parametrize(
    "config",
    [
        CrossTokenizerLoss(),
        CrossTokenizerLoss(loss_type="jsd", beta=0.0, matched_weight=0.7, unmatched_weight=0.3, span_weight=0.1),
        CrossTokenizerLoss(loss_type="jsd", beta=1.0, temperature=2.0, span_weight=1.0),
    ],
)
def test_span_losses_match_the_naive_reference_in_value_and_gradient(byte_level, metaspace, config):
    text = TEXTS[2]
    s_ids, s_ends = encode_with_ends(byte_level, text)
    t_ids, t_ends = encode_with_ends(metaspace, text)
    spans = align_spans(s_ends, t_ends)
    shared = SharedVocabulary.build(byte_level, metaspace)
    generator = torch.Generator().manual_seed(0)
    s_logits = (torch.randn(len(s_ids), len(byte_level), generator=generator) * 3).requires_grad_()
    t_logits = torch.randn(len(t_ids), len(metaspace), generator=generator) * 3
    got = config.span_losses(s_logits, torch.tensor(s_ids), t_logits, torch.tensor(t_ids), spans, shared)
    (grad,) = torch.autograd.grad(got.sum(), s_logits)

    s64 = s_logits.detach().double().requires_grad_()
    want = naive_span_loss(config, s64, s_ids, t_logits.double(), t_ids, spans, shared)
    (want_grad,) = torch.autograd.grad(want.sum(), s64)
    # fp32 against fp64: relative to the magnitude of the values, a few hundred fp32 ulps
    eps = torch.finfo(torch.float32).eps
    scale = want.abs().max().item() + 1.0
    torch.testing.assert_close(got.double(), want, rtol=0, atol=512 * eps * scale)
    g_scale = want_grad.abs().max().item() + 1e-6
    torch.testing.assert_close(grad.double(), want_grad, rtol=0, atol=512 * eps * g_scale)


def test_same_tokenizer_reduces_to_the_token_level_divergence(byte_level):
    """One tokenizer on both sides: every span is one token (no multi-byte characters in the text), the shared
    vocabulary is the whole vocabulary, and the shared part alone gives the package's divergence token by token."""
    text = TEXTS[0]
    ids, ends = encode_with_ends(byte_level, text)
    spans = align_spans(ends, ends)
    assert spans == [((k, k + 1), (k, k + 1)) for k in range(len(ids))]
    shared = SharedVocabulary(torch.arange(len(byte_level)), torch.arange(len(byte_level)), *(len(byte_level),) * 2)
    generator = torch.Generator().manual_seed(1)
    s_logits, t_logits = torch.randn(2, len(ids), len(byte_level), generator=generator)
    config = CrossTokenizerLoss(beta=0.3)
    got = config.span_losses(s_logits, torch.tensor(ids), t_logits, torch.tensor(ids), spans, shared)
    want = divergence_from_log_probs(s_logits.log_softmax(-1), t_logits.log_softmax(-1), "jsd", 0.3)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # identical models: nothing to learn
    same = config.span_losses(s_logits, torch.tensor(ids), s_logits, torch.tensor(ids), spans, shared)
    assert same.abs().max().item() < 1e-5


def test_slow_tokenizer_is_refused_with_the_fix():
    class Slow:
        pass

    with pytest.raises(ValueError, match="use_fast=True"):
        token_ends(Slow(), [1, 2])


# ------------------------------------------------------------------------------------------------ in the trainer
def cross_trainer(tmp_path, byte_level, metaspace, trainer_class=KDTrainer, **overrides):
    teacher = build_model("llama", metaspace, "teacher", seed=1)
    return make_trainer(
        tmp_path,
        byte_level,
        trainer_class=trainer_class,
        teacher=teacher,
        teacher_processing_class=metaspace,
        cross_tokenizer=True,
        **overrides,
    )


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_kdtrainer_distils_across_tokenizers(tmp_path, byte_level, metaspace, lmbda):
    trainer = cross_trainer(tmp_path, byte_level, metaspace, lmbda=lmbda, max_steps=3, learning_rate=1e-3)
    before = params(trainer.model)
    trainer.train()
    losses = logged(trainer, "kd_loss")
    assert len(losses) == 3 and all(math.isfinite(x) and x > 0 for x in losses)
    assert_changed(before, trainer.model)


def test_seq_kd_trains_on_teacher_samples_re_tokenized_for_the_student(tmp_path, byte_level, metaspace):
    dataset = make_dataset("prompt_only", 8)
    trainer = cross_trainer(
        tmp_path, byte_level, metaspace, dataset=dataset, lmbda=0.0, seq_kd=True, max_steps=2, max_completion_length=12
    )
    # the teacher generates with its own pad/EOS ids, not the student's
    config = trainer.teacher_generation_config
    assert config.pad_token_id == metaspace.pad_token_id and metaspace.eos_token_id in config.eos_token_id
    before = params(trainer.model)
    trainer.train()
    assert logged(trainer, "teacher_token_fraction") == [1.0, 1.0]
    assert all(math.isfinite(x) for x in logged(trainer, "kd_loss"))
    assert_changed(before, trainer.model)


def test_a_teacher_sample_becomes_the_student_tokens_of_its_text(tmp_path, byte_level, metaspace):
    bridge = cross_trainer(tmp_path, byte_level, metaspace).cross_tokenizer
    text = TEXTS[1]
    teacher_ids = metaspace(text, add_special_tokens=False)["input_ids"]
    want = byte_level(text, add_special_tokens=False)["input_ids"]
    assert bridge.student_completion(teacher_ids, 1000) == want
    ended = bridge.student_completion(teacher_ids + [metaspace.eos_token_id], 1000)
    assert ended == want + [byte_level.eos_token_id]
    assert bridge.student_completion(teacher_ids + [metaspace.eos_token_id], 5) == want[:5]


def test_the_trainer_loss_is_the_span_loss_of_its_batch(tmp_path, byte_level, metaspace):
    """The loss of a batch (dataset rows) equals the span losses computed here from the rows' text, the teacher
    reading its own tokenization of each prompt and completion."""
    trainer = cross_trainer(tmp_path, byte_level, metaspace, lmbda=0.0, cross_tokenizer_span_weight=0.5)
    rows = [trainer.train_dataset[i] for i in range(2)]
    batch = trainer._generate_and_score_completions(rows)
    student, teacher = trainer.model, trainer.teacher_model
    loss, divergence_sum, _, num_tokens = trainer.distillation_loss(student, batch, None)

    bridge, total = trainer.cross_tokenizer, 0.0
    for i, row in enumerate(rows):
        length = int(batch["completion_mask"][i].sum())
        s_ids = batch["completion_ids"][i, :length].tolist()
        t_ids, spans = bridge.completion(s_ids)
        t_prompt = metaspace(row["prompt"])["input_ids"]
        s_prompt = batch["prompt_ids"][i][batch["prompt_mask"][i].bool()].tolist()
        s_logits = student(torch.tensor([s_prompt + s_ids])).logits[0, len(s_prompt) - 1 : -1]
        t_logits = teacher(torch.tensor([t_prompt + t_ids])).logits[0, len(t_prompt) - 1 : -1]
        total = (
            total
            + bridge.loss_config.span_losses(
                s_logits, torch.tensor(s_ids), t_logits, torch.tensor(t_ids), spans, bridge.shared
            ).sum()
        )
    assert int(num_tokens) == int(batch["completion_mask"].sum())
    assert_close_to_rounding(divergence_sum.detach(), total.detach(), dtype=torch.float32)
    assert_close_to_rounding(loss.detach(), total.detach() / num_tokens, dtype=torch.float32)


def test_a_micro_batch_without_spans_has_a_zero_loss_that_backpropagates(tmp_path, byte_level, metaspace):
    trainer = cross_trainer(tmp_path, byte_level, metaspace, lmbda=0.0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(2)])
    batch["completion_mask"] = torch.zeros_like(batch["completion_mask"])
    loss, divergence_sum, entropy_sum, num_tokens = trainer.distillation_loss(trainer.model, batch, None)
    assert float(loss.detach()) == float(divergence_sum) == float(entropy_sum) == int(num_tokens) == 0
    loss.backward()  # a rank whose rows are all empty still takes part in the step


@pytest.mark.parametrize("trainer_class", [SpeculativeKDTrainer, SwitchTrainer, PromptKDTrainer])
def test_teacher_in_the_loop_methods_refuse_cross_tokenizer_and_say_why(
    tmp_path, byte_level, metaspace, trainer_class
):
    with pytest.raises(ValueError, match="does not support cross_tokenizer=True: .*(token|prompt)"):
        cross_trainer(tmp_path, byte_level, metaspace, trainer_class=trainer_class)


@pytest.mark.parametrize(
    "overrides",
    [{"teacher_cache": "some-cache"}, {"loss_normalization": "sequences"}, {"cross_tokenizer_matched_weight": 0.5}],
)
def test_unsupported_cross_tokenizer_settings_are_refused(tmp_path, overrides):
    with pytest.raises(ValueError, match="cross_tokenizer"):
        make_args(tmp_path, cross_tokenizer=True, **overrides)


def test_a_teacher_without_its_tokenizer_is_refused_with_the_fix(tmp_path, byte_level, metaspace):
    folder = tmp_path / "teacher"
    build_model("llama", metaspace, "teacher", seed=1).save_pretrained(folder)
    with pytest.raises(ValueError, match="teacher's tokenizer.*teacher_processing_class"):
        make_trainer(tmp_path, byte_level, teacher=str(folder), cross_tokenizer=True)


def test_a_tokenizer_whose_unknown_token_is_in_its_vocabulary_is_its_own_teacher(metaspace):
    """`<unk>` is one of the student's tokens; encoding its text gives the unknown token, as it should."""
    bridge = CrossTokenizerTeacher(metaspace, metaspace, len(metaspace), len(metaspace), [1], CrossTokenizerLoss())
    assert len(bridge.shared) > 0


def test_a_teacher_tokenizer_that_cannot_encode_the_student_tokens_is_refused(tmp_path, byte_level):
    # a word-level teacher tokenizer that knows a few words only: most of the student's tokens become <unk>
    backend = Tokenizer(models.WordLevel({"<pad>": 0, "<eos>": 1, "<unk>": 2, "a": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    narrow = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    teacher = build_model("llama", narrow, "teacher", seed=1)
    with pytest.raises(ValueError, match="cannot encode .* of the student's tokens.*byte"):
        make_trainer(tmp_path, byte_level, teacher=teacher, teacher_processing_class=narrow, cross_tokenizer=True)


def test_the_student_eos_paired_with_the_teachers_is_the_one_it_writes(byte_level, metaspace):
    """With several student EOS ids, the tokenizer's own EOS is both the one paired with the teacher's EOS in the
    shared vocabulary and the one a finished teacher sample ends with on the student's side."""
    other = next(i for i in range(len(byte_level)) if i < byte_level.eos_token_id)
    bridge = CrossTokenizerTeacher(
        byte_level, metaspace, len(byte_level), len(metaspace), [other, byte_level.eos_token_id], CrossTokenizerLoss()
    )
    pairs = dict(zip(bridge.shared.student_ids.tolist(), bridge.shared.teacher_ids.tolist()))
    assert pairs[byte_level.eos_token_id] == metaspace.eos_token_id
    teacher_ids = metaspace(TEXTS[0], add_special_tokens=False)["input_ids"] + [metaspace.eos_token_id]
    assert bridge.student_completion(teacher_ids, 1000)[-1] == byte_level.eos_token_id
    with pytest.raises(ValueError, match="student EOS"):
        CrossTokenizerTeacher(byte_level, metaspace, len(byte_level), len(metaspace), [], CrossTokenizerLoss())
