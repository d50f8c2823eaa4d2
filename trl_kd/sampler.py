"""Teacher-in-the-loop sampling: the student proposes each token, a rule decides whether the teacher writes it.

Shared by Speculative KD (arXiv 2410.11325) and SWITCH (arXiv 2410.19503). The rule at response position ``t`` depends
only on the shared prefix, so it can be applied like speculative decoding: the student drafts ``num_draft_tokens``
tokens with its KV cache, the teacher scores them in one forward, the first rejected token is replaced by a teacher
sample and the rest of the draft is dropped. The sequences have exactly the distribution of the token-by-token
algorithm ([`reference_sample`][trl_kd.sampler.reference_sample], kept for tests); the block size changes speed, never
results.

Batched: rows accept different numbers of tokens per round. Both caches keep one slot layout; slots of dropped draft
tokens are masked out of attention (and cropped when no row needs them), positions are counted per row, and rows
that finish (EOS or length) leave the batch.

Two things make it cheaper without changing the sequences: the draft length can adapt to the acceptance (as
`transformers`' assisted generation does), and the teacher's final hidden states at every response position can be
kept, so a trainer computes its loss from them instead of running the teacher again.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache, GenerationConfig

from ._compat import cache_argument
from .guards import check_sampling_probs
from .losses import LMHead, backbone, divergence


@dataclass(frozen=True)
class SamplingParams:
    """How a model draws a token: temperature, then top-k, then top-p (nucleus); ``greedy`` takes the argmax."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    greedy: bool = False

    def log_probs(self, logits: torch.Tensor) -> torch.Tensor:
        """Log-probabilities of the warped distribution, ``-inf`` outside the kept set (fp32)."""
        logits = logits.float()
        if self.greedy:
            out = torch.full_like(logits, float("-inf"))
            return out.scatter(-1, logits.argmax(-1, keepdim=True), 0.0)
        logits = logits / self.temperature
        if 0 < self.top_k < logits.shape[-1]:
            kth = logits.topk(self.top_k, dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p < 1.0:
            logits = logits.masked_fill(~nucleus_mask(logits, self.top_p), float("-inf"))
        return logits.log_softmax(-1)

    def generation_config(self, **kwargs) -> GenerationConfig:
        """These settings as a `transformers.GenerationConfig` for `generate`, over `kwargs` (e.g. TRL's
        `generation_kwargs`, `max_new_tokens`, `suppress_tokens`)."""
        sampling = {"do_sample": not self.greedy, "temperature": self.temperature, "top_p": self.top_p}
        return GenerationConfig(**{**kwargs, **sampling, "top_k": self.top_k}, disable_compile=True)

    def sample(
        self, logits: torch.Tensor, generator: torch.Generator | None = None, source: str = "student"
    ) -> torch.Tensor:
        """One token per row of ``logits`` (shape ``(..., V)``) of the ``source`` model ("student" or "teacher", named
        in the error if they are not finite)."""
        if self.greedy:
            return logits.argmax(-1)
        probs = self.log_probs(logits).exp()
        check_sampling_probs(probs, source)
        flat = probs.reshape(-1, probs.shape[-1])
        return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


NUCLEUS_PREFILTER = 64


def nucleus_mask(logits: torch.Tensor, top_p: float, prefilter: int = NUCLEUS_PREFILTER) -> torch.Tensor:
    """True on the nucleus of each row of ``logits``: its most probable tokens, in order, while the mass before a token
    is below ``top_p`` (at least one), and every token as probable as the last of them, so ties never depend on a
    sort's order.

    On CPU the ranking starts from the ``prefilter`` most probable tokens (`torch.topk`, a partial sort) and sorts the
    whole vocabulary only when some row's nucleus is larger; both give the same mask, bit for bit. Elsewhere the full
    sort always runs: it is cheap there, and the test would make the host wait for the device at every token.
    """
    probs = logits.softmax(-1)
    if 0 < prefilter < probs.shape[-1] and probs.device.type == "cpu":
        ranked = probs.topk(prefilter, dim=-1).values
        cumulative = ranked.cumsum(-1)
        if bool((cumulative[..., -1] >= top_p).all()):  # every row's nucleus ends inside the prefilter
            return probs >= _nucleus_cutoff(ranked, cumulative, top_p)
    ranked = probs.sort(dim=-1, descending=True).values
    return probs >= _nucleus_cutoff(ranked, ranked.cumsum(-1), top_p)


def _nucleus_cutoff(ranked: torch.Tensor, cumulative: torch.Tensor, top_p: float) -> torch.Tensor:
    """The probability of the last nucleus token, from probabilities ranked in descending order and their running sum
    (the mass before a token is the sum up to the token before it: non-decreasing, so the kept tokens are a prefix)."""
    before = torch.cat([torch.zeros_like(cumulative[..., :1]), cumulative[..., :-1]], dim=-1)
    kept = (before < top_p).sum(-1, keepdim=True).clamp(min=1)
    return ranked.gather(-1, kept - 1)


class StopStrings:
    """Where a completion ends under stop strings: after the token that completes the first occurrence of any of
    them (in the decoded text, so a stop string may span several tokens), as `transformers`' `stop_strings`."""

    def __init__(self, tokenizer, stop_strings: Sequence[str]):
        self.tokenizer, self.stop_strings = tokenizer, tuple(stop_strings)

    def _contains(self, ids: Sequence[int]) -> bool:
        text = self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)
        return any(stop in text for stop in self.stop_strings)

    def end(self, ids: Sequence[int], start: int = 0) -> int | None:
        """Length of the shortest prefix of ``ids`` that contains a stop string, or ``None`` when ``ids`` contains
        none. ``ids[:start]`` is known to contain none (only longer prefixes are searched)."""
        if not self._contains(ids):
            return None
        low, high = start, len(ids)  # ids[:low] has no stop string, ids[:high] has one
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (low, middle) if self._contains(ids[:middle]) else (middle, high)
        return high

    def cut(self, ids: list[int]) -> list[int]:
        """``ids`` up to and including the token that completes the first stop string."""
        end = self.end(ids)
        return ids if end is None else ids[:end]


@dataclass
class Proposal:
    """What a rule sees for one block of drafted tokens.

    Attributes:
        student_logits: raw student logits ``(B, K, V)`` that each drafted token was drawn from.
        teacher_logits: raw teacher logits ``(B, K, V)`` at the same positions (same prefixes).
        draft: drafted tokens ``(B, K)``.
        positions: response index (0-based) of each drafted token ``(B, K)``.
        rows: index of each row in the original batch ``(B,)`` (rows leave the batch when they finish).
    """

    student_logits: torch.Tensor
    teacher_logits: torch.Tensor
    draft: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor


class Rule:
    """Decides, for each drafted position, whether the teacher writes the token instead of the student.

    A rule must be *prefix-consistent*: the decision at block position ``j`` may use positions ``<= j`` only, because
    positions after the first rejection are dropped. Rules with per-row state (e.g. a running mean over the response)
    keep it in `start`/`update`.
    """

    def start(self, batch_size: int, max_new_tokens: int) -> None:
        """Called once before sampling a batch."""

    def reject(self, proposal: Proposal) -> torch.Tensor:
        """Boolean ``(B, K)``: ``True`` where the teacher must write the token."""
        raise NotImplementedError

    def update(self, proposal: Proposal, num_kept: torch.Tensor) -> None:
        """Called after each block with how many positions of it each row kept (accepted + the replacement)."""


class OnPolicyRule(Rule):
    """Never reject: plain student sampling (on-policy KD)."""

    def reject(self, proposal: Proposal) -> torch.Tensor:
        return torch.zeros_like(proposal.draft, dtype=torch.bool)


class TeacherOnlyRule(Rule):
    """Always reject: the teacher writes every token (sequence-level KD)."""

    def reject(self, proposal: Proposal) -> torch.Tensor:
        return torch.ones_like(proposal.draft, dtype=torch.bool)


class TopKRule(Rule):
    """Speculative KD: reject a drafted token that is not among the teacher's top-``k`` tokens at its position.

    Args:
        k: size of the teacher's top set; ``0`` rejects everything, ``k >= V`` accepts everything (``raw``).
        on: ``"raw"`` ranks the teacher's unwarped distribution (the paper's Algorithm 1). ``"warped"`` is the
            official code's test: ``torch.topk`` of the teacher's probabilities after ``teacher_params`` (temperature,
            top-p), so when the nucleus holds fewer than ``k`` tokens the remaining slots are zero-probability tokens
            in ``torch.topk``'s tie order, and a drafted token in one of them is accepted.
        teacher_params: the teacher's sampling settings, for ``on="warped"``.
        test: ``"drafted"`` tests the drafted token (the paper). ``"fresh_sample"`` tests a fresh draw from the
            student's drafting distribution at the same position and keeps or replaces the *drafted* token on its
            result (the official code), so a kept token may lie outside the teacher's top-``k``: the output is
            ``A * q(v) + (1 - A) * p(v)`` with ``A`` the student's mass on the top-``k``.
        student_params: the student's drafting settings, for ``test="fresh_sample"``.
    """

    def __init__(
        self,
        k: int,
        on: str = "raw",
        teacher_params: SamplingParams | None = None,
        test: str = "drafted",
        student_params: SamplingParams | None = None,
    ):
        if on not in ("raw", "warped"):
            raise ValueError(f"on must be 'raw' or 'warped', got {on!r}.")
        if test not in ("drafted", "fresh_sample"):
            raise ValueError(f"test must be 'drafted' or 'fresh_sample', got {test!r}.")
        self.k, self.on, self.teacher_params = k, on, teacher_params or SamplingParams()
        self.test, self.student_params = test, student_params or SamplingParams()

    def reject(self, proposal: Proposal) -> torch.Tensor:
        if self.k <= 0:
            return torch.ones_like(proposal.draft, dtype=torch.bool)
        tested = proposal.draft
        if self.test == "fresh_sample":
            tested = self.student_params.sample(proposal.student_logits)
        if self.on == "warped":
            probs = self.teacher_params.log_probs(proposal.teacher_logits).exp()
            top = probs.topk(min(self.k, probs.shape[-1]), dim=-1).indices
            return ~(top == tested.unsqueeze(-1)).any(-1)
        scores = proposal.teacher_logits.float()
        token_score = scores.gather(-1, tested.unsqueeze(-1)).squeeze(-1)
        rank = (scores > token_score.unsqueeze(-1)).sum(-1)  # tokens strictly better than the tested one
        return rank >= self.k


class DivergenceThresholdRule(Rule):
    """SWITCH: the teacher writes the token when ``D(p_t, q_t) > threshold`` (decided before the token is drawn).

    Args:
        threshold: maps response positions ``(B, K)`` to thresholds (SWITCH's decaying schedule).
        divergence: one of the package's divergences (``jsd`` with ``beta``, ``tvd``, ...) on the raw distributions.
        beta: interpolation of ``jsd``.
        handoff: once the teacher writes a token it writes the rest of the response.
        adaptive_factor: AdaSwitch (arXiv 2510.07842): from the second position on, the threshold is
            ``adaptive_factor`` times the mean divergence over the response's earlier positions; ``threshold`` is
            used at the first position only.
    """

    def __init__(
        self,
        threshold: Callable[[torch.Tensor], torch.Tensor],
        divergence: str = "jsd",
        beta: float = 0.5,
        handoff: bool = False,
        adaptive_factor: float | None = None,
    ):
        self.threshold, self.divergence, self.beta = threshold, divergence, beta
        self.handoff, self.adaptive_factor = handoff, adaptive_factor

    def start(self, batch_size: int, max_new_tokens: int) -> None:
        self.handed_off = torch.zeros(batch_size, dtype=torch.bool)
        self.history_sum = torch.zeros(batch_size, dtype=torch.float64)
        self.history_count = torch.zeros(batch_size, dtype=torch.long)
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def divergences(self, proposal: Proposal) -> torch.Tensor:
        return divergence(proposal.student_logits, proposal.teacher_logits, self.divergence, beta=self.beta)

    def thresholds(self, proposal: Proposal, divergences: torch.Tensor) -> torch.Tensor:
        scheduled = self.threshold(proposal.positions).to(divergences)
        if self.adaptive_factor is None:
            return scheduled
        rows = proposal.rows.cpu()
        # mean over the earlier positions of the response: the history plus this block's positions before each one
        earlier_sum = self.history_sum[rows].to(divergences)[:, None] + divergences.cumsum(1) - divergences
        earlier_count = self.history_count[rows].to(divergences.device)[:, None] + torch.arange(
            divergences.shape[1], device=divergences.device
        )
        adaptive = self.adaptive_factor * earlier_sum / earlier_count.clamp(min=1)
        return torch.where(earlier_count > 0, adaptive, scheduled)

    def reject(self, proposal: Proposal) -> torch.Tensor:
        divergences = self.divergences(proposal)
        reject = divergences > self.thresholds(proposal, divergences)
        if self.handoff:
            handed_off = self.handed_off[proposal.rows.cpu()].to(reject.device)
            reject = (reject.long().cummax(1).values > 0) | handed_off[:, None]
        self._last = (divergences, reject)
        return reject

    def update(self, proposal: Proposal, num_kept: torch.Tensor) -> None:
        divergences, reject = self._last
        kept = torch.arange(divergences.shape[1], device=divergences.device)[None] < num_kept[:, None]
        rows = proposal.rows.cpu()
        self.history_sum[rows] += (divergences * kept).sum(1).double().cpu()
        self.history_count[rows] += num_kept.cpu()
        self.handed_off[rows] |= (reject & kept).any(1).cpu()


@dataclass
class Rollout:
    """Completions for a batch of prompts and who wrote each token (the rollout hook's and the samplers' output).

    Attributes:
        completion_ids: per row, the response tokens, ending at (and including) the first EOS if any.
        teacher_mask: per row, ``True`` where the teacher wrote the token, ``False`` where the student did.
        counts: integer counters, summed over processes and logged (``acceptance_rate`` is logged when ``drafted`` is
            present). The block-verify sampler's: ``drafted`` (positions judged by the rule), ``accepted``,
            ``replaced``, ``proposed`` (drafted tokens including the ones dropped after a rejection),
            ``student_forwards``, ``teacher_forwards``, ``rounds``.
        teacher_hidden: with ``keep_teacher_hidden``, per row the teacher's final hidden states ``(len, H)`` at the
            response positions, the state at position ``t`` being the one that predicts token ``t`` (in the model's
            dtype, on its device); the loss then uses them instead of running the teacher again
            (`KDConfig.reuse_teacher_states`). ``None`` otherwise.
    """

    completion_ids: list[list[int]]
    teacher_mask: list[list[bool]]
    counts: dict[str, int] = field(default_factory=dict)
    teacher_hidden: list[torch.Tensor] | None = None


def _left_pad(prompt_ids: Sequence[Sequence[int]], pad_token_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompt_ids)
    ids = torch.full((len(prompt_ids), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        if len(p):
            ids[i, width - len(p) :] = torch.tensor(list(p))
            mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def generate_completions(
    model: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    generation_config: GenerationConfig,
    *,
    pad_token_id: int,
    eos_token_ids: Sequence[int],
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """One completion per prompt from `model.generate` over the left-padded prompts (no teacher in the loop), each
    cut after its first EOS. The prompts go to `device` (default: that of the model's first parameter)."""
    device = device if device is not None else next(model.parameters()).device
    input_ids, attention_mask = _left_pad(prompt_ids, pad_token_id, device)
    output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=generation_config)
    completions = []
    for row in output[:, input_ids.shape[1] :].tolist():
        end = next((i + 1 for i, token in enumerate(row) if token in eos_token_ids), len(row))
        completions.append(row[:end])
    return completions


def _parameter_count(model: torch.nn.Module) -> int:
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())  # ZeRO-3 keeps the full count there


def _forward(model, input_ids, slot_mask, positions, cache) -> torch.Tensor:
    out = model(
        input_ids=input_ids,
        attention_mask=slot_mask,
        position_ids=positions,
        use_cache=True,
        **{cache_argument(model): cache},
    )
    return out.logits.float()


def _backbone_forward(model, input_ids, slot_mask, positions, cache) -> torch.Tensor:
    """Fill ``cache`` with the backbone alone (nothing needs the prompt's logits); returns the final hidden states."""
    body = backbone(model)
    return body(
        input_ids=input_ids,
        attention_mask=slot_mask,
        position_ids=positions,
        use_cache=True,
        **{cache_argument(body): cache},
    ).last_hidden_state


def _forward_with_hidden(
    model, input_ids, slot_mask, positions, cache, vocab_size: int | None, last: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 logits over the first ``vocab_size`` entries and the final hidden states of the last ``last`` positions,
    from the backbone and the head as the losses apply it ([`LMHead`][trl_kd.losses.LMHead]), so a loss from the
    kept states sees the distribution the rule saw."""
    hidden = _backbone_forward(model, input_ids, slot_mask, positions, cache)[:, -last:]
    head = LMHead.from_model(model)
    return head.logits(hidden, vocab_size or head.vocab_size), hidden


DRAFT_SCHEDULES = ("heuristic", "expected_cost")


def expected_tokens_per_round(acceptance: float, gamma: int) -> float:
    """Tokens a row writes in one round of ``gamma`` drafted tokens when the rule keeps each with probability
    ``acceptance``: the kept drafts up to the first rejection plus the teacher's replacement there, or the whole
    block, ``(1 - a^gamma) / (1 - a)`` (``gamma`` at ``a = 1``)."""
    if acceptance >= 1.0:
        return float(gamma)
    return (1.0 - acceptance**gamma) / (1.0 - acceptance)


def cheapest_draft_length(
    acceptance: Sequence[float], remaining: Sequence[int], draft_cost: float, largest: int
) -> int:
    """The draft length that finishes a batch at the lowest expected cost: the rounds its slowest row still needs
    (its ``remaining`` tokens over `expected_tokens_per_round` at its ``acceptance``) times the cost of a round,
    ``gamma`` student forwards at ``draft_cost`` each plus one teacher forward (the cost model of speculative
    decoding, Leviathan et al. 2023, applied to the row that sets the batch's length). Between 1 and ``largest``; the
    shortest of equal costs."""
    best, best_cost = 1, float("inf")
    for gamma in range(1, max(1, largest) + 1):
        rounds = max(left / expected_tokens_per_round(a, gamma) for a, left in zip(acceptance, remaining))
        cost = rounds * (gamma * draft_cost + 1.0)
        if cost < best_cost * (1 - 1e-9):
            best, best_cost = gamma, cost
    return best


def next_draft_length(gamma: int, fully_accepted: int, judged: int, largest: int) -> int:
    """The adaptive draft length after a round: ``gamma + 2`` when more than half of the ``judged`` rows kept their
    whole block, else ``gamma - 1``, within ``[1, largest]``. With one row this is `transformers`' "heuristic"
    schedule for assisted generation (grow on a fully accepted block, shrink otherwise). With a batch, whose rows
    share one length per round and all pay for the longest draft, it settles where about half of the rows take the
    whole block."""
    if judged == 0:
        return max(1, min(gamma, largest))
    grown = gamma + 2 if 2 * fully_accepted > judged else gamma - 1
    return max(1, min(grown, largest))


def _apply_stop_strings(
    stop: StopStrings,
    tokens: torch.Tensor,
    lengths: torch.Tensor,
    done: torch.Tensor,
    rows: torch.Tensor,
    previous_lengths: torch.Tensor,
) -> None:
    """End the rows of ``rows`` whose new tokens complete a stop string: cut their length, mark them done."""
    for row, previous in zip(rows.tolist(), previous_lengths.tolist()):
        end = stop.end(tokens[row, : int(lengths[row])].tolist(), start=previous)
        if end is not None:
            lengths[row] = end
            done[row] = True


@dataclass
class _Verdict:
    """What one round of the rule decided, per row still in the batch (phase 3)."""

    first_reject: torch.Tensor  # first rejected block slot, `gamma` if none
    accepted: torch.Tensor  # drafted tokens kept
    replaced: torch.Tensor  # whether the teacher's replacement follows them
    num_kept: torch.Tensor  # accepted + replaced
    written: torch.Tensor  # (rows, gamma): the kept tokens, the replacement after them
    ended_on_eos: torch.Tensor  # the kept draft ends on an EOS
    budget: torch.Tensor  # tokens the row could still write (0 for finished rows)
    active: torch.Tensor  # the row was unfinished when the round began
    start: torch.Tensor  # the row's length before the round
    last: torch.Tensor  # the last token kept (the next pending token where any was kept)


class _BlockVerifier:
    """The state of one `block_verify_sample` call: the batch's KV caches and its output buffers, and one method per
    phase of a round (SKD's Algorithm 1, batched): the student drafts, the teacher verifies, the rule accepts or the
    teacher replaces, then the per-row bookkeeping."""

    def __init__(
        self,
        student,
        teacher,
        prompt_ids,
        *,
        max_new_tokens,
        eos_token_ids,
        pad_token_id,
        vocab_size,
        keep_teacher_hidden,
        draft_schedule="heuristic",
    ):
        self.student, self.teacher, self.vocab_size = student, teacher, vocab_size
        self.draft_schedule, self.draft_cost = draft_schedule, None
        if draft_schedule == "expected_cost":  # a student forward's cost in teacher forwards, from parameter counts
            self.draft_cost = _parameter_count(student) / max(_parameter_count(teacher), 1)
        self.max_new_tokens, self.keep_teacher_hidden = max_new_tokens, keep_teacher_hidden
        self.device = device = next(student.parameters()).device
        batch = self.batch = len(prompt_ids)
        ids, slot_mask = _left_pad(prompt_ids, pad_token_id, device)
        self.student_cache, self.teacher_cache = DynamicCache(), DynamicCache()
        positions = (slot_mask.cumsum(-1) - 1).clamp(min=0)
        self.counts = dict.fromkeys(
            ("drafted", "accepted", "replaced", "proposed", "student_forwards", "teacher_forwards", "rounds"), 0
        )
        # the teacher's prompt (all but its last token) joins the first verification: one teacher forward fewer
        self.teacher_prefix = None
        if ids.shape[1] > 1:  # prefill everything but the last prompt token, which becomes the pending token
            _backbone_forward(student, ids[:, :-1], slot_mask[:, :-1], positions[:, :-1], self.student_cache)
            self.counts["student_forwards"] += 1
            self.teacher_prefix = ids[:, :-1], positions[:, :-1]
        self.slot_mask = slot_mask[:, :-1]
        self.pending = ids[:, -1]
        self.next_position = positions[:, -1]  # position of the pending token
        self.rows = torch.arange(batch, device=device)  # original index of each row still in the batch
        self.done = torch.zeros(batch, dtype=torch.bool, device=device)
        # outputs live in fixed buffers so that a round's bookkeeping is a few tensor ops whatever the batch size
        self.tokens = torch.full((batch, max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        self.by_teacher = torch.zeros((batch, max_new_tokens), dtype=torch.bool, device=device)
        self.lengths = torch.zeros(batch, dtype=torch.long, device=device)
        self.eos = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
        self.totals = torch.zeros(3, dtype=torch.long, device=device)  # accepted, replaced, proposed
        # per row: drafted tokens the rule kept, and the positions it judged (kept + replaced), for the schedule
        self.row_accepted = torch.zeros(batch, dtype=torch.long, device=device)
        self.row_judged = torch.zeros(batch, dtype=torch.long, device=device)
        self.teacher_hidden: torch.Tensor | None = None  # (batch, max_new_tokens, H), allocated at the first round

    def cut(self, logits: torch.Tensor) -> torch.Tensor:
        return logits if self.vocab_size is None else logits[..., : self.vocab_size]

    def draft(self, gamma: int, params: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
        """Phase 1: the student drafts `gamma` tokens `(rows, gamma)`, keeping the logits each was drawn from."""
        self.counts["rounds"] += 1
        draft, student_logits = [], []
        token = self.pending
        for j in range(gamma):
            self.slot_mask = torch.cat([self.slot_mask, self.slot_mask.new_ones(len(self.rows), 1)], dim=1)
            position = (self.next_position + j)[:, None]
            logits = self.cut(_forward(self.student, token[:, None], self.slot_mask, position, self.student_cache))
            self.counts["student_forwards"] += 1
            token = params.sample(logits[:, -1])
            draft.append(token)
            student_logits.append(logits[:, -1])
        return torch.stack(draft, 1), torch.stack(student_logits, 1)

    def verify(self, draft_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Phase 2: one teacher forward over pending + draft[:-1]: its logits at every drafted position (and with
        `keep_teacher_hidden` its hidden states there)."""
        gamma = draft_ids.shape[1]
        teacher_input = torch.cat([self.pending[:, None], draft_ids[:, :-1]], dim=1)
        teacher_positions = self.next_position[:, None] + torch.arange(gamma, device=self.device)
        if self.teacher_prefix is not None:
            teacher_input = torch.cat([self.teacher_prefix[0], teacher_input], dim=1)
            teacher_positions = torch.cat([self.teacher_prefix[1], teacher_positions], dim=1)
            self.teacher_prefix = None
        self.counts["teacher_forwards"] += 1
        args = (self.teacher, teacher_input, self.slot_mask, teacher_positions, self.teacher_cache)
        if self.keep_teacher_hidden:
            return _forward_with_hidden(*args, self.vocab_size, gamma)
        return self.cut(_forward(*args)[:, -gamma:]), None

    def proposal(self, student_logits, teacher_logits, draft_ids) -> Proposal:
        offsets = torch.arange(draft_ids.shape[1], device=self.device)
        positions = self.lengths[self.rows][:, None] + offsets
        return Proposal(student_logits, teacher_logits, draft_ids, positions, self.rows)

    def accept_or_replace(self, proposal: Proposal, rule: Rule, teacher_params: SamplingParams) -> _Verdict:
        """Phase 3: each row keeps its draft up to the rule's first rejection, its first EOS (included) or its
        budget; where the rule rejected, the teacher samples the replacement."""
        draft_ids, gamma = proposal.draft, proposal.draft.shape[1]
        offsets = torch.arange(gamma, device=self.device)
        reject = rule.reject(proposal).to(self.device)
        first_reject = torch.where(reject.any(1), reject.float().argmax(1), gamma)
        at_reject = proposal.teacher_logits[
            torch.arange(len(self.rows), device=self.device), first_reject.clamp(max=gamma - 1)
        ]
        replacement = teacher_params.sample(at_reject, source="teacher")
        active = ~self.done[self.rows]
        budget = torch.where(active, self.max_new_tokens - self.lengths[self.rows], 0)
        draft_eos = torch.isin(draft_ids, self.eos)
        first_eos = torch.where(draft_eos.any(1), draft_eos.float().argmax(1), gamma)
        accepted = torch.minimum(torch.minimum(first_reject, first_eos + 1), budget)
        ended_on_eos = first_eos < accepted
        replaced = (first_reject < gamma) & (accepted == first_reject) & (accepted < budget) & ~ended_on_eos
        num_kept = accepted + replaced.long()
        written = torch.where(offsets < accepted[:, None], draft_ids, replacement[:, None])
        last = written.gather(1, (num_kept - 1).clamp(min=0)[:, None]).squeeze(1)
        start = self.lengths[self.rows]
        return _Verdict(first_reject, accepted, replaced, num_kept, written, ended_on_eos, budget, active, start, last)

    def record(self, verdict: _Verdict, hidden: torch.Tensor | None) -> None:
        """Phase 4, per row: write the kept tokens, who wrote them (and the teacher's states), the lengths, which
        rows are done, the counters."""
        gamma = verdict.written.shape[1]
        offsets = torch.arange(gamma, device=self.device)
        rows, num_kept, row_lengths = self.rows, verdict.num_kept, verdict.start
        keep = offsets < num_kept[:, None]
        index = (row_lengths[:, None] + offsets).clamp(max=self.max_new_tokens - 1)
        row_index = rows[:, None].expand_as(index)
        self.tokens[row_index[keep], index[keep]] = verdict.written[keep]
        by_teacher = (offsets[None] == verdict.accepted[:, None]).expand_as(keep)
        self.by_teacher[row_index[keep], index[keep]] = by_teacher[keep]
        if hidden is not None:  # the state at block slot j predicts the token kept at j (same prefix)
            if self.teacher_hidden is None:
                self.teacher_hidden = hidden.new_zeros(self.batch, self.max_new_tokens, hidden.shape[-1])
            self.teacher_hidden[row_index[keep], index[keep]] = hidden[keep]
        self.lengths[rows] = row_lengths + num_kept
        ended = verdict.active & (num_kept > 0) & torch.isin(verdict.last, self.eos)
        self.done[rows] |= (self.lengths[rows] >= self.max_new_tokens) | ended
        self.totals += torch.stack([verdict.accepted.sum(), verdict.replaced.sum(), gamma * verdict.active.sum()])
        if self.draft_schedule == "expected_cost":  # only that schedule reads them: no work on the default path
            self.row_accepted[rows] += verdict.accepted
            self.row_judged[rows] += verdict.accepted + verdict.replaced.long()

    def apply_stop_strings(self, stop: StopStrings, verdict: _Verdict) -> None:
        wrote = verdict.num_kept > 0
        _apply_stop_strings(stop, self.tokens, self.lengths, self.done, self.rows[wrote], verdict.start[wrote])

    def advance_caches(self, verdict: _Verdict) -> None:
        """Cache slots: pending + the kept draft tokens stay visible, the rest is masked or cropped; the last kept
        token becomes the pending one."""
        gamma = verdict.written.shape[1]
        offsets = torch.arange(gamma, device=self.device)
        new_valid = verdict.num_kept.clamp(1, gamma)
        self.slot_mask[:, -gamma:] = (offsets[None, :] < new_valid[:, None]).long()
        surplus = gamma - int(new_valid.max())
        if surplus > 0:
            self.student_cache.crop(-surplus)
            self.teacher_cache.crop(-surplus)
            self.slot_mask = self.slot_mask[:, :-surplus]
        self.pending = torch.where(verdict.num_kept > 0, verdict.last, self.pending)
        self.next_position = self.next_position + verdict.num_kept

    def next_draft_length(self, gamma: int, verdict: _Verdict, max_draft_tokens: int) -> int:
        """The adaptive draft length. ``"heuristic"``: `next_draft_length` from the rows whose block the rule ended
        (not an EOS or the budget), and those of them that kept all of it. ``"expected_cost"``:
        `cheapest_draft_length` from each unfinished row's acceptance so far (add-one smoothed) and remaining
        budget."""
        unfinished = ~self.done[self.rows]
        if not bool(unfinished.any()):  # only forwards in step with other processes are left: no preference
            return max_draft_tokens
        remaining = self.max_new_tokens - self.lengths[self.rows][unfinished]
        largest = min(max_draft_tokens, int(remaining.max()))
        if self.draft_schedule == "expected_cost":
            rows = self.rows[unfinished]
            acceptance = (self.row_accepted[rows] + 1).double() / (self.row_judged[rows] + 2).double()
            return cheapest_draft_length(acceptance.tolist(), remaining.tolist(), self.draft_cost, largest)
        cut_by_budget = verdict.budget < torch.minimum(
            verdict.first_reject + 1, torch.full_like(verdict.first_reject, gamma)
        )
        judged = verdict.active & ~verdict.ended_on_eos & ~cut_by_budget
        fully = judged & (verdict.first_reject >= gamma)
        return next_draft_length(gamma, int(fully.sum()), int(judged.sum()), largest)

    def drop_finished_rows(self) -> None:
        keep_rows = ~self.done[self.rows]
        if not bool(keep_rows.all()) and bool(keep_rows.any()):
            index = keep_rows.nonzero().squeeze(1)
            self.student_cache.batch_select_indices(index)
            self.teacher_cache.batch_select_indices(index)
            self.rows, self.slot_mask = self.rows[index], self.slot_mask[index]
            self.pending, self.next_position = self.pending[index], self.next_position[index]

    def output(self) -> Rollout:
        counts = self.counts
        counts["accepted"], counts["replaced"], counts["proposed"] = self.totals.tolist()
        counts["drafted"] = counts["accepted"] + counts["replaced"]
        lengths = self.lengths.tolist()
        completions = [row[:n] for row, n in zip(self.tokens.tolist(), lengths)]
        teacher_mask = [row[:n] for row, n in zip(self.by_teacher.tolist(), lengths)]
        kept_hidden = None
        if self.keep_teacher_hidden:
            hidden = self.teacher_hidden
            if hidden is None:  # no round ran (every row finished at once): nothing was kept
                width = self.teacher.config.get_text_config().hidden_size
                hidden = torch.zeros(self.batch, self.max_new_tokens, width, device=self.device)
            kept_hidden = [hidden[i, :n] for i, n in enumerate(lengths)]
        return Rollout(completions, teacher_mask, counts, kept_hidden)


@torch.no_grad()
def block_verify_sample(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    rule: Rule,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    vocab_size: int | None = None,
    num_draft_tokens: int = 5,
    student_params: SamplingParams = SamplingParams(),
    teacher_params: SamplingParams = SamplingParams(),
    sync_continue: Callable[[bool], bool] | None = None,
    stop: StopStrings | None = None,
    adaptive_draft: bool = False,
    max_draft_tokens: int = 16,
    draft_schedule: str = "heuristic",
    sync_draft_length: Callable[[int], int] | None = None,
    keep_teacher_hidden: bool = False,
) -> Rollout:
    """Sample one completion per prompt: the student drafts blocks, the teacher verifies them under ``rule``.

    Args:
        student: causal LM that drafts (plain, PEFT-wrapped, or unwrapped from a DeepSpeed engine). Run both models
            with gradient checkpointing off (e.g. under `trl.models.unwrap_model_for_generation`).
        teacher: causal LM sharing the student's tokenizer, which verifies the drafts and writes replacements.
        prompt_ids: unpadded prompt token ids per row (at least one token each).
        rule: who writes each position, see [`Rule`][trl_kd.sampler.Rule].
        max_new_tokens: completion budget per row.
        eos_token_ids: tokens that end a completion (kept in it).
        vocab_size: compare and sample over the first ``vocab_size`` logits only (the tokenizer's range).
        num_draft_tokens: tokens the student drafts per teacher forward (gamma); changes speed, not results. With
            ``adaptive_draft``, the length of the first round.
        sync_continue: for ZeRO-3 and other collectives: called each round with "this process has unfinished rows"
            and must return whether any process has; finished processes then keep running forwards on their rows
            (whose outputs are ignored) until every process is done, and no row leaves the batch.
        stop: a row ends after the token that completes a stop string (checked after every round).
        adaptive_draft: choose each round's draft length from the last round's acceptance
            ([`next_draft_length`][trl_kd.sampler.next_draft_length]), between 1 and ``max_draft_tokens`` and never
            past the longest remaining budget. Speed only: the sequences keep their distribution, and under greedy
            settings they are the fixed-length sampler's tokens.
        max_draft_tokens: the adaptive draft length's ceiling.
        draft_schedule: how ``adaptive_draft`` chooses the next length. ``"heuristic"``: `transformers`'
            assisted-generation rule, +2 when more than half of the rows kept their whole block, -1 otherwise
            ([`next_draft_length`][trl_kd.sampler.next_draft_length]). ``"expected_cost"``: the length that
            finishes the batch at the lowest expected cost, from each row's acceptance so far and remaining budget
            and the student's parameter count over the teacher's as a forward's cost
            ([`cheapest_draft_length`][trl_kd.sampler.cheapest_draft_length]).
        sync_draft_length: with ``sync_continue`` and ``adaptive_draft``: maps this process's next draft length to
            the one every process uses (e.g. the smallest), so all run the same forwards.
        keep_teacher_hidden: return the teacher's final hidden states at the response positions
            (`Rollout.teacher_hidden`). The teacher then runs as backbone plus
            [`LMHead`][trl_kd.losses.LMHead] (fp32 logits), which in half precision can differ from its own
            ``forward``'s logits in the last bits.

    Returns:
        [`Rollout`][trl_kd.Rollout].
    """
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}.")
    if adaptive_draft and max_draft_tokens < 1:
        raise ValueError(f"max_draft_tokens must be >= 1, got {max_draft_tokens}.")
    if draft_schedule not in DRAFT_SCHEDULES:
        raise ValueError(f"draft_schedule must be one of {DRAFT_SCHEDULES}, got {draft_schedule!r}.")
    if adaptive_draft and sync_continue is not None and sync_draft_length is None:
        raise ValueError("adaptive_draft with sync_continue needs sync_draft_length, so processes draft alike.")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("Every prompt needs at least one token.")
    rule.start(len(prompt_ids), max_new_tokens)
    sampler = _BlockVerifier(
        student,
        teacher,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        pad_token_id=pad_token_id,
        vocab_size=vocab_size,
        keep_teacher_hidden=keep_teacher_hidden,
        draft_schedule=draft_schedule,
    )
    gamma = num_draft_tokens
    while sync_continue(not bool(sampler.done.all())) if sync_continue is not None else not bool(sampler.done.all()):
        draft_ids, student_logits = sampler.draft(gamma, student_params)  # 1. the student drafts gamma tokens
        teacher_logits, hidden = sampler.verify(draft_ids)  # 2. one teacher forward scores every drafted position
        proposal = sampler.proposal(student_logits, teacher_logits, draft_ids)
        verdict = sampler.accept_or_replace(proposal, rule, teacher_params)  # 3. first rejection: a teacher token
        sampler.record(verdict, hidden)  # 4. per-row bookkeeping
        rule.update(proposal, verdict.num_kept)
        if stop is not None:
            sampler.apply_stop_strings(stop, verdict)
        sampler.advance_caches(verdict)
        if adaptive_draft:
            gamma = sampler.next_draft_length(gamma, verdict, max_draft_tokens)
            if sync_draft_length is not None:
                gamma = sync_draft_length(gamma)
        if sync_continue is None:  # finished rows leave the batch
            sampler.drop_finished_rows()
    return sampler.output()


@torch.no_grad()
def reference_sample(
    student: torch.nn.Module,
    teacher: torch.nn.Module,
    prompt_ids: Sequence[Sequence[int]],
    rule: Rule,
    *,
    max_new_tokens: int,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    vocab_size: int | None = None,
    student_params: SamplingParams = SamplingParams(),
    teacher_params: SamplingParams = SamplingParams(),
    stop: StopStrings | None = None,
) -> Rollout:
    """The token-by-token algorithm, without KV caches: at each position both models run on the whole sequence, the
    student draws a token, the rule decides, and a rejected token is redrawn from the teacher. Slow; for tests."""
    device = next(student.parameters()).device
    batch = len(prompt_ids)
    sequences = [list(p) for p in prompt_ids]
    completions: list[list[int]] = [[] for _ in range(batch)]
    teacher_mask: list[list[bool]] = [[] for _ in range(batch)]
    counts = {"drafted": 0, "accepted": 0, "replaced": 0}
    rule.start(batch, max_new_tokens)
    active = list(range(batch))
    for t in range(max_new_tokens):
        if not active:
            break
        ids, mask = _left_pad([sequences[r] for r in active], pad_token_id, device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        q = student(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        p = teacher(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].float()
        if vocab_size is not None:
            q, p = q[:, :vocab_size], p[:, :vocab_size]
        drawn = student_params.sample(q)
        rows = torch.tensor(active, device=device)
        position = torch.full((len(active), 1), t, device=device)
        proposal = Proposal(q[:, None], p[:, None], drawn[:, None], position, rows)
        reject = rule.reject(proposal)[:, 0]
        replacement = teacher_params.sample(p, source="teacher")
        token = torch.where(reject, replacement, drawn)
        rule.update(proposal, torch.ones(len(active), dtype=torch.long, device=device))
        still = []
        for i, row in enumerate(active):
            tok = int(token[i])
            sequences[row].append(tok)
            completions[row].append(tok)
            teacher_mask[row].append(bool(reject[i]))
            counts["replaced" if reject[i] else "accepted"] += 1
            stopped = stop is not None and stop.end(completions[row], start=len(completions[row]) - 1) is not None
            if tok not in eos_token_ids and not stopped:
                still.append(row)
        active = still
    counts["drafted"] = counts["accepted"] + counts["replaced"]
    return Rollout(completions, teacher_mask, counts)
