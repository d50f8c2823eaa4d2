"""The contract every registered method keeps, as one matrix over `trl_kd.METHODS` (PEFT's `TEST_CASES` idea): a
method registered with `register_method` is tested here without being named. Method-specific behaviour stays in the
method's own test file."""

import dataclasses
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from trl import DistillationConfig

from trl_kd import METHODS, KDConfig, KDTrainer, register_method
from trl_kd.registry import UnknownMethodError, get_method, unregister_method
from trl_kd.testing import build_model, make_dataset

from helpers import jsonl_dataset, local_run_flags, logged, make_args, params


ROOT = Path(__file__).resolve().parents[1]
# settings that give a method state worth resuming, or keep it fast; a method not listed runs its defaults
CONTRACT_OVERRIDES = {
    "switch": {"target_teacher_fraction": 0.4, "calibration_rounds": 3},
    "promptkd": {"lmbda": 1.0},
}


def contract_cases():
    return [pytest.param(name, id=name) for name in METHODS]


def method_trainer(method, tmp_path, tokenizer, student=None, peft_config=None, **overrides):
    args = make_args(tmp_path, method.config, **{**CONTRACT_OVERRIDES.get(method.name, {}), **overrides})
    return method.trainer(
        model=student if student is not None else build_model("qwen2", tokenizer, "student", seed=0),
        teacher_model=build_model("qwen2", tokenizer, "teacher", seed=1),
        args=args,
        train_dataset=make_dataset("prompt_completion", 16),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def assert_same_state(a, b, where="state"):
    """Equal nested method states: tensors bit for bit, everything else by value."""
    assert type(a) is type(b), where
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


# ------------------------------------------------------------------------------------------------ the contract
def check_wrong_config_class_is_refused(name, tmp_path, tokenizer):
    method = get_method(name)
    with pytest.raises(TypeError, match=method.trainer.config_class.__name__):
        method.trainer(
            model=build_model("qwen2", tokenizer, "student"),
            teacher_model=build_model("qwen2", tokenizer, "teacher"),
            args=DistillationConfig(output_dir=str(tmp_path), bf16=False, report_to="none"),
            train_dataset=make_dataset("prompt_only", 4),
            processing_class=tokenizer,
        )


def check_bad_shared_values_are_refused(name, tmp_path):
    method = get_method(name)
    for overrides, match in (
        ({"lmbda": 2.0}, "lmbda"),
        ({"beta": float("nan")}, "beta"),
        ({"loss_type": "kl"}, "loss_type"),
    ):
        with pytest.raises(ValueError, match=match):
            make_args(tmp_path, method.config, **overrides)
    # every field of the method's config that lists `choices` refuses a value outside them, by name (checked from
    # the field metadata, so a new method's fields are covered without code of its own)
    trl_fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    listed = [f for f in dataclasses.fields(method.config) if "choices" in f.metadata and f.name not in trl_fields]
    assert {"loss_type", "loss_normalization"} <= {f.name for f in listed}
    assert name != "toy" or "toy_writer" in {f.name for f in listed}
    for f in listed:
        with pytest.raises(ValueError, match=f"{f.name} must be one of"):
            make_args(tmp_path, method.config, **{f.name: "not-a-choice"})
        make_args(tmp_path, method.config, **{f.name: list(f.metadata["choices"])[-1]})


def check_lora_student_trains(name, tmp_path, tokenizer):
    from peft import LoraConfig

    trainer = method_trainer(
        get_method(name), tmp_path, tokenizer, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    frozen = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" not in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert lora and any(not torch.equal(lora[n], after[n]) for n in lora)
    assert all(torch.equal(frozen[n], after[n]) for n in frozen)


def check_model_card(name, tmp_path, tokenizer, student_path):
    """The card of a student loaded from a local folder: the folder's name as its base (not "None"), a quick start
    that loads this model's own folder, the method and its paper, and the Distillation section before the
    citations."""
    method = get_method(name)
    trainer = method_trainer(method, tmp_path, tokenizer, student=student_path, max_steps=1)
    trainer.train()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "None" not in card.text.split("## Training procedure")[0]
    assert f"fine-tuned version of `{Path(student_path).name}`" in card.text
    assert f'model="{tmp_path / "out"}"' in card.text
    assert f"**Method**: {method.title}" in card.text
    if method.paper:
        assert f"https://huggingface.co/papers/{method.paper}" in card.text
    assert {"trl-kd", "distillation"} <= set(card.data.tags)
    assert card.text.index("## Distillation") < card.text.index("## Citations")


def check_resume_matches_an_uninterrupted_run(name, tmp_path, tokenizer):
    method = get_method(name)
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = method_trainer(method, tmp_path / "full", tokenizer, **overrides)
    full.train()
    method_trainer(method, tmp_path / "resumed", tokenizer, **overrides).train()
    resumed = method_trainer(method, tmp_path / "resumed", tokenizer, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-2"))
    for key, value in params(full.model).items():
        torch.testing.assert_close(params(resumed.model)[key], value, atol=0, rtol=0)
    assert_same_state(resumed.method_state_dict(), full.method_state_dict())
    assert logged(resumed, "kd_loss")[-2:] == pytest.approx(logged(full, "kd_loss")[-2:])


# ------------------------------------------------------------------------------------------- over every method
@pytest.mark.parametrize("name", contract_cases())
def test_wrong_config_class_is_refused(name, tmp_path, tokenizer):
    check_wrong_config_class_is_refused(name, tmp_path, tokenizer)


@pytest.mark.parametrize("name", contract_cases())
def test_bad_shared_config_values_are_refused(name, tmp_path):
    check_bad_shared_values_are_refused(name, tmp_path)


@pytest.mark.parametrize("name", contract_cases())
def test_lora_student_trains(name, tmp_path, tokenizer):
    check_lora_student_trains(name, tmp_path, tokenizer)


@pytest.mark.parametrize("name", contract_cases())
def test_model_card_names_the_base_loads_itself_and_puts_distillation_before_citations(
    name, tmp_path, tokenizer, llama_paths
):
    check_model_card(name, tmp_path, tokenizer, llama_paths["student"])


@pytest.mark.parametrize("name", contract_cases())
def test_resume_matches_an_uninterrupted_run(name, tmp_path, tokenizer):
    check_resume_matches_an_uninterrupted_run(name, tmp_path, tokenizer)


@pytest.mark.parametrize("name", contract_cases())
def test_shipped_method_has_its_example_recipe_and_docs(name):
    method = METHODS[name]
    script = (ROOT / method.example).read_text()
    assert f'main("{name}")' in script, method.example
    assert (ROOT / "examples" / "recipes" / f"{name}.yaml").exists()
    readme = (ROOT / "README.md").read_text()
    assert f"trl-kd {name}" in readme or f"examples/{name}.py" in readme


def test_the_base_method_has_one_name_and_an_alias():
    assert get_method("kd") is get_method("gkd") is METHODS["gkd"]
    assert METHODS["gkd"].trainer is KDTrainer and METHODS["gkd"].title == "GKD"


# ----------------------------------------------------------------------------------------------- a new method
@dataclasses.dataclass
class ToyConfig(KDConfig):
    """A method's own setting with fixed values: `choices` in its metadata is all it takes to have it checked."""

    toy_writer: str = dataclasses.field(
        default="student", metadata={"help": "Who writes the toy's tokens.", "choices": ["student", "nobody"]}
    )


class ToyTrainer(KDTrainer):
    """A method in one class: on-policy GKD whose rollout is the base one (what a new method starts from)."""

    _name = "Toy KD"
    _tag_names = [*KDTrainer._tag_names, "toy"]
    config_class = ToyConfig


@pytest.fixture
def toy():
    method = register_method("toy", ToyTrainer, ToyConfig, paper="2306.13649", aliases=("toy_kd",))
    yield method
    unregister_method("toy")
    if "quality_methods" in sys.modules:  # the benchmark's method list, as it was
        importlib.reload(sys.modules["quality_methods"])


def test_a_method_is_one_register_call(toy, tmp_path, tokenizer, llama_paths, capsys):
    """Registering a trainer and config, in this file only, is all it takes for the CLI (`trl-kd --help`, `trl-kd
    toy --help`), the example runner (`trl_kd.scripts.main`, behind `trl-kd <method>`), the model card, the quality
    benchmark's method list and this contract to pick a method up."""
    from trl_kd.cli import build_parser, main

    assert [p.values[0] for p in contract_cases()][-1] == "toy" and get_method("toy_kd") is toy
    check_wrong_config_class_is_refused("toy", tmp_path / "a", tokenizer)
    check_bad_shared_values_are_refused("toy", tmp_path / "b")
    check_model_card("toy", tmp_path / "c", tokenizer, llama_paths["student"])
    check_resume_matches_an_uninterrupted_run("toy", tmp_path / "d", tokenizer)
    assert "toy" in build_parser().format_help()
    with pytest.raises(SystemExit) as exit_:
        main(["toy", "--help"])
    assert exit_.value.code == 0 and "usage: trl-kd toy" in capsys.readouterr().out
    import quality_methods  # the quality benchmark's method list

    assert "Toy KD (defaults)" in importlib.reload(quality_methods).METHODS

    data = jsonl_dataset(tmp_path / "data", make_dataset("prompt_completion", 8))
    output_dir = tmp_path / "toy-run"
    flags = dict(max_steps=1, per_device_train_batch_size=4, max_completion_length=8, report_to="none")
    main(["toy_kd", *local_run_flags(llama_paths, data, output_dir, **flags)])
    assert "**Method**: Toy KD" in (output_dir / "README.md").read_text()


def test_every_registered_method_has_a_distributed_case():
    sys.path.insert(0, str(ROOT / "tests" / "distributed"))
    import run_trainers

    assert set(run_trainers.METHOD_CASES) == set(METHODS)


@pytest.mark.parametrize(
    "name,error",
    [
        ("Toy", "lowercase"),
        ("plan", "commands"),
        ("gkd", "taken by KDTrainer"),
        ("kd", "taken by KDTrainer"),
    ],
)
def test_bad_registrations_are_refused(name, error):
    with pytest.raises(ValueError, match=error):
        register_method(name, ToyTrainer, ToyConfig)
    assert "toy" not in METHODS


def test_a_trainer_that_is_not_a_kd_trainer_is_refused():
    with pytest.raises(TypeError, match="subclass of trl_kd.KDTrainer"):
        register_method("toy", DistillationConfig, KDConfig)
    from trl_kd import SwitchTrainer

    with pytest.raises(TypeError, match=re.escape("SwitchTrainer accepts SwitchConfig")):
        register_method("toy", SwitchTrainer, KDConfig)


def test_an_unknown_method_names_the_choices():
    with pytest.raises(UnknownMethodError, match="choose one of gkd, promptkd, skd, switch"):
        get_method("distil")


ENUM_FIELDS = (
    "loss_type",
    "loss_normalization",
    "acceptance_on",
    "acceptance_test",
    "draft_sampling",
    "switch_schedule",
    "switch_decay_unit",
    "switch_divergence",
    "switch_mode",
)


@pytest.mark.parametrize("name", contract_cases())
def test_enum_like_fields_list_their_values_in_the_cli(name):
    """Every fixed-value field declares `choices`, so `--help` lists them and the parser refuses other values."""

    from trl import TrlParser

    config = METHODS[name].config
    fields = {f.name: f for f in dataclasses.fields(config) if f.name in ENUM_FIELDS}
    assert "loss_type" in fields
    parser = TrlParser(config)
    for field_name, field in fields.items():
        choices = field.metadata.get("choices")
        assert choices, f"{config.__name__}.{field_name} has no choices"
        assert getattr(config(output_dir="x", bf16=False), field_name) in choices
        with pytest.raises(SystemExit):
            parser.parse_args_into_dataclasses(["--output_dir", "x", f"--{field_name}", "not-a-value"])
