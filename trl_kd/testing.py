"""Small local fixtures: a tokenizer trained here, tiny causal LMs built from configs, and tiny datasets.

Nothing is downloaded: tests, examples and benchmarks use these with ``HF_HUB_OFFLINE=1``. The data is a synthetic
instruction task over letter sequences (reverse, sort, copy, count) whose answers are exact, so a small teacher can
really learn it and a student's output can be scored.

>>> tokenizer = build_tokenizer()
>>> student = build_model("qwen2", tokenizer, size="student")
>>> dataset = make_dataset("conversational_prompt_completion", n=8)
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)


PAD, EOS, IM_START = "<|pad|>", "<|im_end|>", "<|im_start|>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LETTERS = "abcdefghijklmnop"
TASK_NAMES = ("reverse", "sort", "copy", "count")
DATASET_FORMATS = (
    "prompt_only",
    "prompt_completion",
    "conversational_prompt_only",
    "conversational_prompt_completion",
    "messages",
)
DatasetFormat = Literal[
    "prompt_only", "prompt_completion", "conversational_prompt_only", "conversational_prompt_completion", "messages"
]

# (hidden, layers, heads, kv heads, intermediate) per size
_SIZES = {"student": (32, 2, 2, 1, 64), "teacher": (64, 3, 4, 2, 128)}


def make_task(rng: random.Random, min_len: int = 2, max_len: int = 6) -> tuple[str, str]:
    """One (instruction, answer) pair of the synthetic task, e.g. ``("reverse: a b c", "c b a")``."""
    task = rng.choice(TASK_NAMES)
    n = rng.randint(min_len, max_len)
    if task == "count":
        start = rng.randint(0, 9)
        return f"count: from {start} to {start + n - 1}", " ".join(str(i) for i in range(start, start + n))
    items = [rng.choice(LETTERS) for _ in range(n)]
    answer = {"reverse": items[::-1], "sort": sorted(items), "copy": items}[task]
    return f"{task}: {' '.join(items)}", " ".join(answer)


def make_pairs(n: int, seed: int = 0, min_len: int = 2, max_len: int = 6) -> list[tuple[str, str]]:
    """``n`` reproducible task pairs."""
    rng = random.Random(seed)
    return [make_task(rng, min_len, max_len) for _ in range(n)]


def _corpus(num_lines: int = 2000) -> list[str]:
    lines = []
    for instruction, answer in make_pairs(num_lines, seed=1234, max_len=12):
        lines.append(f"{IM_START}user\n{instruction}{EOS}\n{IM_START}assistant\n{answer}{EOS}\n")
        lines.append(f"{instruction}\n{answer}")
    return lines


def build_tokenizer(save_dir: str | Path | None = None, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on the synthetic corpus, with pad/eos tokens and a ChatML chat template.

    ``eos`` is ``<|im_end|>``, so both plain and chat completions end with it; ``pad`` is distinct from ``eos``;
    padding is on the left as TRL's generation expects.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, EOS, IM_START],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=PAD, eos_token=EOS, padding_side="left", truncation_side="left"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_metaspace_tokenizer(
    vocab_size: int = 350, alphabet_texts: tuple[str, ...] = (), save_dir: str | Path | None = None
) -> PreTrainedTokenizerFast:
    """A tokenizer of another family than [`build_tokenizer`]'s, for cross-tokenizer tests: BPE over Metaspace
    pieces (`"▁"` for spaces, SentencePiece's convention), `<eos>`/`<pad>`/`<unk>`, no chat template, trained on the
    same corpus; its alphabet holds the 256 one-byte characters and those of `alphabet_texts`."""
    corpus = _corpus(500) + list(alphabet_texts)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="never")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<eos>", "<unk>"],
        # every character of one byte, so that it can encode whatever the byte-level student writes in them
        initial_alphabet=sorted(set("".join(corpus)) | {chr(i) for i in range(256)} | {"▁"}),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )
    if save_dir is not None:
        tokenizer.save_pretrained(save_dir)
    return tokenizer


def build_model(
    arch: Literal["qwen2", "llama", "gpt2"],
    tokenizer: PreTrainedTokenizerFast,
    size: Literal["student", "teacher"] = "student",
    vocab_size: int | None = None,
    seed: int = 0,
    tie_word_embeddings: bool = True,
    initializer_range: float = 0.02,
    save_dir: str | Path | None = None,
    context_length: int = 256,
) -> PreTrainedModel:
    """A randomly initialised tiny causal LM of a Qwen2-, Llama- or GPT-2-style architecture.

    ``vocab_size`` defaults to the tokenizer's size; pass a larger value to get an embedding matrix padded beyond the
    tokenizer, as real model pairs have (e.g. Qwen2.5-0.5B vs 7B). A larger ``initializer_range`` gives peaked,
    clearly different next-token distributions (useful where ties would make greedy decoding fragile).
    ``context_length`` is the longest sequence the model accepts (prompt and completion).
    """
    import torch

    hidden, layers, heads, kv_heads, inter = _SIZES[size]
    common = dict(
        vocab_size=vocab_size or len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=tie_word_embeddings,
        initializer_range=initializer_range,
    )
    if arch == "gpt2":
        config = GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, n_positions=context_length, n_inner=inter, **common
        )
    else:
        cls = Qwen2Config if arch == "qwen2" else LlamaConfig
        config = cls(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            intermediate_size=inter,
            max_position_embeddings=context_length,
            **common,
        )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = None
    if save_dir is not None:
        model.save_pretrained(save_dir)
    return model


def make_dataset(fmt: DatasetFormat, n: int = 16, seed: int = 0, min_len: int = 2, max_len: int = 6) -> Dataset:
    """A tiny dataset of the synthetic task in one of TRL's formats.

    ``prompt_only``/``prompt_completion`` are standard (plain text); ``conversational_*`` hold lists of messages;
    ``messages`` holds whole conversations whose last message is the assistant's answer.
    """
    pairs = make_pairs(n, seed, min_len, max_len)
    if fmt == "prompt_only":
        rows = [{"prompt": f"{q}\n"} for q, _ in pairs]
    elif fmt == "prompt_completion":
        rows = [{"prompt": f"{q}\n", "completion": a} for q, a in pairs]
    elif fmt == "conversational_prompt_only":
        rows = [{"prompt": [{"role": "user", "content": q}]} for q, _ in pairs]
    elif fmt == "conversational_prompt_completion":
        rows = [
            {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
            for q, a in pairs
        ]
    elif fmt == "messages":
        rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    else:
        raise ValueError(f"Unknown dataset format {fmt!r}; expected one of {DATASET_FORMATS}.")
    return Dataset.from_list(rows)


def sft_on_task(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    steps: int = 300,
    batch_size: int = 32,
    learning_rate: float = 3e-3,
    seed: int = 0,
    min_len: int = 2,
    max_len: int = 6,
) -> list[float]:
    """Supervised fine-tuning of ``model`` on the synthetic task (chat-formatted, loss on the answer only), in place.

    A plain PyTorch loop, to give tests and benchmarks a teacher that knows the task or an SFT-initialised student
    in seconds. Returns the loss of every step.
    """
    import torch

    rng = random.Random(seed)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    losses = []
    for _ in range(steps):
        rows, labels = [], []
        for _ in range(batch_size):
            question, answer = make_task(rng, min_len, max_len)
            prompt = tokenizer.apply_chat_template(
                [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
            )
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append(prompt_ids + answer_ids)
            labels.append([-100] * len(prompt_ids) + answer_ids)
        width = max(map(len, rows))
        input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
        attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        label_ids = torch.tensor([lab + [-100] * (width - len(lab)) for lab in labels])
        loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=label_ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    return losses
