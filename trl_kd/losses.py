"""Token-level divergences between a teacher and a student, dense and chunked.

One convention for the whole package (GKD, arXiv 2306.13649, eq. 1, and TRL): ``p`` is the teacher's next-token
distribution, ``q`` the student's.

* ``jsd`` — generalized Jensen-Shannon ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` with
  ``m = beta * p + (1 - beta) * q``; ``beta=0`` is exactly the forward KL ``KL(p || q)`` and ``beta=1`` exactly the
  reverse KL ``KL(q || p)``.
* ``skew_fkl`` — ``KL(p || a * p + (1 - a) * q)`` and ``skew_rkl`` — ``KL(q || (1 - a) * p + a * q)``, the skew KLs of
  DistiLLM (arXiv 2402.03898) with ``a = skew_alpha``.
* ``tvd`` — total variation ``0.5 * sum |p - q|``.

Everything is computed in fp32. [`chunked_kd_loss`][trl_kd.losses.chunked_kd_loss] projects hidden states through the
two LM heads a block of tokens at a time, so the vocabulary-sized logits of a whole batch never exist at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

from ._compat import trl_triton_available


LossType = Literal["jsd", "skew_fkl", "skew_rkl", "tvd"]
LOSS_TYPES: tuple[str, ...] = ("jsd", "skew_fkl", "skew_rkl", "tvd")

# Elements of one fp32 logits tile in the chunked path: 2**24 floats = 64 MiB, e.g. 512 tokens x 32k vocab.
_TILE_ELEMENTS = 2**24


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under a causal LM's head (looking through a PEFT wrapper): what returns the final hidden
    states the head projects."""
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model.base_model


def response_hidden_states(
    model: torch.nn.Module,
    attention_mask: torch.Tensor,
    num_completion_tokens: int,
    *,
    input_ids: torch.Tensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The final hidden states that predict the last `num_completion_tokens` tokens of left-padded `prompt +
    completion` sequences, shape `(B, C, H)`: the backbone only (no vocabulary projection), with position ids counted
    from each row's first real token, so that left padding does not shift positions (it matters for absolute-position
    models such as GPT-2). Give `input_ids`, or `inputs_embeds` (e.g. with a soft prompt in front)."""
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(model)(
        input_ids=input_ids,
        inputs_embeds=inputs_embeds,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).last_hidden_state
    return hidden[:, -num_completion_tokens - 1 : -1]


def stack_rows(per_row: list[torch.Tensor | None], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row `(len, H)` states (`None` for a row without) as one `(B, width, H)` tensor, zero past each row's
    length and for rows without, and which rows have them, `(B,)`."""
    example = next(states for states in per_row if states is not None)
    stacked = example.new_zeros(len(per_row), width, example.shape[-1])
    for i, states in enumerate(per_row):
        if states is not None:
            stacked[i, : len(states)] = states
    return stacked, torch.tensor([states is not None for states in per_row], device=example.device)


def _kl_from_logs(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b)`` per row from log-probabilities; ``0 * log 0`` counts as 0, and a NaN stays NaN."""
    a = log_a.exp()
    return torch.where(a == 0, 0.0, a * (log_a - log_b)).sum(-1)


def _log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, weight_p: float) -> torch.Tensor:
    """``log(weight_p * p + (1 - weight_p) * q)`` computed stably in log space."""
    return torch.logaddexp(log_p + math.log(weight_p), log_q + math.log(1.0 - weight_p))


def divergence_from_log_probs(
    student_log_probs: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    loss_type: LossType = "jsd",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Per-position divergence between two distributions given as log-probabilities over the last dimension.

    Args:
        student_log_probs: ``log q``, shape ``(..., V)``.
        teacher_log_probs: ``log p``, shape ``(..., V)``.
        loss_type: one of ``jsd``, ``skew_fkl``, ``skew_rkl``, ``tvd`` (see the module docstring).
        beta: ``jsd`` interpolation, 0 = forward KL, 1 = reverse KL.
        skew_alpha: mixing weight of the skew KLs, in ``(0, 1)``.

    Returns:
        Tensor of shape ``(...)``: the divergence at each position, in nats.
    """
    log_q, log_p = student_log_probs, teacher_log_probs
    if loss_type == "jsd":
        if beta == 0.0:
            return _kl_from_logs(log_p, log_q)
        if beta == 1.0:
            return _kl_from_logs(log_q, log_p)
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl_from_logs(log_p, log_m) + (1.0 - beta) * _kl_from_logs(log_q, log_m)
    if loss_type == "skew_fkl":
        return _kl_from_logs(log_p, _log_mixture(log_p, log_q, skew_alpha))
    if loss_type == "skew_rkl":
        return _kl_from_logs(log_q, _log_mixture(log_p, log_q, 1.0 - skew_alpha))
    if loss_type == "tvd":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1)
    raise ValueError(f"Unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}.")


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    loss_type: LossType = "jsd",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-position divergence from raw logits of shape ``(..., V)``, in fp32, after dividing both by
    ``temperature``. See [`divergence_from_log_probs`][trl_kd.losses.divergence_from_log_probs]."""
    log_q = _log_softmax(student_logits.float(), temperature)
    log_p = _log_softmax(teacher_logits.float(), temperature)
    return divergence_from_log_probs(log_q, log_p, loss_type, beta, skew_alpha)


def _gather_partitioned(*params: torch.Tensor | None):
    """Gather ZeRO-3-partitioned parameters for a direct read (like TRL's `maybe_gather_lm_head_ctx`), decided per
    parameter rather than by the global ZeRO stage: a teacher can be sharded beside a ZeRO-2 student."""
    import deepspeed
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    # deduplicated by identity: ZeRO-3 mishandles a tied weight listed twice
    to_gather = {
        id(p): p for p in params if p is not None and hasattr(p, "ds_id") and p.ds_status != ZeroParamStatus.AVAILABLE
    }
    return deepspeed.zero.GatheredParameters(list(to_gather.values())) if to_gather else nullcontext()


def _whole(param: torch.Tensor | None) -> torch.Tensor | None:
    """An FSDP2 parameter read outside its unit's forward is a sharded `DTensor`: gathered here once (a collective,
    differentiable), as TRL's chunked loss does, so every chunk uses the same plain tensor. Anything else as is."""
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param


@dataclass
class LMHead:
    """An output projection as the loss sees it: ``logits = softcap(scale * (h @ weight.T + bias))``.

    ``weight`` is the model's own parameter (it may be partitioned under ZeRO-3); only its first ``vocab_size`` rows
    are used by the loss, which is how a teacher and a student whose embedding matrices are padded to different sizes
    are compared over the tokenizer they share.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_model(cls, model: torch.nn.Module) -> LMHead:
        """Read the output embedding and the logit post-processing (Cohere/Granite scale, Gemma softcap)."""
        head = model.get_output_embeddings()
        config = model.config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        if scale is None and getattr(config, "logits_scaling", None) is not None:  # Granite divides
            scale = 1.0 / config.logits_scaling
        return cls(
            _whole(head.weight),
            _whole(head.bias),
            1.0 if scale is None else float(scale),
            getattr(config, "final_logit_softcapping", None),
        )

    @property
    def vocab_size(self) -> int:
        return self.weight.ds_shape[0] if hasattr(self.weight, "ds_shape") else self.weight.shape[0]

    @property
    def is_partitioned(self) -> bool:
        return hasattr(self.weight, "ds_id")

    def logits(self, hidden: torch.Tensor, vocab_size: int) -> torch.Tensor:
        """fp32 logits over the first ``vocab_size`` entries. Gathers a ZeRO-3 weight for the duration."""
        with _gather_partitioned(self.weight, self.bias) if self.is_partitioned else nullcontext():
            logits = hidden.float() @ _rows(self.weight, vocab_size).float().t()
            if self.bias is not None:
                logits = logits + _rows(self.bias, vocab_size).float()
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits


def _rows(param: torch.Tensor, count: int) -> torch.Tensor:
    """The first `count` rows of `param`; `param` itself when that is all of it, since the backward of a slice fills
    a zero tensor of the whole parameter (a vocabulary-by-hidden head) to copy its gradient into."""
    return param if param.shape[0] == count else param[:count]


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """`log_softmax(logits / temperature)`; at temperature 1 without the division's pass over the vocabulary."""
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def _entropy(log_q: torch.Tensor) -> torch.Tensor:
    return -(log_q.exp() * log_q).sum(-1)


def _chunk_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    vocab_size: int,
    loss_type: LossType,
    beta: float,
    skew_alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    log_q = _log_softmax(student_head.logits(student_hidden, vocab_size), temperature)
    with torch.no_grad():
        log_p = _log_softmax(teacher_head.logits(teacher_hidden, vocab_size), temperature)
    return divergence_from_log_probs(log_q, log_p, loss_type, beta, skew_alpha), _entropy(log_q.detach())


def _use_trl_kernel(
    student_hidden: torch.Tensor, student_head: LMHead, teacher_head: LMHead, vocab_size: int, loss_type: LossType
) -> bool:
    """Whether the live-teacher divergence runs on TRL's fused kernel rather than on trl-kd's token chunks."""
    heads_fit = student_head.vocab_size == teacher_head.vocab_size == vocab_size
    partitioned = student_head.is_partitioned or teacher_head.is_partitioned
    # TRL's kernel gathers partitioned heads only when ZeRO-3 is on globally (not for a teacher sharded on its own
    # beside a ZeRO-2 student), and only whole heads
    return (
        loss_type == "jsd"
        and trl_triton_available(student_hidden.device)
        and (not partitioned or (heads_fit and is_deepspeed_zero3_enabled()))
    )


def _trl_kernel_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    vocab_size: int,
    beta: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    def cut(head: LMHead) -> tuple[torch.Tensor, torch.Tensor | None]:
        if head.vocab_size == vocab_size:
            return head.weight, head.bias
        return head.weight[:vocab_size], None if head.bias is None else head.bias[:vocab_size]

    (s_w, s_b), (t_w, t_b) = cut(student_head), cut(teacher_head)
    return ChunkedDivergenceFunction.apply(
        student_hidden,
        s_w,
        s_b,
        teacher_hidden.detach(),
        t_w,
        t_b,
        beta,
        temperature,
        student_head.scale,
        student_head.softcap,
        teacher_head.scale,
        teacher_head.softcap,
    )


def chunked_token_divergence(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    vocab_size: int,
    loss_type: LossType = "jsd",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence and student entropy from hidden states of shape ``(N, H)``.

    On devices with Triton (CUDA, XPU) the generalized JSD runs on TRL's chunked kernel
    (`trl.kernels.chunked_divergence`: vocabulary tiles with an online log-sum-exp). Everything else projects
    ``chunk_size`` tokens at a time under activation checkpointing, so only one ``(chunk_size, V)`` tile is alive in
    the forward and in the backward: the other divergences, the JSD on CPU (where TRL's torch fallback holds several
    4096 x 32768 fp32 tiles), and the JSD where a ZeRO-3 head must be cut to the shared vocabulary. Gradients flow to
    the student only.

    Returns:
        ``(divergence, entropy)``, both of shape ``(N,)`` in fp32.
    """
    if _use_trl_kernel(student_hidden, student_head, teacher_head, vocab_size, loss_type):
        return _trl_kernel_divergence(
            student_hidden, teacher_hidden, student_head, teacher_head, vocab_size, beta, temperature
        )
    chunks = _live_teacher_chunks(student_hidden, teacher_hidden, student_head, teacher_head, vocab_size, chunk_size)
    return chunks.run(loss_type, beta, skew_alpha, temperature)


def _tile_tokens(chunk_size: int | None, vocab_size: int) -> int:
    """Tokens per tile: `chunk_size`, else as many as keep one tile's logits near `_TILE_ELEMENTS` values."""
    return chunk_size or max(1, _TILE_ELEMENTS // vocab_size)


def _live_teacher_chunks(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead,
    vocab_size: int,
    chunk_size: int | None,
) -> _Chunks:
    return _Chunks(
        _chunk_divergence,
        _tile_tokens(chunk_size, vocab_size),
        (student_hidden, teacher_hidden.detach()),
        (student_head, teacher_head, vocab_size),
    )


@dataclass
class _Chunks:
    """A per-token divergence computed `size` tokens at a time: `fn(*rows of per_token, *shared, loss_type, beta,
    skew_alpha, temperature) -> (divergence, entropy)`, with `per_token[0]` the hidden states gradients flow to and
    `shared[0]` their LM head."""

    fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    size: int
    per_token: tuple[torch.Tensor, ...]
    shared: tuple

    def spans(self) -> Iterator[slice]:
        return (slice(start, start + self.size) for start in range(0, len(self.per_token[0]), self.size))

    def rows(self, span: slice) -> tuple[torch.Tensor, ...]:
        return tuple(t[span] for t in self.per_token)

    def run(self, *loss: object) -> tuple[torch.Tensor, torch.Tensor]:
        """Divergence and entropy of every token; the chunks run under activation checkpointing when the hidden states
        need a gradient, so only one chunk's logits are alive in the forward and in the backward."""
        hidden = self.per_token[0]
        checkpointed = torch.is_grad_enabled() and hidden.requires_grad
        divergences, entropies = [], []
        for span in self.spans():
            args = (*self.rows(span), *self.shared, *loss)
            div, ent = checkpoint(self.fn, *args, use_reentrant=False) if checkpointed else self.fn(*args)
            divergences.append(div)
            entropies.append(ent)
        if not divergences:
            empty = hidden.new_zeros(0, dtype=torch.float32)
            return empty, empty
        return torch.cat(divergences), torch.cat(entropies)

    def weighted_sum(
        self, coefficients: torch.Tensor, *loss: object
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(sum(coefficients * divergence), divergence, entropy)`, the sum's gradient taken during this forward pass
        ([`_GradientInForward`]); the divergence and the entropy carry none."""
        head: LMHead = self.shared[0]
        params = tuple(p for p in (head.weight, head.bias) if p is not None and p.requires_grad)
        return _GradientInForward.apply(self, loss, coefficients, self.per_token[0], *params)


class _GradientInForward(torch.autograd.Function):
    """`sum_i c_i * divergence_i` with its gradient taken chunk by chunk in the forward pass: each chunk's logits are
    built, differentiated and freed before the next, and the backward only scales the stored gradients. Activation
    checkpointing (`_Chunks.run`) reaches the same gradients by projecting every chunk through both heads again in
    the backward; this saves those projections, and holds the head's gradient (the head's size and dtype) from the
    loss's forward to its backward."""

    @staticmethod
    def forward(ctx, chunks: _Chunks, loss: tuple, coefficients: torch.Tensor, hidden: torch.Tensor, *params):
        wants_hidden, wants_params = ctx.needs_input_grad[3], ctx.needs_input_grad[4:]
        grad_hidden = torch.zeros_like(hidden) if wants_hidden else None
        # a parameter's gradient is the first chunk's, the others added to it: no zero-filled buffer the size of
        # the head, which costs as much as a chunk's elementwise work when the batch is one chunk
        grad_params: list[torch.Tensor | None] = [None] * len(params)
        wanted = [i for i, want in enumerate(wants_params) if want]
        targets = [params[i] for i in wanted]
        total = hidden.new_zeros((), dtype=torch.float32)
        divergences, entropies = [], []
        with torch.enable_grad():
            for span in chunks.spans():
                rows = chunks.rows(span)
                first = rows[0].detach().requires_grad_(wants_hidden)
                div, ent = chunks.fn(first, *rows[1:], *chunks.shared, *loss)
                part = (div * coefficients[span]).sum()
                wrt = [first] * wants_hidden + targets
                grads = torch.autograd.grad(part, wrt, allow_unused=True) if part.requires_grad else [None] * len(wrt)
                if wants_hidden:
                    if grads[0] is not None:
                        grad_hidden[span] = grads[0]
                    grads = grads[1:]
                for i, grad in zip(wanted, grads):
                    if grad is not None:
                        grad_params[i] = grad if grad_params[i] is None else grad_params[i].add_(grad)
                total += part.detach()
                divergences.append(div.detach())
                entropies.append(ent.detach())
        ctx.gradients = (grad_hidden, grad_params)
        divergence = torch.cat(divergences) if divergences else hidden.new_zeros(0, dtype=torch.float32)
        entropy = torch.cat(entropies) if entropies else torch.zeros_like(divergence)
        ctx.mark_non_differentiable(divergence, entropy)
        return total, divergence, entropy

    @staticmethod
    def backward(ctx, grad_total: torch.Tensor, *_):
        if ctx.gradients is None:
            raise RuntimeError(
                "This KD loss took its gradient in the forward pass and can be back-propagated once; set "
                "loss_gradient_in_forward=False (KDConfig) to back-propagate it again."
            )
        grad_hidden, grad_params = ctx.gradients
        ctx.gradients = None  # the buffers become the gradients: scaled in place and handed over, not kept

        def scaled(grad: torch.Tensor | None) -> torch.Tensor | None:
            return None if grad is None else grad.mul_(grad_total.to(grad.dtype))

        return None, None, None, scaled(grad_hidden), *(scaled(g) for g in grad_params)


def _chunk_topk_divergence(
    student_hidden: torch.Tensor,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_tail_log_probs: torch.Tensor,
    student_head: LMHead,
    vocab_size: int,
    loss_type: LossType,
    beta: float,
    skew_alpha: float,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    log_q = _log_softmax(student_head.logits(student_hidden, vocab_size), temperature)
    student = log_q.gather(-1, teacher_ids)
    teacher = teacher_log_probs.float()
    if teacher_ids.shape[-1] < vocab_size:  # the tail bin: all the tokens outside the teacher's top-k, as one
        student_tail = log_q.scatter(-1, teacher_ids, float("-inf")).logsumexp(-1, keepdim=True)
        student = torch.cat([student, student_tail], dim=-1)
        teacher = torch.cat([teacher, teacher_tail_log_probs.float()[:, None]], dim=-1)
    return divergence_from_log_probs(student, teacher, loss_type, beta, skew_alpha), _entropy(log_q.detach())


def chunked_topk_token_divergence(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    vocab_size: int,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_tail_log_probs: torch.Tensor,
    loss_type: LossType = "jsd",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    chunk_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token divergence against a teacher known only by its top-k (an offline cache), and the student entropy.

    The teacher's distribution at a position is its `k` top tokens plus one *tail bin* holding the rest of its mass;
    the student's is folded the same way (its probabilities of those `k` tokens, and the sum of all the others), and
    the divergence (`loss_type`, as [`divergence_from_log_probs`][trl_kd.losses.divergence_from_log_probs]) is taken
    between these two `k + 1`-bin distributions, in fp32. With `k` equal to the vocabulary there is no tail and it is
    the dense divergence. The student's logits are projected `chunk_size` tokens at a time under activation
    checkpointing, as in [`chunked_token_divergence`][trl_kd.losses.chunked_token_divergence]; the teacher side is
    never wider than `k + 1`.

    Args:
        student_hidden: `(N, H)` student hidden states.
        teacher_ids: `(N, k)` the teacher's top-k token ids at each position (below `vocab_size`).
        teacher_log_probs: `(N, k)` their log-probabilities under the teacher at the loss temperature.
        teacher_tail_log_probs: `(N,)` the log of the teacher's remaining mass, `log(1 - sum(exp(teacher_log_probs)))`.

    Returns:
        `(divergence, entropy)`, both of shape `(N,)` in fp32.
    """
    chunks = _topk_teacher_chunks(
        student_hidden, student_head, vocab_size, teacher_ids, teacher_log_probs, teacher_tail_log_probs, chunk_size
    )
    return chunks.run(loss_type, beta, skew_alpha, temperature)


def _topk_teacher_chunks(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    vocab_size: int,
    teacher_ids: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    teacher_tail_log_probs: torch.Tensor,
    chunk_size: int | None,
) -> _Chunks:
    return _Chunks(
        _chunk_topk_divergence,
        _tile_tokens(chunk_size, vocab_size),
        (student_hidden, teacher_ids.long(), teacher_log_probs, teacher_tail_log_probs),
        (student_head, vocab_size),
    )


@dataclass
class TopKTeacher:
    """The teacher of some rows of a batch known only by its top-k (an offline cache): `ids` and `log_probs` of
    shape `(B, T, k)`, `tail_log_probs` `(B, T)` (the log of the rest of its mass) and `rows` `(B,)`, true for the
    rows they cover."""

    ids: torch.Tensor
    log_probs: torch.Tensor
    tail_log_probs: torch.Tensor
    rows: torch.Tensor


def loss_weights(
    completion_mask: torch.Tensor,
    normalization: str,
    num_items_in_batch: torch.Tensor | None,
    num_sequences_in_batch: torch.Tensor | None,
    num_processes: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(token_weights, denominator)` for [`chunked_kd_loss`] under `KDConfig.loss_normalization`.

    `"tokens"` keeps TRL's global token count `num_items_in_batch`. `"sequences"` weighs each token by `1 / its
    response length` and divides by the global number of sequences per process (as TRL divides the token count,
    because DDP averages gradients); without global counts (evaluation), by the local number of sequences.
    """
    if normalization == "tokens":
        return None, num_items_in_batch
    mask = completion_mask.float()
    lengths = mask.sum(1, keepdim=True)
    weights = mask / lengths.clamp(min=1)
    if num_items_in_batch is None or num_sequences_in_batch is None:
        return weights, (lengths > 0).sum().clamp(min=1)
    return weights, num_sequences_in_batch.clamp(min=1) / num_processes


def chunked_kd_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_head: LMHead | None,
    loss_mask: torch.Tensor,
    vocab_size: int,
    loss_type: LossType = "jsd",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    num_items_in_batch: torch.Tensor | float | None = None,
    chunk_size: int | None = None,
    token_weights: torch.Tensor | None = None,
    teacher_topk: TopKTeacher | None = None,
    gradient_in_forward: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token-averaged distillation loss over the positions where ``loss_mask`` is 1.

    Args:
        student_hidden: ``(B, T, H_s)`` student hidden states aligned with the completion tokens.
        teacher_hidden: ``(B, T, H_t)`` teacher hidden states, same positions.
        loss_mask: ``(B, T)``, 1 at response tokens that count.
        num_items_in_batch: the normaliser. Pass the *global* number of response tokens (divided by the number of
            processes, since DDP averages gradients) so that gradient accumulation and world size don't change the
            loss; ``None`` divides by the local count.
        token_weights: optional ``(B, T)`` weight of each token in the loss's sum (e.g. ``1 / response length`` for a
            per-sequence mean, with ``num_items_in_batch`` then counting sequences). The returned sums stay
            unweighted.
        teacher_topk: rows whose teacher is an offline top-k cache
            ([`chunked_topk_token_divergence`][trl_kd.losses.chunked_topk_token_divergence]); their
            ``teacher_hidden`` is not read, and ``teacher_head`` may be ``None`` when every counted token is cached.
        gradient_in_forward: take the loss's gradient chunk by chunk while computing it, so that the backward pass
            does not project the tokens through both heads again (as activation checkpointing does); the student
            head's gradient is then held from this call to the backward. Not for a ZeRO-3-partitioned student head,
            nor where TRL's kernel runs; the loss can then be back-propagated only once.

    Returns:
        ``(loss, divergence_sum, entropy_sum, num_tokens)``: the normalised loss and the raw local sums (detached),
        from which metrics are reduced across processes.
    """
    valid = loss_mask.reshape(-1).bool()
    count = valid.sum()
    denominator = count.clamp(min=1) if num_items_in_batch is None else num_items_in_batch
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(student_hidden.device)
    loss_args = (loss_type, beta, skew_alpha, temperature)
    h_s = student_hidden.reshape(-1, student_hidden.shape[-1])
    weights = h_s.new_ones(h_s.shape[0], dtype=torch.float32) if token_weights is None else token_weights.reshape(-1)
    in_forward = (
        gradient_in_forward
        and torch.is_grad_enabled()
        and not student_head.is_partitioned
        and (h_s.requires_grad or student_head.weight.requires_grad)
    )

    def part(rows: torch.Tensor, live: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(loss, divergence, entropy)` of the tokens in `rows`, whose teacher is live or a top-k cache."""
        if live and _use_trl_kernel(h_s, student_head, teacher_head, vocab_size, loss_type):
            div, ent = _trl_kernel_divergence(
                h_s[rows], teacher_states(rows), student_head, teacher_head, vocab_size, beta, temperature
            )
        else:
            chunks = live_chunks(rows) if live else cached_chunks(rows)
            if in_forward:
                return chunks.weighted_sum(weights[rows].float() / denominator, *loss_args)
            div, ent = chunks.run(*loss_args)
        weighted = div.sum() if token_weights is None else (div * weights[rows].float()).sum()
        return weighted / denominator, div, ent

    def teacher_states(rows: torch.Tensor) -> torch.Tensor:
        return teacher_hidden.reshape(-1, teacher_hidden.shape[-1])[rows]

    def live_chunks(rows: torch.Tensor) -> _Chunks:
        return _live_teacher_chunks(
            h_s[rows], teacher_states(rows), student_head, teacher_head, vocab_size, chunk_size
        )

    def cached_chunks(rows: torch.Tensor) -> _Chunks:
        k = teacher_topk.ids.shape[-1]
        return _topk_teacher_chunks(
            h_s[rows],
            student_head,
            vocab_size,
            teacher_topk.ids.reshape(-1, k)[rows],
            teacher_topk.log_probs.reshape(-1, k)[rows],
            teacher_topk.tail_log_probs.reshape(-1)[rows],
            chunk_size,
        )

    if teacher_topk is None:
        loss, per_token, entropy = part(valid, live=True)
    else:  # live-teacher tokens and cached-teacher tokens, each through its own divergence, back in token order
        cached = teacher_topk.rows.bool()[:, None].expand(loss_mask.shape).reshape(-1) & valid
        live_rows = valid & ~cached
        loss = h_s.new_zeros((), dtype=torch.float32)
        per_token = h_s.new_zeros(valid.shape[0], dtype=torch.float32)
        entropy = torch.zeros_like(per_token)
        for rows, live in ((live_rows, True), (cached, False)):
            if not bool(rows.any()):
                continue
            if live and teacher_head is None:
                raise ValueError("Some counted tokens are not in the teacher cache, and there is no teacher head.")
            weighted, div, ent = part(rows, live)
            index = rows.nonzero().squeeze(1)
            loss = loss + weighted
            per_token, entropy = per_token.index_put((index,), div.detach()), entropy.index_put((index,), ent)
        per_token, entropy = per_token[valid], entropy[valid]
    return loss, per_token.sum().detach(), entropy.sum(), count
