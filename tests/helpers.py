"""Helpers shared by the trainer tests (on `sys.path` through pytest's `pythonpath`)."""

import json
from pathlib import Path

import torch
import yaml

from trl_kd import KDConfig, KDTrainer
from trl_kd.testing import build_model, make_dataset


def make_args(tmp_path, config_class=KDConfig, **overrides):
    defaults = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=2,
        max_completion_length=8,
        learning_rate=0.05,
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=7,
        disable_tqdm=True,
    )
    defaults.update(overrides)
    return config_class(**defaults)


def make_trainer(
    tmp_path,
    tokenizer,
    dataset=None,
    arch="qwen2",
    teacher=None,
    trainer_class=KDTrainer,
    student=None,
    teacher_processing_class=None,
    **overrides,
):
    student = student if student is not None else build_model(arch, tokenizer, "student", seed=0)
    teacher = teacher if teacher is not None else build_model(arch, tokenizer, "teacher", seed=1)
    dataset = dataset if dataset is not None else make_dataset("prompt_completion", 16)
    return trainer_class(
        model=student,
        teacher_model=teacher,
        args=make_args(tmp_path, trainer_class.config_class, **overrides),
        train_dataset=dataset,
        processing_class=tokenizer,
        teacher_processing_class=teacher_processing_class,
    )


def assert_close_to_rounding(
    actual: torch.Tensor, expected: torch.Tensor, ulps: int = 512, dtype: torch.dtype | None = None, **kwargs
) -> None:
    """Equal up to rounding: the same quantity computed in another order (a KV cache against a full forward, reused
    teacher states against recomputed ones, a chunked loss against a dense one) agrees within ``ulps`` units of the
    rounding of ``dtype`` (default: ``expected``'s; pass ``torch.float32`` when ``expected`` is a float64 reference of
    an fp32 computation) at the largest magnitude of ``expected``. A tolerance from the dtype and the magnitude, not
    from one machine's kernels (the blocking of matrix products differs across x86 CPUs)."""
    dtype = dtype or expected.dtype
    eps = torch.finfo(dtype).eps
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, torch.finfo(dtype).tiny)
    torch.testing.assert_close(actual, expected, rtol=ulps * eps, atol=ulps * eps * scale, **kwargs)


def params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def logged(trainer, key):
    return [row[key] for row in trainer.state.log_history if key in row]


def assert_changed(before, model):
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed, "no parameter changed"


def rollout_with_seed(trainer, prompt_ids, rule=None, seed=0):
    """The trainer's own rollout, or a teacher-in-the-loop rollout under `rule` with the trainer's settings, from a
    fixed seed (so two rules can be compared on the same random draws)."""
    torch.manual_seed(seed)
    if rule is None:
        return trainer.rollout(prompt_ids)
    return trainer.teacher_in_the_loop_rollout(prompt_ids, rule, trainer.args.num_draft_tokens)


ROOT = Path(__file__).resolve().parents[1]


def cpu_config(stage: str, tmp_path: Path) -> Path:
    """The shipped accelerate config `stage` (a DeepSpeed or FSDP2 one), adapted to this CPU: 2 processes, fp32 and,
    for ZeRO-3, a persistence threshold of 0 so that even tiny tensors are really partitioned. (FSDP2 on CPU also
    needs `fsdp_over_gloo` in the launched processes.)"""
    config = yaml.safe_load((ROOT / "trl_kd" / "accelerate_configs" / f"{stage}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", use_cpu=True)
    ds = config.get("deepspeed_config")
    if ds is not None and ds["zero_stage"] == 3:
        offload = {
            f"offload_{what}": {"device": "cpu"}
            for what in ("param", "optimizer")
            if ds.get(f"offload_{what}_device", "none") != "none"
        }
        ds_json = {
            "zero_optimization": {
                "stage": 3,
                "stage3_param_persistence_threshold": 0,
                "stage3_gather_16bit_weights_on_model_save": ds.get("zero3_save_16bit_model", False),
                **offload,
            },
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "bf16": {"enabled": False},
            "fp16": {"enabled": False},
        }
        (tmp_path / f"{stage}_ds.json").write_text(json.dumps(ds_json))
        config["deepspeed_config"] = {
            "deepspeed_config_file": str(tmp_path / f"{stage}_ds.json"),
            "zero3_init_flag": True,
            "deepspeed_multinode_launcher": ds["deepspeed_multinode_launcher"],
        }
        config.pop("mixed_precision")  # set in the DeepSpeed file
    path = tmp_path / f"{stage}_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def jsonl_dataset(folder: Path, rows, split: str = "train") -> Path:
    """Write `rows` to `folder/<split>.jsonl`, a dataset folder `datasets.load_dataset` reads; returns `folder`."""
    folder.mkdir(exist_ok=True)
    (folder / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def local_run_flags(paths: dict[str, str], data: Path, output_dir: Path, **flags) -> list[str]:
    """`trl-kd <method>` flags for the local student and teacher in `paths`, the dataset folder `data`, and `flags`."""
    argv = ["--model_name_or_path", paths["student"], "--teacher_model_name_or_path", paths["teacher"]]
    argv += ["--dataset_name", str(data), "--output_dir", str(output_dir)]
    for name, value in flags.items():
        argv += [f"--{name}", str(value)]
    return argv
