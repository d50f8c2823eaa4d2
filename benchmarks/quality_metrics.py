"""The quality benchmark's per-prompt metrics: generation scored against the references (ROUGE-L, exact match,
validity, stop rate) and, on text, the student's cross-entropy and its divergences from the teacher."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch


if TYPE_CHECKING:
    from quality_settings import Example, Task


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, sample: bool, seed: int) -> tuple:
    """Completions (text, and whether each ended with EOS) for the prompts, in batches."""
    texts, stopped = [], []
    for start in range(0, len(prompts), 64):
        batch = tokenizer(prompts[start : start + 64], return_tensors="pt", padding=True, add_special_tokens=False)
        torch.manual_seed(seed + start)
        sampling = {"do_sample": False}
        if sample:
            sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
        out = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **sampling,
        )
        for row in out[:, batch["input_ids"].shape[1] :].tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            stopped.append(ended)
    return texts, stopped


def rouge_scores(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


@torch.no_grad()
def text_metrics(student, teacher, tokenizer, examples: list[Example], seed: int) -> dict[str, list[float]]:
    """Per passage: the student's cross-entropy on the real continuation, forward and reverse KL to the teacher
    there, the teacher's NLL of the student's sampled continuation and its distinct-2."""
    out = {k: [] for k in ("ce", "fkl", "rkl", "teacher_nll", "distinct_2")}
    samples, _ = generate(student, tokenizer, [e.prompt for e in examples], 64, sample=True, seed=seed)
    for e, sample in zip(examples, samples):
        prompt = tokenizer(e.prompt, add_special_tokens=False)["input_ids"]
        for continuation, kind in ((e.reference, "real"), (sample, "sample")):
            cont = tokenizer(continuation, add_special_tokens=False)["input_ids"][:64] or [tokenizer.eos_token_id]
            ids = torch.tensor([prompt + cont])
            targets = ids[0, len(prompt) :]
            # from the end: a prompt-tuned teacher (PromptKD's, through PEFT) returns logits for its virtual tokens too
            log_p = teacher(ids).logits[0, -len(targets) - 1 : -1].float().log_softmax(-1)
            if kind == "sample":
                out["teacher_nll"].append(-log_p.gather(-1, targets[:, None]).mean().item())
                bigrams = list(zip(cont, cont[1:]))
                out["distinct_2"].append(len(set(bigrams)) / max(len(bigrams), 1))
                continue
            log_q = student(ids).logits[0, -len(targets) - 1 : -1].float().log_softmax(-1)
            out["ce"].append(-log_q.gather(-1, targets[:, None]).mean().item())
            out["fkl"].append((log_p.exp() * (log_p - log_q)).sum(-1).mean().item())
            out["rkl"].append((log_q.exp() * (log_q - log_p)).sum(-1).mean().item())
    return out


def evaluate(task: Task, model, examples: list[Example], seed: int, quick_curve: bool = False) -> dict[str, list]:
    """Per-prompt scores of ``model`` on ``examples`` (``quick_curve``: the primary metric only)."""
    setting, tokenizer = task.setting, task.tokenizer
    if setting.name == "text":
        return text_metrics(model, task.teacher, tokenizer, examples, seed)
    prompts = [e.prompt for e in examples]
    greedy, stopped = generate(model, tokenizer, prompts, setting.max_new_tokens, sample=False, seed=seed)
    if setting.name == "multi":
        scores = {"validity": [100.0 * e.valid(t) for e, t in zip(examples, greedy)]}
        if quick_curve:
            return scores
        sampled, _ = generate(model, tokenizer, prompts, setting.max_new_tokens, sample=True, seed=seed)
        scores["validity_sampled"] = [100.0 * e.valid(t) for e, t in zip(examples, sampled)]
        # different valid answers over 4 samples of the same prompt: does the student keep the teacher's spread?
        spread = [set() for _ in examples]
        for k in range(4):
            more, _ = generate(model, tokenizer, prompts, setting.max_new_tokens, sample=True, seed=seed + 1000 * k)
            for s, e, t in zip(spread, examples, more):
                if e.valid(t):
                    s.add(t)
        scores["distinct_answers"] = [float(len(s)) for s in spread]
        scores["stop_rate"] = [100.0 * s for s in stopped]
        return scores
    references = [e.reference for e in examples]
    scores = {"rouge_l": rouge_scores(greedy, references)}
    if quick_curve:
        return scores
    scores["exact_match"] = [100.0 * (t == r) for t, r in zip(greedy, references)]
    scores["stop_rate"] = [100.0 * s for s in stopped]
    sampled, _ = generate(model, tokenizer, prompts, setting.max_new_tokens, sample=True, seed=seed)
    scores["rouge_l_sampled"] = rouge_scores(sampled, references)
    scores["reference_tokens"] = [float(len(tokenizer(r, add_special_tokens=False)["input_ids"])) for r in references]
    return scores


def summary(scores: dict[str, list]) -> dict[str, float]:
    return {k: float(np.mean(v)) for k, v in scores.items() if k != "reference_tokens"}
