"""Helpers shared by the trainer tests (on `sys.path` through pytest's `pythonpath`)."""

import torch

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
    tmp_path, tokenizer, dataset=None, arch="qwen2", teacher=None, trainer_class=KDTrainer, student=None,
    teacher_processing_class=None, **overrides
):
    student = student if student is not None else build_model(arch, tokenizer, "student", seed=0)
    teacher = teacher if teacher is not None else build_model(arch, tokenizer, "teacher", seed=1)
    dataset = dataset if dataset is not None else make_dataset("prompt_completion", 16)
    return trainer_class(
        model=student, teacher_model=teacher, args=make_args(tmp_path, trainer_class.config_class, **overrides),
        train_dataset=dataset, processing_class=tokenizer, teacher_processing_class=teacher_processing_class,
    )


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
