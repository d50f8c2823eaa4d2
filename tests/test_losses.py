"""Divergences against a naive float64 implementation written from the definitions."""

import pytest
import torch

from trl_kd.losses import LOSS_TYPES, LMHead, chunked_kd_loss, chunked_token_divergence, divergence

from helpers import assert_close_to_rounding


def naive_divergence(student_logits, teacher_logits, loss_type, beta=0.5, skew_alpha=0.1, temperature=1.0):
    """Row by row, token by token, in float64, straight from the formulas."""
    out = []
    for s_row, t_row in zip(student_logits.double(), teacher_logits.double()):
        q = torch.softmax(s_row / temperature, -1)
        p = torch.softmax(t_row / temperature, -1)

        def kl(a, b):
            return sum(a[v] * torch.log(a[v] / b[v]) for v in range(len(a)))

        if loss_type == "jsd":
            if beta == 0:
                value = kl(p, q)
            elif beta == 1:
                value = kl(q, p)
            else:
                m = beta * p + (1 - beta) * q
                value = beta * kl(p, m) + (1 - beta) * kl(q, m)
        elif loss_type == "skew_fkl":
            value = kl(p, skew_alpha * p + (1 - skew_alpha) * q)
        elif loss_type == "skew_rkl":
            value = kl(q, (1 - skew_alpha) * p + skew_alpha * q)
        else:
            value = 0.5 * sum(abs(p[v] - q[v]) for v in range(len(p)))
        out.append(value)
    return torch.stack(out)


CASES = [("jsd", b) for b in (0.0, 0.1, 0.5, 0.9, 1.0)] + [("skew_fkl", None), ("skew_rkl", None), ("tvd", None)]


def _logits(n=6, v=11, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=g) * scale, torch.randn(n, v, generator=g) * scale


@pytest.mark.parametrize("loss_type,beta", CASES)
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_divergence_matches_naive_values_and_gradients(loss_type, beta, temperature):
    s, t = _logits()
    s.requires_grad_(True)
    kwargs = dict(loss_type=loss_type, beta=beta if beta is not None else 0.5, skew_alpha=0.2, temperature=temperature)
    ours = divergence(s, t, **kwargs)
    s64 = s.detach().double().requires_grad_(True)
    ref = naive_divergence(s64, t, **kwargs)
    assert_close_to_rounding(ours.double(), ref.detach(), dtype=torch.float32)
    (grad,) = torch.autograd.grad(ours.sum(), s)
    (ref_grad,) = torch.autograd.grad(ref.sum(), s64)
    assert_close_to_rounding(grad.double(), ref_grad, dtype=torch.float32)


def test_beta_endpoints_are_forward_and_reverse_kl():
    s, t = _logits(seed=3)
    q, p = torch.log_softmax(s, -1), torch.log_softmax(t, -1)
    forward_kl = (p.exp() * (p - q)).sum(-1)
    reverse_kl = (q.exp() * (q - p)).sum(-1)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), forward_kl, atol=1e-6, rtol=0)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), reverse_kl, atol=1e-6, rtol=0)
    # and they are different quantities, so the test above can fail
    assert not torch.allclose(forward_kl, reverse_kl, atol=1e-3)


@pytest.mark.parametrize("loss_type,beta", CASES)
def test_nonnegative_and_zero_on_equal_inputs(loss_type, beta):
    beta = 0.5 if beta is None else beta
    for seed in range(5):
        s, t = _logits(seed=seed, scale=5.0)
        assert (divergence(s, t, loss_type, beta=beta) >= -1e-6).all()
        zero = divergence(s, s.clone(), loss_type, beta=beta)
        torch.testing.assert_close(zero, torch.zeros_like(zero), atol=1e-6, rtol=0)
        assert divergence(s, t, loss_type, beta=beta).sum() > 1e-3


def _heads(hidden_s=8, hidden_t=12, vocab_s=37, vocab_t=37, seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    student = LMHead(torch.randn(vocab_s, hidden_s, generator=g), torch.randn(vocab_s, generator=g) if bias else None)
    teacher = LMHead(torch.randn(vocab_t, hidden_t, generator=g), torch.randn(vocab_t, generator=g) if bias else None)
    return student, teacher


@pytest.mark.parametrize("loss_type,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("vocab", [(37, 37, 37), (37, 45, 33)])
def test_chunked_equals_dense(loss_type, beta, chunk_size, vocab):
    """Chunked loss == dense full-logit loss, values and gradients (hidden states and head weight), including heads
    padded to different sizes compared over a shared range."""
    beta = 0.5 if beta is None else beta
    vocab_s, vocab_t, vocab_size = vocab
    student, teacher = _heads(vocab_s=vocab_s, vocab_t=vocab_t, bias=True)
    student.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    h_s = torch.randn(10, 8, generator=g, requires_grad=True)
    h_t = torch.randn(10, 12, generator=g)

    div, _ = chunked_token_divergence(h_s, h_t, student, teacher, vocab_size, loss_type, beta, 0.1, 1.5, chunk_size)
    grads = torch.autograd.grad(div.sum(), (h_s, student.weight))

    s_logits = h_s @ student.weight[:vocab_size].t() + student.bias[:vocab_size]
    t_logits = h_t @ teacher.weight[:vocab_size].t() + teacher.bias[:vocab_size]
    dense = divergence(s_logits, t_logits, loss_type, beta=beta, skew_alpha=0.1, temperature=1.5)
    dense_grads = torch.autograd.grad(dense.sum(), (h_s, student.weight))
    assert_close_to_rounding(div, dense)
    for ours, ref in zip(grads, dense_grads):
        assert_close_to_rounding(ours, ref)


def test_chunked_loss_normalises_by_given_token_count():
    student, teacher = _heads()
    g = torch.Generator().manual_seed(2)
    h_s, h_t = torch.randn(2, 5, 8, generator=g), torch.randn(2, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    loss, total, entropy, count = chunked_kd_loss(h_s, h_t, student, teacher, mask, 37, "jsd", beta=0.0)
    assert count.item() == 8
    dense = divergence(h_s @ student.weight.t(), h_t @ teacher.weight.t(), "jsd", beta=0.0)
    torch.testing.assert_close(total, (dense * mask).sum())
    torch.testing.assert_close(loss, total / 8)
    loss_global, *_ = chunked_kd_loss(h_s, h_t, student, teacher, mask, 37, "jsd", 0.0, num_items_in_batch=20)
    torch.testing.assert_close(loss_global, total / 20)
    q = torch.log_softmax(h_s @ student.weight.t(), -1)
    torch.testing.assert_close(entropy, (-(q.exp() * q).sum(-1) * mask).sum(), atol=1e-4, rtol=1e-5)


def test_unknown_loss_type_is_refused():
    s, t = _logits()
    with pytest.raises(ValueError, match="loss_type"):
        divergence(s, t, "kl")
    assert set(LOSS_TYPES) == {"jsd", "skew_fkl", "skew_rkl", "tvd"}


def naive_topk_divergence(student_logits, teacher_logits, k, loss_type, beta=0.5, skew_alpha=0.1, temperature=1.0):
    """The teacher's top-k plus a tail bin, against the student folded onto the same k + 1 bins: row by row in
    float64, from the definitions (the student's tail is 1 minus its mass on the teacher's top-k)."""
    out = []
    for s_row, t_row in zip(student_logits.double(), teacher_logits.double()):
        q_full = torch.softmax(s_row / temperature, -1)
        p_full = torch.softmax(t_row / temperature, -1)
        top = p_full.topk(k).indices
        p, q = list(p_full[top]), list(q_full[top])
        if k < len(p_full):
            p.append(1 - p_full[top].sum())
            q.append(1 - q_full[top].sum())
        p, q = torch.stack(p), torch.stack(q)
        out.append(naive_divergence(q.log()[None], p.log()[None], loss_type, beta, skew_alpha)[0])
    return torch.stack(out)


def topk_cache(teacher_logits, k, temperature):
    """What an offline cache stores: top-k ids and log-probabilities, and the log of the remaining mass."""
    log_p = torch.log_softmax(teacher_logits / temperature, -1)
    values, ids = log_p.topk(k, dim=-1)
    tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, values, tail


@pytest.mark.parametrize("loss_type,beta", CASES)
@pytest.mark.parametrize("k", [1, 4, 36])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_topk_divergence_matches_naive_values_and_gradients(loss_type, beta, k, chunk_size):
    from trl_kd.losses import chunked_topk_token_divergence

    beta = 0.5 if beta is None else beta
    student, teacher = _heads(bias=True)
    student.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    h_s = torch.randn(7, 8, generator=g, requires_grad=True)
    t_logits = (torch.randn(7, 12, generator=g) @ teacher.weight.t()) * 0.5
    ids, values, tail = topk_cache(t_logits, k, temperature=1.5)
    kwargs = dict(loss_type=loss_type, beta=beta, skew_alpha=0.2, temperature=1.5)
    div, _ = chunked_topk_token_divergence(h_s, student, 37, ids, values, tail, chunk_size=chunk_size, **kwargs)
    grads = torch.autograd.grad(div.sum(), (h_s, student.weight))

    h64, w64 = h_s.detach().double().requires_grad_(True), student.weight.detach().double().requires_grad_(True)
    s_logits = h64 @ w64.t() + student.bias.double()
    ref = naive_topk_divergence(s_logits, t_logits.double(), k, **kwargs)
    ref_grads = torch.autograd.grad(ref.sum(), (h64, w64))
    assert_close_to_rounding(div.double(), ref.detach(), dtype=torch.float32)
    for ours, expected in zip(grads, ref_grads):
        assert_close_to_rounding(ours.double(), expected, dtype=torch.float32)


@pytest.mark.parametrize("loss_type,beta", CASES)
def test_topk_divergence_with_the_whole_vocabulary_is_the_dense_divergence(loss_type, beta):
    from trl_kd.losses import chunked_topk_token_divergence

    beta = 0.5 if beta is None else beta
    student, teacher = _heads()
    student.weight.requires_grad_(True)
    g = torch.Generator().manual_seed(4)
    h_s, h_t = torch.randn(9, 8, generator=g, requires_grad=True), torch.randn(9, 12, generator=g)
    ids, values, tail = topk_cache(teacher.logits(h_t, 37), 37, temperature=1.0)
    kwargs = dict(loss_type=loss_type, beta=beta, skew_alpha=0.1)
    sparse, _ = chunked_topk_token_divergence(h_s, student, 37, ids, values, tail, **kwargs)
    dense, _ = chunked_token_divergence(h_s, h_t, student, teacher, 37, **kwargs)
    assert_close_to_rounding(sparse, dense)
    sparse_grad = torch.autograd.grad(sparse.sum(), student.weight)[0]
    dense_grad = torch.autograd.grad(dense.sum(), student.weight)[0]
    assert_close_to_rounding(sparse_grad, dense_grad)


def _dense_kd_loss(h_s, h_t, student, teacher, mask, vocab_size, weights, denominator, **kwargs):
    """The loss straight from full logits: sum over counted tokens of weight x divergence, over the denominator."""
    s_logits = student.logits(h_s.reshape(-1, h_s.shape[-1]), vocab_size)
    t_logits = teacher.logits(h_t.reshape(-1, h_t.shape[-1]), vocab_size)
    per_token = divergence(s_logits, t_logits, **kwargs) * mask.reshape(-1)
    return (per_token * (1.0 if weights is None else weights.reshape(-1))).sum() / denominator


def _kd_loss_case(seed=5, bias=True, padded=True):
    g = torch.Generator().manual_seed(seed)
    student, teacher = _heads(vocab_s=45 if padded else 37, vocab_t=37, bias=bias, seed=seed)
    student.scale, student.softcap = 0.8, 6.0  # Granite-style scale and Gemma-style softcap on the trained head
    student.weight.requires_grad_(True)
    if bias:
        student.bias.requires_grad_(True)
    h_s = torch.randn(3, 5, 8, generator=g, requires_grad=True)
    h_t = torch.randn(3, 5, 12, generator=g)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0]])
    return student, teacher, h_s, h_t, mask


@pytest.mark.parametrize("loss_type,beta", CASES)
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("per_sequence", [False, True])
def test_gradient_in_forward_equals_recomputation_and_the_dense_loss(loss_type, beta, chunk_size, per_sequence):
    """The loss whose gradient is taken tile by tile in its forward pass gives the dense loss's value and gradients
    (hidden states, head weight and bias), as the checkpointed tiles do, under token weights and a global count."""
    beta = 0.5 if beta is None else beta
    student, teacher, h_s, h_t, mask = _kd_loss_case()
    vocab_size = 33  # the heads padded to 45 and 37 rows, compared over a shared 33
    weights = mask / mask.sum(1, keepdim=True) if per_sequence else None
    denominator = 3.0 if per_sequence else 17.0
    kwargs = dict(loss_type=loss_type, beta=beta, skew_alpha=0.2, temperature=1.5)
    leaves = (h_s, student.weight, student.bias)
    dense = _dense_kd_loss(h_s, h_t, student, teacher, mask, vocab_size, weights, denominator, **kwargs)
    dense_grads = torch.autograd.grad(dense, leaves)
    for in_forward in (True, False):
        loss, total, entropy, count = chunked_kd_loss(
            h_s, h_t, student, teacher, mask, vocab_size, **kwargs, num_items_in_batch=denominator,
            chunk_size=chunk_size, token_weights=weights, gradient_in_forward=in_forward,
        )  # fmt: skip
        assert count.item() == 11 and total.grad_fn is None and entropy.grad_fn is None
        assert_close_to_rounding(loss, dense.detach())
        for ours, ref in zip(torch.autograd.grad(loss, leaves), dense_grads):
            assert_close_to_rounding(ours, ref)


@pytest.mark.parametrize("trained", ["hidden", "head", "both"])
def test_gradient_in_forward_reaches_only_what_is_trained(trained):
    """A frozen head (PEFT) or frozen hidden states (a head-only probe) get no gradient, and the rest the dense
    one."""
    student, teacher, h_s, h_t, mask = _kd_loss_case(bias=False)
    h_s.requires_grad_(trained != "head")
    student.weight.requires_grad_(trained != "hidden")
    leaves = [t for t in (h_s, student.weight) if t.requires_grad]
    dense = _dense_kd_loss(h_s, h_t, student, teacher, mask, 37, None, 11.0, loss_type="jsd", beta=0.3)
    loss, *_ = chunked_kd_loss(h_s, h_t, student, teacher, mask, 37, "jsd", beta=0.3, chunk_size=4)
    for ours, ref in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(dense, leaves)):
        assert_close_to_rounding(ours, ref)


def test_gradient_in_forward_skips_the_second_projection(monkeypatch):
    """The saving itself: with the gradient taken in the forward pass the backward projects nothing through the heads;
    recomputation projects every tile through both heads again."""
    calls = []
    logits = LMHead.logits
    monkeypatch.setattr(
        LMHead, "logits", lambda self, hidden, vocab: calls.append(len(hidden)) or logits(self, hidden, vocab)
    )
    student, teacher, h_s, h_t, mask = _kd_loss_case()
    for in_forward, backward_projections in ((True, 0), (False, 2 * 3)):
        calls.clear()
        loss, *_ = chunked_kd_loss(h_s, h_t, student, teacher, mask, 33, chunk_size=4, gradient_in_forward=in_forward)
        assert calls == [
            4,
            4,
            4,
            4,
            3,
            3,
        ]  # 11 tokens in tiles of 4, each through the student's and the teacher's head
        calls.clear()
        loss.backward()
        assert len(calls) == backward_projections


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_head_gradient_is_not_built_in_a_zero_filled_head(chunk_size):
    """Filling a head-sized zero tensor costs as much as a tile's elementwise work when a batch is one tile: the
    head's gradient is the first tile's, the others added to it, and a head compared over all its rows is not sliced
    (a slice's backward copies into zeros the size of the parameter)."""
    from torch.profiler import ProfilerActivity, profile

    student, teacher, h_s, h_t, mask = _kd_loss_case(padded=False)
    head_shape = list(student.weight.shape)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        loss, *_ = chunked_kd_loss(h_s, h_t, student, teacher, mask, 37, chunk_size=chunk_size)
        loss.backward()
    fills = [e for e in prof.events() if e.name in ("aten::fill_", "aten::zero_") and head_shape in e.input_shapes]
    assert student.weight.grad is not None and fills == []


def test_gradient_in_forward_refuses_a_second_backward():
    student, teacher, h_s, h_t, mask = _kd_loss_case()
    loss, *_ = chunked_kd_loss(h_s, h_t, student, teacher, mask, 33)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="loss_gradient_in_forward=False"):
        loss.backward()
    again, *_ = chunked_kd_loss(h_s, h_t, student, teacher, mask, 33, gradient_in_forward=False)
    again.backward(retain_graph=True)
    again.backward()


@pytest.mark.parametrize("in_forward", [True, False])
def test_gradient_in_forward_with_cached_and_live_teacher_rows(in_forward):
    """Rows of a batch whose teacher is a top-k cache and rows with a live teacher, in one loss: each part's value and
    gradients as computed alone."""
    from trl_kd.losses import TopKTeacher, chunked_topk_token_divergence

    student, teacher, h_s, h_t, mask = _kd_loss_case(padded=False)
    ids, values, tail = topk_cache(teacher.logits(h_t.reshape(-1, 12), 37).reshape(3, 5, 37), 4, temperature=1.0)
    cached_rows = torch.tensor([True, False, True])
    topk = TopKTeacher(ids, values, tail, cached_rows)
    leaves = (h_s, student.weight)
    loss, total, _, count = chunked_kd_loss(
        h_s, h_t, student, teacher, mask, 37, "skew_rkl", teacher_topk=topk, gradient_in_forward=in_forward
    )
    live_mask, cached_mask = mask * ~cached_rows[:, None], mask * cached_rows[:, None]
    live = _dense_kd_loss(h_s, h_t, student, teacher, live_mask, 37, None, 11.0, loss_type="skew_rkl")
    rows = cached_mask.reshape(-1).bool()
    div, _ = chunked_topk_token_divergence(
        h_s.reshape(-1, 8)[rows], student, 37, ids.reshape(-1, 4)[rows], values.reshape(-1, 4)[rows],
        tail.reshape(-1)[rows], loss_type="skew_rkl",
    )  # fmt: skip
    expected = live + div.sum() / 11.0
    assert count.item() == 11
    assert_close_to_rounding(loss, expected.detach())
    for ours, ref in zip(torch.autograd.grad(loss, leaves), torch.autograd.grad(expected, leaves)):
        assert_close_to_rounding(ours, ref)


def test_gradient_in_forward_keeps_a_bf16_head_gradient_in_bf16():
    student, teacher, h_s, h_t, mask = _kd_loss_case(bias=False)
    student.weight = student.weight.detach().bfloat16().requires_grad_(True)
    loss, *_ = chunked_kd_loss(h_s.bfloat16(), h_t, student, teacher, mask, 33, chunk_size=4)
    reference, *_ = chunked_kd_loss(
        h_s.bfloat16(), h_t, student, teacher, mask, 33, chunk_size=4, gradient_in_forward=False
    )
    (ours,), (ref,) = torch.autograd.grad(loss, [student.weight]), torch.autograd.grad(reference, [student.weight])
    assert ours.dtype == torch.bfloat16
    assert_close_to_rounding(ours.float(), ref.float(), ulps=4, dtype=torch.bfloat16)
