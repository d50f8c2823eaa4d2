import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from trl_kd.testing import build_model, build_tokenizer  # noqa: E402


torch.set_num_threads(min(2, torch.get_num_threads()))


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
