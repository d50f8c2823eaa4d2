"""Batching and one SFT step, shared by the benchmarks' own training loops (the quality and real-model benchmarks)."""

from __future__ import annotations

import torch


def left_padded(rows: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask, position_ids)`` of token-id rows padded on the left, positions counted from each
    row's first real token."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def sft_step(model, optimizer, prompts: list[list[int]], answers: list[list[int]], pad: int) -> None:
    """One optimizer step of cross-entropy on ``answers`` after ``prompts`` (token ids), gradients clipped at 1.0."""
    ids, mask, positions = left_padded([p + a for p, a in zip(prompts, answers)], pad)
    labels, _, _ = left_padded([[-100] * len(p) + a for p, a in zip(prompts, answers)], -100)
    loss = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
