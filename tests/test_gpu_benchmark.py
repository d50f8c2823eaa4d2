"""`benchmarks/gpu.py` runs end to end before a GPU is lent: its `--tiny` mode on CPU, two steps per trainer."""

import subprocess
import sys

import pytest

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
