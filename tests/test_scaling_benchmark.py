"""`benchmarks/scaling.py` end to end on the tiny pair: cells measured in fresh processes, written as records, not
run again, and reported against `trl.DistillationTrainer` at the same cell."""

import json
import subprocess
import sys

import pytest

from helpers import ROOT


@pytest.mark.slow
def test_tiny_grid_records_resumes_and_reports(tmp_path):
    trainers = "trl-distillationtrainer-on-policy-jsd-0-5,skd-every-draft-accepted-k-v"
    command = [
        sys.executable, str(ROOT / "benchmarks" / "scaling.py"), "--tiny", "--lengths", "8", "--batches", "2",
        "--steps", "2", "--threads", "1", "--trainers", trainers, "--records", str(tmp_path / "records"),
        "--plots", "",
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = sorted((tmp_path / "records" / "tiny").glob("*/*.json"))
    assert [p.parent.name for p in records] == trainers.split(",")[::-1]  # sorted by slug
    cells = {p.parent.name: json.loads(p.read_text())["metrics"] for p in records}

    reference = cells["trl-distillationtrainer-on-policy-jsd-0-5"]
    # TRL's trainer runs the teacher once per step, in the loss, over the whole batch
    assert reference["teacher_forwards_per_token"] * reference["generated_tokens_per_step"] == pytest.approx(1.0)
    skd = cells["skd-every-draft-accepted-k-v"]
    assert skd["acceptance"] == 1.0 and skd["teacher_token_fraction"] == 0.0
    for cell in cells.values():
        assert 0 < cell["generated_tokens_per_step"] <= 2 * 8
        assert cell["seconds_per_step"] > 0 and cell["peak_rss_mib"] > 0
        assert all(seconds >= 0 for seconds in cell["phases"].values()), cell["phases"]  # no time counted twice
    assert "| trl.DistillationTrainer (on-policy, JSD 0.5) | 1.00x |" in proc.stdout
    assert "| SKD, every draft accepted (K = V) |" in proc.stdout

    stamps = [p.stat().st_mtime_ns for p in records]
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [p.stat().st_mtime_ns for p in records] == stamps  # finished cells are not run again
    assert "s/step" not in again.stdout.split("Machine:")[0]  # no progress lines: nothing ran
    assert again.stdout.split("Machine:")[1] == proc.stdout.split("Machine:")[1]
