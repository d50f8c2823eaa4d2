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
def tiny_paths(tmp_path_factory, tokenizer):
    """A tokenizer, a Qwen2-style student and a teacher saved to disk, for tests that load by path."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer.save_pretrained(root / "student")
    tokenizer.save_pretrained(root / "teacher")
    build_model("qwen2", tokenizer, "student", seed=0, save_dir=root / "student")
    build_model("qwen2", tokenizer, "teacher", seed=1, save_dir=root / "teacher")
    return {"student": str(root / "student"), "teacher": str(root / "teacher")}
