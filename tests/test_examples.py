"""The example scripts and the `trl-kd` command: each example runs end to end with no arguments on the embedded
default and writes a model card; recipes parse; bad flags fail with a clear message."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

from trl_kd import METHODS, KDConfig

from helpers import jsonl_dataset, local_run_flags


ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(default_cache):
    """The session's shared cache, so the embedded default teacher is trained once."""
    return {**os.environ, "TRL_KD_CACHE": default_cache, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(command, cwd, env, timeout=600):
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_example_runs_with_no_arguments(method, tmp_path, env):
    script = str(ROOT / METHODS[method].example)
    if method == "switch":  # the README's command
        command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", script]
    else:
        command = [sys.executable, script]
    out = run(command, tmp_path, env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    output_dir = tmp_path / "outputs" / f"{method}-default"
    assert f"to outputs/{method}-default" in out.stdout
    assert "Student ROUGE-L on 48 held-out prompts" in out.stdout
    if method == "switch":  # the newcomer's run must show a clear effect (issue #16: >= 20 ROUGE-L points)
        match = re.search(r"ROUGE-L on 48 held-out prompts: ([\d.]+) before, ([\d.]+) after", out.stdout)
        before, after = map(float, match.groups())
        assert after - before >= 20, out.stdout[-2000:]
    assert (output_dir / "model.safetensors").exists() and (output_dir / "tokenizer.json").exists()
    card = ModelCard.load(output_dir / "README.md")
    assert {"trl-kd", "distillation"} <= set(card.data.tags)
    assert f"**Method**: {METHODS[method].title}" in card.text
    assert "default-v1/teacher" in card.text  # the teacher's path
    assert "| eval_rouge_l |" in card.text and "| eval_rouge_l_before |" in card.text
    if method == "promptkd":
        assert (output_dir / "teacher_prompt" / "adapter_config.json").exists()


@pytest.mark.parametrize("method", list(METHODS))
def test_recipes_parse(method):
    from trl import ModelConfig, ScriptArguments, TrlParser

    config_class = METHODS[method].config
    parser = TrlParser((ScriptArguments, config_class, ModelConfig))
    script_args, args, model_args = parser.parse_args_and_config(
        args=["--config", str(ROOT / "examples" / "recipes" / f"{method}.yaml"), "--bf16", "False"]
    )
    assert model_args.model_name_or_path and args.teacher_model_name_or_path and script_args.dataset_name
    assert args.output_dir and isinstance(args, config_class)


def test_the_cross_tokenizer_recipe_parses():
    from trl import ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((ScriptArguments, KDConfig, ModelConfig))
    script_args, args, model_args = parser.parse_args_and_config(
        args=["--config", str(ROOT / "examples" / "recipes" / "gkd_cross_tokenizer.yaml"), "--bf16", "False"]
    )
    assert args.cross_tokenizer and args.teacher_model_name_or_path and args.cross_tokenizer_matched_weight is None
    assert model_args.model_name_or_path and script_args.dataset_name


def test_the_offline_teacher_recipe_parses():
    from trl import ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((ScriptArguments, KDConfig, ModelConfig))
    script_args, args, model_args = parser.parse_args_and_config(
        args=["--config", str(ROOT / "examples" / "recipes" / "gkd_offline.yaml"), "--bf16", "False"]
    )
    assert args.teacher_cache and args.lmbda == 0 and args.teacher_model_name_or_path is None
    assert model_args.model_name_or_path and script_args.dataset_name


def test_cli_bad_flags_fail_clearly(tmp_path, env):
    unknown = run([sys.executable, "-m", "trl_kd.cli", "switch", "--not_a_flag", "1"], tmp_path, env)
    assert unknown.returncode != 0 and "--not_a_flag" in unknown.stderr
    bad_value = run([sys.executable, "-m", "trl_kd.cli", "switch", "--switch_schedule", "cosine"], tmp_path, env)
    # the field's `choices` metadata: argparse refuses the value and lists the allowed ones, without a traceback
    assert bad_value.returncode == 2 and "Traceback" not in bad_value.stderr
    assert "--switch_schedule" in bad_value.stderr and "invalid choice: 'cosine'" in bad_value.stderr
    assert "'exp', 'linear', 'constant', 'adaptive'" in bad_value.stderr
    no_teacher = run([sys.executable, "-m", "trl_kd.cli", "skd", "--model_name_or_path", "x"], tmp_path, env)
    assert no_teacher.returncode == 2 and "--teacher_model_name_or_path is required" in no_teacher.stderr
    no_method = run([sys.executable, "-m", "trl_kd.cli", "distil"], tmp_path, env)
    assert no_method.returncode == 2 and "invalid choice" in no_method.stderr


def test_script_runs_a_gpu_recipe_on_local_models_and_data(tmp_path, llama_paths, monkeypatch, capsys):
    """The path a user takes with their own models: a recipe naming model folders and a dataset folder (loaded by
    `datasets.load_dataset`), written for GPUs (bf16). Its `output_dir` is honoured and bf16 is turned off on CPU."""

    import yaml

    from trl_kd.scripts import main
    from trl_kd.testing import make_dataset

    data = tmp_path / "data"
    for split, n in (("train", 8), ("test", 4)):
        jsonl_dataset(data, make_dataset("prompt_completion", n, seed=n), split)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": llama_paths["student"],
                "teacher_model_name_or_path": llama_paths["teacher"],
                "dataset_name": str(data),
                "output_dir": str(tmp_path / "from-recipe"),
                "bf16": True,
                "max_steps": 2,
                "per_device_train_batch_size": 4,
                "max_completion_length": 8,
                "report_to": "none",
            }
        )
    )
    monkeypatch.chdir(tmp_path)
    output_dir = main(
        "gkd", ["--config", str(recipe), "--lmbda", "1.0", "--eval_strategy", "steps", "--eval_steps", "2"]
    )
    assert output_dir == str(tmp_path / "from-recipe")
    assert "Student ROUGE-L on 4 held-out prompts" in capsys.readouterr().out  # the test split's 4 rows, not 48
    card = ModelCard.load(tmp_path / "from-recipe" / "README.md")
    assert llama_paths["teacher"] in card.text and "| eval_rouge_l |" in card.text
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--not_a_flag", "1"],
            r"Some specified arguments are not used by the HfArgumentParser: \['--not_a_flag', '1'\]",
        ),
        (["--config", "no-such-recipe.yaml"], r"--config no-such-recipe.yaml: No such file or directory"),
        (["--lmbda", "2"], r"lmbda must be in \[0, 1\], got 2.0"),
        (["--output_dir", "a-file"], r"--output_dir a-file is a file; name a folder"),
        (
            [
                "--model_name_or_path",
                "./no-student",
                "--teacher_model_name_or_path",
                "./no-teacher",
                "--dataset_name",
                "x",
            ],
            r"--model_name_or_path ./no-student: no such folder",
        ),
    ],
)
def test_cli_user_errors_are_one_line_with_exit_2(argv, message, tmp_path, monkeypatch, capsys):
    from trl_kd.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(SystemExit) as exit_:
        main(["gkd", *argv])
    lines = [
        line
        for line in capsys.readouterr().err.splitlines()
        if "Warning" not in line and line.strip() and not line.startswith("  ")
    ]
    assert exit_.value.code == 2
    assert len(lines) == 1 and re.fullmatch(rf"trl-kd gkd: error: {message}.* \(see `trl-kd gkd --help`\)", lines[0])


def test_cli_names_a_missing_teacher_folder(tmp_path, llama_paths, capsys):
    from trl_kd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(
            [
                "gkd",
                "--model_name_or_path",
                llama_paths["student"],
                "--teacher_model_name_or_path",
                str(tmp_path / "no-teacher"),
                "--dataset_name",
                "x",
                "--output_dir",
                str(tmp_path / "out"),
            ]
        )
    assert exit_.value.code == 2
    assert f"--teacher_model_name_or_path {tmp_path / 'no-teacher'}: no such folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,name,expected",
    [
        (
            "--teacher_model_name_or_path",
            "models/no-such-teacher",
            "read as a Hub id (offline: HF_HUB_OFFLINE is set), since there is no local folder of that name, and it "
            "is not in the local Hub cache",
        ),
        ("--model_name_or_path", "no-org/no-such-student", "read as a Hub id"),
        ("--dataset_name", "./no-such-data", "no such folder, and it cannot be loaded"),
        ("--dataset_name", "no-org/no-such-data", "read as a Hub id (offline: HF_HUB_OFFLINE is set)"),
    ],
)
def test_cli_names_what_cannot_be_found_and_how_it_was_read(flag, name, expected, tmp_path, llama_paths, capsys):
    """A model or dataset that cannot be found ends the command in one line that names it and says whether it was
    read as a folder or a Hub id, instead of the Hub client's "couldn't connect" (tests run offline)."""
    from trl_kd.cli import main

    flags = {
        "--model_name_or_path": llama_paths["student"],
        "--teacher_model_name_or_path": llama_paths["teacher"],
        "--dataset_name": "x",
        "--output_dir": str(tmp_path / "out"),
        flag: name,
    }
    with pytest.raises(SystemExit) as exit_:
        main(["gkd", *[item for pair in flags.items() for item in pair]])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("trl-kd gkd: error:")]
    assert exit_.value.code == 2
    assert len(errors) == 1 and errors[0].startswith(f"trl-kd gkd: error: {flag} {name}: {expected}")


@pytest.mark.parametrize("command", ["plan", "cache-teacher"])
def test_the_other_commands_name_what_cannot_be_found(command, tmp_path, llama_paths, capsys):
    from trl_kd.cli import main

    if command == "plan":
        argv = ["plan", "--student", llama_paths["student"], "--teacher", "org/no-teacher", "--gpus", "1"]
        argv += ["--gpu-memory", "8"]
        expected = "--teacher org/no-teacher: read as a Hub id"
    else:
        argv = ["cache-teacher", "--teacher", llama_paths["teacher"], "--dataset_name", "./no-data"]
        argv += ["--output_dir", str(tmp_path / "cache")]
        expected = "--dataset_name ./no-data: no such folder, and it cannot be loaded"
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert exit_.value.code == 2
    assert len(errors) == 1 and f"error: {expected}" in errors[0]


def test_a_missing_hub_model_online_is_named(monkeypatch):
    """Online, a Hub id that names no repository is reported as such (the Hub client is replaced: tests have no
    network)."""
    import huggingface_hub

    from trl_kd.errors import missing_model

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: False)
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda name: name == "org/real")
    assert missing_model("org/real") is None
    assert missing_model("org/none") == (
        "read as a Hub id, since there is no local folder of that name, and the Hub has no such model (or it is "
        "private or gated: `hf auth login`)"
    )

    def unreachable(name):
        raise ConnectionError("Max retries exceeded\nmore detail")

    monkeypatch.setattr(huggingface_hub, "repo_exists", unreachable)
    assert missing_model("org/real").endswith("and the Hub could not be asked: Max retries exceeded")


def test_cli_a_bad_dataset_is_one_line(tmp_path, llama_paths, capsys):
    """An error the trainer raises at construction (here: a row without a prompt) ends the command in one line."""

    rows = [{"prompt": "count: from 0 to 3\n", "completion": "0 1 2 3"}] * 4 + [{"prompt": None, "completion": "0"}]
    data = jsonl_dataset(tmp_path / "data", rows)
    from trl_kd.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["gkd", *local_run_flags(llama_paths, data, tmp_path / "out")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "Traceback" not in err
    assert "trl-kd gkd: error: Row 4 of `train_dataset`: `prompt` must be a string" in err


@pytest.mark.slow
def test_cli_launches_through_accelerate_on_two_processes(tmp_path, llama_paths, env):
    """`trl-kd <method> --accelerate_config ... --num_processes 2` runs the distillation under `accelerate launch`
    (here the shipped ZeRO-2 config, adapted to this CPU as the distributed tests adapt it)."""
    from trl_kd.testing import make_dataset

    from helpers import cpu_config

    data = jsonl_dataset(tmp_path / "data", make_dataset("prompt_completion", 16))
    flags = dict(max_steps=2, per_device_train_batch_size=2, max_completion_length=8, report_to="none")
    command = [sys.executable, "-m", "trl_kd.cli", "gkd", "--accelerate_config", str(cpu_config("zero2", tmp_path))]
    command += ["--num_processes", "2", *local_run_flags(llama_paths, data, tmp_path / "out", **flags)]
    out = run(command, tmp_path, {**env, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "accelerate.commands.launch --config_file" in out.stdout and "--num_processes 2" in out.stdout
    assert "(trained on 2 processes)" in out.stdout
    assert ModelCard.load(tmp_path / "out" / "README.md").text.count("## Distillation") == 1


def test_accelerate_configs_ship_with_the_package_and_resolve_by_name():
    from accelerate.commands.config.config_args import load_config_from_file

    from trl_kd.cli import accelerate_config_path, launch_command

    for name in ("ddp", "zero2", "zero3", "zero3_offload", "fsdp2"):
        path = accelerate_config_path(name)
        assert Path(path).parent.name == "accelerate_configs" and load_config_from_file(path)
    command = launch_command("switch", ["--accelerate_config=zero3", "--num_processes", "8", "--max_steps", "3"])
    assert command[1:] == [
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        accelerate_config_path("zero3"),
        "--num_processes",
        "8",
        "-m",
        "trl_kd.cli",
        "switch",
        "--max_steps",
        "3",
    ]
    assert launch_command("switch", ["--max_steps", "3"]) is None
    with pytest.raises(ValueError, match="not one of the shipped configs"):
        accelerate_config_path("zero4")
