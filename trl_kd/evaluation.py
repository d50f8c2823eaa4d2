"""Evaluation by generation: ROUGE-L (as the SWITCH, PromptKD and SKD papers report it), exact match, and how often
the teacher's and the student's most likely next tokens agree on the student's own outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback


def teacher_tokens_by_position(
    completion_mask: torch.Tensor, teacher_mask: torch.Tensor, buckets: int
) -> torch.Tensor:
    """`(2, buckets)`: per relative position bucket of the responses, the teacher's tokens (row 0) and all tokens
    (row 1). Bucket `b` of a response of length `L` holds its positions `t` with `floor(buckets * t / L) == b`."""
    mask = completion_mask.float()
    lengths = mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device)[None]
    bucket = torch.floor(positions * buckets / lengths).clamp(max=buckets - 1).long()
    one_hot = torch.nn.functional.one_hot(bucket, buckets).float() * mask[..., None]
    return torch.stack([(one_hot * teacher_mask.float()[..., None]).sum((0, 1)), one_hot.sum((0, 1))])


def teacher_fraction_by_position(
    accelerator, completion_mask: torch.Tensor, teacher_mask: torch.Tensor, buckets: int
) -> dict[str, float]:
    """`teacher_token_fraction/bucket_<b>_of_<n>` over every process's responses (a collective); empty buckets are
    left out."""
    sums = accelerator.reduce(teacher_tokens_by_position(completion_mask, teacher_mask, buckets), "sum")
    return {
        f"teacher_token_fraction/bucket_{b + 1}_of_{buckets}": teacher / total
        for b, (teacher, total) in enumerate(sums.cpu().T.tolist())
        if total > 0
    }


def teacher_token_metrics(
    accelerator, completion_mask: torch.Tensor, teacher_mask: torch.Tensor, buckets: int = 0
) -> dict[str, float]:
    """`teacher_token_fraction` over every process's responses and, with `buckets`, its value by position (see
    `teacher_fraction_by_position`). A collective."""
    teacher_tokens = accelerator.gather(teacher_mask.sum()).sum()
    total_tokens = accelerator.gather(completion_mask.sum()).sum()
    metrics = {"teacher_token_fraction": (teacher_tokens / total_tokens.clamp(min=1)).item()}
    if buckets:
        metrics.update(teacher_fraction_by_position(accelerator, completion_mask, teacher_mask, buckets))
    return metrics


def rollout_metrics(accelerator, num_on_policy: int, num_rows: int, counts: dict[str, int]) -> dict[str, float]:
    """`on_policy_fraction`, the sampler's counters as `rollout/<key>` and `acceptance_rate` (when it drafted), summed
    over processes (a collective: every process passes the same keys, with zeros where it had no on-policy row)."""
    keys = sorted(counts)
    local = torch.tensor([num_on_policy, num_rows, *(counts.get(k, 0) for k in keys)], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), "sum").cpu()
    summed = dict(zip(keys, total[2:].tolist()))
    metrics = {"on_policy_fraction": (total[0] / total[1]).item()}
    metrics.update({f"rollout/{key}": value for key, value in summed.items()})
    if summed.get("drafted"):
        metrics["acceptance_rate"] = summed["accepted"] / summed["drafted"]
    return metrics


def rouge_l(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Mean ROUGE-L F1 x 100 with stemming (the `rouge-score` package, as in MiniLLM/DistiLLM/SWITCH/PromptKD)."""
    try:
        from rouge_score import rouge_scorer
    except ImportError as error:
        raise ImportError("ROUGE-L needs the `rouge-score` package: pip install 'trl-kd[eval]'.") from error
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    scores = [scorer.score(ref, pred)["rougeL"].fmeasure for pred, ref in zip(predictions, references)]
    return 100.0 * sum(scores) / max(len(scores), 1)


@torch.no_grad()
def generation_metrics(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[list[int]],
    references: Sequence[str],
    max_new_tokens: int,
    batch_size: int = 16,
) -> dict[str, float]:
    """Greedy completions of the student for `prompts` (token ids), scored against `references`.

    Returns `rouge_l`, `exact_match` (stripped strings equal) and, with a teacher, `top1_agreement`: the fraction of
    the student's completion positions where teacher and student rank the same next token first.
    """
    was_training = student.training
    student.eval()
    device = next(student.parameters()).device
    predictions, agree, total = [], 0, 0
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(p)) + list(p) for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        out = student.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        completion = out[:, width:]
        predictions += tokenizer.batch_decode(completion, skip_special_tokens=True)
        if teacher is not None and completion.shape[1] > 0:
            full_mask = torch.cat([mask, (completion != tokenizer.pad_token_id).long()], dim=1)
            positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
            vocab = len(tokenizer)
            logits = [
                m(input_ids=out, attention_mask=full_mask, position_ids=positions).logits[:, width - 1 : -1, :vocab]
                for m in (student, teacher)
            ]
            valid = full_mask[:, width:].bool()
            agree += ((logits[0].argmax(-1) == logits[1].argmax(-1)) & valid).sum().item()
            total += valid.sum().item()
    student.train(was_training)
    metrics = {
        "rouge_l": rouge_l(predictions, references),
        "exact_match": sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / max(len(references), 1),
    }
    if teacher is not None:
        metrics["top1_agreement"] = agree / max(total, 1)
    return metrics


class GenerationEvalCallback(TrainerCallback):
    """Logs `eval_rouge_l`, `eval_exact_match` and `eval_top1_agreement` of a trl-kd trainer's student before
    training (with a `_before` suffix, and the teacher's `eval_teacher_rouge_l`), whenever the trainer evaluates, and
    at the end of training.

    The metrics are also added to what `trainer.evaluate()` returns, so `metric_for_best_model="rouge_l"` with
    `load_best_model_at_end=True` keeps the checkpoint with the best ROUGE-L.

    Args:
        trainer: the trainer (its student, teacher and tokenizer are used).
        prompts: prompt token ids (chat template applied), one list per example.
        references: the expected completions.
    """

    def __init__(self, trainer: Trainer, prompts: Sequence[list[int]], references: Sequence[str], max_new_tokens: int):
        self.trainer, self.prompts, self.references, self.max_new_tokens = trainer, prompts, references, max_new_tokens

    def evaluate(self) -> dict[str, float]:
        trainer = self.trainer
        student = trainer.accelerator.unwrap_model(trainer.model)
        teacher = None if trainer.teacher_model is None else trainer.accelerator.unwrap_model(trainer.teacher_model)
        metrics = generation_metrics(
            student, teacher, trainer.processing_class, self.prompts, self.references, self.max_new_tokens
        )
        return {f"eval_{k}": v for k, v in metrics.items()}

    # every process evaluates (identical greedy work), so ZeRO-3 parameter gathers stay aligned
    def on_train_begin(self, args, state, control, **kwargs):
        before = {f"{k}_before": v for k, v in self.evaluate().items()}
        trainer = self.trainer
        if trainer.teacher_model is None:  # trained from an offline teacher cache: no teacher to score
            trainer.log(before)
            return
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
        # the teacher's own score: the ceiling the student is distilled toward
        ceiling = generation_metrics(
            teacher, None, trainer.processing_class, self.prompts, self.references, self.max_new_tokens
        )
        trainer.log({**before, "eval_teacher_rouge_l": ceiling["rouge_l"]})

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        results = self.evaluate()
        if metrics is not None:  # the dict `Trainer.evaluate` returns: `metric_for_best_model="rouge_l"` sees them
            metrics.update(results)
        self.trainer.log(results)

    def on_train_end(self, args, state, control, **kwargs):
        self.trainer.log(self.evaluate())
