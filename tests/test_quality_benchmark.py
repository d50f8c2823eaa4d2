"""The quality benchmark's statistics and record/resume logic (the benchmark itself runs outside CI)."""

import json

import numpy as np
import pytest

from quality_records import (
    foreign_records,
    is_finished,
    load_records,
    read_record,
    record_path,
    run_once,
    slug,
    write_record,
)
from quality_stats import Interval, mean_and_interval, paired_bootstrap


def test_constant_differences_have_a_point_interval():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0, 100, size=(5, 64))
    interval = paired_bootstrap(baseline + 3.0, baseline)
    assert (interval.mean, interval.low, interval.high) == pytest.approx((3.0, 3.0, 3.0))
    assert interval.excludes_zero and interval.verdict() == "better"


def test_two_prompts_hand_computed():
    # one seed, differences 0 and 2: a resample of two prompts has mean 0 (p=1/4), 1 (p=1/2) or 2 (p=1/4),
    # so the 2.5th and 97.5th percentiles are 0 and 2
    interval = paired_bootstrap(np.array([[0.0, 2.0]]), np.zeros((1, 2)), resamples=20000)
    assert (interval.mean, interval.low, interval.high) == (1.0, 0.0, 2.0)
    assert not interval.excludes_zero and interval.verdict() == "tie"


def test_seeds_are_resampled_too():
    # one prompt, two seeds with differences 0 and 4: means 0, 2, 4 with p = 1/4, 1/2, 1/4
    interval = paired_bootstrap(np.array([[0.0], [4.0]]), np.zeros((2, 1)), resamples=20000)
    assert (interval.mean, interval.low, interval.high) == (2.0, 0.0, 4.0)


def test_pairing_removes_the_shared_prompt_variation():
    """Prompts differ a lot in difficulty; the method is 1 point better on every prompt. Paired: exactly +1."""
    rng = np.random.default_rng(1)
    difficulty = rng.uniform(0, 100, size=(1, 256)).repeat(5, axis=0)
    paired = paired_bootstrap(difficulty + 1.0, difficulty)
    assert paired.low == pytest.approx(1.0) and paired.high == pytest.approx(1.0)
    # the method's own mean has the prompts' spread in its interval (about +-7 points here)
    alone = mean_and_interval(difficulty + 1.0)
    assert alone.high - alone.low > 5.0


def test_worse_and_reproducible():
    rng = np.random.default_rng(2)
    base = rng.uniform(0, 1, size=(5, 100))
    worse = base - 0.2 + rng.normal(0, 0.05, size=base.shape)
    first, second = paired_bootstrap(worse, base, seed=3), paired_bootstrap(worse, base, seed=3)
    assert first == second and first.verdict() == "worse" and first.high < 0
    assert str(Interval(1.0, -0.5, 2.5)) == "+1.0 [-0.5, +2.5]"
    assert str(Interval(-0.17, -0.19, -0.152)) == "-0.170 [-0.190, -0.152]"  # nats: small differences keep digits


def test_shapes_must_match():
    with pytest.raises(ValueError, match="seeds, prompts"):
        paired_bootstrap(np.zeros((2, 3)), np.zeros((3, 2)))


def test_records_are_written_atomically_and_read_back(tmp_path):
    path = record_path(
        tmp_path, "Exact answers", "SKD (K=25, FKL)", seed=2, learning_rate=3e-4, phase="final", steps=400
    )
    assert path.parts[-3:] == ("exact-answers", "skd-k-25-fkl", "final-steps400-lr0.0003-seed2.json")
    assert not is_finished(path)
    write_record(path, {"metrics": {"rouge_l": 41.5}, "seed": 2})
    assert read_record(path)["metrics"] == {"rouge_l": 41.5} and "written_at" in read_record(path)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_half_written_and_foreign_files_are_not_finished_runs(tmp_path):
    path = record_path(tmp_path, "text", "SFT", seed=0, learning_rate=1e-3, phase="grid")
    path.parent.mkdir(parents=True)
    path.write_text('{"metrics": {"ce": 1.')  # a run killed mid-write by an older, non-atomic writer
    assert not is_finished(path)
    (path.parent / "other.json").write_text(json.dumps({"no": "metrics"}))
    (path.parent / ".tmp-abc.json").write_text(json.dumps({"metrics": {}}))
    assert load_records(tmp_path) == []


def test_finished_runs_are_skipped_on_restart(tmp_path):
    calls = []

    def run():
        calls.append(1)
        return {"metrics": {"exact_match": 50.0}, "method": "SFT"}

    path = record_path(tmp_path, "exact", "SFT", seed=0, learning_rate=1e-3, phase="final")
    first, computed = run_once(path, run)
    again, recomputed = run_once(path, run)
    assert computed and not recomputed and len(calls) == 1
    assert again["metrics"] == first["metrics"] == {"exact_match": 50.0}
    assert [r["method"] for r in load_records(tmp_path, "exact")] == ["SFT"]
    assert slug("GKD on-policy (lmbda 1, JSD 0.5)") == "gkd-on-policy-lmbda-1-jsd-0-5"


def test_a_failed_run_writes_nothing(tmp_path):
    path = record_path(tmp_path, "exact", "SFT", seed=0, learning_rate=1e-3, phase="final")

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        run_once(path, crash)
    assert not path.exists()


def test_records_of_other_models_are_foreign():
    models = {"teacher": "aa", "student": "bb"}
    records = [
        {"method": "SFT", "models": models},
        {"method": "old, no fingerprint"},
        {"method": "retrained teacher", "models": {"teacher": "cc", "student": "bb"}},
        {"method": "retrained student", "models": {"teacher": "aa", "student": "dd"}},
    ]
    assert [r["method"] for r in foreign_records(records, models)] == ["retrained teacher", "retrained student"]


def test_a_retrained_teacher_is_refused(tmp_path):
    """Adding runs to records made with another teacher stops before anything is trained; the same models pass."""
    import quality

    class FakeTask:
        setting = quality.SETTINGS["exact"]
        models = {"teacher": "new", "student": "same"}

    write_record(
        record_path(tmp_path, "exact", "SFT on references", 0, 1e-3, "final", 400),
        {"method": "SFT on references", "phase": "final", "metrics": {}, "models": FakeTask.models},
    )
    quality.check_records_match(FakeTask(), str(tmp_path))  # same models: no error
    write_record(
        record_path(tmp_path, "exact", "Teacher", 0, 0.0, "reference"),
        {"method": "Teacher", "phase": "reference", "metrics": {}, "models": {"teacher": "old", "student": "same"}},
    )
    with pytest.raises(SystemExit, match="1 record.* another teacher or base student"):
        quality.check_records_match(FakeTask(), str(tmp_path))


def test_a_legacy_teacher_record_is_rescored(tmp_path, monkeypatch):
    """A teacher record from before fingerprints is checked by re-scoring the teacher: equal scores pass."""
    import quality

    class FakeTask:
        setting, models, teacher, test = quality.SETTINGS["exact"], {"teacher": "t", "student": "s"}, None, []

    write_record(
        record_path(tmp_path, "exact", "Teacher", 0, 0.0, "reference"),
        {"method": "Teacher", "phase": "reference", "metrics": {}, "per_prompt_by_seed": [{"rouge_l": [100.0, 50.0]}]},
    )
    monkeypatch.setattr(quality, "evaluate", lambda *a, **k: {"rouge_l": [100.0, 50.0]})
    quality.check_records_match(FakeTask(), str(tmp_path))
    monkeypatch.setattr(quality, "evaluate", lambda *a, **k: {"rouge_l": [100.0, 49.0]})
    with pytest.raises(SystemExit, match="another teacher"):
        quality.check_records_match(FakeTask(), str(tmp_path))


def test_length_buckets_split_at_the_quantiles_and_pair_with_gkd():
    """Six prompts of 2, 4 and 6 reference tokens; a method 1, 2 and 3 points above GKD on them: three buckets with
    exactly those differences (point intervals, since the gain is the same on every prompt and seed)."""
    import quality_report
    from quality_methods import GKD_BASELINE
    from quality_settings import SETTINGS

    lengths = [2.0, 6.0, 4.0, 2.0, 4.0, 6.0]
    gain = [1.0, 3.0, 2.0, 1.0, 2.0, 3.0]
    rng = np.random.default_rng(2)

    def runs(offset):
        return [
            {"seed": seed, "per_prompt": {"rouge_l": list(base + offset), "reference_tokens": lengths}}
            for seed, base in enumerate(rng.uniform(0, 50, size=(2, 6)))
        ]

    gkd = runs(0.0)
    method = [
        {**r, "per_prompt": {**r["per_prompt"], "rouge_l": list(np.add(r["per_prompt"]["rouge_l"], gain))}}
        for r in gkd
    ]
    lines = quality_report.length_buckets(SETTINGS["exact"], {GKD_BASELINE: gkd, "SKD (K=25, FKL)": method})
    header = next(line for line in lines if line.startswith("| method |"))
    assert header == "| method | 2-2 tokens | 4-4 tokens | 6-6 tokens |"
    row = next(line for line in lines if line.startswith("| SKD"))
    assert "(+1.0 [+1.0, +1.0])" in row and "(+2.0 [+2.0, +2.0])" in row and "(+3.0 [+3.0, +3.0])" in row
    gkd_row = next(line for line in lines if line.startswith(f"| {GKD_BASELINE}"))
    expected = [
        np.mean([r["per_prompt"]["rouge_l"][i] for r in gkd for i in range(6) if lengths[i] == n]) for n in (2, 4, 6)
    ]
    assert gkd_row == f"| {GKD_BASELINE} | " + " | ".join(f"{m:.1f}" for m in expected) + " |"


def test_claims_are_judged_at_every_shared_grid_rate_and_flagged_rate_sensitive():
    """SKD is 2 points above supervised KD at the chosen rate and at grid rate 1e-3, 1 point below at 3e-3 (the same
    on every prompt and seed): point intervals at each rate, and the sign change makes the claim rate-sensitive. A
    grid rate only one of the two methods ran is not compared; "SKD beats on-policy KD" keeps its sign: no flag."""
    import quality_report
    from quality_methods import GKD_BASELINE
    from quality_settings import SETTINGS

    rng = np.random.default_rng(4)
    base = rng.uniform(0, 50, size=(2, 8))

    def runs(offset):
        return [{"seed": seed, "per_prompt": {"rouge_l": list(row + offset)}} for seed, row in enumerate(base)]

    skd, supervised = "SKD (K=25, FKL)", "Supervised KD (lmbda 0, FKL)"
    final = {skd: runs(2.0), supervised: runs(0.0), GKD_BASELINE: runs(-1.0)}
    grid = {
        skd: {(300, 1e-3): runs(2.0), (300, 3e-3): runs(-1.0), (300, 1e-2): runs(5.0)},
        supervised: {(300, 1e-3): runs(0.0), (300, 3e-3): runs(0.0)},
        GKD_BASELINE: {(300, 1e-3): runs(1.0), (300, 3e-3): runs(-3.0)},
    }
    rows = quality_report.claim_rows(SETTINGS["exact"], final, "rouge_l", grid)
    against_supervised = next(row for row in rows if row.startswith("| SKD beats supervised KD"))
    assert against_supervised == (
        "| SKD beats supervised KD (SKD paper) | +2.0 [+2.0, +2.0] | 0.001: +2.0 [+2.0, +2.0]; "
        "0.003: -1.0 [-1.0, -1.0] | confirmed, rate-sensitive |"
    )
    against_gkd = next(row for row in rows if row.startswith("| SKD beats on-policy KD"))
    assert against_gkd.endswith("| 0.001: +1.0 [+1.0, +1.0]; 0.003: +2.0 [+2.0, +2.0] | confirmed |")
    without_grid = quality_report.claim_rows(SETTINGS["exact"], final, "rouge_l")
    assert without_grid[0] == "| SKD beats supervised KD (SKD paper) | +2.0 [+2.0, +2.0] | – | confirmed |"
