"""`benchmarks/cross_tokenizer.py` end to end on tiny stand-ins for the real pair's folders (no download)."""

import json
import math
import subprocess
import sys

import pytest

from trl_kd.testing import build_metaspace_tokenizer, build_model, build_tokenizer, make_pairs

from helpers import ROOT


@pytest.mark.slow
def test_the_benchmark_times_every_row_against_the_reference(tmp_path):
    root = tmp_path / "real-v1"
    ours, theirs = build_tokenizer(), build_metaspace_tokenizer()
    for name, tokenizer, size in (
        ("teacher", ours, "teacher"),
        ("students/pruned-8", ours, "student"),
        ("cross-teacher", theirs, "teacher"),
    ):
        build_model("llama", tokenizer, size, save_dir=root / name)
        tokenizer.save_pretrained(root / name)
    (root / "answers").mkdir()
    lines = [json.dumps({"prompt": q, "text": a}) for q, a in make_pairs(16)]
    (root / "answers" / "train-greedy.jsonl").write_text("\n".join(lines) + "\n")
    command = [sys.executable, str(ROOT / "benchmarks" / "cross_tokenizer.py"), "--root", str(root)]
    proc = subprocess.run(
        command + ["--steps", "2", "--batch", "2", "--tokens", "8", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [
        line.split(" | ") for line in proc.stdout.splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")
    ]
    assert len(rows) == 6
    for cells in rows:
        assert float(cells[2]) > 0
    assert [cells[3] for cells in rows[::3]] == ["1.00x |", "1.00x |"]


@pytest.mark.slow
def test_the_quality_benchmark_trains_scores_and_reports_both_methods(tmp_path):
    root = tmp_path / "real-v1"
    ours, theirs = build_tokenizer(), build_metaspace_tokenizer()
    for name, tokenizer, size in (("students/pruned-8", ours, "student"), ("cross-teacher", theirs, "teacher")):
        build_model("llama", tokenizer, size, save_dir=root / name)
        tokenizer.save_pretrained(root / name)
    questions = [q for q, _ in make_pairs(16)]
    (root / "prompts.json").write_text(json.dumps({"train": questions[:8], "val": [], "test": questions[8:]}))
    script = ROOT / "benchmarks" / "cross_tokenizer_quality.py"
    records = tmp_path / "records"
    command = [sys.executable, str(script), "--root", str(root), "--records", str(records), "--threads", "1"]
    proc = subprocess.run(command + ["--quick"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    finals = sorted((records.parent / "records-quick").rglob("final-*.json"))
    assert len(finals) == 4  # two methods x two seeds
    for path in finals:
        rec = json.loads(path.read_text())
        assert len(rec["per_prompt"]["student_nll"]) == 4 and rec["cost"]["seconds_per_step"] > 0
        assert all(math.isfinite(x) and x > 0 for x in rec["per_prompt"]["student_nll"])
    assert "Student before distillation" in proc.stdout and "Teacher (Gemma 3 270M)" in proc.stdout
    # everything is cached (answers, records): a second run trains and generates nothing, and reports the same table
    again = subprocess.run(command + ["--quick"], capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "teacher answers" not in again.stdout and "seed 0:" not in again.stdout
    assert again.stdout.strip() and proc.stdout.endswith(again.stdout)
