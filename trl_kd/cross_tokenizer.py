"""Cross-tokenizer distillation: align a teacher's tokens with the student's by the characters they cover, and compare
the two models' next-token distributions over the aligned spans.

The two tokenizers cut the same text differently. Each token ends at a character of the text; a **span** closes at a
character where a token of each side ends, and holds every token of either side that ends inside it (a token that
completes a multi-byte character ends where the character ends). The probability a model gives a span is the product
of the probabilities of its tokens; its distribution over the span's first token, times the probabilities of the rest
("observed" merging, TRL's GOLD default), is what the loss compares.

The loss at each span (TRL's GOLD combination, after Universal Logit Distillation, Boizard et al. 2024, arXiv
2402.12030):

* over the **shared vocabulary** (the token pairs whose text is the same in both tokenizers), the package's divergence
  (`trl_kd.losses.divergence_from_log_probs`) between the two distributions renormalised over those tokens;
* over the **rest of each vocabulary**, ULD: the L1 distance between the two probability vectors sorted in decreasing
  order (zero-padded to one length), which needs no correspondence between the tokens;
* optionally a **span term**: `0.5 * (log p_student(span) - log p_teacher(span))^2`, from the two models'
  log-probabilities of the span's text.

GOLD weighs the first two by the share of the teacher's vocabulary that is shared (`matched_weight=None`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from .losses import LossType, divergence_from_log_probs


def _backend(tokenizer: PreTrainedTokenizerBase):
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(
            "Cross-tokenizer distillation needs fast tokenizers (character offsets and streamed decoding); "
            f"{type(tokenizer).__name__} is a slow one. Load it with "
            "`AutoTokenizer.from_pretrained(..., use_fast=True)`."
        )
    return backend


def token_ends(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> tuple[str, list[int]]:
    """The text that `ids` decode to and, per token, the character where it ends. The text is the tokenizer's
    streamed decoding, without clean-up, so every token's characters are its own; a token that leaves a multi-byte
    character incomplete ends where the character does (with the token that completes it)."""
    from tokenizers.decoders import DecodeStream

    backend, stream = _backend(tokenizer), DecodeStream(skip_special_tokens=False)
    text, ends, pending = "", [], 0
    for token in ids:
        piece = stream.step(backend, int(token))
        if piece is None:
            pending += 1
            continue
        text += piece
        ends.extend([len(text)] * (pending + 1))
        pending = 0
    ends.extend([len(text)] * pending)
    return text, ends


def encode_with_ends(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """`text` tokenized (no special tokens) and, per token, the character of `text` where it ends: from the streamed
    decoding when it gives `text` back, else from the tokenizer's offsets (normalisers that change the text)."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoding["input_ids"])
    decoded, ends = token_ends(tokenizer, ids)
    if decoded == text:
        return ids, ends
    ends, last = [], 0
    for _, end in encoding["offset_mapping"]:
        last = min(max(last, end), len(text))
        ends.append(last)
    if ends:
        ends[-1] = len(text)
    return ids, ends


Span = tuple[tuple[int, int], tuple[int, int]]  # (student token range, teacher token range), stop excluded


def align_spans(student_ends: Sequence[int], teacher_ends: Sequence[int]) -> list[Span]:
    """Spans of the two token sequences that cover the same characters, as `((s_start, s_stop), (t_start, t_stop))`
    token ranges. A span closes at a character where a token of each side ends, after every token of either side
    that ends there; tokens left over at the end of one side only (text the other does not cover) form no span."""
    spans, s, t = [], 0, 0
    while s < len(student_ends) and t < len(teacher_ends):
        s_start, t_start = s, t
        while student_ends[s] != teacher_ends[t]:  # the side that ends first takes its next token
            if student_ends[s] < teacher_ends[t]:
                s += 1
            else:
                t += 1
            if s == len(student_ends) or t == len(teacher_ends):
                return spans
        boundary = student_ends[s]
        while s < len(student_ends) and student_ends[s] == boundary:
            s += 1
        while t < len(teacher_ends) and teacher_ends[t] == boundary:
            t += 1
        spans.append(((s_start, s), (t_start, t)))
    return spans


def token_texts(tokenizer: PreTrainedTokenizerBase, size: int | None = None) -> list[str | None]:
    """The text each token id adds after other text (so `"▁the"` and `"Ġthe"` are both `" the"`), `None` for a token
    that is not whole characters on its own (a byte of a multi-byte character)."""
    from tokenizers.decoders import DecodeStream

    backend = _backend(tokenizer)
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1]
    texts = []
    for token in range(len(tokenizer) if size is None else size):
        stream = DecodeStream(skip_special_tokens=False)
        stream.step(backend, anchor)
        try:
            piece = stream.step(backend, token)
        except Exception:  # an id the backend does not know (embedding padding)
            piece = None
        texts.append(piece or None)
    return texts


@dataclass(frozen=True)
class SharedVocabulary:
    """Token pairs, one student id and one teacher id, whose text is the same: the part of the two vocabularies that
    corresponds one to one. Built once per pair of tokenizers ([`SharedVocabulary.build`])."""

    student_ids: torch.Tensor
    teacher_ids: torch.Tensor
    student_size: int
    teacher_size: int

    @classmethod
    def build(
        cls,
        student: PreTrainedTokenizerBase,
        teacher: PreTrainedTokenizerBase,
        student_size: int | None = None,
        teacher_size: int | None = None,
        extra_pairs: Sequence[tuple[int, int]] = (),
    ) -> SharedVocabulary:
        """Match the tokens of `student` and `teacher` by text (the first id of each text on each side), over the
        first `student_size` / `teacher_size` ids (default: the tokenizers' lengths), plus `extra_pairs` (for
        example the two end-of-sequence tokens, whose texts differ)."""
        student_size = len(student) if student_size is None else student_size
        teacher_size = len(teacher) if teacher_size is None else teacher_size
        teacher_id_of: dict[str, int] = {}
        for token, text in enumerate(token_texts(teacher, teacher_size)):
            if text is not None:
                teacher_id_of.setdefault(text, token)
        pairs = dict(extra_pairs)
        taken = set(pairs.values())
        for token, text in enumerate(token_texts(student, student_size)):
            match = None if text is None else teacher_id_of.get(text)
            if match is not None and token not in pairs and match not in taken:
                pairs[token] = match
                taken.add(match)
        ordered = sorted(pairs.items())
        return cls(
            torch.tensor([s for s, _ in ordered], dtype=torch.long),
            torch.tensor([t for _, t in ordered], dtype=torch.long),
            student_size,
            teacher_size,
        )

    def __len__(self) -> int:
        return len(self.student_ids)


def _span_index(spans: Sequence[tuple[int, int]], num_tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """`(first, span_of)`: each span's first token, and each token's span (-1 outside every span)."""
    first = torch.tensor([start for start, _ in spans], dtype=torch.long, device=device)
    span_of = torch.full((num_tokens,), -1, dtype=torch.long, device=device)
    for index, (start, stop) in enumerate(spans):
        span_of[start:stop] = index
    return first, span_of


def _merged_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, spans: Sequence[tuple[int, int]], temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per span: the log-distribution over its first token times the probabilities of its other tokens ("observed"
    merging), `(G, V)`, and the log-probability of all its tokens, `(G,)`."""
    log_probs = F.log_softmax(logits.float() / temperature, dim=-1)
    token_log_probs = log_probs.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    first, span_of = _span_index(spans, len(ids), logits.device)
    inside = span_of >= 0
    span_log_probs = torch.zeros(len(spans), device=logits.device).index_add(
        0, span_of[inside], token_log_probs[inside]
    )
    rest = span_log_probs - token_log_probs[first]
    return log_probs[first] + rest.unsqueeze(-1), span_log_probs


def _sorted_l1(student_probs: torch.Tensor, teacher_probs: torch.Tensor) -> torch.Tensor:
    """ULD's distance: L1 between the two probability vectors sorted in decreasing order, zero-padded to one length."""
    width = max(student_probs.shape[-1], teacher_probs.shape[-1])
    student_sorted = F.pad(student_probs.sort(-1, descending=True).values, (0, width - student_probs.shape[-1]))
    teacher_sorted = F.pad(teacher_probs.sort(-1, descending=True).values, (0, width - teacher_probs.shape[-1]))
    return (student_sorted - teacher_sorted).abs().sum(-1)


@dataclass(frozen=True)
class CrossTokenizerLoss:
    """How the span losses combine (see the module docstring). `matched_weight=None`: GOLD's adaptive weights,
    the shared share of the teacher's vocabulary for the shared part and the rest for ULD."""

    loss_type: LossType = "jsd"
    beta: float = 0.5
    skew_alpha: float = 0.1
    temperature: float = 1.0
    matched_weight: float | None = None
    unmatched_weight: float | None = None
    span_weight: float = 0.0

    def weights(self, shared: SharedVocabulary) -> tuple[float, float]:
        if self.matched_weight is None:
            matched = len(shared) / max(1, shared.teacher_size)
            return matched, 1.0 - matched
        return self.matched_weight, self.unmatched_weight if self.unmatched_weight is not None else 0.0

    def span_losses(
        self,
        student_logits: torch.Tensor,
        student_ids: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_ids: torch.Tensor,
        spans: Sequence[Span],
        shared: SharedVocabulary,
    ) -> torch.Tensor:
        """The loss of each aligned span of one sequence, `(G,)`.

        Args:
            student_logits: `(S, V_s)`, row `k` predicting the student's token `student_ids[k]`.
            student_ids: `(S,)` the student's tokens.
            teacher_logits: `(T, V_t)`, likewise for the teacher (no gradient flows into it).
            teacher_ids: `(T,)`.
            spans: from [`align_spans`] over the same text.
            shared: the two vocabularies' one-to-one part, over the logits' first `student_size` / `teacher_size`
                entries.
        """
        if not spans:
            return student_logits.new_zeros(0)
        student_logits = student_logits[:, : shared.student_size]
        teacher_logits = teacher_logits.detach()[:, : shared.teacher_size]
        student_merged, student_span = _merged_log_probs(
            student_logits, student_ids, [s for s, _ in spans], self.temperature
        )
        teacher_merged, teacher_span = _merged_log_probs(
            teacher_logits, teacher_ids, [t for _, t in spans], self.temperature
        )
        matched_weight, unmatched_weight = self.weights(shared)
        loss = student_merged.new_zeros(len(spans))
        s_ids, t_ids = shared.student_ids.to(student_logits.device), shared.teacher_ids.to(student_logits.device)
        if matched_weight and len(shared):
            student_shared = student_merged[:, s_ids]
            teacher_shared = teacher_merged[:, t_ids]
            loss = loss + matched_weight * divergence_from_log_probs(
                student_shared - student_shared.logsumexp(-1, keepdim=True),
                teacher_shared - teacher_shared.logsumexp(-1, keepdim=True),
                self.loss_type,
                self.beta,
                self.skew_alpha,
            )
        if unmatched_weight:
            # the shared tokens' probabilities set to zero: sorted last, as if removed and zero-padded
            student_rest = student_merged.exp().index_fill(-1, s_ids, 0.0)
            teacher_rest = teacher_merged.exp().index_fill(-1, t_ids, 0.0)
            loss = loss + unmatched_weight * _sorted_l1(student_rest, teacher_rest)
        if self.span_weight:
            loss = loss + self.span_weight * 0.5 * (student_span - teacher_span) ** 2
        return loss


def teacher_eos_ids(model) -> list[int]:
    """The ids that end a model's samples, from its generation config (an int or a list; none when unset)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


class CrossTokenizerTeacher:
    """The teacher's side of a batch whose rows the student's tokenizer wrote: each prompt in the teacher's own
    format (its chat template for conversations), each completion's text re-tokenized for the teacher, the spans
    that align the two, and the loss over them.

    Args:
        student: the student's (fast) tokenizer.
        teacher: the teacher's (fast) tokenizer.
        student_vocab_size: the ids the student's distributions are compared over.
        teacher_vocab_size: the ids the teacher's distributions are compared over.
        student_eos_ids: the ids that end a student completion; a completion that ends with one ends with the
            teacher's EOS on the teacher's side, and the two EOS tokens form a span of their own.
        loss: how the span losses combine.
    """

    def __init__(
        self,
        student: PreTrainedTokenizerBase,
        teacher: PreTrainedTokenizerBase,
        student_vocab_size: int,
        teacher_vocab_size: int,
        student_eos_ids: Sequence[int],
        loss: CrossTokenizerLoss,
        teacher_eos_ids: Sequence[int] = (),
    ):
        _backend(student), _backend(teacher)
        if teacher.eos_token_id is None:
            raise ValueError("The teacher's tokenizer has no `eos_token`: set one (the token that ends its answers).")
        if not student_eos_ids:
            raise ValueError("No student EOS ids were given: pass the ids that end the student's completions.")
        self.student, self.teacher, self.loss_config = student, teacher, loss
        self.student_eos_ids = set(student_eos_ids)
        # the student's EOS that pairs with the teacher's: its tokenizer's, when that is one of the ids
        self.student_eos_id = (
            student.eos_token_id if student.eos_token_id in self.student_eos_ids else min(self.student_eos_ids)
        )
        self.teacher_eos_ids = sorted({teacher.eos_token_id, *teacher_eos_ids})
        self.teacher_vocab_size = min(teacher_vocab_size, len(teacher))
        self.shared = SharedVocabulary.build(
            student,
            teacher,
            min(student_vocab_size, len(student)),
            self.teacher_vocab_size,
            extra_pairs=[(self.student_eos_id, teacher.eos_token_id)],
        )
        self._check_teacher_encodes_student_tokens()

    @classmethod
    def from_config(
        cls,
        args,
        student: PreTrainedTokenizerBase,
        teacher,
        student_vocab_size: int,
        teacher_vocab_size: int,
        student_eos_ids: Sequence[int],
        teacher_eos_ids: Sequence[int] = (),
    ) -> CrossTokenizerTeacher:
        """Built from a `KDConfig`'s loss fields (`loss_type`, `beta`, `skew_alpha`, `loss_temperature`, the
        `cross_tokenizer_*` weights); `teacher` may be a processor holding the tokenizer, and `teacher_eos_ids`
        the ids that end the teacher's samples besides its tokenizer's EOS (its generation config's)."""
        loss = CrossTokenizerLoss(
            loss_type=args.loss_type,
            beta=args.beta,
            skew_alpha=args.skew_alpha,
            temperature=args.loss_temperature,
            matched_weight=args.cross_tokenizer_matched_weight,
            unmatched_weight=args.cross_tokenizer_unmatched_weight,
            span_weight=args.cross_tokenizer_span_weight,
        )
        teacher = getattr(teacher, "tokenizer", teacher)
        return cls(student, teacher, student_vocab_size, teacher_vocab_size, student_eos_ids, loss, teacher_eos_ids)

    def _check_teacher_encodes_student_tokens(self) -> None:
        unknown = self.teacher.unk_token_id
        if unknown is None:
            return
        # the unknown token's own text (e.g. SmolLM2's `<|endoftext|>`) encodes to it on purpose
        texts = [t for t in token_texts(self.student, self.shared.student_size) if t and t != self.teacher.unk_token]
        encoded = self.teacher(texts, add_special_tokens=False)["input_ids"]
        bad = [text for text, ids in zip(texts, encoded) if unknown in ids]
        if bad:
            raise ValueError(
                f"The teacher's tokenizer cannot encode {len(bad)} of the student's tokens (for example "
                f"{bad[:5]!r}): they become its unknown token, so a completion holding them could not be scored. "
                "Use a teacher tokenizer that falls back to bytes (byte-level BPE, or SentencePiece with "
                "`byte_fallback`)."
            )

    def prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        """The prompt as the teacher reads it: a conversation through the teacher's chat template (with the
        generation prompt), a plain prompt with the teacher's special tokens (e.g. its BOS)."""
        if isinstance(prompt, list):
            if not self.teacher.chat_template:
                raise ValueError(
                    "The prompts are conversations but the teacher's tokenizer has no chat template, so the teacher "
                    "cannot read them as it was trained to. Give it one (`teacher_tokenizer.chat_template = ...`) or "
                    "use plain-text prompts."
                )
            text = self.teacher.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
            ids = self.teacher(text, add_special_tokens=False)["input_ids"]
        else:
            ids = self.teacher(prompt)["input_ids"]
        if not ids:
            raise ValueError(
                "A prompt is empty for the teacher, which then has no position to predict the answer from."
            )
        return list(ids)

    @property
    def teacher_pad_id(self) -> int:
        """The teacher's pad id, its EOS when it has none."""
        return self.teacher.pad_token_id if self.teacher.pad_token_id is not None else self.teacher.eos_token_id

    @property
    def teacher_generation_ids(self) -> dict[str, int | list[int] | None]:
        """The teacher's own pad, BOS and EOS ids, for its `GenerationConfig` (the student's would be other tokens)."""
        return {
            "pad_token_id": self.teacher_pad_id,
            "bos_token_id": self.teacher.bos_token_id,
            "eos_token_id": self.teacher_eos_ids,
        }

    def student_completion(self, teacher_ids: Sequence[int], max_length: int) -> list[int]:
        """A teacher sample (`seq_kd`) as student tokens: its text tokenized by the student, the student's EOS in
        place of the teacher's when the teacher ended its answer, cut at `max_length` tokens."""
        ids = list(teacher_ids)
        ended = bool(ids) and ids[-1] in self.teacher_eos_ids
        text, _ = token_ends(self.teacher, ids[:-1] if ended else ids)
        student_ids = list(self.student(text, add_special_tokens=False)["input_ids"])
        if ended:
            student_ids.append(self.student_eos_id)
        return student_ids[:max_length]

    def completion(self, completion_ids: Sequence[int]) -> tuple[list[int], list[Span]]:
        """The teacher's tokens for the text of a student completion, and the spans that align the two."""
        ids = list(completion_ids)
        ended = bool(ids) and ids[-1] in self.student_eos_ids
        if ended:
            ids = ids[:-1]
        text, student_ends = token_ends(self.student, ids)
        teacher_ids, teacher_ends = encode_with_ends(self.teacher, text)
        spans = align_spans(student_ends, teacher_ends)
        if ended:
            spans.append(((len(ids), len(ids) + 1), (len(teacher_ids), len(teacher_ids) + 1)))
            teacher_ids.append(self.teacher.eos_token_id)
        return teacher_ids, spans

    def batch(
        self, prompts: Sequence, completion_ids: torch.Tensor, completion_mask: torch.Tensor
    ) -> dict[str, torch.Tensor | list]:
        """The teacher's inputs for a batch: `xt_input_ids` and `xt_attention_mask` (prompt + completion,
        left-padded), `xt_completion_lengths`, and `xt_spans` (one list per row)."""
        rows, lengths, spans = [], [], []
        for prompt, ids, mask in zip(prompts, completion_ids.tolist(), completion_mask.tolist()):
            teacher_ids, row_spans = self.completion(ids[: int(sum(mask))])
            rows.append(self.prompt_ids(prompt) + teacher_ids)
            lengths.append(len(teacher_ids))
            spans.append(row_spans)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self.teacher_pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
        device = completion_ids.device
        return {
            "xt_input_ids": input_ids.to(device),
            "xt_attention_mask": attention_mask.to(device),
            "xt_completion_lengths": torch.tensor(lengths, device=device),
            "xt_spans": spans,
        }

    def loss(
        self,
        student_head,
        student_hidden: torch.Tensor,
        teacher_head,
        teacher_hidden: torch.Tensor,
        inputs: dict,
        denominator: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """`(loss, divergence_sum, entropy_sum, num_tokens)` of a micro-batch, as `KDTrainer.distillation_loss`
        returns them: the span losses summed over the rows, divided by `denominator` (the batch's student response
        tokens, as TRL counts them; the local count when `None`).

        `student_hidden` `(B, C, H)` predicts the student's completion tokens; `teacher_hidden` `(B, T, H)` the last
        `T` tokens of `xt_input_ids`, the teacher's completion among them."""
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        # the rows' tokens laid end to end, each row's spans shifted to its place, so that one call scores them all
        student_rows, student_ids, teacher_rows, teacher_ids, spans = [], [], [], [], []
        student_offset = teacher_offset = 0
        for i, row_spans in enumerate(inputs["xt_spans"]):
            length = int(completion_mask[i].sum())
            teacher_length = int(inputs["xt_completion_lengths"][i])
            if length == 0 or not row_spans:
                continue
            student_rows.append(student_hidden[i, :length])
            student_ids.append(completion_ids[i, :length])
            teacher_rows.append(teacher_hidden[i, teacher_hidden.shape[1] - teacher_length :])
            teacher_ids.append(inputs["xt_input_ids"][i, inputs["xt_input_ids"].shape[1] - teacher_length :])
            spans += [
                ((s0 + student_offset, s1 + student_offset), (t0 + teacher_offset, t1 + teacher_offset))
                for (s0, s1), (t0, t1) in row_spans
            ]
            student_offset, teacher_offset = student_offset + length, teacher_offset + teacher_length
        # each head is read once per micro-batch even with no span (a ZeRO-3 head's gather is a collective)
        student_logits = student_head.logits(
            torch.cat([student_hidden[0, :0], *student_rows]), self.shared.student_size
        )
        teacher_logits = teacher_head.logits(
            torch.cat([teacher_hidden[0, :0], *teacher_rows]), self.teacher_vocab_size
        )
        total = student_logits.sum() * 0.0  # on the graph: a micro-batch without spans still runs a backward
        if spans:
            total = self.loss_config.span_losses(
                student_logits, torch.cat(student_ids), teacher_logits, torch.cat(teacher_ids), spans, self.shared
            ).sum()
        with torch.no_grad():
            log_q = F.log_softmax(student_logits.float(), -1)
            entropy = -(log_q.exp() * log_q).sum()
        num_tokens = completion_mask.sum()
        scale = denominator if denominator is not None else num_tokens.clamp(min=1)
        return total / scale, total.detach(), entropy, num_tokens
