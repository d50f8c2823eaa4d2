"""The offline teacher cache: writing and reading it, resuming, several processes, the refusals, and training from
it (with no teacher at all, and equal to the live teacher when the cache keeps the whole vocabulary)."""

import copy
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch

from trl_kd import KDConfig, KDTrainer, PromptKDConfig
from trl_kd.teacher_cache import (
    CACHE_COLUMNS,
    MANIFEST_NAME,
    PARQUET_SHARD_PATTERN,
    SHARD_PATTERN,
    TeacherCacheManifest,
    cache_teacher,
    load_teacher_cache,
)
from trl_kd.testing import build_model, make_dataset

from helpers import ROOT, assert_close_to_rounding, jsonl_dataset, logged, make_args, params


@pytest.fixture(scope="module")
def teacher(tokenizer):
    return build_model("qwen2", tokenizer, "teacher", seed=1).eval()


def write(teacher, tokenizer, dataset, path, **overrides):
    settings = {**dict(k=8, max_completion_length=8, batch_size=3, shard_rows=5, progress=False), **overrides}
    return cache_teacher(teacher, tokenizer, dataset, str(path), **settings)


def trainer_on(tmp_path, tokenizer, cache, teacher=None, dataset=None, **overrides):
    args = make_args(tmp_path, KDConfig, **{"lmbda": 0.0, "teacher_cache": str(cache), **overrides})
    return KDTrainer(
        model=build_model("qwen2", tokenizer, "student", seed=0),
        teacher_model=teacher,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("fmt", ["prompt_completion", "conversational_prompt_completion", "messages"])
def test_the_cache_holds_the_teachers_top_k_next_to_the_rows(tmp_path, tokenizer, teacher, fmt):
    dataset = make_dataset(fmt, 12)
    manifest = write(teacher, tokenizer, dataset, tmp_path / "cache", value_dtype="float32")
    cache, loaded = load_teacher_cache(str(tmp_path / "cache"))
    assert loaded == manifest and manifest.num_shards == 3 and len(cache) == 12
    assert cache.column_names == dataset.column_names + list(CACHE_COLUMNS)
    assert cache.features["teacher_topk_ids"].feature.feature.dtype == "uint16"  # the narrowest type for 331 ids
    assert cache.select_columns(dataset.column_names).to_list() == dataset.to_list()  # rows kept, in order

    # against a live teacher forward over one row, from the definitions
    row = cache[4]
    assert row["teacher_cache_row"] == 4
    ids = row["teacher_prompt_ids"] + row["teacher_completion_ids"]
    with torch.no_grad():
        logits = teacher(torch.tensor([ids])).logits[0, len(row["teacher_prompt_ids"]) - 1 : -1, : len(tokenizer)]
    log_p = logits.float().log_softmax(-1)
    values, top = log_p.topk(8, dim=-1)
    assert np.array(row["teacher_topk_ids"]).tolist() == top.tolist()
    assert_close_to_rounding(torch.tensor(row["teacher_topk_logprobs"]), values)
    tail = torch.log1p(-values.exp().sum(-1))
    assert_close_to_rounding(torch.tensor(row["teacher_tail_logprob"]), tail)


def test_half_precision_values(tmp_path, tokenizer, teacher):
    write(teacher, tokenizer, make_dataset("prompt_completion", 6), tmp_path / "cache")
    cache, manifest = load_teacher_cache(str(tmp_path / "cache"))
    assert manifest.value_dtype == "float16"
    assert cache.features["teacher_topk_logprobs"].feature.feature.dtype == "float16"


def test_reading_the_cache_maps_its_own_shards_and_writes_nothing(tmp_path, tokenizer, teacher):
    """The shards are memory-mapped where they lie: no converted copy in the `datasets` cache or anywhere else."""
    path = tmp_path / "cache"
    write(teacher, tokenizer, make_dataset("prompt_completion", 12), path)
    hf_cache = tmp_path / "hf-datasets-cache"
    before = sorted(p for p in tmp_path.rglob("*"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", hf_cache)
        cache, _ = load_teacher_cache(str(path))
    assert sorted(p for p in tmp_path.rglob("*")) == before
    files = [f["filename"] for f in cache.cache_files]
    assert len(files) == 3 and all(os.path.commonpath([f, str(path)]) == str(path) for f in files)


def test_a_parquet_cache_from_an_earlier_version_still_loads(tmp_path, tokenizer, teacher):
    path = tmp_path / "cache"
    write(teacher, tokenizer, make_dataset("prompt_completion", 12), path)
    current, manifest = load_teacher_cache(str(path))
    legacy = tmp_path / "legacy"  # the layout before Arrow shards: Parquet files, no `shard_format` in the manifest
    legacy.mkdir()
    fields = {k: v for k, v in dataclasses.asdict(manifest).items() if k != "shard_format"}
    (legacy / MANIFEST_NAME).write_text(json.dumps(fields))
    for i in range(manifest.num_shards):
        shard = datasets.load_from_disk(str(path / SHARD_PATTERN.format(index=i)))
        shard.to_parquet(str(legacy / PARQUET_SHARD_PATTERN.format(index=i)))
    cache, loaded = load_teacher_cache(str(legacy))
    assert loaded.shard_format == "parquet" and dataclasses.replace(loaded, shard_format="arrow") == manifest
    assert cache.to_list() == current.to_list()
    with pytest.raises(ValueError, match="other settings.*shard_format: 'parquet' vs 'arrow'"):
        write(teacher, tokenizer, make_dataset("prompt_completion", 12), legacy)  # resuming it would mix formats


@pytest.mark.slow
def test_a_cache_several_times_the_memory_headroom_trains_with_flat_memory(tmp_path, tokenizer, teacher):
    """An epoch over a cache of 18 shards (about 240 MiB: the whole vocabulary in fp32 over about 56 tokens a row)
    holds the trainer's own memory flat: building the trainer and training raise it by less than half the cache, and
    the steps after the first by less than an eighth, while holding the cache in memory raises it by at least half the
    cache (the control). Memory-mapped shards are paged in by the operating system, which can drop them again."""
    dataset = make_dataset("prompt_completion", 2200, min_len=50, max_len=60)
    path = tmp_path / "cache"
    settings = dict(k=len(tokenizer), value_dtype="float32", max_completion_length=64, batch_size=64, shard_rows=128)
    manifest = write(teacher, tokenizer, dataset, path, **settings)
    assert manifest.num_shards == 18
    size = sum(f.stat().st_size for f in path.rglob("*.arrow"))
    assert size > 200 * 2**20
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    script = [sys.executable, str(ROOT / "tests" / "memory" / "train_on_cache.py")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [*script, str(path), str(tmp_path / "tokenizer"), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=900, env=env, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    measured = json.loads(proc.stdout.strip().splitlines()[-1])
    assert measured["rows"] == measured["rows_trained"] == 2200  # every row was read, in batches of 8
    assert measured["peak"] - measured["before_trainer"] < size / 2, measured
    assert measured["peak_after_first_step"] - measured["baseline"] < size / 8, measured
    assert measured["held_growth"] > size / 2, measured


def test_a_rerun_resumes_and_an_unfinished_cache_is_refused(tmp_path, tokenizer, teacher, monkeypatch):
    dataset = make_dataset("prompt_completion", 12)
    path = tmp_path / "cache"
    write(teacher, tokenizer, dataset, path)
    shards = [path / SHARD_PATTERN.format(index=i) for i in range(3)]
    before = {s: s.stat().st_mtime_ns for s in shards}
    shutil.rmtree(shards[1])
    with pytest.raises(ValueError, match="1 of 3 shards are missing.*shard-00001"):
        load_teacher_cache(str(path))
    import trl_kd.teacher_cache as module

    calls = []
    original = module.teacher_topk
    monkeypatch.setattr(module, "teacher_topk", lambda *a, **kw: calls.append(len(a[1])) or original(*a, **kw))
    write(teacher, tokenizer, dataset, path)
    assert sum(calls) == 5  # the missing shard's rows only
    assert all(shards[i].stat().st_mtime_ns == before[shards[i]] for i in (0, 2))
    assert len(load_teacher_cache(str(path))[0]) == 12
    with pytest.raises(ValueError, match="other settings.*k: 8 vs 4"):
        write(teacher, tokenizer, dataset, path, k=4)


def test_each_process_writes_its_own_shards(tmp_path, tokenizer, teacher):
    dataset = make_dataset("prompt_completion", 12)
    path = tmp_path / "cache"
    write(teacher, tokenizer, dataset, path, process_index=1, num_processes=2)
    assert sorted(os.listdir(path)) == [SHARD_PATTERN.format(index=1)]  # the manifest is process 0's to write
    write(teacher, tokenizer, dataset, path, process_index=0, num_processes=2)
    assert sorted(os.listdir(path)) == sorted([MANIFEST_NAME, *(SHARD_PATTERN.format(index=i) for i in range(3))])
    one_process = tmp_path / "single"
    write(teacher, tokenizer, dataset, one_process)
    assert load_teacher_cache(str(path))[0].to_list() == load_teacher_cache(str(one_process))[0].to_list()


@pytest.mark.slow
def test_the_command_on_two_processes(tmp_path, tokenizer, teacher):
    teacher.save_pretrained(tmp_path / "teacher")
    tokenizer.save_pretrained(tmp_path / "teacher")
    data = jsonl_dataset(tmp_path / "data", make_dataset("prompt_completion", 10).to_list())
    out = tmp_path / "cache"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "trl_kd.cli",
        "cache-teacher", "--teacher", str(tmp_path / "teacher"), "--dataset_name", str(data), "--output_dir", str(out),
        "--k", "4", "--shard_rows", "3", "--max_completion_length", "8", "--dtype", "float32",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Cached the teacher's top-4 over 10 rows in 4 shards" in proc.stdout
    cache, manifest = load_teacher_cache(str(out))
    assert len(cache) == 10 and manifest.k == 4 and cache["teacher_cache_row"] == list(range(10))
    # each process wrote its own shards: rank 0 the even ones, rank 1 the odd ones
    assert proc.stdout.count("Cached the teacher's") == 1  # printed by the main process only


def test_training_needs_no_teacher_and_changes_the_student(tmp_path, tokenizer, teacher):
    write(teacher, tokenizer, make_dataset("prompt_completion", 12), tmp_path / "cache")
    trainer = trainer_on(tmp_path, tokenizer, tmp_path / "cache", max_steps=3)
    assert trainer.teacher_model is None
    before = params(trainer.model)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in trainer.model.named_parameters())
    assert all(np.isfinite(logged(trainer, "kd_loss")))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "Offline teacher cache**: top-8" in card


@pytest.mark.parametrize("passed", [False, True])
def test_a_messages_cache_trains_with_its_top_k_left_in_the_shards(tmp_path, tokenizer, teacher, passed):
    """Splitting `messages` into prompt and completion writes a copy (`map`); it holds the rows' own columns only,
    and the top-k columns are read from the shards."""
    dataset = make_dataset("messages", 12)
    write(teacher, tokenizer, dataset, tmp_path / "cache")
    trainer = trainer_on(tmp_path, tokenizer, tmp_path / "cache", dataset=dataset if passed else None, max_steps=2)
    shards = {str(p) for p in (tmp_path / "cache").rglob("data-*.arrow")}
    files = {f["filename"] for f in trainer.train_dataset.cache_files}
    assert len(shards) == 3 and shards <= files
    for copy_file in files - shards:
        with pa.memory_map(copy_file) as source:
            assert not set(pa.ipc.open_stream(source).schema.names) & set(CACHE_COLUMNS)
    trainer.train()
    assert all(np.isfinite(logged(trainer, "kd_loss")))


@pytest.mark.parametrize("lmbda", [0.0, 0.5])
def test_a_whole_vocabulary_cache_trains_as_the_live_teacher(tmp_path, tokenizer, teacher, lmbda):
    """k = V in fp32: the cached rows' losses are the live teacher's; with lmbda = 0.5 the sampled rows still run the
    live teacher, and the run is the live run."""
    dataset = make_dataset("prompt_completion", 12)
    write(teacher, tokenizer, dataset, tmp_path / "cache", k=len(tokenizer), value_dtype="float32")
    common = dict(max_steps=3, lmbda=lmbda)
    live_args = make_args(tmp_path / "live", KDConfig, **common)
    torch.manual_seed(0)
    live = KDTrainer(
        model=build_model("qwen2", tokenizer, "student", seed=0),
        teacher_model=teacher,
        args=live_args,
        train_dataset=dataset,
        processing_class=tokenizer,
    )
    live.train()
    torch.manual_seed(0)
    cached = trainer_on(tmp_path, tokenizer, tmp_path / "cache", teacher=teacher, dataset=dataset, **common)
    cached.train()
    assert logged(cached, "kd_loss") == pytest.approx(logged(live, "kd_loss"), rel=1e-5)
    if lmbda:
        assert 0 < np.mean(logged(cached, "on_policy_fraction")) < 1


def test_refusals(tmp_path, tokenizer, teacher):
    dataset = make_dataset("prompt_completion", 8)
    cache = tmp_path / "cache"
    write(teacher, tokenizer, dataset, cache, temperature=2.0)
    with pytest.raises(ValueError, match="temperature 2.0.*set it to 2.0"):
        trainer_on(tmp_path, tokenizer, cache)
    other = copy.deepcopy(tokenizer)
    other.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # other ids for the same rows
    with pytest.raises(ValueError, match="tokenizer is not the student's"):
        trainer_on(tmp_path, other, cache, loss_temperature=2.0)
    with pytest.raises(ValueError, match="computed from another dataset"):
        trainer_on(
            tmp_path, tokenizer, cache, dataset=make_dataset("prompt_completion", 8, seed=5), loss_temperature=2.0
        )
    with pytest.raises(ValueError, match="seq_kd=True|cache with `--seq_kd`"):
        trainer_on(tmp_path, tokenizer, cache, seq_kd=True, loss_temperature=2.0)
    with pytest.raises(ValueError, match="cut to 8 tokens"):
        trainer_on(tmp_path, tokenizer, cache, loss_temperature=2.0, max_completion_length=16)
    with pytest.raises(ValueError, match="No teacher.*lmbda=0"):
        trainer_on(tmp_path, tokenizer, cache, loss_temperature=2.0, lmbda=0.5)
    with pytest.raises(ValueError, match="PromptKD.*teacher_cache"):
        make_args(tmp_path, PromptKDConfig, teacher_cache=str(cache))
    with pytest.raises(FileNotFoundError, match="no teacher_cache.json"):
        trainer_on(tmp_path, tokenizer, tmp_path)


def test_a_row_whose_tokens_differ_is_refused_with_its_index(tmp_path, tokenizer, teacher):
    dataset = make_dataset("prompt_completion", 8)
    write(teacher, tokenizer, dataset, tmp_path / "cache")
    cache, manifest = load_teacher_cache(str(tmp_path / "cache"))
    # the cache of another completion for row 3, as if the dataset had changed under it
    changed = cache.map(
        lambda row, i: {"teacher_completion_ids": row["teacher_completion_ids"][::-1]} if i == 3 else {},
        with_indices=True,
    )
    edited = tmp_path / "edited"
    edited.mkdir()
    manifest = TeacherCacheManifest(**{**manifest.__dict__, "num_rows": 8, "shard_rows": 8})
    manifest.save(str(edited))
    changed.save_to_disk(str(edited / SHARD_PATTERN.format(index=0)))
    trainer = trainer_on(tmp_path, tokenizer, edited, per_device_train_batch_size=8, max_steps=1)
    with pytest.raises(ValueError, match="Row 3 of the teacher cache .*completion tokens differ"):
        trainer.train()
