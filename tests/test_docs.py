"""The documentation site (`mkdocs.yml`, `docs/`) and every code example in it and in the README.

- The site builds with `mkdocs build --strict`: a broken link between pages, a missing anchor, a page left out of
  the nav or a docstring mkdocstrings can't parse fails the build.
- Every public name of `trl_kd` is in the API reference, and every config field trl-kd declares is documented in its
  class's docstring and shows on the rendered API page.
- Every Python block runs; the blocks of a page run in order in one namespace, as a reader pastes them. Every shell
  command that runs trl-kd (`trl-kd ...`, `accelerate launch examples/...`) runs in-process.

The examples are written for real models on GPUs. Here they run with local stand-ins (`DocsSandbox`): Hub model ids
become tiny Llama-style models saved to disk, Hub datasets a tiny synthetic dataset, and every `TrainingArguments`
is made CPU/fp32, untracked and at most 2 optimizer steps. Set-up commands (pip, venv, pytest, mkdocs, benchmarks)
are what CI itself runs; they are only checked to name extras, scripts and options that exist.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import inspect
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import yaml
from transformers import TrainingArguments
from trl import DistillationConfig

import trl_kd
from trl_kd import (
    KDConfig,
    PromptKDConfig,
    SpeculativeKDConfig,
    SwitchConfig,
    checkpoints,
    cross_tokenizer,
    evaluation,
    losses,
    model_card,
    placement,
    planner,
    registry,
    sampler,
    teacher_cache,
    testing,
)
from trl_kd.cli import main as trl_kd_main
from trl_kd.registry import METHODS
from trl_kd.scripts import distill
from trl_kd.testing import make_dataset


ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.M | re.S)

# Hub ids the examples use (and the real pair that `benchmarks/real_model.py prepare` writes), and what stands in for
# them here
REAL_PAIR = "~/.cache/trl-kd/real-v1"
STUDENT_IDS = (
    "Qwen/Qwen2.5-0.5B-Instruct",
    "google/gemma-2b-it",
    "openai-community/gpt2",
    "meta-llama/Llama-3.2-1B",
    f"{REAL_PAIR}/students/pruned-8",
)
TEACHER_IDS = (
    "Qwen/Qwen2.5-7B-Instruct",
    "google/gemma-7b-it",
    "openai-community/gpt2-xl",
    "meta-llama/Llama-3.1-8B",
    f"{REAL_PAIR}/teacher",
)
DATASET_IDS = ("trl-lib/tldr", f"{REAL_PAIR}/dataset")
SETUP_PREFIXES = ("pip ", "python3 -m venv", "source ", "python -m pytest", "mkdocs ", "python benchmarks/", "ruff ")
CONFIGS = (KDConfig, SpeculativeKDConfig, SwitchConfig, PromptKDConfig)


def code_blocks(page: Path, lang: str) -> list[str]:
    """The bodies of the page's fenced blocks in `lang`, de-indented (fences inside list items are indented)."""
    blocks = []
    for match in FENCE.finditer(page.read_text()):
        if match["lang"] == lang:
            indent = len(match["indent"])
            blocks.append("\n".join(line[indent:] for line in match["body"].splitlines()))
    return blocks


def shell_commands(page: Path) -> list[list[str]]:
    """Each command of the page's bash blocks: continuation lines joined, comments dropped, `&&` chains split."""
    commands = []
    for block in code_blocks(page, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            while words:
                end = words.index("&&") if "&&" in words else len(words)
                commands.append(words[:end])
                words = words[end + 1 :]
    return commands


def _page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


# ---------------------------------------------------------------------------------------------------------- site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    site_dir = tmp_path_factory.mktemp("site")
    out = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=600,
    )
    assert out.returncode == 0, f"mkdocs build --strict failed:\n{out.stdout[-4000:]}{out.stderr[-6000:]}"
    return site_dir


def test_site_builds_strict_with_every_page(site):
    for page in (ROOT / "docs").rglob("*.md"):
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        html = site / ("index.html" if relative.name == "index" else relative / "index.html")
        assert html.exists(), f"{page} was not rendered"


def test_api_reference_has_every_public_name_and_config_field(site):
    html = "".join(page.read_text() for page in (site / "api").rglob("index.html"))
    anchors = set(re.findall(r'id="(trl_kd[\w.]*)"', html))
    for name in trl_kd.__all__:
        if not name.startswith("__"):
            obj = getattr(trl_kd, name)
            if hasattr(obj, "__qualname__"):
                candidates = {f"trl_kd.{name}", f"{obj.__module__}.{obj.__qualname__}"}
            else:  # a module-level value such as `trl_kd.METHODS`: its entry is in the module that defines it
                candidates = {f"trl_kd.{name}", f"trl_kd.registry.{name}"}
            assert candidates & anchors, f"no API entry for {name}"
    for module in (
        losses,
        sampler,
        planner,
        placement,
        evaluation,
        model_card,
        testing,
        checkpoints,
        registry,
        teacher_cache,
        cross_tokenizer,
    ):
        for name, obj in vars(module).items():
            if not name.startswith("_") and (inspect.isroutine(obj) or inspect.isclass(obj)):
                if getattr(obj, "__module__", None) == module.__name__:
                    assert f"{module.__name__}.{name}" in anchors, f"no API entry for {module.__name__}.{name}"
    rendered = (site / "api" / "trainers" / "index.html").read_text()
    trl_fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    for config in CONFIGS:
        declared = config.__dict__.get("__annotations__", {})
        assert declared, config
        for name in declared:
            assert re.search(rf"^ +{name} \(", config.__doc__, re.M), f"{config.__name__}.{name} is undocumented"
            assert f"<code>{name}</code>" in rendered or f">{name}<" in rendered, f"{name} not on the API page"
        assert {f.name for f in dataclasses.fields(config)} - trl_fields <= {
            name for c in config.__mro__ for name in c.__dict__.get("__annotations__", {}) if c in CONFIGS
        }


# ------------------------------------------------------------------------------------------------------ examples


class DocsSandbox:
    """Runs the documentation's examples on this machine: see the module docstring."""

    def __init__(self, models: dict[str, str], monkeypatch: pytest.MonkeyPatch, workdir: Path):
        self.models, self.workdir = models, workdir
        monkeypatch.setattr(datasets, "load_dataset", self.load_dataset)
        monkeypatch.setattr(distill, "load_dataset", self.load_dataset)
        original = TrainingArguments.__post_init__

        def cpu_post_init(args):
            args.use_cpu, args.bf16, args.report_to = True, False, "none"
            args.max_steps = 2 if args.max_steps <= 0 else min(args.max_steps, 2)
            original(args)

        monkeypatch.setattr(TrainingArguments, "__post_init__", cpu_post_init)

    @staticmethod
    def load_dataset(path, name=None, split=None, **kwargs):
        assert path in DATASET_IDS, f"the docs load {path!r}: give it a stand-in in DATASET_IDS"
        data = datasets.DatasetDict(
            train=make_dataset("prompt_completion", 8), test=make_dataset("prompt_completion", 4, seed=1)
        )
        return data[split] if split else data

    def python(self, code: str) -> str:
        for hub_id, path in self.models.items():
            code = code.replace(f'"{hub_id}"', repr(path))
        return code

    def command(self, words: list[str]) -> list[str]:
        words = [self.models.get(word, word) for word in words]
        if "--config" in words:  # a recipe names Hub ids too: run a copy with the stand-ins
            at = words.index("--config") + 1
            recipe = self.workdir / "stand-in-recipes" / Path(words[at]).name
            recipe.parent.mkdir(exist_ok=True)
            text = Path(words[at]).read_text()
            for hub_id, path in self.models.items():
                text = text.replace(hub_id, path)
            recipe.write_text(text)
            words[at] = str(recipe)
        return words


@pytest.fixture(scope="module")
def stand_in_models(llama_paths) -> dict[str, str]:
    return {hub_id: llama_paths["student"] for hub_id in STUDENT_IDS} | {
        hub_id: llama_paths["teacher"] for hub_id in TEACHER_IDS
    }


@pytest.fixture
def sandbox(stand_in_models, monkeypatch, tmp_path, default_cache) -> DocsSandbox:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(ROOT / "examples")  # recipes, by their relative paths
    (tmp_path / "trl_kd").symlink_to(ROOT / "trl_kd")  # the shipped accelerate configs, by their relative paths
    monkeypatch.setenv("TRL_KD_CACHE", default_cache)
    return DocsSandbox(stand_in_models, monkeypatch, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if code_blocks(p, "python")], ids=_page_id)
def test_python_examples_run(page, sandbox):
    namespace = {"__name__": "__main__"}
    for i, block in enumerate(code_blocks(page, "python")):
        try:
            exec(compile(sandbox.python(block), f"{_page_id(page)} (python block {i + 1})", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{_page_id(page)}, python block {i + 1} failed:\n{block}") from error


def _run_trl_kd(argv: list[str], sandbox: DocsSandbox, tmp_path: Path) -> None:
    from trl_kd.cli import launch_command

    launch = launch_command(argv[0], argv[1:]) if argv[0] in METHODS else None
    if launch is not None:  # the launcher's config must resolve; the run itself is one process here
        argv = [argv[0], *launch[launch.index("trl_kd.cli") + 2 :]]
    trl_kd_main(sandbox.command(argv))
    if argv[0] in METHODS:
        output_dir = _output_dir(argv) or f"outputs/{argv[0]}-default"
        assert (tmp_path / output_dir / "README.md").exists(), f"no model card in {output_dir}"


def _output_dir(argv: list[str]) -> str | None:
    if "--output_dir" in argv:
        return argv[argv.index("--output_dir") + 1]
    if "--config" in argv:
        return yaml.safe_load((ROOT / argv[argv.index("--config") + 1]).read_text()).get("output_dir")
    return None


def _check_setup_command(words: list[str]) -> None:
    line = " ".join(words)
    extras = importlib.metadata.metadata("trl-kd").get_all("Provides-Extra")
    for extra in re.findall(r"trl-kd\[([\w,-]+)\]|\.\[([\w,-]+)\]", line):
        for name in ",".join(extra).strip(",").split(","):
            assert name in extras, f"`{line}` names the extra {name!r}, which pyproject.toml lacks"
    if line.startswith("python benchmarks/"):
        script = ROOT / words[1]
        assert script.exists(), line
        if "--only" in words:
            assert f'"{words[words.index("--only") + 1]}"' in script.read_text(), line


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PAGES if shell_commands(p)], ids=_page_id)
def test_shell_examples_run(page, sandbox, tmp_path):
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    for words in shell_commands(page):
        line = " ".join(words)
        if line.startswith(SETUP_PREFIXES) or (words[0].startswith("HF_HUB_OFFLINE=") and "pytest" in words):
            _check_setup_command(words)
        elif words[0] == "trl-kd":
            _run_trl_kd(words[1:], sandbox, tmp_path)
        elif words[:2] == ["accelerate", "launch"]:
            launch = launch_command_parser().parse_args(words[2:])
            if launch.config_file:
                load_config_from_file(launch.config_file)
            script = Path(launch.training_script)
            assert script.exists() and script.parent.name == "examples", f"`{line}`: unknown script"
            _run_trl_kd([script.stem, *launch.training_script_args], sandbox, tmp_path)
        else:
            raise AssertionError(f"{_page_id(page)}: no way to run `{line}`; teach tests/test_docs.py")
