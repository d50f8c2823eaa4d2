"""Real multi-process runs (2 processes, gloo, CPU) of every trainer under DDP, the shipped DeepSpeed ZeRO-2, ZeRO-3
and ZeRO-3 offload configs, FSDP2 (`fsdp_over_gloo`) and ZeRO-3 across 2 nodes (two launchers on localhost), against
single-process references. Each mode is one launch of `distributed/run_trainers.py` (two for 2 nodes). The last test
checks the trainer x backend table in docs/distributed.md against these results."""

import json
import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch


pytest.importorskip("deepspeed", reason="the multi-process tests need DeepSpeed: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent / "distributed"))
import fsdp_over_gloo  # noqa: E402
import run_trainers  # noqa: E402
from conftest import OUTCOMES_KEY  # noqa: E402

from helpers import cpu_config  # noqa: E402


pytestmark = pytest.mark.slow
LAUNCH_TIMEOUT = 900  # seconds; a deadlock fails the test instead of hanging CI


@dataclass(frozen=True)
class Mode:
    """One launch: the accelerate config and the cases it runs."""

    config: str | None  # a shipped accelerate config adapted by `cpu_config`; None: torchrun (DDP)
    cases: tuple[str, ...]
    nodes: int = 1
    resume: bool = False


def _cases_without(*excluded: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(c for c in run_trainers.CASES if not any(c in group for group in excluded))


MODES = {
    "ddp": Mode(None, _cases_without(run_trainers.DEEPSPEED_ONLY, run_trainers.FSDP_ONLY)),
    "zero2": Mode("zero2", _cases_without(run_trainers.FSDP_ONLY)),
    "zero3": Mode("zero3", _cases_without(run_trainers.FSDP_ONLY)),
    "zero3_offload": Mode("zero3_offload", run_trainers.METHODS_ONLY),
    "fsdp2": Mode("fsdp2", _cases_without(run_trainers.DEEPSPEED_ONLY), resume=True),
    "zero3_2nodes": Mode("zero3", run_trainers.METHODS_ONLY, nodes=2),
}
# the launches that run every case (the others run each method's case only)
FULL_MODES = [name for name, mode in MODES.items() if mode.cases != run_trainers.METHODS_ONLY]


def only_under(*modes: str):
    """Run a test on the results of these launches only (the other launches lack its cases)."""
    return pytest.mark.parametrize("launched", modes, indirect=True)


# docs/distributed.md's columns: name -> (mode, the case that shows each method: "{}" is the method's name)
TABLE_COLUMNS = {
    "DDP": ("ddp", "{}"),
    "ZeRO-2": ("zero2", "{}"),
    "ZeRO-2 + sharded teacher": ("zero2", "{}_teacher_sharded"),
    "ZeRO-3": ("zero3", "{}"),
    "ZeRO-3 offload": ("zero3_offload", "{}"),
    "FSDP2": ("fsdp2", "{}"),
    "FSDP2 + replicated teacher": ("fsdp2", "{}_teacher_whole_fsdp"),
    "2-node ZeRO-3": ("zero3_2nodes", "{}"),
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(mode: Mode, tmp_path: Path, models: str) -> tuple[str, list[int]]:
    script = [str(ROOT / "tests" / "distributed" / "run_trainers.py"), "--out", str(tmp_path / "out")]
    script += ["--models", models, "--cases", ",".join(mode.cases), *(["--resume"] if mode.resume else [])]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode.config is None:
        # `accelerate launch` runs MULTI_CPU as a single process; torchrun with ACCELERATE_USE_CPU is what works
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *script]
        env["ACCELERATE_USE_CPU"] = "1"
        return _run([command], env)
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(cpu_config(mode.config, tmp_path)),
    ]
    if mode.config.startswith("fsdp"):
        env.update(ACCELERATE_USE_CPU="1", **{fsdp_over_gloo.ENV: "1"})
    if mode.nodes == 1:
        return _run([launcher + script], env)
    # one launcher per node, each with one process, meeting at a rendezvous on localhost
    port = str(_free_port())
    node = ["--num_machines", str(mode.nodes), "--num_processes", str(mode.nodes), "--main_process_ip", "127.0.0.1"]
    node += ["--main_process_port", port]
    return _run([launcher + [*node, "--machine_rank", str(rank)] + script for rank in range(mode.nodes)], env)


def _run(commands: list[list[str]], env: dict[str, str]) -> tuple[str, list[int]]:
    procs = [
        subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT)
        for c in commands
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=LAUNCH_TIMEOUT)[0])
    finally:
        for proc in procs:
            proc.kill()
    return "\n".join(logs), [proc.returncode for proc in procs]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    directory = tmp_path_factory.mktemp("models")
    run_trainers.save_models(str(directory))
    return str(directory)


@pytest.fixture(scope="module", params=list(MODES))
def launched(request, tmp_path_factory, models):
    mode = MODES[request.param]
    tmp_path = tmp_path_factory.mktemp(request.param)
    log, returncodes = _launch(mode, tmp_path, models)
    done = sum(f"DONE {case} rank {rank}" in log for case in mode.cases for rank in (0, 1))
    # DeepSpeed on CPU rarely aborts a rank at interpreter exit after all work is done: accept that, nothing else.
    assert all(rc == 0 for rc in returncodes) or done == 2 * len(mode.cases), log[-6000:]
    results = {}
    for case in mode.cases:
        results[case] = [json.loads((tmp_path / "out" / case / f"rank{r}.json").read_text()) for r in (0, 1)]
    if mode.resume:
        results["resume"] = [json.loads((tmp_path / "out" / "resume" / f"rank{r}.json").read_text()) for r in (0, 1)]
    return request.param, tmp_path / "out", results


@pytest.fixture(scope="module")
def single_process_losses(tmp_path_factory, models):
    """First-step losses of the deterministic cases in this process, with the global batch on one process."""
    losses = {}
    for case in sorted(set(run_trainers.PARITY_CASES.values())):
        trainer = run_trainers.build_trainer(case, str(tmp_path_factory.mktemp(case)), 4, models, steps=1)
        trainer.train()
        history = trainer.state.log_history
        losses[case] = {key: [row[key] for row in history if key in row][0] for key in ("kd_loss", "loss")}
    return {case: losses[reference] for case, reference in run_trainers.PARITY_CASES.items()}


def _case_results(results):
    return {case: ranks for case, ranks in results.items() if case != "resume"}


def test_every_trainer_ran_on_two_processes_under_the_right_backend(launched):
    mode, _, results = launched
    for case, ranks in _case_results(results).items():
        assert [r["world"] for r in ranks] == [2, 2], case
        config = MODES[mode].config or ""
        expected_stage = int(config[len("zero")]) if config.startswith("zero") else None
        assert all(r["zero_stage"] == expected_stage for r in ranks), case
        assert all(r["fsdp_version"] == (2 if mode == "fsdp2" else None) for r in ranks), case
        assert [r["node_rank"] for r in ranks] == ([0, 1] if MODES[mode].nodes == 2 else [0, 0]), case
        assert all(len(r["kd_loss"]) == 2 and all(map(torch.isfinite, torch.tensor(r["kd_loss"]))) for r in ranks)


def test_models_are_partitioned_where_they_should_be(launched):
    """ZeRO-3 and FSDP2 shard both models, ZeRO-2 and DDP replicate them; `teacher_zero_stage` and `teacher_fsdp`
    override the teacher's placement."""
    mode, _, results = launched
    sharded_student = mode in ("zero3", "zero3_offload", "fsdp2", "zero3_2nodes")

    def assert_sharded(local, full, sharded, what):
        if sharded:  # each rank holds its share, about half
            assert local < full and 2 * local >= full * 0.98, what
        else:
            assert local == full, what

    for case, ranks in _case_results(results).items():
        teacher_sharded = sharded_student
        if case.endswith("_teacher_sharded") or case == "skd_teacher_offloaded":
            teacher_sharded = True
        elif case.endswith(("_teacher_replicated", "_teacher_whole_fsdp")):
            teacher_sharded = False
        for r in ranks:
            if case != "gkd_cached":  # no teacher there (checked by the cache test)
                assert_sharded(*r["teacher_numel"], teacher_sharded, f"{case} teacher")
            # measured after training: FSDP2 shards the student when training starts, ZeRO-3 when it is built
            assert_sharded(*r["student_numel_after"], sharded_student, f"{case} student")
            offloaded = case in ("skd_teacher_offloaded", "gkd_teacher_offloaded_fsdp") or mode == "zero3_offload"
            assert r["teacher_offload"] == offloaded, case


@only_under("fsdp2")
def test_fsdp2_shards_each_models_own_decoder_layers(launched):
    """Each decoder layer is its own FSDP2 unit in both models, also for a teacher of another family than the
    student (a Llama teacher beside a Qwen2 student), so no forward gathers a whole model."""
    _, _, results = launched
    assert "gkd_other_family_teacher" in results
    for case, ranks in _case_results(results).items():
        for r in ranks:
            (teacher_units, student_units), (teacher_layers, student_layers) = r["fsdp_units"], r["layers"]
            assert student_units > student_layers, case
            if r["teacher_numel"][0] < r["teacher_numel"][1]:  # sharded
                assert teacher_units > teacher_layers, case


def test_loss_equals_the_single_process_loss(launched, single_process_losses):
    _, _, results = launched
    compared = 0
    for case, expected in single_process_losses.items():
        for r in results.get(case, []):
            # kd_loss: the token-mean divergence; loss: the trained objective (per-sequence mean for gkd_sequences)
            assert r["kd_loss"][0] == pytest.approx(expected["kd_loss"], rel=1e-4), case
            assert r["loss"][0] == pytest.approx(expected["loss"], rel=1e-4), case
            compared += 1
    assert compared >= 2 * len(run_trainers.METHOD_CASES)  # every method, on both ranks


@only_under(*FULL_MODES)
def test_reused_teacher_states_give_the_recomputed_loss(launched):
    """Both steps' losses with the sampler's teacher states equal those of a teacher forward, also when one rank
    reuses every row and the other needs the (ZeRO-3, FSDP2: collective) teacher forward."""
    _, _, results = launched
    for reused, recomputed in run_trainers.REUSE_PAIRS:
        for a, b in zip(results[reused], results[recomputed]):
            for key in ("kd_loss", "loss"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (reused, key)


@only_under(*FULL_MODES)
def test_a_whole_vocabulary_cache_without_a_teacher_gives_the_live_teachers_loss(launched):
    _, _, results = launched
    for cached, live in zip(results["gkd_cached"], results["gkd"]):
        assert cached["kd_loss"] == pytest.approx(live["kd_loss"], rel=1e-5)
        assert cached["teacher_numel"] == [0, 0]  # no teacher in memory


def test_soft_prompt_stays_identical_across_processes(launched):
    _, _, results = launched
    for case in ("promptkd", "promptkd_teacher_sharded", "promptkd_teacher_whole_fsdp"):
        if case in results:
            rank0, rank1 = results[case]
            assert rank0["soft_prompt"] == rank1["soft_prompt"], case


@only_under(*FULL_MODES)
def test_ranks_that_need_different_numbers_of_rounds_stay_in_step(launched):
    _, _, results = launched
    rank0, rank1 = results["uneven"]
    # rank 1 rejects every draft (one token per round), rank 0 accepts all: both ran rank 1's number of rounds
    assert rank0["rounds"] == rank1["rounds"] == [10, 10]
    assert all(0.0 < f < 1.0 for f in rank0["teacher_token_fraction"])
    # transformers' generation: rank 0 wrote 10 tokens per rollout, rank 1 two, and both finished (with the student
    # gathered once per rollout, and layer by layer, where the ranks' forwards are collectives)
    for case in ("uneven_generation", "uneven_generation_layerwise"):
        rank0, rank1 = results[case]
        assert rank0["rounds"] == [10, 10] and rank1["rounds"] == [2, 2], case


@only_under(*(name for name, mode in MODES.items() if mode.resume))
def test_a_resumed_run_continues_the_uninterrupted_one(launched):
    _, _, results = launched
    for r in results["resume"]:
        assert len(r["straight"]) == 4
        assert r["resumed"] == pytest.approx(r["straight"], rel=1e-5)


def test_saved_students_load(launched):
    from transformers import AutoModelForCausalLM

    _, out, results = launched
    for case, ranks in _case_results(results).items():
        model = AutoModelForCausalLM.from_pretrained(out / case)
        assert sum(p.numel() for p in model.parameters()) == ranks[0]["student_numel"][1]


# the placement of the planner each launch's `gkd` case (and the ZeRO-2 sharded-teacher case) ran
PLANNED = {
    "ddp": {"gkd": "DDP (everything replicated)"},
    "zero2": {"gkd": "ZeRO-2", "gkd_teacher_sharded": "ZeRO-2 + sharded teacher"},
    "zero3": {"gkd": "ZeRO-3"},
    "fsdp2": {"gkd": "FSDP2", "gkd_teacher_whole_fsdp": "FSDP2 + replicated teacher"},
}


@only_under(*PLANNED)
def test_planner_matches_the_measured_partitioning(launched, models):
    """The planner's per-GPU weights for the placement that ran equal the parameters each rank really held (ZeRO-3
    offload and 2 nodes place weights as ZeRO-3 does)."""
    from trl_kd.planner import GIB, ModelSpec, plan

    mode, _, results = launched
    student = ModelSpec.from_pretrained(os.path.join(models, "student"))
    teacher = ModelSpec.from_pretrained(os.path.join(models, "teacher"))
    estimates = {e.placement.name: e.parts_gib for e in plan(student, teacher, 2, 80, dtype="fp32").estimates}
    for case, placement in PLANNED[mode].items():
        for r in results[case]:
            fp32_bytes = 4
            assert estimates[placement]["teacher weights"] * GIB == pytest.approx(
                r["teacher_numel"][0] * fp32_bytes, rel=0.01
            ), (case, placement)
            assert estimates[placement]["student weights"] * GIB == pytest.approx(
                r["student_numel_after"][0] * fp32_bytes, rel=0.01
            ), (case, placement)


# ------------------------------------------------------------------------------------ the table in the docs
TABLE_START, TABLE_END = "<!-- distributed-matrix:start -->", "<!-- distributed-matrix:end -->"


def matrix_table(outcomes: dict[str, dict[str, bool]]) -> str:
    """The trainer x backend table: a cell is tested when its launch ran that trainer's case and every check of the
    launch passed."""
    from trl_kd import METHODS

    lines = ["| trainer | " + " | ".join(TABLE_COLUMNS) + " |", "|" + " --- |" * (len(TABLE_COLUMNS) + 1)]
    for method in run_trainers.METHOD_CASES:
        cells = []
        for mode, pattern in TABLE_COLUMNS.values():
            ran = pattern.format(method) in MODES[mode].cases
            passed = bool(outcomes.get(mode)) and all(outcomes[mode].values())
            cells.append("tested" if ran and passed else "not tested")
        lines.append(f"| `{METHODS[method].trainer.__name__}` | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def test_the_documented_backend_table_is_what_these_tests_found(request):
    """docs/distributed.md's table is generated from this module's results (run it whole). To update it after a
    change: `TRL_KD_WRITE_MATRIX=1 pytest tests/test_distributed.py`."""
    outcomes = request.config.stash.get(OUTCOMES_KEY, {})
    if set(outcomes) != set(MODES):
        pytest.skip("run the whole module: the table needs every launch's results")
    table = matrix_table(outcomes)
    path = ROOT / "docs" / "distributed.md"
    text = path.read_text()
    documented = re.search(re.escape(TABLE_START) + r"\n(.*?)\n" + re.escape(TABLE_END), text, re.S)
    assert documented is not None, f"docs/distributed.md lacks the {TABLE_START} ... {TABLE_END} block"
    if os.environ.get("TRL_KD_WRITE_MATRIX") == "1":
        path.write_text(text.replace(documented.group(1), table))
        return
    assert documented.group(1) == table, f"docs/distributed.md's table is out of date; the suite found:\n{table}"
