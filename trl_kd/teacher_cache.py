"""An offline teacher: its top-k log-probabilities over a dataset's completions, computed once and read in training.

[`cache_teacher`][trl_kd.teacher_cache.cache_teacher] runs the teacher over every row's prompt + completion (or over
a completion it samples itself, `seq_kd=True`) and writes, for each completion token, the teacher's `k` most likely
next tokens and their log-probabilities at `temperature`, plus the log of the remaining mass (the tail), next to the
dataset's own columns. The cache is a folder of shards and a manifest
([`TeacherCacheManifest`][trl_kd.teacher_cache.TeacherCacheManifest]); finished shards are skipped when the command
is run again, and with several processes each writes its own shards. A shard is a `Dataset.save_to_disk` folder of
Arrow files, which reading memory-maps: nothing is copied, and a cache larger than memory trains with flat memory, the
operating system paging rows in as they are read. A trainer given the cache
(`KDConfig.teacher_cache`) trains the off-policy rows on it with the sparse losses of
[`chunked_topk_token_divergence`][trl_kd.losses.chunked_topk_token_divergence], so no teacher needs to be in memory
when every row is off-policy (`lmbda=0`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from datasets import Dataset, concatenate_datasets, load_from_disk
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from .data import completion_token_ids, prepare_dataset
from .losses import LMHead, TopKTeacher, response_hidden_states
from .sampler import generate_completions


MANIFEST_NAME = "teacher_cache.json"
SHARD_PATTERN = "shard-{index:05d}"  # a `Dataset.save_to_disk` folder
PARQUET_SHARD_PATTERN = "shard-{index:05d}.parquet"  # caches written before Arrow shards
CACHE_COLUMNS = (
    "teacher_cache_row",  # the row's index in the dataset the cache was computed from
    "teacher_prompt_ids",  # the prompt's tokens the teacher saw
    "teacher_completion_ids",  # the completion's tokens, one cached position each
    "teacher_topk_ids",  # per completion token: the teacher's top-k next-token ids
    "teacher_topk_logprobs",  # ... and their log-probabilities at the cache temperature
    "teacher_tail_logprob",  # per completion token: log of the teacher's mass outside its top-k
)
VALUE_DTYPES = {"float16": np.float16, "float32": np.float32}


@dataclass
class TeacherCacheManifest:
    """What a cache was computed with; a trainer refuses a cache that disagrees with its own settings.

    Attributes:
        teacher: the teacher's name or path; `teacher_revision` its Hub commit, when known.
        tokenizer_hash: [`tokenizer_hash`][trl_kd.teacher_cache.tokenizer_hash] of the tokenizer the rows were
            tokenized with.
        dataset_fingerprint: the `datasets` fingerprint of the dataset the cache was computed from.
        k: top tokens kept per position; `temperature`: the teacher's softmax temperature.
        vocab_size: the vocabulary the top-k was taken over (the tokenizer's).
        num_rows, shard_rows: rows in the dataset and per shard.
        value_dtype: storage type of the log-probabilities; ids use the narrowest unsigned type for `vocab_size`.
        max_completion_length: completions were cut to this many tokens.
        seq_kd: the completions are the teacher's own samples instead of the dataset's.
        shard_format: `"arrow"` (`Dataset.save_to_disk` folders, memory-mapped when read); a manifest without it
            was written by an earlier trl-kd, as Parquet files, which are still read (converted into the `datasets`
            cache on first use).
    """

    teacher: str
    teacher_revision: str | None
    tokenizer_hash: str
    dataset_fingerprint: str
    k: int
    temperature: float
    vocab_size: int
    num_rows: int
    shard_rows: int
    value_dtype: str
    max_completion_length: int
    seq_kd: bool = False
    shard_format: str = "parquet"  # what a manifest that predates the field describes; new caches write "arrow"

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.num_rows / self.shard_rows))

    def save(self, directory: str) -> None:
        with open(os.path.join(directory, MANIFEST_NAME), "w") as f:
            json.dump(asdict(self), f, indent=2)

    @classmethod
    def load(cls, directory: str) -> TeacherCacheManifest:
        path = os.path.join(directory, MANIFEST_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"{directory} is no teacher cache: it has no {MANIFEST_NAME}. Write one with "
                "`trl-kd cache-teacher` or `trl_kd.teacher_cache.cache_teacher`."
            )
        with open(path) as f:
            return cls(**json.load(f))


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of everything that decides token ids: the vocabulary and merges (the fast tokenizer's JSON), the
    special tokens and the chat template."""
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocabulary = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [vocabulary, json.dumps(tokenizer.special_tokens_map, sort_keys=True), tokenizer.chat_template or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def id_dtype(vocab_size: int) -> type:
    """The narrowest unsigned integer type that holds every token id."""
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prompt_token_ids(
    tokenizer: PreTrainedTokenizerBase, prompt: str | list[dict[str, Any]], chat_template_kwargs: dict | None = None
) -> list[int]:
    """A prompt's tokens as TRL's trainers tokenize it: the chat template with the generation prompt for a
    conversation, the tokenizer for text."""
    if isinstance(prompt, list):
        return tokenizer.apply_chat_template(
            prompt, add_generation_prompt=True, tokenize=True, return_dict=True, **(chat_template_kwargs or {})
        )["input_ids"]
    return tokenizer(text=prompt)["input_ids"]


def _pad(rows: list[list[int]], value: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and attention mask of `rows`, padded on the left (prompts) or the right (completions)."""
    tensors = [torch.tensor(r, dtype=torch.long) for r in rows]
    side = "left" if left else "right"
    mask = pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side=side)
    return pad(tensors, padding_value=value, padding_side=side), mask


@torch.no_grad()
def teacher_topk(
    teacher: PreTrainedModel,
    prompt_ids: list[list[int]],
    completion_ids: list[list[int]],
    *,
    k: int,
    temperature: float,
    vocab_size: int,
    pad_token_id: int,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per row, the teacher's top-k ids `(C, k)`, their log-probabilities `(C, k)` and the tail's log-probability
    `(C,)` at each of the completion's `C` positions (fp32; the vocabulary cut to `vocab_size`)."""
    device = next(teacher.parameters()).device
    prompts, prompt_mask = _pad(prompt_ids, pad_token_id, left=True)
    completions, completion_mask = _pad([c or [pad_token_id] for c in completion_ids], pad_token_id, left=False)
    input_ids = torch.cat([prompts, completions], 1).to(device)
    attention_mask = torch.cat([prompt_mask, completion_mask], 1).to(device)
    hidden = response_hidden_states(teacher, attention_mask, completions.shape[1], input_ids=input_ids)
    head = LMHead.from_model(teacher)
    out = []
    for row, completion in zip(hidden, completion_ids):
        log_p = torch.log_softmax(head.logits(row[: len(completion)], vocab_size) / temperature, dim=-1)
        values, ids = log_p.topk(min(k, vocab_size), dim=-1)
        tail = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1)
        out.append((ids.cpu().numpy(), values.cpu().numpy(), tail.cpu().numpy()))
    return out


def cache_teacher(
    teacher: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset,
    output_dir: str,
    *,
    k: int = 64,
    temperature: float = 1.0,
    max_completion_length: int = 256,
    batch_size: int = 8,
    shard_rows: int = 512,
    value_dtype: str = "float16",
    seq_kd: bool = False,
    generation_config: GenerationConfig | None = None,
    chat_template_kwargs: dict | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
) -> TeacherCacheManifest:
    """Write the teacher's top-k log-probabilities for every completion token of `dataset` to `output_dir`.

    Args:
        teacher: the teacher, on the device it should run on, in eval mode.
        tokenizer: the tokenizer teacher and student share (the student's tokenizer).
        dataset: rows with `prompt` and `completion` (standard or conversational), or `messages`; with `seq_kd`,
            `prompt` alone is enough.
        output_dir: where the shards and the manifest go; shards already there are kept (a rerun resumes).
        k: top tokens kept per position (the rest is one tail bin).
        temperature: the teacher's softmax temperature; training must use the same `loss_temperature`.
        max_completion_length: completions are cut to this many tokens, as in training.
        batch_size: rows per teacher forward.
        shard_rows: rows per shard (the unit of resumption and of work between processes).
        value_dtype: `"float16"` or `"float32"` storage of the log-probabilities.
        seq_kd: cache the teacher's own samples (drawn with `generation_config`) instead of the dataset's completions.
        chat_template_kwargs: passed to the chat template, as `KDConfig.chat_template_kwargs`.
        process_index: this process's rank: it writes the shards whose index is `process_index` modulo
            `num_processes` (`accelerate launch` gives every process its own).
        num_processes: how many processes share the shards.
        progress: show a progress bar (on process 0).

    Returns:
        The manifest (written by process 0).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}.")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be one of {sorted(VALUE_DTYPES)}, got {value_dtype!r}.")
    if seq_kd and generation_config is None:
        raise ValueError("seq_kd samples the completions from the teacher: pass a `generation_config`.")
    original_columns = list(dataset.column_names)
    rows = prepare_dataset(dataset, "dataset")
    vocab_size = len(tokenizer)
    manifest = TeacherCacheManifest(
        teacher=teacher.config._name_or_path or "",
        teacher_revision=getattr(teacher.config, "_commit_hash", None),
        tokenizer_hash=tokenizer_hash(tokenizer),
        dataset_fingerprint=dataset._fingerprint,
        k=min(k, vocab_size),
        temperature=float(temperature),
        vocab_size=vocab_size,
        num_rows=len(dataset),
        shard_rows=shard_rows,
        value_dtype=value_dtype,
        max_completion_length=max_completion_length,
        seq_kd=seq_kd,
        shard_format="arrow",
    )
    os.makedirs(output_dir, exist_ok=True)
    if os.path.exists(os.path.join(output_dir, MANIFEST_NAME)):
        existing = TeacherCacheManifest.load(output_dir)
        if existing != manifest:
            raise ValueError(
                f"{output_dir} holds a cache computed with other settings ({_differences(existing, manifest)}); "
                "write this one to another folder."
            )
    elif process_index == 0:
        manifest.save(output_dir)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    if seq_kd:
        sampling = GenerationConfig(**{**generation_config.to_dict(), "max_new_tokens": max_completion_length})
    teacher.eval()
    mine = [i for i in range(manifest.num_shards) if i % num_processes == process_index]
    todo = [i for i in mine if not os.path.exists(os.path.join(output_dir, SHARD_PATTERN.format(index=i)))]
    bar = _progress(len(todo) * shard_rows, progress and process_index == 0)
    for shard in todo:
        start, stop = shard * shard_rows, min((shard + 1) * shard_rows, len(dataset))
        columns: dict[str, list] = {name: [] for name in CACHE_COLUMNS}
        for batch_start in range(start, stop, batch_size):
            batch = [rows[i] for i in range(batch_start, min(batch_start + batch_size, stop))]
            prompts = [prompt_token_ids(tokenizer, row["prompt"], chat_template_kwargs) for row in batch]
            if seq_kd:
                completions = generate_completions(teacher, prompts, sampling, pad_token_id=pad_id, eos_token_ids=eos)
            else:
                completions = [
                    completion_token_ids(
                        tokenizer,
                        row["prompt"],
                        ids,
                        row["completion"],
                        eos,
                        max_completion_length,
                        chat_template_kwargs,
                    )
                    for row, ids in zip(batch, prompts)
                ]
            top = teacher_topk(
                teacher, prompts, completions, k=k, temperature=temperature, vocab_size=vocab_size, pad_token_id=pad_id
            )
            ids_type = id_dtype(vocab_size)
            for offset, (ids, completion, (top_ids, values, tail)) in enumerate(zip(prompts, completions, top)):
                columns["teacher_cache_row"].append(batch_start + offset)
                columns["teacher_prompt_ids"].append(np.asarray(ids, dtype=ids_type))
                columns["teacher_completion_ids"].append(np.asarray(completion, dtype=ids_type))
                columns["teacher_topk_ids"].append(list(top_ids.astype(ids_type)))
                columns["teacher_topk_logprobs"].append(list(values.astype(VALUE_DTYPES[value_dtype])))
                columns["teacher_tail_logprob"].append(tail.astype(VALUE_DTYPES[value_dtype]))
            bar.update(len(batch))
        part = dataset.select(range(start, stop)).select_columns(original_columns)
        for name in CACHE_COLUMNS:
            part = part.add_column(name, columns[name])
        path = os.path.join(output_dir, SHARD_PATTERN.format(index=shard))
        partial = f"{path}.{process_index}.tmp"
        shutil.rmtree(partial, ignore_errors=True)  # left by a run that was killed while saving
        part.save_to_disk(partial)
        os.replace(partial, path)  # a shard exists only once it is complete
    bar.close()
    return manifest


def load_teacher_cache(directory: str) -> tuple[Dataset, TeacherCacheManifest]:
    """The cached dataset (the original columns and the cache's, in the original row order) and its manifest.

    The shards are memory-mapped, not read into memory: rows are paged in from disk as training reads them. Refuses a
    cache with a shard missing (a run that has not finished)."""
    manifest = TeacherCacheManifest.load(directory)
    if manifest.shard_format not in ("arrow", "parquet"):
        raise ValueError(
            f"The teacher cache in {directory} has shards of format {manifest.shard_format!r}, which this version of "
            "trl-kd cannot read; upgrade trl-kd or write the cache again."
        )
    pattern = SHARD_PATTERN if manifest.shard_format == "arrow" else PARQUET_SHARD_PATTERN
    paths = [os.path.join(directory, pattern.format(index=i)) for i in range(manifest.num_shards)]
    missing = [os.path.basename(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise ValueError(
            f"The teacher cache in {directory} is incomplete: {len(missing)} of {len(paths)} shards are missing "
            f"(first: {missing[0]}). Run the same `cache-teacher` command again to finish it."
        )
    read = load_from_disk if manifest.shard_format == "arrow" else Dataset.from_parquet
    return concatenate_datasets([read(p) for p in paths]), manifest


class OfflineTeacher:
    """A teacher cache as a trainer uses it: the training rows with the cache's columns joined, checked against the
    run, and asked for the teacher's top-k log-probabilities of a batch the way the live teacher is asked for its
    forward. Rows are checked once, as training reads them; the cache's columns stay memory-mapped.

    Args:
        path: the cache folder (`KDConfig.teacher_cache`).
        seq_kd: whether the run trains on teacher samples (`KDConfig.seq_kd`); the cache must hold the same kind.
    """

    def __init__(self, path: str, seq_kd: bool):
        self.path = path
        self.cache, self.manifest = load_teacher_cache(path)
        if self.manifest.seq_kd != seq_kd:
            raise ValueError(
                f"The teacher cache {path} holds "
                + (
                    "teacher samples (it was written with seq_kd): set `seq_kd=True`."
                    if self.manifest.seq_kd
                    else "dataset completions, not teacher samples: set `seq_kd=False` or cache with `--seq_kd`."
                )
            )

    def training_rows(self, train_dataset: Dataset | None) -> Dataset:
        """The training rows, checked and in prompt-completion form, with the cache's columns joined: the cached rows
        themselves when no dataset is passed, else the passed dataset (which must be the one the cache was computed
        from). Only the rows' own columns are converted (a `messages` dataset is split by `map`, which writes a
        copy)."""
        cache, manifest = self.cache, self.manifest
        if train_dataset is None:
            train_dataset = cache.select_columns([c for c in cache.column_names if c not in CACHE_COLUMNS])
        elif not isinstance(train_dataset, Dataset) or train_dataset._fingerprint != manifest.dataset_fingerprint:
            raise ValueError(
                f"The teacher cache {self.path} was computed from another dataset (fingerprint "
                f"{manifest.dataset_fingerprint}, this one {getattr(train_dataset, '_fingerprint', None)}): pass "
                "`train_dataset=None` to train on the cached rows, or cache this dataset."
            )
        rows = prepare_dataset(train_dataset, "train_dataset")
        joined = concatenate_datasets([rows, cache.select_columns(list(CACHE_COLUMNS))], axis=1)
        # Arrays, not nested lists: a row holds completion length x k values, and the dataloader (Accelerate's
        # `send_to_device`) walks every element of a list, which cost most of a step at k = 331.
        arrays = [c for c in CACHE_COLUMNS if c != "teacher_cache_row"]
        return joined.with_format("numpy", columns=arrays, output_all_columns=True)

    def check(
        self, tokenizer: PreTrainedTokenizerBase, loss_temperature: float, vocab_size: int, max_completion_length: int
    ) -> None:
        """Refuse a cache that does not fit the run, with every reason and its fix."""
        manifest, problems = self.manifest, []
        if manifest.tokenizer_hash != tokenizer_hash(tokenizer):
            problems.append("its tokenizer is not the student's (another vocabulary, special tokens or chat template)")
        if not math.isclose(manifest.temperature, loss_temperature):
            problems.append(
                f"it holds the teacher at temperature {manifest.temperature}, and `loss_temperature` is "
                f"{loss_temperature} (set it to {manifest.temperature})"
            )
        if manifest.vocab_size != vocab_size:
            problems.append(f"its vocabulary has {manifest.vocab_size} tokens, the tokenizer {vocab_size}")
        if manifest.max_completion_length < max_completion_length:
            problems.append(
                f"its completions were cut to {manifest.max_completion_length} tokens, and `max_completion_length` is "
                f"{max_completion_length} (lower it, or cache again)"
            )
        if problems:
            raise ValueError(f"The teacher cache {self.path} does not fit this run: {'; '.join(problems)}.")

    @staticmethod
    def is_cached(row: dict[str, Any]) -> bool:
        return "teacher_topk_ids" in row

    def completion(
        self, row: dict[str, Any], prompt_ids: list[int], dataset_completion: list[int] | None, limit: int
    ) -> tuple[list[int], tuple[torch.Tensor, ...]]:
        """A cached row's completion (at most `limit` tokens) and its teacher top-k `(ids, log-probs, tail)`, after
        checking that the cache saw the tokens this run trains on: `prompt_ids`, and `dataset_completion` (this
        run's tokens of the row's completion; `None` for teacher samples)."""
        completion = np.asarray(row["teacher_completion_ids"])[:limit].tolist()
        expected = {"prompt": (list(prompt_ids), np.asarray(row["teacher_prompt_ids"]).tolist())}
        if dataset_completion is not None:
            expected["completion"] = (dataset_completion, completion)
        for what, (ours, theirs) in expected.items():
            if ours != theirs:
                at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
                raise ValueError(
                    f"Row {row['teacher_cache_row']} of the teacher cache {self.path}: its {what} tokens differ from "
                    f"this run's from token {at} on ({len(theirs)} cached, {len(ours)} now). The cache was written "
                    "with another tokenizer, chat template or dataset row; write it again."
                )
        top = tuple(
            torch.tensor(np.asarray(row[name])[: len(completion)], dtype=dtype)  # a copy: the cache is read-only
            for name, dtype in (
                ("teacher_topk_ids", torch.long),
                ("teacher_topk_logprobs", torch.float32),
                ("teacher_tail_logprob", torch.float32),
            )
        )
        return completion, top

    def batch(
        self, per_row: list[tuple[torch.Tensor, ...] | None], width: int, device: torch.device | str
    ) -> dict[str, torch.Tensor]:
        """The rows' teacher top-k as batch tensors `(B, width, k)` (`teacher_topk_ids`, `teacher_topk_logprobs`)
        and `(B, width)` (`teacher_tail_logprob`), zero past each completion, and which rows have them,
        `teacher_topk_rows` `(B,)`: what the loss reads instead of a teacher forward."""
        k, n = self.manifest.k, len(per_row)
        ids = torch.zeros(n, width, k, dtype=torch.long)
        log_probs = torch.zeros(n, width, k)
        tail = torch.zeros(n, width)
        for i, top in enumerate(per_row):
            if top is not None:
                length = len(top[0])
                ids[i, :length], log_probs[i, :length], tail[i, :length] = top
        rows = torch.tensor([top is not None for top in per_row])
        tensors = {"teacher_topk_ids": ids, "teacher_topk_logprobs": log_probs, "teacher_tail_logprob": tail}
        return {**{key: value.to(device) for key, value in tensors.items()}, "teacher_topk_rows": rows.to(device)}


def cached_topk(inputs: dict[str, torch.Tensor]) -> TopKTeacher | None:
    """The cached teacher of a (micro-)batch that `OfflineTeacher.batch` filled, for the loss; `None` without one."""
    if "teacher_topk_rows" not in inputs:
        return None
    return TopKTeacher(
        inputs["teacher_topk_ids"],
        inputs["teacher_topk_logprobs"],
        inputs["teacher_tail_logprob"],
        inputs["teacher_topk_rows"],
    )


def _differences(a: TeacherCacheManifest, b: TeacherCacheManifest) -> str:
    return ", ".join(f"{k}: {v!r} vs {getattr(b, k)!r}" for k, v in asdict(a).items() if getattr(b, k) != v)


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="caching the teacher", unit="rows", disable=not enabled)
