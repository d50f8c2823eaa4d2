"""The seams to TRL, transformers and DeepSpeed (`trl_kd._compat`): each private API trl-kd relies on still exists
with the parameters it is called with, every private hook the package touches is listed, and trl-kd's own calls
raise no deprecation warning."""

import inspect
import re
import warnings
from pathlib import Path

import pytest
import torch
from trl import DistillationTrainer

from trl_kd import METHODS
from trl_kd._compat import INSTANCE_ATTRIBUTES, SEAMS, cache_argument, checkpointing_field, resolve
from trl_kd.testing import build_model

from helpers import make_trainer


PACKAGE = Path(__file__).resolve().parents[1] / "trl_kd"


@pytest.mark.parametrize("seam", SEAMS, ids=lambda seam: f"{seam.owner}.{seam.name}")
def test_each_seam_exists_with_the_parameters_trl_kd_uses(seam):
    owner = resolve(seam.owner)
    assert hasattr(owner, seam.name), f"{seam.owner}.{seam.name} is gone; trl-kd relies on it: {seam.relies_on}"
    if seam.parameters:
        parameters = inspect.signature(getattr(owner, seam.name)).parameters
        missing = [name for name in seam.parameters if name not in parameters]
        assert not missing, f"{seam.owner}.{seam.name} lost {missing}; trl-kd relies on it: {seam.relies_on}"


def test_every_private_trainer_hook_the_package_touches_is_a_listed_seam():
    """A private method of TRL's trainer that a trl-kd module overrides or calls must be in `SEAMS`, so the seam
    test above covers it."""
    listed = {seam.name for seam in SEAMS}
    touched = set()
    for path in PACKAGE.rglob("*.py"):
        source = path.read_text()
        touched |= set(re.findall(r"(?:self|super\(\))\.(_[a-z]\w*)\(", source))
        touched |= set(re.findall(r"^    def (_[a-z]\w*)\(", source, flags=re.M))
    private_hooks = {name for name in touched if hasattr(DistillationTrainer, name)}
    assert private_hooks and private_hooks <= listed, sorted(private_hooks - listed)


def test_instance_attributes_trl_kd_reads_exist(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer)
    trainer._set_signature_columns_if_needed()
    missing = {name: why for name, why in INSTANCE_ATTRIBUTES.items() if not hasattr(trainer, name)}
    assert not missing, missing


def test_the_cache_keyword_is_the_one_the_model_takes(tokenizer):
    from peft import LoraConfig, get_peft_model

    model = build_model("qwen2", tokenizer, "student")
    name = cache_argument(model)
    assert name in inspect.signature(type(model).forward).parameters
    assert cache_argument(get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))) == name


@pytest.mark.parametrize("name", list(METHODS))
def test_a_training_step_raises_no_deprecation_warning_from_trl_kd(name, tmp_path, tokenizer):
    """Config with defaults (gradient checkpointing on, TRL's default), a teacher-in-the-loop or student rollout,
    the loss and the card: no FutureWarning or DeprecationWarning, not even the ones TRL's own generation code raises
    under transformers 5.24 (its gradient-checkpointing aliases), which trl-kd silences."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = make_trainer(tmp_path, tokenizer, trainer_class=METHODS[name].trainer, lmbda=1.0, max_steps=1)
        assert getattr(trainer.args, checkpointing_field()) is True and trainer.args.gradient_checkpointing is True
        trainer.train()
    deprecations = [
        f"{w.filename}:{w.lineno}: {w.message}"
        for w in caught
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
    ]
    assert not deprecations, deprecations
    assert all(torch.isfinite(torch.tensor(row["loss"])) for row in trainer.state.log_history if "loss" in row)


def test_only_the_checkpointing_alias_warnings_are_silenced():
    from trl_kd._compat import quiet_checkpointing_aliases

    aliases = [
        "`is_gradient_checkpointing` is deprecated and will be removed in v6. Use `is_activation_checkpointing`.",
        "`gradient_checkpointing_enable` is deprecated and will be removed in v6.",
        "`gradient_checkpointing_disable` is deprecated and will be removed in v6.",
    ]
    others = [
        ("`gradient_checkpointing_kwargs` is deprecated", FutureWarning),  # another name
        (aliases[0], DeprecationWarning),  # another category
        ("something else entirely", FutureWarning),
    ]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_checkpointing_aliases():
            for message in aliases:
                warnings.warn(message, FutureWarning)
            for message, category in others:
                warnings.warn(message, category)
        warnings.warn(aliases[1], FutureWarning)  # outside the context: shown again
    assert [(str(w.message), w.category) for w in caught] == [*others, (aliases[1], FutureWarning)]
