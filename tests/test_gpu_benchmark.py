"""`benchmarks/gpu.py` runs end to end before a GPU is lent: its `--tiny` mode on CPU, two steps per trainer."""

import subprocess
import sys

import pytest
import torch

import trl_kd

from helpers import ROOT


@pytest.mark.slow
def test_tiny_mode_times_every_trainer(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--pairs", "qwen2", "--steps", "2"]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| trainer")]
    rows = [row for row in rows if not row.startswith("| ---")]
    labels = [row.split(" | ")[0][2:] for row in rows]
    assert labels[0].startswith("trl.DistillationTrainer")
    for method in trl_kd.METHODS.values():
        assert any(label.startswith(method.trainer.__name__) for label in labels), method.name
    for row in rows:
        cells = row.strip("| ").split(" | ")
        step, tokens_per_second = float(cells[1]), float(cells[3])
        assert step > 0 and tokens_per_second > 0, row
    assert "Device: CPU" in proc.stdout


@pytest.mark.slow
def test_rows_picks_trainers_and_keeps_the_reference(tmp_path):
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--pairs", "qwen2", "--steps", "1"]
    proc = subprocess.run(command + ["--rows", "never"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    labels = [line.split(" | ")[0][2:] for line in proc.stdout.splitlines() if line.startswith("| ")]
    labels = [label for label in labels if label not in ("trainer", "---")]
    assert len(labels) == 2, labels
    assert labels[0].startswith("trl.DistillationTrainer") and labels[1].startswith("SwitchTrainer"), labels


def test_real_size_mode_needs_a_gpu_and_says_so(tmp_path):
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present: the real-size mode would run")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py")], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2 and "--tiny" in proc.stderr


def test_close_pair_builds_a_student_that_follows_the_teacher(monkeypatch):
    """The smollm2 pair's close student: with the dropped layers silenced (DAMP = 0) it computes the teacher's logits
    exactly, the teacher keeps every layer, and the far student shares the teacher's kept layers."""
    import gpu
    from real_assets import evenly_spaced

    monkeypatch.setattr(gpu, "DAMP", 0.0)
    title, student, teacher, close = gpu.build_pair("smollm2", tiny=True, dtype=torch.float32)
    total = teacher.config.num_hidden_layers
    assert (student.config.num_hidden_layers, close.config.num_hidden_layers, total) == (2, 4, 6)
    assert student.dtype == close.dtype == teacher.dtype

    ids = torch.randint(3, teacher.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        teacher_logits, close_logits = teacher(ids).logits, close(ids).logits
    scale = teacher_logits.abs().max()
    torch.testing.assert_close(close_logits, teacher_logits, rtol=0, atol=1e-5 * float(scale))
    # the final norm sharpens the logits by SHARPEN: the same norm in every model
    assert torch.equal(close.model.norm.weight, teacher.model.norm.weight)
    assert torch.allclose(teacher.model.norm.weight, torch.full_like(teacher.model.norm.weight, gpu.SHARPEN))
    for new, old in enumerate(evenly_spaced(total, 2)):
        assert torch.equal(student.model.layers[new].mlp.up_proj.weight, teacher.model.layers[old].mlp.up_proj.weight)


def test_close_pair_damps_only_the_layers_the_close_student_drops():
    import gpu
    from real_assets import evenly_spaced

    _, _, plain, _ = gpu.build_pair("qwen2", tiny=True, dtype=torch.float32)  # no close student: untouched
    assert plain.model.norm.weight.eq(1).all()
    _, _, reference, _ = gpu.build_pair("smollm2", tiny=True, dtype=torch.float32)
    kept = evenly_spaced(6, 4)
    # the undamped teacher, built again from build_pair's seed, compared layer by layer
    config = gpu.TINY_PAIRS["smollm2"][2]
    torch.manual_seed(0)
    undamped = gpu.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    for index, (damped, original) in enumerate(zip(reference.model.layers, undamped.model.layers)):
        factor = 1.0 if index in kept else gpu.DAMP
        torch.testing.assert_close(damped.mlp.down_proj.weight, original.mlp.down_proj.weight * factor)
        torch.testing.assert_close(damped.self_attn.o_proj.weight, original.self_attn.o_proj.weight * factor)
        torch.testing.assert_close(damped.self_attn.q_proj.weight, original.self_attn.q_proj.weight)


@pytest.mark.slow
def test_profile_splits_the_step_by_phase(tmp_path):
    """`--profile` on the smollm2 pair's close-student rows: DistillationTrainer runs its teacher in the loss only,
    SKD in the sampler only (its loss reuses the sampler's teacher states)."""
    command = [
        sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--tiny", "--pairs", "smollm2", "--steps", "2",
        "--rows", "close student", "--profile",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    profile = proc.stdout.split("Where a step goes")[1]
    header = next(line for line in profile.splitlines() if line.startswith("| trainer"))
    parts = [cell.strip() for cell in header.strip("|").split("|")][2:]
    rows = {}
    for line in profile.splitlines():
        if line.startswith("| ") and not line.startswith(("| trainer", "| ---")):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0]] = {part: float(cell.split()[0]) for part, cell in zip(parts, cells[2:])}
    assert set(rows) == {
        "trl.DistillationTrainer (on-policy, JSD)",
        "trl.DistillationTrainer (on-policy, JSD), close student",
        "SpeculativeKDTrainer, paper defaults (K=25), close student",
    }, rows
    reference, skd = (
        rows["trl.DistillationTrainer (on-policy, JSD), close student"],
        rows["SpeculativeKDTrainer, paper defaults (K=25), close student"],
    )
    assert reference["teacher forward (loss)"] > 0 and reference["sampling: teacher"] == 0
    assert skd["sampling: teacher"] > 0 and skd["teacher forward (loss)"] == 0
