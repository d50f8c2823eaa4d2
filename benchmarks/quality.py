"""Does each method make a better student? Every trainer on the same budget, in settings where distillation works.

    python benchmarks/quality.py --quick                                   # a few minutes: the harness end to end
    python benchmarks/quality.py --settings exact                          # one setting (each fits in a session)
    python benchmarks/quality.py --settings text --text-file ../shared/data/tinyshakespeare.txt
    python benchmarks/quality.py --report                                  # tables and plots from the records only

Settings (each has its own teacher, trained here and cached under the trl-kd cache folder, keyed by its recipe):

* ``exact``: `trl_kd.testing`'s synthetic instructions with exact answers (reverse, sort, copy, count; 2-6 items).
* ``multi``: "pick two of these items": many correct answers, and the reference is one of them at random, so the
  teacher's distribution carries more than the reference. Scored by validity, not by overlap with the reference.
* ``long``: copy, reverse or sort 64-72 letters: answers of 64 tokens and more, for SWITCH's length claim, scored by
  response-length bucket too.
* ``text``: continuation of real text that no one here wrote (``--text-file``, e.g. Shakespeare): a teacher
  pre-trained on the file, a 4-8x smaller student; prompts are passages, completions the next 64 tokens. Metrics: the
  student's cross-entropy on held-out text, forward and reverse KL to the teacher there, the teacher's NLL of the
  student's samples and distinct-2 of those samples (collapse shows as a low distinct-2).

Every setting starts each method from the same student, SFT'd to at most about half the teacher's score, and also
reports how far a long SFT run of that student gets (its capacity). Each method's learning rate is picked from a small
grid on a validation split (``--grid-seeds`` seeds per rate, the best mean), then the method runs ``--seeds`` seeds at
that rate and is scored on held-out test prompts. Every run writes a JSON record (``--records``); finished runs are
skipped when the script is started again, and ``--report`` rebuilds the tables, the paired-bootstrap intervals (over
prompts and seeds, against SFT and against on-policy GKD) and the learning-curve plots from the records alone. PromptKD
also gets a diagnostic run that scores its prompted teacher; ``DIAGNOSTIC_METHODS`` run only when named with
``--methods``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

import trl_kd  # noqa: E402
from trl_kd import PromptKDTrainer, get_method  # noqa: E402
from trl_kd._compat import checkpointing_field  # noqa: E402
from trl_kd.scripts.default import cache_base  # noqa: E402
from trl_kd.teacher_cache import cache_teacher  # noqa: E402
from trl_kd.testing import CHAT_TEMPLATE, EOS, PAD, build_tokenizer, make_task  # noqa: E402

from plotting import pyplot  # noqa: E402
from quality_records import foreign_records, git_commit, load_records, record_path, run_once, slug  # noqa: E402
from quality_stats import choose_rate, mean_and_interval, paired_bootstrap  # noqa: E402
from training import sft_step  # noqa: E402


RECIPE_VERSION = "v2"
BATCH = 8


def method(name: str, overrides: dict) -> tuple:
    """`(trainer, config, overrides)` of a method registered with `trl_kd.register_method`."""
    registered = get_method(name)
    return registered.trainer, registered.config, overrides


# name -> (trainer, config, overrides); None = plain SFT on the references
METHODS: dict[str, tuple | None] = {
    "SFT on references": None,
    "Supervised KD (lmbda 0, FKL)": method("gkd", {"lmbda": 0.0, "beta": 0.0}),
    "SeqKD (teacher samples, FKL)": method("gkd", {"lmbda": 0.0, "seq_kd": True, "beta": 0.0}),
    "GKD on-policy (lmbda 1, JSD 0.5)": method("gkd", {"lmbda": 1.0, "beta": 0.5}),
    "GKD mixed (lmbda 0.5, JSD 0.1)": method("gkd", {"lmbda": 0.5, "beta": 0.1}),
    "On-policy reverse KL (lmbda 1, beta 1)": method("gkd", {"lmbda": 1.0, "beta": 1.0}),
    "SKD (K=25, FKL)": method("skd", {}),
    "SWITCH (target 50% teacher tokens, held)": method("switch", {"target_teacher_fraction": 0.5}),
    "PromptKD (paper init text)": method("promptkd", {}),
    "PromptKD (in-distribution init)": method("promptkd", {"prompt_init_text": None}),
}
# run only when named with --methods, to diagnose a result (e.g. SKD when the teacher accepts every student token)
DIAGNOSTIC_METHODS: dict[str, tuple] = {
    "On-policy FKL (lmbda 1, beta 0)": method("gkd", {"lmbda": 1.0, "beta": 0.0}),
    "SKD (K=3, FKL)": method("skd", {"acceptance_top_k": 3}),
    # SKD drafts at the paper's temperature 0.5 / top-p 0.5: on open-ended text, is that what hurts?
    "SKD (K=25, FKL, drafts at temperature 1)": method("skd", {"temperature": 1.0, "top_p": 1.0}),
    # SWITCH's exp schedule hands the late tokens (the end of the answer) to the teacher: is that why its students
    # stop less often on long answers?
    "SWITCH (constant threshold, target 50%, held)": method(
        "switch", {"target_teacher_fraction": 0.5, "switch_schedule": "constant"}
    ),
    # SWITCH sits between supervised KD (teacher-written prefixes) and on-policy GKD (the student's own): does its
    # score follow the share of tokens the teacher writes?
    "SWITCH (target 25% teacher tokens, held)": method("switch", {"target_teacher_fraction": 0.25}),
    "SWITCH (target 75% teacher tokens, held)": method("switch", {"target_teacher_fraction": 0.75}),
    # supervised KD from an offline top-k cache of the teacher (trl-kd cache-teacher), no teacher in training: how
    # much does k cost against the live teacher?
    "Supervised KD from a top-8 teacher cache (FKL)": method("gkd", {"lmbda": 0.0, "beta": 0.0, "cache_k": 8}),
    "Supervised KD from a top-64 teacher cache (FKL)": method("gkd", {"lmbda": 0.0, "beta": 0.0, "cache_k": 64}),
}
# a method registered with `trl_kd.register_method` that no row above runs gets a row at its defaults, so a new
# method is benchmarked without an edit here
_LISTED = {spec[0] for spec in {**METHODS, **DIAGNOSTIC_METHODS}.values() if spec is not None}
METHODS.update(
    {f"{m.title} (defaults)": method(m.name, {}) for m in trl_kd.METHODS.values() if m.trainer not in _LISTED}
)
ALL_METHODS = {**METHODS, **DIAGNOSTIC_METHODS}
SFT_BASELINE, GKD_BASELINE = "SFT on references", "GKD on-policy (lmbda 1, JSD 0.5)"
# the papers' claims, as (claim, method, baseline) comparisons of the primary metric
CLAIMS = [
    ("SKD beats supervised KD (SKD paper)", "SKD (K=25, FKL)", "Supervised KD (lmbda 0, FKL)"),
    ("SKD beats on-policy KD (SKD paper)", "SKD (K=25, FKL)", GKD_BASELINE),
    (
        "PromptKD beats on-policy reverse KL (PromptKD paper)",
        "PromptKD (paper init text)",
        "On-policy reverse KL (lmbda 1, beta 1)",
    ),
    (
        "... with an in-distribution prompt init",
        "PromptKD (in-distribution init)",
        "On-policy reverse KL (lmbda 1, beta 1)",
    ),
    ("On-policy GKD beats supervised KD (GKD paper)", GKD_BASELINE, "Supervised KD (lmbda 0, FKL)"),
    (
        "SWITCH beats on-policy GKD (SWITCH paper; its length claim needs the long setting)",
        "SWITCH (target 50% teacher tokens, held)",
        GKD_BASELINE,
    ),
]
QUICK_METHODS = (
    "SFT on references",
    "Supervised KD (lmbda 0, FKL)",
    GKD_BASELINE,
    "SKD (K=25, FKL)",
    "SWITCH (target 50% teacher tokens, held)",
    "PromptKD (paper init text)",
)


# ------------------------------------------------------------------------------------------------------ the settings
@dataclass
class Example:
    prompt: str  # the text the model continues (chat-formatted for the instruction settings)
    reference: str  # one reference completion (what SFT trains on)
    valid: Callable[[str], bool] | None = None  # for tasks with several correct answers


@dataclass
class Setting:
    """A task: how to make examples, the models' sizes, the budgets, the metrics."""

    name: str
    describe: str
    make: Callable[[random.Random], tuple[str, str, Callable[[str], bool] | None]]
    max_new_tokens: int
    primary: str  # the metric the learning rate is chosen on and the claims are judged by
    higher_is_better: dict[str, bool]
    teacher_steps: int = 1500
    student_steps: int = 100
    steps: int = 300
    student_size: tuple[int, int, int] = (32, 2, 64)  # hidden, layers, intermediate
    capacity_steps: int = 2000  # the long SFT run that shows how far the student can go
    capacity_batch: int = BATCH
    batch: int = BATCH  # of every method's runs
    schedule: str = "constant"  # of every method's runs: "constant" or "linear" (decay to 0)
    teacher_size: tuple[int, int, int] = (64, 3, 128)
    text_file: str | None = None
    # the claims judged again on this metric (e.g. the quality of the student's own samples, which is what the
    # on-policy methods claim to improve, beside the primary metric's cross-entropy on reference text)
    generation_metric: str | None = None
    # the methods a plain run trains here (None: all of METHODS)
    methods: tuple[str, ...] | None = None


def _letters(rng: random.Random, n: int) -> list[str]:
    return [rng.choice("abcdefghijklmnop") for _ in range(n)]


def make_exact(rng):
    question, answer = make_task(rng, 2, 6)
    return question, answer, None


def make_multi(rng):
    items = sorted(set(_letters(rng, rng.randint(4, 6))))
    while len(items) < 3:
        items = sorted(set(items + _letters(rng, 1)))
    pick = sorted(rng.sample(items, 2))

    def valid(text: str, items=tuple(items)) -> bool:
        words = text.split()
        return len(words) == 2 and words[0] < words[1] and all(w in items for w in words)

    return f"pick two of: {' '.join(items)}", " ".join(pick), valid


def make_long(rng):
    task = rng.choice(("copy", "reverse", "sort"))
    items = _letters(rng, rng.randint(64, 72))
    answer = {"copy": items, "reverse": items[::-1], "sort": sorted(items)}[task]
    return f"{task}: {' '.join(items)}", " ".join(answer), None


# `long` is for SWITCH's length claim: its baselines and the other method whose teacher writes tokens of the
# response. Its runs cost 4-8x those of `exact`; the other claims are judged in the three other settings.
LONG_METHODS = (
    "SFT on references",
    "Supervised KD (lmbda 0, FKL)",
    GKD_BASELINE,
    "SWITCH (target 50% teacher tokens, held)",
    "SKD (K=25, FKL)",
)
GENERATION = {"rouge_l": True, "exact_match": True, "stop_rate": True, "rouge_l_sampled": True}
SETTINGS = {
    "exact": Setting(
        "exact",
        "exact answers, 2-6 items",
        make_exact,
        18,
        "rouge_l",
        GENERATION,
        student_steps=300,
        steps=400,
        capacity_steps=4000,
    ),
    "multi": Setting(
        "multi",
        "pick two of 3-6 items: several correct answers, noisy references",
        make_multi,
        8,
        "validity",
        {"validity": True, "validity_sampled": True, "distinct_answers": True, "stop_rate": True},
        student_steps=150,
        steps=400,
    ),
    "long": Setting(
        "long",
        "copy/reverse/sort 64-72 letters (answers of 64+ tokens)",
        make_long,
        80,
        "rouge_l",
        GENERATION,
        teacher_steps=2500,
        student_steps=200,
        steps=300,
        student_size=(64, 2, 128),
        teacher_size=(96, 3, 192),
        capacity_steps=3000,
        capacity_batch=32,
        batch=32,
        schedule="linear",
        methods=LONG_METHODS,
    ),
    "text": Setting(
        "text",
        "continuing real text (the next 64 tokens of a held-out passage)",
        None,
        64,
        "ce",
        {"ce": False, "fkl": False, "rkl": False, "teacher_nll": False, "distinct_2": True},
        teacher_steps=2000,
        student_steps=150,
        steps=300,
        student_size=(64, 2, 192),
        teacher_size=(128, 4, 384),
        generation_metric="teacher_nll",
    ),
}


# ------------------------------------------------------------------------------------------------ data and models
def cache_root() -> Path:
    return cache_base() / f"quality-{RECIPE_VERSION}"


def recipe_key(setting: Setting, *fields: str) -> str:
    """A hash of the setting's data (its name, and the text file's content) and of the named recipe fields, so a
    cached model is reused exactly when what made it is unchanged (a new student size keeps the teacher)."""
    recipe = {"name": setting.name, **{f: getattr(setting, f) for f in fields}}
    if setting.text_file:
        recipe["text_sha"] = hashlib.sha256(Path(setting.text_file).read_bytes()).hexdigest()[:16]
    return hashlib.sha256(json.dumps(recipe, sort_keys=True, default=str).encode()).hexdigest()[:12]


def text_tokenizer(text: str, path: Path) -> PreTrainedTokenizerFast:
    """A byte-level BPE (512 tokens) trained on the text, with the package's special tokens."""
    if (path / "tokenizer.json").exists():
        return PreTrainedTokenizerFast.from_pretrained(path)
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=[PAD, EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="left")
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    return tokenizer


def llama(tokenizer, size: tuple[int, int, int], seed: int, context: int = 320):
    hidden, layers, inter = size
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=inter,
        max_position_embeddings=context,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=True,
    )
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model


class Task:
    """A setting made concrete: its tokenizer, splits, cached teacher and base student."""

    def __init__(self, setting: Setting, n_test: int, n_val: int, log=print):
        self.setting, self.log = setting, log
        self.folder = cache_root() / f"{setting.name}-{recipe_key(setting)}"
        self.folder.mkdir(parents=True, exist_ok=True)
        if setting.name == "text":
            if not setting.text_file:
                raise SystemExit("The text setting needs --text-file (e.g. ../shared/data/tinyshakespeare.txt).")
            text = Path(setting.text_file).read_text()
            cut = int(0.9 * len(text))
            self.tokenizer = text_tokenizer(text[:cut], self.folder / "tokenizer")
            self.train_ids = self.tokenizer(text[:cut], add_special_tokens=False)["input_ids"]
            held_out = self.tokenizer(text[cut:], add_special_tokens=False)["input_ids"]
            rng = random.Random(5)
            starts = rng.sample(range(0, len(held_out) - 128), n_test + n_val)
            examples = [self._passage(held_out, s) for s in starts]
            self.test, self.val = examples[:n_test], examples[n_test:]
        else:
            self.tokenizer = build_tokenizer()
            self.test = self.examples(n_test, seed=999)
            self.val = self.examples(n_val, seed=998)
        self.teacher = self._cached_model("teacher", setting.teacher_size, setting.teacher_steps, seed=1)
        self.student = self._cached_model("student", setting.student_size, setting.student_steps, seed=0)
        self.models = {"teacher": fingerprint(self.teacher), "student": fingerprint(self.student)}

    def _passage(self, ids: list[int], start: int) -> Example:
        prompt, completion = ids[start : start + 64], ids[start + 64 : start + 128]
        return Example(self.tokenizer.decode(prompt), self.tokenizer.decode(completion))

    def examples(self, n: int, seed: int) -> list[Example]:
        if self.setting.name == "text":
            rng = random.Random(seed)
            return [self._passage(self.train_ids, rng.randrange(len(self.train_ids) - 128)) for _ in range(n)]
        rng = random.Random(seed)
        out = []
        for _ in range(n):
            question, answer, valid = self.setting.make(rng)
            prompt = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            out.append(Example(prompt, answer, valid))
        return out

    def _cached_model(self, role, size, steps, seed):
        path = self.folder / f"{role}-{recipe_key(self.setting, f'{role}_size', f'{role}_steps')}"
        if (path / "config.json").exists():
            return AutoModelForCausalLM.from_pretrained(path).eval()
        start = time.perf_counter()
        model = llama(self.tokenizer, size, seed)
        sft(model, self.tokenizer, self.examples(steps * 32, seed=100 + seed), steps, batch=32, lr=3e-3, seed=seed)
        model.save_pretrained(path)
        self.log(
            f"[{self.setting.name}] {role}: {sum(p.numel() for p in model.parameters()):,} parameters, "
            f"{steps} SFT steps in {time.perf_counter() - start:.0f}s (cached in {path})"
        )
        return model.eval()

    def train_rows(self, n: int, seed: int) -> Dataset:
        rows = self.examples(n, seed)
        return Dataset.from_list([{"prompt": e.prompt, "completion": e.reference} for e in rows])


def fingerprint(model) -> str:
    """A hash of the model's weights: the same recipe gives other weights with another thread count or machine."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def sft(
    model,
    tokenizer,
    examples: list[Example],
    steps: int,
    batch: int,
    lr: float,
    seed: int,
    callback: Callable[[int], None] | None = None,
    schedule: str = "linear",
) -> None:
    """Supervised fine-tuning on prompt + reference (loss on the reference and EOS), in place."""
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    decay = (lambda s: 1 - s / steps) if schedule == "linear" else (lambda s: 1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, decay)
    model.train()
    for step in range(steps):
        chunk = [examples[(step * batch + i) % len(examples)] for i in range(batch)]
        prompts = [tokenizer(e.prompt, add_special_tokens=False)["input_ids"] for e in chunk]
        answers = [
            tokenizer(e.reference, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for e in chunk
        ]
        sft_step(model, optimizer, prompts, answers, tokenizer.pad_token_id)
        scheduler.step()
        if callback is not None:
            model.eval()
            callback(step + 1)
            model.train()
    model.eval()


# ------------------------------------------------------------------------------------------------------- metrics
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


# --------------------------------------------------------------------------------------------------------- one run
class CurveCallback(TrainerCallback):
    def __init__(self, record_at: Callable[[int], None]):
        self.record_at = record_at

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.record_at(state.global_step)


def train_one(
    task: Task,
    method: str,
    lr: float,
    seed: int,
    steps: int,
    examples: list[Example],
    curve_examples: list[Example],
    phase: str,
) -> dict:
    """Train a copy of the base student with ``method`` and return its record (scores on ``examples``)."""
    setting, tokenizer = task.setting, task.tokenizer
    student = copy.deepcopy(task.student)
    curve_at = {max(1, round(steps * f)) for f in (0.25, 0.5, 0.75, 1.0)}
    curve: list[dict] = []
    extra: dict[str, dict] = {}

    def record_at(step: int, model=None) -> None:
        if step in curve_at:
            metrics = summary(evaluate(task, model or student, curve_examples, seed, quick_curve=True))
            curve.append({"step": step, **metrics})

    begin = time.perf_counter()
    spec = ALL_METHODS[method]
    rows = task.train_rows(steps * setting.batch, seed=21 + seed)
    if spec is None:
        examples_train = [Example(r["prompt"], r["completion"]) for r in rows]
        sft(
            student,
            tokenizer,
            examples_train,
            steps,
            setting.batch,
            lr,
            seed,
            callback=record_at,
            schedule=setting.schedule,
        )
    else:
        trainer_class, config_class, overrides = spec
        overrides, teacher = dict(overrides), copy.deepcopy(task.teacher)
        cache_k = overrides.pop("cache_k", None)
        if cache_k is not None:  # the teacher runs once, over these rows, before training; training never loads it
            name = f"{setting.name}-{fingerprint(teacher)}-steps{steps}-seed{seed}-k{cache_k}"
            folder = cache_root() / "teacher-caches" / name
            cache_teacher(
                teacher, tokenizer, rows, str(folder), k=cache_k, max_completion_length=setting.max_new_tokens,
                batch_size=64, shard_rows=4096, progress=False,
            )  # fmt: skip
            overrides["teacher_cache"], teacher = str(folder), None
        args = config_class(
            **{
                "output_dir": str(cache_root() / "runs"),
                "per_device_train_batch_size": setting.batch,
                "max_steps": steps,
                "learning_rate": lr,
                "lr_scheduler_type": setting.schedule,
                "warmup_steps": 0,
                "max_completion_length": setting.max_new_tokens,
                "report_to": "none",
                "bf16": False,
                "use_cpu": not torch.cuda.is_available(),
                "save_strategy": "no",
                "logging_steps": max(1, steps // 10),
                "disable_tqdm": True,
                checkpointing_field(): False,
                "seed": seed,
                **overrides,
            }
        )
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=rows,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        model = trainer.accelerator.unwrap_model(trainer.model)

        def at_step(step):
            model.eval()
            record_at(step, model)
            model.train()

        trainer.add_callback(CurveCallback(at_step))
        score_prompted_teacher = phase == "diagnostic" and isinstance(trainer, PromptKDTrainer)
        if score_prompted_teacher:
            extra["prompted_teacher_before"] = prompted_teacher_scores(task, trainer, examples, seed)
        trainer.train()
        student = model
        if score_prompted_teacher:
            extra["prompted_teacher_after"] = prompted_teacher_scores(task, trainer, examples, seed)
        logs = [row for row in trainer.state.log_history if "teacher_token_fraction" in row]
        teacher_fraction = [row["teacher_token_fraction"] for row in logs]
    wall = time.perf_counter() - begin
    scores = evaluate(task, student.eval(), examples, seed)
    return {
        "setting": setting.name,
        "method": method,
        "phase": phase,
        "seed": seed,
        "lr": lr,
        "steps": steps,
        "batch": setting.batch,
        "schedule": setting.schedule,
        "metrics": summary(scores),
        "per_prompt": scores,
        "curve": curve,
        "wall_time": wall,
        "teacher_token_fraction": teacher_fraction if spec is not None else [],
        **provenance(task),
        **extra,
    }


def prompted_teacher_scores(task: Task, trainer: PromptKDTrainer, examples: list[Example], seed: int) -> dict:
    """The teacher with PromptKD's current soft prompt, scored like a student (through the PEFT adapter the trainer
    exports): does the prompt the student learns from keep the teacher's skill?"""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as folder:
        trainer.save_prompt_adapter(folder)
        prompted = PeftModel.from_pretrained(copy.deepcopy(task.teacher), folder).eval()
        return summary(evaluate(task, prompted, examples, seed, quick_curve=True))


def reference_record(task: Task, name: str, model, examples, seeds: int) -> dict:
    per_seed = [evaluate(task, model, examples, seed) for seed in range(seeds)]
    return {
        "setting": task.setting.name,
        "method": name,
        "phase": "reference",
        "seed": -1,
        "lr": 0.0,
        "steps": 0,
        "metrics": summary(per_seed[0]),
        "per_prompt_by_seed": per_seed,
        "curve": [],
        "wall_time": 0.0,
        **provenance(task),
    }


def provenance(task: Task) -> dict:
    return {"git_commit": git_commit(), "models": task.models, "threads": torch.get_num_threads()}


def check_records_match(task: Task, root: str) -> None:
    """Refuse to add runs to records made with another teacher or base student (a cache rebuilt elsewhere, or with
    another ``--threads``, trains other weights). Records from before fingerprints are checked by re-scoring the
    teacher on the recorded test prompts."""
    setting = task.setting
    records = load_records(root, setting.name)
    foreign = foreign_records(records, task.models)
    teacher = next((r for r in records if r["method"] == "Teacher" and r.get("phase") == "reference"), None)
    if teacher is not None and "models" not in teacher:
        rescored = evaluate(task, task.teacher, task.test, 0)[setting.primary]
        if rescored != teacher["per_prompt_by_seed"][0][setting.primary]:
            foreign.append(teacher)
    if foreign:
        raise SystemExit(
            f"{len(foreign)} record(s) under {Path(root) / setting.name} were made with another teacher or base "
            f"student than the cached ones ({task.models}): the models were retrained (another machine or thread "
            "count?). Write to a new --records folder, or remove that setting's records to redo it."
        )


# ----------------------------------------------------------------------------------------------------- the driver
def run_setting(setting: Setting, args, log=print) -> None:
    task = Task(setting, n_test=args.prompts, n_val=args.val_prompts, log=log)
    root, better = args.records, setting.higher_is_better[setting.primary]
    check_records_match(task, root)
    steps = args.steps or setting.steps
    methods = [m for m in ALL_METHODS if slug(m) in args.methods] if args.methods else list(setting.methods or METHODS)
    # references: the teacher, the base student, and the base student after a long SFT (its capacity)
    for name, make in (("Teacher", lambda: task.teacher), ("Student before distillation", lambda: task.student)):
        run_once(
            record_path(root, setting.name, name, 0, 0.0, "reference"),
            lambda make=make, name=name: reference_record(task, name, make(), task.test, args.seeds),
        )

    capacity_steps = setting.capacity_steps if args.capacity_steps is None else args.capacity_steps
    capacity_batch = setting.capacity_batch

    def capacity():
        model = copy.deepcopy(task.student)
        sft(
            model,
            task.tokenizer,
            task.examples(capacity_steps * capacity_batch, seed=77),
            capacity_steps,
            capacity_batch,
            3e-3,
            seed=0,
        )
        name = f"Student capacity ({capacity_steps} SFT steps of batch {capacity_batch})"
        return reference_record(task, name, model, task.test, 1)

    if capacity_steps:
        run_once(
            record_path(root, setting.name, f"capacity-{capacity_steps}x{capacity_batch}", 0, 0.0, "reference"),
            capacity,
        )
    for method in methods:
        scored: dict[float, list[float]] = {}  # validation scores of each grid rate, one per grid seed
        for lr in args.lr_grid if len(args.lr_grid) > 1 else []:
            for seed in range(args.grid_seeds):
                path = record_path(root, setting.name, method, seed, lr, "grid", steps)
                record, computed = run_once(
                    path,
                    lambda lr=lr, method=method, seed=seed: train_one(
                        task, method, lr, seed, steps, task.val, task.val[:32], "grid"
                    ),
                )
                scored.setdefault(lr, []).append(record["metrics"][setting.primary])
                if computed:
                    log(
                        f"[{setting.name}] grid {method} lr {lr:g} seed {seed}: {setting.primary} {scored[lr][-1]:.2f}"
                    )
        best_lr = choose_rate(scored, better) if scored else args.lr_grid[0]
        for seed in range(args.seeds):
            path = record_path(root, setting.name, method, seed, best_lr, "final", steps)
            record, computed = run_once(
                path,
                lambda seed=seed, method=method: train_one(
                    task, method, best_lr, seed, steps, task.test, task.val[:32], "final"
                ),
            )
            if computed:
                log(
                    f"[{setting.name}] {method} seed {seed} (lr {best_lr:g}): {setting.primary} "
                    f"{record['metrics'][setting.primary]:.2f} in {record['wall_time']:.0f}s"
                )
        if ALL_METHODS[method] is not None and ALL_METHODS[method][0] is PromptKDTrainer:
            # one more seed-0 run that also scores the prompted teacher the student learns from
            run_once(
                record_path(root, setting.name, method, 0, best_lr, "diagnostic", steps),
                lambda method=method: train_one(task, method, best_lr, 0, steps, task.test, [], "diagnostic"),
            )


# ------------------------------------------------------------------------------------------------------- reporting
def _per_prompt_matrix(records: list[dict], metric: str) -> np.ndarray:
    rows = []
    for r in sorted(records, key=lambda r: r["seed"]):
        if "per_prompt_by_seed" in r:
            rows += [s[metric] for s in r["per_prompt_by_seed"]]
        else:
            rows.append(r["per_prompt"][metric])
    return np.array(rows, dtype=float)


def _final_runs(final: dict, grid: dict, setting: Setting) -> dict[str, list[dict]]:
    """Each method's final runs at the rate its grid chose (else the budget and rate with the most seeds); final
    runs at any other rate are diagnostics, listed after the methods as "<method> at lr <rate>"."""
    better = setting.higher_is_better[setting.primary]
    chosen, extra = {}, {}
    for method in ALL_METHODS:
        if method not in final:
            continue
        key = max(final[method], key=lambda k: len(final[method][k]))
        on_grid = grid.get(method, {}).items()
        scored = {k: [r["metrics"][setting.primary] for r in runs] for k, runs in on_grid if k[0] == key[0]}
        if scored:
            best = choose_rate(scored, better)
            key = best if best in final[method] else key
        chosen[method] = final[method][key]
        for other, runs in final[method].items():
            if other != key:
                extra[f"{method} at lr {other[1]:g}"] = runs
    return {**chosen, **extra}


def report(setting: Setting, root: str, plots: str | None) -> list[str]:
    """The markdown tables of one setting, from its records."""
    records = load_records(root, setting.name)
    final, grid = {}, {}
    for r in records:
        if r.get("phase") in ("final", "grid") and r["method"] in ALL_METHODS:
            by_phase = final if r["phase"] == "final" else grid
            by_phase.setdefault(r["method"], {}).setdefault((r["steps"], r["lr"]), []).append(r)
    refs = {r["method"]: r for r in records if r.get("phase") == "reference"}
    final = _final_runs(final, grid, setting)
    metrics = list(setting.higher_is_better)
    lines = [f"**{setting.name}**: {setting.describe}", ""]
    header = "| method | lr | seeds | " + " | ".join(metrics) + " | wall s/run |"
    lines += [header, "|" + " --- |" * (len(metrics) + 4)]
    for name, r in refs.items():
        cells = [
            f"{mean_and_interval(_per_prompt_matrix([r], k)).mean:.2f}" if k in r["metrics"] else "–" for k in metrics
        ]
        seeds = len(r.get("per_prompt_by_seed", []))
        lines.append(f"| {name} | – | {seeds} | " + " | ".join(cells) + " | – |")
    for method, runs in final.items():
        cells = []
        for k in metrics:
            interval = mean_and_interval(_per_prompt_matrix(runs, k))
            cells.append(f"{interval.mean:.2f} [{interval.low:.2f}, {interval.high:.2f}]")
        wall = np.mean([r["wall_time"] for r in runs])
        lines.append(f"| {method} | {runs[0]['lr']:g} | {len(runs)} | " + " | ".join(cells) + f" | {wall:.0f} |")
    if grid:
        rates = sorted({lr for by_key in grid.values() for _, lr in by_key})
        some_run = next(iter(next(iter(grid.values())).values()))[0]
        lines += [
            "",
            f"Learning-rate grid ({setting.primary} on {len(some_run['per_prompt'][setting.primary])} "
            "validation prompts; the mean over the grid seeds, their number in brackets):",
            "",
            "| method | " + " | ".join(f"{lr:g}" for lr in rates) + " |",
            "|" + " --- |" * (len(rates) + 1),
        ]
        for method in METHODS:
            if method in grid:
                by_lr = {lr: [r["metrics"][setting.primary] for r in runs] for (_, lr), runs in grid[method].items()}
                cells = [f"{np.mean(by_lr[lr]):.2f} ({len(by_lr[lr])})" if lr in by_lr else "–" for lr in rates]
                lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Differences in {setting.primary} (paired bootstrap over prompts and seeds, 95%; "
        f"{'higher' if setting.higher_is_better[setting.primary] else 'lower'} is better):",
        "",
        "| method | vs student before | vs SFT on references | vs GKD on-policy |",
        "| --- | --- | --- | --- |",
    ]
    before = refs.get("Student before distillation")
    for method, runs in final.items():
        scores = _per_prompt_matrix(runs, setting.primary)
        cells = []
        for baseline in (before, final.get(SFT_BASELINE), final.get(GKD_BASELINE)):
            if baseline is None:
                cells.append("–")
                continue
            base = _per_prompt_matrix(baseline if isinstance(baseline, list) else [baseline], setting.primary)
            n = min(len(base), len(scores))
            cells.append(str(paired_bootstrap(scores[:n], base[:n])))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"The papers' claims on this setting, in {setting.primary} (the difference is signed so that + "
        "favours the claim; confirmed or refuted only when the interval excludes 0):",
        "",
        "| claim | difference | verdict |",
        "| --- | --- | --- |",
    ]
    lines += claim_rows(setting, final, setting.primary)
    if setting.generation_metric:
        lines += [
            "",
            f"The same claims judged on {setting.generation_metric} (the student's own samples; "
            f"{'higher' if setting.higher_is_better[setting.generation_metric] else 'lower'} is better; the "
            "difference is signed so that + favours the claim):",
            "",
            "| claim | difference | verdict |",
            "| --- | --- | --- |",
        ]
        lines += claim_rows(setting, final, setting.generation_metric)
    lines += length_buckets(setting, final)
    lines += prompted_teacher_table(setting, records, refs.get("Teacher"))
    if plots:
        plot_curves(setting, final, refs, os.path.join(plots, f"quality_{setting.name}.png"))
    return lines


def claim_rows(setting: Setting, final: dict, metric: str) -> list[str]:
    """One table row per paper claim whose two methods ran: the paired difference in `metric`, signed so that +
    favours the claim, and the verdict."""
    sign = 1 if setting.higher_is_better[metric] else -1
    rows = []
    for claim, method, baseline in CLAIMS:
        if method in final and baseline in final:
            ours = _per_prompt_matrix(final[method], metric)
            theirs = _per_prompt_matrix(final[baseline], metric)
            n = min(len(ours), len(theirs))
            interval = paired_bootstrap(sign * ours[:n], sign * theirs[:n])
            verdict = {"better": "confirmed", "worse": "refuted", "tie": "inconclusive at this power"}
            rows.append(f"| {claim} | {interval} | {verdict[interval.verdict()]} |")
    return rows


def prompted_teacher_table(setting: Setting, records: list[dict], teacher: dict | None) -> list[str]:
    """PromptKD's diagnostic runs: the teacher with the initial and with the learned soft prompt, beside the plain
    teacher, on the test prompts (seed 0)."""
    runs = [r for r in records if r.get("phase") == "diagnostic" and "prompted_teacher_after" in r]
    if not runs or teacher is None:
        return []
    k = setting.primary
    lines = [
        "",
        f"PromptKD's prompted teacher ({k} on the test prompts, seed 0; the plain teacher: "
        f"{teacher['metrics'][k]:.2f}):",
        "",
        "| method | lr | initial prompt | learned prompt | student after |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in sorted(runs, key=lambda r: r["method"]):
        lines.append(
            f"| {r['method']} | {r['lr']:g} | {r['prompted_teacher_before'][k]:.2f} | "
            f"{r['prompted_teacher_after'][k]:.2f} | {r['metrics'][k]:.2f} |"
        )
    return lines


def length_buckets(setting: Setting, final: dict, buckets: int = 3) -> list[str]:
    """The primary metric by reference length (tertiles of the test prompts' reference tokens), and each method's
    difference from on-policy GKD in every bucket: SWITCH's claim is that its gain grows with length."""
    first = next(iter(final.values()), [None])[0]
    if first is None or "reference_tokens" not in first["per_prompt"] or GKD_BASELINE not in final:
        return []
    lengths = np.array(first["per_prompt"]["reference_tokens"])
    edges = np.quantile(lengths, np.linspace(0, 1, buckets + 1))
    which = np.clip(np.searchsorted(edges, lengths, side="right") - 1, 0, buckets - 1)
    names = [f"{int(lengths[which == b].min())}-{int(lengths[which == b].max())} tokens" for b in range(buckets)]
    gkd = _per_prompt_matrix(final[GKD_BASELINE], setting.primary)
    lines = [
        "",
        f"{setting.primary} by reference length (test prompts split at the length quantiles into {buckets} "
        "buckets; the difference from GKD on-policy with its paired 95% interval):",
        "",
        "| method | " + " | ".join(names) + " |",
        "|" + " --- |" * (buckets + 1),
    ]
    for method, runs in final.items():
        scores = _per_prompt_matrix(runs, setting.primary)
        cells = []
        for b in range(buckets):
            cell = f"{scores[:, which == b].mean():.1f}"
            if method != GKD_BASELINE:
                n = min(len(scores), len(gkd))
                cell += f" ({paired_bootstrap(scores[:n, which == b], gkd[:n, which == b])})"
            cells.append(cell)
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return lines


def plot_curves(setting: Setting, final: dict, refs: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for method, runs in final.items():
        steps = [p["step"] for p in runs[0]["curve"]]
        values = np.array([[p[setting.primary] for p in r["curve"]] for r in runs if len(r["curve"]) == len(steps)])
        if not len(values):
            continue
        mean = values.mean(0)
        ax.plot(steps, mean, label=method)
        if len(values) > 1:
            ax.fill_between(steps, values.min(0), values.max(0), alpha=0.15)
    for name, r in refs.items():
        if setting.primary in r["metrics"]:
            ax.axhline(r["metrics"][setting.primary], linestyle="--", linewidth=0.8, color="gray")
            ax.text(
                0.01,
                r["metrics"][setting.primary],
                name,
                fontsize=7,
                color="gray",
                va="bottom",
                transform=ax.get_yaxis_transform(),
            )
    ax.set_xlabel("training step")
    ax.set_ylabel(f"{setting.primary} (validation prompts; band: min-max over seeds)")
    ax.set_title(f"Learning curves, {setting.name}: {setting.describe}")
    ax.legend(fontsize=6, loc="best")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="exact,multi,long,text")
    parser.add_argument(
        "--methods",
        default=None,
        help="comma-separated method slugs, e.g. sft-on-references,skd-k-25-fkl (default: all)",
    )
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--prompts", type=int, default=256, help="held-out test prompts")
    parser.add_argument("--val-prompts", type=int, default=64, help="validation prompts (learning-rate grid)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per run (default: per setting)")
    parser.add_argument("--lr-grid", default="3e-4,1e-3,3e-3")
    parser.add_argument(
        "--grid-seeds", type=int, default=2, help="seeds per grid rate; the rate with the best mean is chosen"
    )
    parser.add_argument("--capacity-steps", type=int, default=None, help="default: per setting; 0 skips it")
    parser.add_argument(
        "--student-steps",
        type=int,
        default=None,
        help="SFT steps of the base student (default: per setting), e.g. to test a stronger start",
    )
    parser.add_argument(
        "--schedule",
        choices=("constant", "linear"),
        default=None,
        help="learning-rate schedule of every method's runs (default: per setting)",
    )
    parser.add_argument("--text-file", default=None, help="a plain-text corpus for the text setting")
    parser.add_argument("--records", default="benchmarks/records/quality")
    parser.add_argument("--plots", default="docs/img")
    parser.add_argument("--report", action="store_true", help="only rebuild the tables and plots from the records")
    parser.add_argument("--quick", action="store_true", help="a few minutes: few steps, prompts, seeds and methods")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (1 lets two settings run side by side)")
    args = parser.parse_args()
    if args.quick:
        args.seeds, args.prompts, args.val_prompts, args.steps = 2, 32, 16, args.steps or 30
        args.lr_grid, args.capacity_steps = "1e-3", 200
        args.methods = args.methods or ",".join(slug(m) for m in QUICK_METHODS)
        args.records = args.records.rstrip("/") + "-quick"
        if args.settings == parser.get_default("settings"):
            args.settings = "exact"
    args.lr_grid = [float(x) for x in args.lr_grid.split(",")]
    args.methods = args.methods.split(",") if args.methods else None
    unknown = set(args.methods or ()) - {slug(m) for m in ALL_METHODS}
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}; choose from {[slug(m) for m in ALL_METHODS]}")
    torch.set_num_threads(args.threads)
    for name in args.settings.split(","):
        setting = copy.copy(SETTINGS[name])
        setting.text_file = args.text_file if name == "text" else None
        setting.student_steps = args.student_steps or setting.student_steps
        setting.schedule = args.schedule or setting.schedule
        if args.quick:
            setting.teacher_steps, setting.student_steps = min(setting.teacher_steps, 300), 30
        if not args.report:
            run_setting(setting, args)
        print("\n".join(report(setting, args.records, args.plots)) + "\n", flush=True)


if __name__ == "__main__":
    main()
