"""Does distilling across tokenizers make a better student than SFT on the same teacher's answers?

    python benchmarks/real_model.py prepare --cross-teacher     # once: Gemma 3 270M, the SmolLM2 students, prompts
    python benchmarks/cross_tokenizer_quality.py                 # teacher answers, runs, report (resumable)
    python benchmarks/cross_tokenizer_quality.py --quick         # the harness end to end in a few minutes
    python benchmarks/cross_tokenizer_quality.py --report        # the tables from the records alone

Teacher: Gemma 3 270M (a base model; vocabulary 262,144). Student: the 8-layer pruned SmolLM2 of the real-model
benchmark (`pruned-8`; vocabulary 49,152; another tokenizer). Prompts: that benchmark's ShareGPT first turns as plain
text (``Question: ...\\nAnswer:``; the GGUF carries no chat template); the teacher's greedy answers to them are the
training rows and the held-out references, cached in ``answers/cross-<split>-greedy.jsonl``.

Two methods on the same rows, budget and learning rate, each with ``--seeds`` seeds (the rows' order and the
initialisation of the run follow the seed):

* SFT on the teacher's answers: cross-entropy on the student's tokens of each answer (sequence-level KD);
* cross-tokenizer supervised KD: `KDTrainer(cross_tokenizer=True, lmbda=0, beta=0)`, forward KL over the two
  vocabularies' shared tokens plus ULD for the rest (GOLD's weights), on the aligned spans of the same answers.

The student's target is the same in both: the first ``max_new_tokens`` student tokens of the teacher's answer (the
answers run past the budget, so an unfinished answer gets no EOS). Metrics per held-out prompt, in nats per character
so that the two tokenizers compare: ``student_nll`` (the student's NLL of the teacher's answer: primary),
``teacher_nll_greedy`` (the teacher's NLL of the student's greedy answer), ``distinct_2`` of the greedy answer in the
student's tokens (degeneration), ``rouge_l`` against the teacher's answer. The untrained student and the teacher are
reference rows; a difference gets a paired bootstrap interval over prompts and seeds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_kd import KDConfig, KDTrainer  # noqa: E402
from trl_kd._compat import checkpointing_field  # noqa: E402
from trl_kd.data import completion_token_ids  # noqa: E402
from trl_kd.scripts.default import cache_base  # noqa: E402

from quality_records import git_commit, load_records, record_path, run_once  # noqa: E402
from quality_stats import mean_and_interval, paired_bootstrap  # noqa: E402
from real_model import answer_token_nll, distinct, generate, log, rouge_l  # noqa: E402
from training import sft_step  # noqa: E402


PROMPT = "Question: {}\nAnswer:"
STUDENT = "pruned-8"
SFT = "SFT on the teacher's answers"
CROSS_KD = "Cross-tokenizer supervised KD (lmbda 0, FKL)"
METHODS = (SFT, CROSS_KD)
TEACHER, BEFORE = "Teacher (Gemma 3 270M)", "Student before distillation"
LOWER_IS_BETTER = {"student_nll": True, "teacher_nll_greedy": True, "distinct_2": False, "rouge_l": False}


@dataclass(frozen=True)
class Budget:
    steps: int = 40
    batch: int = 4
    max_new_tokens: int = 64  # student tokens of each answer
    teacher_tokens: int = 96  # the teacher's answers run this long, past the student's budget
    train_prompts: int = 160
    test_prompts: int = 128


QUICK = Budget(steps=2, batch=2, max_new_tokens=8, teacher_tokens=16, train_prompts=4, test_prompts=4)


class Pair:
    """The teacher, the base student, their tokenizers, and the prompts with the teacher's answers."""

    def __init__(self, root: Path, budget: Budget):
        folders = {"teacher": root / "cross-teacher", "student": root / "students" / STUDENT}
        missing = [str(f) for f in folders.values() if not (f / "config.json").exists()]
        if missing:
            raise SystemExit(f"missing {missing}: run `python benchmarks/real_model.py prepare --cross-teacher` first")
        self.root, self.budget, self.student_dir = root, budget, folders["student"]
        self.teacher = AutoModelForCausalLM.from_pretrained(folders["teacher"], dtype=torch.float32).eval()
        self.student = AutoModelForCausalLM.from_pretrained(folders["student"], dtype=torch.float32).eval()
        self.teacher_tok = AutoTokenizer.from_pretrained(folders["teacher"], padding_side="left")
        self.student_tok = AutoTokenizer.from_pretrained(folders["student"], padding_side="left")
        splits = json.loads((root / "prompts.json").read_text())
        self.rows = {
            split: self._rows(split, splits[split][:n])
            for split, n in (("train", budget.train_prompts), ("test", budget.test_prompts))
        }

    def _rows(self, split: str, questions: list[str]) -> list[dict]:
        """Per prompt: the text prompt, the teacher's whole answer (the dataset completion), the student's target ids
        (cut to the budget) and their text."""
        prompts = [PROMPT.format(q) for q in questions]
        answers = self._teacher_answers(split, prompts)
        eos = self.student_tok.eos_token_id
        rows = []
        for prompt, answer in zip(prompts, answers):
            prompt_ids = self.student_tok(prompt)["input_ids"]
            target = completion_token_ids(
                self.student_tok, prompt, prompt_ids, answer, [eos], self.budget.max_new_tokens
            )
            text = self.student_tok.decode(target[:-1] if target[-1] == eos else target)
            rows.append(
                {"prompt": prompt, "completion": answer, "prompt_ids": prompt_ids, "target": target, "text": text}
            )
        return rows

    def _teacher_answers(self, split: str, prompts: list[str]) -> list[str]:
        """The teacher's greedy answers (text), cached line by line so that a killed run resumes at the next batch."""
        path = self.root / "answers" / f"cross-{split}-greedy.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        cached = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                if row["tokens"] >= self.budget.teacher_tokens:
                    cached[row["prompt"]] = row["text"]
        todo = [p for p in prompts if p not in cached]
        with open(path, "a") as f:
            for start in range(0, len(todo), 16):
                chunk = todo[start : start + 16]
                ids, _ = generate(
                    self.teacher, self.teacher_tok, chunk, self.budget.teacher_tokens, sample=False, seed=0,
                    batch=16, add_special_tokens=True,
                )  # fmt: skip
                for prompt, row in zip(chunk, ids):
                    cached[prompt] = self.teacher_tok.decode(row, skip_special_tokens=True)
                    f.write(
                        json.dumps({"prompt": prompt, "text": cached[prompt], "tokens": self.budget.teacher_tokens})
                    )
                    f.write("\n")
                f.flush()
                log(f"teacher answers ({split}): {min(start + 16, len(todo))}/{len(todo)}")
        return [cached[p] for p in prompts]

    def train_rows(self, seed: int) -> list[dict]:
        pool = list(self.rows["train"])
        random.Random(seed).shuffle(pool)
        return [pool[i % len(pool)] for i in range(self.budget.steps * self.budget.batch)]


# ---------------------------------------------------------------------------------------------------------- metrics
def per_char_nll(model, tokenizer, prompts: list[str], texts: list[str], ended: list[bool], bos: bool) -> list[float]:
    """Each answer's NLL under ``model`` (its own tokens, EOS included when the answer ended) over its characters."""
    eos = tokenizer.eos_token_id
    prompt_ids = [tokenizer(p, add_special_tokens=bos)["input_ids"] for p in prompts]
    answers = [
        tokenizer(t, add_special_tokens=False)["input_ids"] + ([eos] if e else []) for t, e in zip(texts, ended)
    ]
    nll = answer_token_nll(model, prompt_ids, [a or [eos] for a in answers], tokenizer.pad_token_id)
    return [float(np.sum(n)) / max(1, len(t)) for n, t in zip(nll, texts)]


def score(pair: Pair, model) -> dict[str, list[float]]:
    rows = pair.rows["test"]
    prompts = [r["prompt"] for r in rows]
    pad = pair.student_tok.pad_token_id
    target_nll = answer_token_nll(model, [r["prompt_ids"] for r in rows], [r["target"] for r in rows], pad)
    greedy, stopped = generate(model, pair.student_tok, prompts, pair.budget.max_new_tokens, sample=False, seed=0)
    texts = [pair.student_tok.decode(g[:-1] if s else g) for g, s in zip(greedy, stopped)]
    return {
        "student_nll": [float(np.sum(n)) / max(1, len(r["text"])) for n, r in zip(target_nll, rows)],
        "teacher_nll_greedy": per_char_nll(pair.teacher, pair.teacher_tok, prompts, texts, stopped, bos=True),
        "distinct_2": [distinct(g[:-1] if s else g, 2) for g, s in zip(greedy, stopped)],
        "rouge_l": rouge_l([t.strip() for t in texts], [r["text"].strip() for r in rows]),
    }


def teacher_scores(pair: Pair) -> dict[str, list[float]]:
    """The teacher's row: its NLL of its own (cut) answers, whose greedy answers they are."""
    rows = pair.rows["test"]
    ended = [r["target"][-1] == pair.student_tok.eos_token_id for r in rows]
    prompts, texts = [r["prompt"] for r in rows], [r["text"] for r in rows]
    own = per_char_nll(pair.teacher, pair.teacher_tok, prompts, texts, ended, bos=True)
    return {
        "student_nll": own,
        "teacher_nll_greedy": own,
        "distinct_2": [distinct(r["target"][:-1] if e else r["target"], 2) for r, e in zip(rows, ended)],
        "rouge_l": [100.0] * len(rows),
    }


# --------------------------------------------------------------------------------------------------------- training
def train(pair: Pair, method: str, lr: float, seed: int) -> tuple:
    """A copy of the base student trained with ``method``; returns it and the cost of its training."""
    budget, student, rows = pair.budget, copy.deepcopy(pair.student), pair.train_rows(seed)
    if method == SFT:
        torch.manual_seed(seed)
        optimizer = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=0.0)
        student.train()
        start = time.perf_counter()
        for step in range(budget.steps):
            chunk = rows[step * budget.batch : (step + 1) * budget.batch]
            prompts, targets = [r["prompt_ids"] for r in chunk], [r["target"] for r in chunk]
            sft_step(student, optimizer, prompts, targets, pair.student_tok.pad_token_id)
    else:
        config = KDConfig(
            output_dir=str(pair.root / "runs"),
            cross_tokenizer=True,
            lmbda=0.0,
            beta=0.0,
            per_device_train_batch_size=budget.batch,
            max_steps=budget.steps,
            learning_rate=lr,
            lr_scheduler_type="constant",
            warmup_steps=0,
            max_completion_length=budget.max_new_tokens,
            report_to="none",
            bf16=False,
            use_cpu=not torch.cuda.is_available(),
            save_strategy="no",
            logging_steps=1,
            disable_tqdm=True,
            seed=seed,
            **{checkpointing_field(): False},
        )
        trainer = KDTrainer(
            model=student,
            teacher_model=copy.deepcopy(pair.teacher),
            args=config,
            train_dataset=Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]),
            processing_class=pair.student_tok,
            teacher_processing_class=pair.teacher_tok,
        )
        trainer.remove_callback(PrinterCallback)
        start = time.perf_counter()
        trainer.train()
        student = trainer.accelerator.unwrap_model(trainer.model)
    seconds = time.perf_counter() - start
    return student.eval(), {"train_seconds": seconds, "seconds_per_step": seconds / budget.steps}


def run(args, pair: Pair) -> None:
    root = Path(args.records)
    common = {"budget": asdict(pair.budget), "git_commit": git_commit(), "threads": torch.get_num_threads()}
    for name, scorer in ((TEACHER, lambda: teacher_scores(pair)), (BEFORE, lambda: score(pair, pair.student))):
        path = record_path(root, "gemma-to-smollm2", name, 0, 0.0, "reference")
        run_once(path, lambda n=name, s=scorer: record(n, 0.0, -1, "reference", s(), {}, common))
    for lr in args.lrs:
        for seed in range(args.seeds):
            for method in METHODS:
                path = record_path(root, "gemma-to-smollm2", method, seed, lr, "final", pair.budget.steps)

                def job(method=method, lr=lr, seed=seed):
                    student, cost = train(pair, method, lr, seed)
                    rec = record(method, lr, seed, "final", score(pair, student), cost, common)
                    log(
                        f"{method} lr {lr:g} seed {seed}: "
                        + ", ".join(f"{k} {v:.3f}" for k, v in rec["metrics"].items())
                    )
                    return rec

                run_once(path, job)


def record(method: str, lr: float, seed: int, phase: str, scores: dict, cost: dict, common: dict) -> dict:
    return {
        "method": method,
        "phase": phase,
        "seed": seed,
        "lr": lr,
        "metrics": {k: float(np.nanmean(v)) for k, v in scores.items()},
        "per_prompt": scores,
        "cost": cost,
        **common,
    }


# ---------------------------------------------------------------------------------------------------------- report
def report(records_root: str) -> str:
    records = load_records(records_root, "gemma-to-smollm2")
    if not records:
        return f"no records under {records_root}"
    refs = {r["method"]: r for r in records if r["phase"] == "reference"}
    by_rate: dict[float, dict[str, list[dict]]] = {}
    for r in records:
        if r["phase"] == "final":
            by_rate.setdefault(r["lr"], {}).setdefault(r["method"], []).append(r)
    budget = records[0]["budget"]
    lines = [
        "Gemma 3 270M into `pruned-8` (SmolLM2 tokenizer); budget: "
        + ", ".join(f"{k} {v}" for k, v in budget.items()),
        "",
        "| method | lr | seeds | " + " | ".join(LOWER_IS_BETTER) + " | s/step |",
        "|" + " --- |" * (len(LOWER_IS_BETTER) + 4),
    ]
    for name in (BEFORE, TEACHER):
        if name in refs:
            cells = [f"{refs[name]['metrics'][k]:.3g}" for k in LOWER_IS_BETTER]
            lines.append(f"| {name} | – | – | " + " | ".join(cells) + " | – |")
    for lr, methods in sorted(by_rate.items()):
        for name in METHODS:
            runs = sorted(methods.get(name, []), key=lambda r: r["seed"])
            if not runs:
                continue
            cells = []
            for k in LOWER_IS_BETTER:
                i = mean_and_interval(np.array([r["per_prompt"][k] for r in runs]))
                cells.append(f"{i.mean:.3g} [{i.low:.3g}, {i.high:.3g}]")
            step = np.mean([r["cost"]["seconds_per_step"] for r in runs])
            lines.append(f"| {name} | {lr:g} | {len(runs)} | " + " | ".join(cells) + f" | {step:.1f} |")
    lines += [
        "",
        "Cross-tokenizer KD minus SFT (positive: KD better), paired over prompts and the seeds both have:",
        "",
    ]
    lines += ["| lr | seeds | " + " | ".join(LOWER_IS_BETTER) + " |", "|" + " --- |" * (len(LOWER_IS_BETTER) + 2)]
    for lr, methods in sorted(by_rate.items()):
        kd = {r["seed"]: r for r in methods.get(CROSS_KD, [])}
        sft = {r["seed"]: r for r in methods.get(SFT, [])}
        seeds = sorted(kd.keys() & sft.keys())
        if not seeds:
            continue
        cells = []
        for k, lower in LOWER_IS_BETTER.items():
            sign = -1.0 if lower else 1.0
            a = sign * np.array([kd[s]["per_prompt"][k] for s in seeds])
            b = sign * np.array([sft[s]["per_prompt"][k] for s in seeds])
            i = paired_bootstrap(a, b)
            cells.append(f"{i} ({i.verdict()})")
        lines.append(f"| {lr:g} | {len(seeds)} | " + " | ".join(cells) + " |")
    if BEFORE in refs and TEACHER in refs:
        before, teacher = refs[BEFORE]["metrics"]["student_nll"], refs[TEACHER]["metrics"]["student_nll"]
        lines += ["", f"Gap in student_nll: {before:.3f} (student before) to {teacher:.3f} (teacher), closed by:", ""]
        for lr, methods in sorted(by_rate.items()):
            for name in METHODS:
                if methods.get(name):
                    mean = np.mean([r["metrics"]["student_nll"] for r in methods[name]])
                    lines.append(f"- {name}, lr {lr:g}: {100 * (before - mean) / (before - teacher):.0f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="the real-model cache folder (default: <trl-kd cache>/real-v1)")
    parser.add_argument("--records", default="benchmarks/records/cross-tokenizer")
    parser.add_argument("--lrs", default="5e-4", help="comma-separated learning rates; every method runs at each")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="a few minutes: tiny budget, 2 seeds")
    parser.add_argument("--report", action="store_true", help="only print the tables from the records")
    args = parser.parse_args(argv)
    if args.quick:  # its records stay out of the committed ones
        args.records, args.seeds = args.records.rstrip("/") + "-quick", 2
    if not args.report:
        torch.set_num_threads(args.threads)
        args.lrs = [float(x) for x in args.lrs.split(",")]
        root = Path(args.root) if args.root else Path(cache_base()) / "real-v1"
        run(args, Pair(root, QUICK if args.quick else Budget()))
    print(report(args.records), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
