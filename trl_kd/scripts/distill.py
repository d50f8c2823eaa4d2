"""One script for every method: `examples/<method>.py` and `trl-kd <method>` call `main(method)`.

    accelerate launch examples/switch.py                       # the embedded default, on a laptop CPU
    accelerate launch examples/skd.py --config examples/recipes/skd.yaml
    accelerate launch examples/switch.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --teacher_model_name_or_path Qwen/Qwen2.5-7B-Instruct \\
        --dataset_name trl-lib/tldr --output_dir qwen-switch --use_peft --lora_r 16

Arguments are TRL's: `ScriptArguments` (dataset), the method's config (training and method fields, including
`teacher_model_name_or_path`) and `ModelConfig` (student loading, PEFT). With no model given, the run uses the
embedded default (`trl_kd.scripts.default`).
"""

from __future__ import annotations

import os
import sys

import torch
import yaml
from datasets import load_dataset
from transformers import AutoTokenizer
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config

from ..errors import first_line, missing_model, one_line_errors, read_as
from ..evaluation import GenerationEvalCallback
from ..registry import UnknownMethodError, get_method
from . import default


EVAL_PROMPTS = 48


def _explicit_flags(argv: list[str]) -> set[str]:
    return {a[2:].split("=")[0].replace("-", "_") for a in argv if a.startswith("--")}


def _recipe_keys(argv: list[str], parser) -> set[str]:
    """The fields a `--config` recipe sets."""
    if "--config" not in argv or argv.index("--config") + 1 >= len(argv):
        return set()
    path = argv[argv.index("--config") + 1]
    try:
        with open(path) as f:
            recipe = yaml.safe_load(f) or {}
    except OSError as error:
        parser.error(f"--config {path}: {error.strerror or error}")
    except yaml.YAMLError as error:
        parser.error(f"--config {path} is not valid YAML: {first_line(error)}")
    if not isinstance(recipe, dict):
        parser.error(f"--config {path} must hold a mapping of flags to values, got {type(recipe).__name__}")
    return set(recipe)


def _check_model_path(parser, flag: str, name: str | None, revision: str | None = None) -> None:
    """Stop before any loading when a model cannot be found, naming it and how it was read (folder or Hub id)."""
    problem = missing_model(name, revision) if name else None
    if problem:
        parser.error(f"{flag} {name}: {problem}")


def _parse(parser, argv: list[str]):
    """TrlParser's parse, with the user's mistakes (an unknown flag, a value a config refuses) as one-line errors."""
    try:
        return parser.parse_args_and_config(args=argv)
    except ValueError as error:
        parser.error(first_line(error))


def _eval_split(dataset, tokenizer, limit: int):
    """Prompt ids (chat template applied) and reference strings of the rows that have a completion."""
    prompts, references = [], []
    for row in dataset.select(range(min(limit, len(dataset)))):
        completion = row.get("completion")
        if completion is None:
            continue
        if isinstance(row["prompt"], list):
            text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
            reference = completion[-1]["content"]
        else:
            text, reference = row["prompt"], completion
        prompts.append(tokenizer(text, add_special_tokens=False)["input_ids"])
        references.append(reference)
    return prompts, references


def main(method: str, argv: list[str] | None = None) -> str:
    """Run a distillation with a registered method (`trl_kd.registry`: gkd, skd, switch, promptkd, or an alias such
    as `kd`); returns the output folder."""
    try:
        spec = get_method(method)
    except UnknownMethodError as error:
        raise SystemExit(str(error)) from None
    method, config_class, trainer_class = spec.name, spec.config, spec.trainer
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = one_line_errors(TrlParser((ScriptArguments, config_class, ModelConfig), prog=f"trl-kd {method}"))
    explicit = _explicit_flags(argv)
    configured = explicit | _recipe_keys(argv, parser)
    extra = []
    if "output_dir" not in configured:
        extra += ["--output_dir", f"outputs/{method}-default"]
    if not torch.cuda.is_available() and "bf16" not in explicit:
        # TRL defaults to bf16 (and GPU recipes ask for it), which a CPU can't run
        extra += ["--bf16", "False", "--use_cpu", "True"]
    script_args, training_args, model_args = _parse(parser, argv + extra)
    if os.path.exists(training_args.output_dir) and not os.path.isdir(training_args.output_dir):
        parser.error(f"--output_dir {training_args.output_dir} is a file; name a folder")

    embedded = model_args.model_name_or_path is None
    if embedded:
        if training_args.teacher_model_name_or_path or script_args.dataset_name:
            parser.error(
                "--model_name_or_path is required with --teacher_model_name_or_path or --dataset_name "
                "(run with none of them for the embedded default)."
            )
        # the embedded default's settings, for every field not given on the command line
        for key, value in default.TRAINING_DEFAULTS.items():
            if key not in configured:
                extra += [f"--{key}", str(value)]
        script_args, training_args, model_args = _parse(parser, argv + extra)
        teacher, student, tokenizer, train_dataset, eval_dataset = default.prepare_default()
        dataset_name = default.DATASET_NAME
    else:
        cache_only = training_args.teacher_cache is not None and training_args.lmbda == 0
        if not training_args.teacher_model_name_or_path and not cache_only:
            parser.error(
                "--teacher_model_name_or_path is required with --model_name_or_path (or an offline --teacher_cache "
                "with --lmbda 0)."
            )
        if not script_args.dataset_name:
            parser.error("--dataset_name is required with --model_name_or_path.")
        _check_model_path(parser, "--model_name_or_path", model_args.model_name_or_path, model_args.model_revision)
        if training_args.teacher_model_name_or_path:
            _check_model_path(
                parser,
                "--teacher_model_name_or_path",
                training_args.teacher_model_name_or_path,
                training_args.teacher_model_revision,
            )
        try:
            dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)
        except (OSError, ValueError) as error:  # not found, offline, no loader for its files, ...
            name = script_args.dataset_name
            parser.error(f"--dataset_name {name}: {read_as(name)}, and it cannot be loaded: {first_line(error)}")
        train_dataset = dataset[script_args.dataset_train_split]
        eval_dataset = dataset[script_args.dataset_test_split] if script_args.dataset_test_split in dataset else None
        tokenizer = AutoTokenizer.from_pretrained(
            model_args.model_name_or_path,
            revision=model_args.model_revision,
            trust_remote_code=training_args.trust_remote_code,  # TRL applies it to both models' loading too
        )
        training_args.model_init_kwargs = {
            **(training_args.model_init_kwargs or {}),
            "revision": model_args.model_revision,
            "attn_implementation": model_args.attn_implementation,
            "dtype": model_args.dtype,
        }
        student, teacher = model_args.model_name_or_path, training_args.teacher_model_name_or_path
        dataset_name = script_args.dataset_name

    try:
        trainer = trainer_class(
            model=student,
            teacher_model=teacher,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset if training_args.eval_strategy != "no" else None,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
        )
    except (ValueError, OSError) as error:  # a bad model, dataset or setting: its message says what to fix
        parser.error(first_line(error))
    trainer.dataset_name = dataset_name
    prompts = []
    if eval_dataset is not None:
        prompts, references = _eval_split(eval_dataset, tokenizer, EVAL_PROMPTS)
        if prompts:
            trainer.add_callback(
                GenerationEvalCallback(trainer, prompts, references, training_args.max_completion_length)
            )
    trainer.train()
    trainer.save_model(training_args.output_dir)
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=dataset_name)
    if trainer.is_world_process_zero():
        history = trainer.state.log_history
        keys = ("eval_teacher_rouge_l", "eval_rouge_l_before", "eval_rouge_l")
        scores = {k: v for row in history for k, v in row.items() if k in keys}
        if len(scores) == 3:
            print(f"Teacher ROUGE-L on {len(prompts)} held-out prompts: {scores['eval_teacher_rouge_l']:.1f}.")
            print(
                f"Student ROUGE-L on {len(prompts)} held-out prompts: {scores['eval_rouge_l_before']:.1f} before, "
                f"{scores['eval_rouge_l']:.1f} after."
            )
        processes = trainer.accelerator.num_processes
        print(
            f"Saved the student, its tokenizer and the model card (README.md) to {training_args.output_dir} "
            f"(trained on {processes} process{'es' if processes > 1 else ''})"
        )
    return training_args.output_dir
