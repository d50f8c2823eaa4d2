import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_kd.testing import build_model, build_tokenizer  # noqa: E402


torch.set_num_threads(min(2, torch.get_num_threads()))

# outcomes of the multi-process tests, by launch: {mode: {test name: passed}}, for the table in docs/distributed.md
# (tests/test_distributed.py's last test); a skipped test counts neither way
OUTCOMES_KEY = pytest.StashKey[dict]()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    mode = getattr(getattr(item, "callspec", None), "params", {}).get("launched")
    if mode is None or report.skipped or (report.when != "call" and report.passed):
        return
    outcomes = item.config.stash.setdefault(OUTCOMES_KEY, {}).setdefault(mode, {})
    outcomes[item.originalname] = outcomes.get(item.originalname, True) and report.passed


@pytest.fixture(scope="session")
def default_cache(tmp_path_factory) -> str:
    """`TRL_KD_CACHE` for every test that runs the embedded default, so its teacher is trained once per session."""
    return str(tmp_path_factory.mktemp("trl-kd-cache"))


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def llama_paths(tmp_path_factory, tokenizer):
    """A Llama-style student and teacher with 2,048 positions, saved with the tokenizer, for loading by path. (A
    saved Qwen2 folder would make AutoTokenizer load a different tokenizer class: see docs/testing.md.)"""
    root = tmp_path_factory.mktemp("llama")
    for role, seed in (("student", 0), ("teacher", 1)):
        tokenizer.save_pretrained(root / role)
        build_model("llama", tokenizer, role, seed=seed, save_dir=root / role, context_length=2048)
    return {"student": str(root / "student"), "teacher": str(root / "teacher")}


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory, tokenizer):
    """A tokenizer, a Qwen2-style student and a teacher saved to disk, for tests that load by path."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "teacher")
    build_model("qwen2", tokenizer, "student", seed=0, save_dir=root / "student")
    build_model("qwen2", tokenizer, "teacher", seed=1, save_dir=root / "teacher")
    return {"student": str(root / "student"), "teacher": str(root / "teacher")}
