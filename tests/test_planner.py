"""The memory planner: exact parameter counts, hand-computed parts, placement ordering, and the CLI."""

import subprocess
import sys

import pytest
from transformers import LlamaConfig

from trl_kd.planner import GIB, PLACEMENTS, ModelSpec, plan
from trl_kd.testing import build_model


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False), ("gpt2", True)])
def test_parameter_count_matches_the_real_model(tokenizer, arch, tied):
    model = build_model(arch, tokenizer, "teacher", tie_word_embeddings=tied)
    spec = ModelSpec.from_config(model.config)
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert spec.num_layers == model.config.get_text_config().num_hidden_layers


def spec(name, params, layers=32, hidden=4096, kv_heads=8, head_dim=128):
    return ModelSpec(name, params, layers, hidden, kv_heads, head_dim, 128_000, params // layers)


def test_parts_match_a_hand_computation():
    student, teacher = spec("s", 10**9, layers=16, hidden=2048), spec("t", 7 * 10**9)
    result = plan(
        student, teacher, num_gpus=8, gpu_memory_gib=80, batch_size=2, prompt_length=100, completion_length=156
    )
    by_name = {e.placement.name: e.parts_gib for e in result.estimates}
    ddp, zero2, zero2_t, zero3, offload, fsdp_whole_teacher, fsdp = (by_name[p.name] for p in PLACEMENTS)
    assert ddp["student weights"] == pytest.approx(2e9 / GIB)  # bf16
    assert ddp["optimizer"] == pytest.approx(12e9 / GIB)  # fp32 master + 2 moments
    assert zero2["optimizer"] == pytest.approx(12e9 / 8 / GIB)
    assert zero2["student grads"] == pytest.approx(2e9 / 8 / GIB)
    assert zero2["teacher weights"] == pytest.approx(14e9 / GIB)  # replicated beside ZeRO-2
    assert zero2_t["teacher weights"] == pytest.approx(14e9 / 8 / GIB)  # teacher_zero_stage=3
    assert zero3["student weights"] == pytest.approx(2e9 / 8 / GIB)
    assert offload["teacher weights"] == offload["optimizer"] == 0.0
    # FSDP2 under bf16: trainable weights in fp32 (4 bytes), fp32 gradients, two fp32 moments, all sharded 8 ways
    assert fsdp["student weights"] == pytest.approx(4e9 / 8 / GIB)
    assert fsdp["student grads"] == pytest.approx(4e9 / 8 / GIB)
    assert fsdp["optimizer"] == pytest.approx(8e9 / 8 / GIB)
    assert fsdp["teacher weights"] == pytest.approx(14e9 / 8 / GIB)  # frozen: bf16, sharded
    assert fsdp_whole_teacher["teacher weights"] == pytest.approx(14e9 / GIB)  # teacher_fsdp=False
    assert fsdp_whole_teacher["student weights"] == fsdp["student weights"]
    # K and V, per layer, per kv head, per head dim, per token, per sequence, 2 bytes
    kv = 2 * (16 * 8 * 128 + 32 * 8 * 128) * 256 * 2 * 2
    assert ddp["KV caches"] == pytest.approx(kv / GIB)


def test_sharding_lowers_the_training_peak_and_more_gpus_never_cost_more():
    student, teacher = spec("s", 10**9), spec("t", 70 * 10**9, layers=80, hidden=8192)
    for backend in ("deepspeed", "fsdp2"):  # each backend's placements, in order, shard more and more
        peaks = [e.train_peak_gib for e in plan(student, teacher, 8, 80, backends=(backend,)).estimates]
        assert len(peaks) == (5 if backend == "deepspeed" else 3)  # DDP, then the backend's placements
        assert peaks == sorted(peaks, reverse=True), backend
    for a, b in zip(plan(student, teacher, 4, 80).estimates, plan(student, teacher, 8, 80).estimates):
        assert b.train_peak_gib <= a.train_peak_gib


def test_recommendation():
    small = plan(spec("s", 10**8, layers=12, hidden=768), spec("t", 10**9, layers=24, hidden=2048), 2, 80)
    assert small.recommended.placement is PLACEMENTS[0]  # everything fits replicated: the fastest wins
    big = plan(spec("s", 10**9), spec("t", 70 * 10**9, layers=80, hidden=8192), 8, 80)
    assert big.recommended.placement.teacher_sharded  # a 140 GB teacher can't be replicated on 80 GB
    assert plan(spec("s", 10**9), spec("t", 400 * 10**9, layers=120, hidden=16384), 2, 24).recommended is None
    assert "Nothing fits" in plan(spec("s", 10**9), spec("t", 400 * 10**9), 2, 24).table()


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="num_gpus"):
        plan(spec("s", 10), spec("t", 10), 0, 80)
    with pytest.raises(ValueError, match="dtype"):
        plan(spec("s", 10), spec("t", 10), 1, 80, dtype="int8")


def test_worked_example_in_the_docs():
    """docs/distributed.md: Llama-3.1-8B -> Llama-3.2-1B (published shapes) on 4 x 24 GiB."""
    teacher = ModelSpec.from_config(
        LlamaConfig(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=14336,
            vocab_size=128256,
            tie_word_embeddings=False,
        ),
        "Llama-3.1-8B",
    )
    student = ModelSpec.from_config(
        LlamaConfig(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
        ),
        "Llama-3.2-1B",
    )
    assert round(teacher.num_params / 1e9, 2) == 8.03 and round(student.num_params / 1e9, 2) == 1.24
    result = plan(student, teacher, num_gpus=4, gpu_memory_gib=24)
    assert result.recommended.placement.name == "ZeRO-2 + sharded teacher"
    # FSDP2 only: both models gathered for sampling don't fit; gathered layer by layer they do
    assert plan(student, teacher, 4, 24, backends=("fsdp2",)).recommended is None
    layerwise = plan(student, teacher, 4, 24, backends=("fsdp2",), gather_for_generation=False)
    assert layerwise.recommended.placement.name == "FSDP2"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "trl_kd.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_plan_on_local_models(tiny_paths):
    out = run_cli(
        "plan",
        "--student",
        tiny_paths["student"],
        "--teacher",
        tiny_paths["teacher"],
        "--gpus",
        "2",
        "--gpu-memory",
        "16",
    )
    assert out.returncode == 0, out.stderr
    assert "| ZeRO-3 |" in out.stdout and "| FSDP2 |" in out.stdout and "Recommended: DDP" in out.stdout
    models = ["--student", tiny_paths["student"], "--teacher", tiny_paths["teacher"]]
    fsdp = run_cli("plan", *models, "--gpus", "2", "--gpu-memory", "16", "--backend", "fsdp2")
    assert fsdp.returncode == 0, fsdp.stderr
    assert "| FSDP2 + replicated teacher |" in fsdp.stdout and "ZeRO" not in fsdp.stdout


def test_cli_env_and_bad_flags():
    env = run_cli("env")
    assert env.returncode == 0 and "- trl:" in env.stdout and "- trl-kd:" in env.stdout
    bad = run_cli("plan", "--student", "x", "--teacher", "y", "--gpus", "two", "--gpu-memory", "16")
    assert bad.returncode == 2 and "invalid int value: 'two'" in bad.stderr


def test_bad_sizes_are_refused_nan_included():
    for kwargs, match in (
        (dict(gpu_memory_gib=float("nan")), "finite"),
        (dict(gpu_memory_gib=-5.0), "finite"),
        (dict(batch_size=0), "batch_size"),
    ):
        with pytest.raises(ValueError, match=match):
            plan(spec("s", 10), spec("t", 10), **{"num_gpus": 1, "gpu_memory_gib": 80, **kwargs})


def test_one_gpu_is_not_called_ddp():
    result = plan(spec("s", 10**8, layers=12, hidden=768), spec("t", 10**9, layers=24, hidden=2048), 1, 80)
    assert result.recommended.placement.name == "Single GPU (one process)"
    assert "DDP" not in result.table() and "multi-GPU" not in result.table()
    two = plan(spec("s", 10**8, layers=12, hidden=768), spec("t", 10**9, layers=24, hidden=2048), 2, 80)
    assert two.recommended.placement is PLACEMENTS[0]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--gpus", "0", "--gpu-memory", "16"], "argument --gpus: must be a finite number > 0, got 0"),
        (["--gpus", "2", "--gpu-memory", "-5"], "argument --gpu-memory: must be a finite number > 0, got -5"),
        (["--gpus", "2", "--gpu-memory", "nan"], "argument --gpu-memory: must be a finite number > 0, got nan"),
        (
            ["--gpus", "2", "--gpu-memory", "16", "--batch-size", "0"],
            "argument --batch-size: must be a finite number > 0, got 0",
        ),
    ],
)
def test_cli_plan_refuses_bad_sizes_in_one_line(argv, message, tiny_paths, capsys):
    from trl_kd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--student", tiny_paths["student"], "--teacher", tiny_paths["teacher"], *argv])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.strip().splitlines() == [
        f"trl-kd plan: error: {message} (see `trl-kd plan --help`)"
    ]


def test_cli_plan_names_a_missing_folder(tiny_paths, capsys):
    from trl_kd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "plan",
                "--student",
                "./no-such-student",
                "--teacher",
                tiny_paths["teacher"],
                "--gpus",
                "1",
                "--gpu-memory",
                "8",
            ]
        )
    assert exit_.value.code == 2
    assert "--student ./no-such-student: no such folder" in capsys.readouterr().err
