"""Records of the quality benchmark: one JSON file per finished run, written atomically, so that an interrupted run
resumes where it stopped and every table and plot is regenerated from the files without retraining.

Layout: ``<root>/<setting>/<method slug>/<phase>-steps<steps>-lr<lr>-seed<seed>.json``, so a run with another
budget, rate or seed is another record. A record holds the setting, method, seed,
learning rate, phase (``"grid"`` for the learning-rate search on the validation split, ``"final"`` for the test
runs), the learning curve (metrics by step), the final metrics, the per-prompt scores, wall time, git commit and the
time it was written, and the fingerprints of the teacher and base student it was made with (``models``), so runs
made with different models are never mixed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any


def slug(name: str) -> str:
    """A file-system-safe name for a method or setting."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def record_path(
    root: str | Path, setting: str, method: str, seed: int, learning_rate: float, phase: str, steps: int = 0
) -> Path:
    return Path(root) / slug(setting) / slug(method) / f"{phase}-steps{steps}-lr{learning_rate:g}-seed{seed}.json"


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def write_record(path: str | Path, record: dict[str, Any]) -> None:
    """Write ``record`` as JSON atomically: a temporary file in the same folder, then a rename, so a killed run
    never leaves a half-written record that would be taken as finished."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**record, "written_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would make shared records unreadable to others
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_record(path: str | Path) -> dict[str, Any] | None:
    """The record at ``path``, or ``None`` if it is missing or unreadable (then the run is done again)."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) and "metrics" in record else None


def is_finished(path: str | Path) -> bool:
    return read_record(path) is not None


def load_records(root: str | Path, setting: str | None = None) -> list[dict[str, Any]]:
    """Every readable record under ``root`` (or under one setting), in a stable order."""
    base = Path(root) / slug(setting) if setting else Path(root)
    records = [read_record(p) for p in sorted(base.rglob("*.json")) if not p.name.startswith(".tmp-")]
    return [r for r in records if r is not None]


def foreign_records(records: list[dict[str, Any]], models: dict[str, str]) -> list[dict[str, Any]]:
    """The records made with other models than ``models`` (role -> fingerprint), e.g. after a teacher was retrained
    on another machine or with another thread count: mixing them with new runs would compare students of different
    teachers. Records without fingerprints (older ones) are not judged here."""
    return [r for r in records if "models" in r and r["models"] != models]


def run_once(path: str | Path, run) -> tuple[dict[str, Any], bool]:
    """The record at ``path`` if that run already finished, else ``run()``'s record, written there. Returns the
    record and whether it was computed now (``False``: resumed from disk)."""
    record = read_record(path)
    if record is not None:
        return record, False
    record = run()
    write_record(path, record)
    return record, True
