"""The quality benchmark's settings (tasks, model sizes, budgets, metrics) and the models each one trains and caches:
its teacher, its base student, and the SFT that makes them."""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from trl_kd.scripts.default import cache_base
from trl_kd.testing import CHAT_TEMPLATE, EOS, PAD, build_tokenizer, make_task

from quality_methods import LONG_METHODS
from training import sft_step


RECIPE_VERSION = "v2"
BATCH = 8


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
