"""Fault injection: a run killed while saving a checkpoint, corrupted or planted method state, NaN and inf from every
source in every trainer, non-finite config values, bad rows past the first (map-style and streamed)."""

import logging
import os
import pathlib

import pytest
import torch
from datasets import Dataset, IterableDataset
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import TrainerState

from trl_kd import KDTrainer, PromptKDTrainer, SpeculativeKDTrainer, SwitchTrainer
from trl_kd.checkpoints import METHOD_STATE_NAME, TRAINER_STATE_NAME, resolve_checkpoint
from trl_kd.guards import NonFiniteError
from trl_kd.losses import divergence
from trl_kd.testing import build_model, make_dataset

from helpers import make_args, make_trainer, params


CHECKPOINTED = dict(max_steps=2, save_strategy="steps", save_steps=1)


def promptkd(folder, tokenizer):
    return make_trainer(
        folder,
        tokenizer,
        make_dataset("conversational_prompt_completion", 8),
        trainer_class=PromptKDTrainer,
        **CHECKPOINTED,
    )


class Killed(RuntimeError):
    """Stands in for the process dying at this point of the save."""


def killed_at_step_2(original):
    def wrapper(self, *args, **kwargs):
        step = self.global_step if isinstance(self, TrainerState) else self.state.global_step
        if step == 2:
            raise Killed("killed while saving checkpoint-2")
        return original(self, *args, **kwargs)

    return wrapper


def kill_in_method_state_write(monkeypatch):
    """torch.save of checkpoint-2's method state writes half a file, then the process dies."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        if "checkpoint-2" in str(f) and METHOD_STATE_NAME in str(f):
            pathlib.Path(f).write_bytes(b"PK\x03\x04 half a zip")
            raise Killed("killed while writing the method state")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


STAGES = {  # the writers of a checkpoint, in the order they run
    "method state": kill_in_method_state_write,
    "model": lambda mp: mp.setattr(PromptKDTrainer, "save_model", killed_at_step_2(PromptKDTrainer.save_model)),
    "optimizer and scheduler": lambda mp: mp.setattr(
        Trainer, "_save_optimizer_and_scheduler", killed_at_step_2(Trainer._save_optimizer_and_scheduler)
    ),
    "rng state": lambda mp: mp.setattr(Trainer, "_save_rng_state", killed_at_step_2(Trainer._save_rng_state)),
    "trainer_state.json": lambda mp: mp.setattr(
        TrainerState, "save_to_json", killed_at_step_2(TrainerState.save_to_json)
    ),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tokenizer):
    trainer = promptkd(tmp_path_factory.mktemp("full"), tokenizer)
    trainer.train()
    return {"prompt": trainer.soft_prompt.detach().clone(), "params": params(trainer.model)}


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_kill_while_saving_resumes_from_the_last_complete_checkpoint(
    stage, tmp_path, tokenizer, uninterrupted, monkeypatch, caplog
):
    with monkeypatch.context() as patch:
        STAGES[stage](patch)
        with pytest.raises(Killed):
            promptkd(tmp_path, tokenizer).train()
    broken = tmp_path / "out" / "checkpoint-2"
    assert not (broken / TRAINER_STATE_NAME).exists()
    assert not any(p.name.endswith(".partial") for p in broken.iterdir())  # no temporary file left behind
    if stage == "method state":
        assert not (broken / METHOD_STATE_NAME).exists()  # never half a file under the real name
    with pytest.raises(ValueError, match=f"{broken}.*{TRAINER_STATE_NAME} is missing"):
        promptkd(tmp_path, tokenizer).train(resume_from_checkpoint=str(broken))

    resumed = promptkd(tmp_path, tokenizer)
    with caplog.at_level(logging.WARNING, logger="trl_kd.checkpoints"):
        resumed.train(resume_from_checkpoint=True)
    assert f"Skipping checkpoint {broken}" in caplog.text
    assert resumed.state.global_step == 2
    # it went on from checkpoint-1 and ended exactly where the run that was never killed did
    torch.testing.assert_close(resumed.soft_prompt.detach(), uninterrupted["prompt"], atol=0, rtol=0)
    for name, value in uninterrupted["params"].items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)


def test_a_checkpoint_without_method_state_is_refused(tmp_path, tokenizer):
    """The layout an older, non-atomic trl-kd left when killed between `trainer_state.json` and its own state."""
    promptkd(tmp_path, tokenizer).train()
    newest = tmp_path / "out" / "checkpoint-2"
    os.unlink(newest / METHOD_STATE_NAME)
    with pytest.raises(ValueError, match=f"{newest / METHOD_STATE_NAME} is missing"):
        promptkd(tmp_path, tokenizer).train(resume_from_checkpoint=str(newest))
    resumed = promptkd(tmp_path, tokenizer)
    resumed.train(resume_from_checkpoint=True)  # skips it for checkpoint-1
    assert resumed.state.global_step == 2


def test_a_method_without_state_needs_none(tmp_path, tokenizer):
    trainer = make_trainer(tmp_path, tokenizer, **CHECKPOINTED)
    trainer.train()
    assert not trainer.has_method_state and not (tmp_path / "out" / "checkpoint-2" / METHOD_STATE_NAME).exists()
    assert resolve_checkpoint(True, str(tmp_path / "out"), needs_method_state=False) == str(
        tmp_path / "out" / "checkpoint-2"
    )
    os.unlink(tmp_path / "out" / "checkpoint-2" / TRAINER_STATE_NAME)
    assert resolve_checkpoint(True, str(tmp_path / "out"), needs_method_state=False) == str(
        tmp_path / "out" / "checkpoint-1"
    )
    with pytest.raises(ValueError, match="No complete checkpoint"):
        make_trainer(tmp_path / "empty", tokenizer).train(resume_from_checkpoint=True)


class Payload:
    """A pickle that touches a file when unpickled: what an attacker would plant."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (pathlib.Path.touch, (pathlib.Path(self.marker),))


def test_a_planted_pickle_is_not_run(tmp_path, tokenizer):
    promptkd(tmp_path, tokenizer).train()
    checkpoint = tmp_path / "out" / "checkpoint-1"
    marker = tmp_path / "pwned"
    torch.save({"soft_prompt": Payload(marker)}, checkpoint / METHOD_STATE_NAME)
    with pytest.raises(ValueError, match=f"{checkpoint / METHOD_STATE_NAME} is not a readable trl-kd method state"):
        promptkd(tmp_path, tokenizer).train(resume_from_checkpoint=str(checkpoint))
    assert not marker.exists()


def test_a_truncated_method_state_names_the_file(tmp_path, tokenizer):
    def switch():
        return make_trainer(
            tmp_path,
            tokenizer,
            make_dataset("conversational_prompt_only", 8),
            trainer_class=SwitchTrainer,
            max_completion_length=6,
            **CHECKPOINTED,
        )

    switch().train()
    path = tmp_path / "out" / "checkpoint-1" / METHOD_STATE_NAME
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"{path} is not a readable trl-kd method state"):
        switch().train(resume_from_checkpoint=str(path.parent))


# ------------------------------------------------------------------------------------------------ non-finite values
TRAINERS = {  # each trainer with sampling on, so a NaN meets its sampler as well as its loss
    "kd": dict(trainer_class=KDTrainer, lmbda=1.0),
    "skd": dict(trainer_class=SpeculativeKDTrainer),
    "switch": dict(trainer_class=SwitchTrainer),
    "promptkd": dict(trainer_class=PromptKDTrainer, lmbda=1.0),
}


def poison_norm(model):
    model.get_decoder().norm.weight.data.fill_(float("nan"))


def poison_gradients(model):
    for p in model.parameters():
        p.register_hook(lambda g: g * float("inf"))


INJECTIONS = {  # source -> what goes wrong after the first optimizer step
    "teacher": lambda trainer: poison_norm(trainer.teacher_model),
    "student": lambda trainer: poison_norm(trainer.model),
    "gradients": lambda trainer: poison_gradients(trainer.model),
}


class InjectAfterStep1(TrainerCallback):
    def __init__(self, inject):
        self.inject, self.trainer = inject, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.inject(self.trainer)
            self.weights = params(self.trainer.model)


def nan_trainer(folder, tokenizer, method, **overrides):
    spec = dict(TRAINERS[method])
    fmt = "conversational_prompt_completion" if method == "promptkd" else "prompt_completion"
    return make_trainer(
        folder, tokenizer, make_dataset(fmt, 8), max_completion_length=6, **CHECKPOINTED, **{**spec, **overrides}
    )


@pytest.mark.parametrize("source", list(INJECTIONS))
@pytest.mark.parametrize("method", list(TRAINERS))
def test_a_non_finite_value_stops_training_naming_its_source(method, source, tmp_path, tokenizer):
    trainer = nan_trainer(tmp_path, tokenizer, method)
    callback = InjectAfterStep1(INJECTIONS[source])
    callback.trainer = trainer
    trainer.add_callback(callback)
    with pytest.raises(NonFiniteError, match=rf"at optimizer step 2 \(source: {source}\)") as error:
        trainer.train()
    assert (error.value.source, error.value.step) == (source, 2)
    # nothing was saved after the first non-finite value, and the student was not updated by it
    assert (tmp_path / "out" / "checkpoint-1" / TRAINER_STATE_NAME).exists()
    assert not (tmp_path / "out" / "checkpoint-2").exists()
    for name, value in params(trainer.model).items():
        torch.testing.assert_close(value, callback.weights[name], atol=0, rtol=0, equal_nan=True)


def test_non_finite_logits_with_finite_hidden_states_blame_the_loss(tmp_path, tokenizer):
    teacher = build_model("qwen2", tokenizer, "teacher", seed=1, tie_word_embeddings=False)
    teacher.lm_head.weight.data.fill_(float("nan"))
    trainer = make_trainer(tmp_path, tokenizer, teacher=teacher, lmbda=0.0)
    with pytest.raises(NonFiniteError, match=r"distillation loss at optimizer step 1 \(source: loss\).*LM heads"):
        trainer.train()


def test_a_nan_teacher_is_not_read_as_zero_divergence():
    """Forward KL (and skew FKL) used to return exactly 0 for a NaN teacher, so the run trained on nothing."""
    student = torch.randn(3, 11)
    teacher = torch.full((3, 11), float("nan"))
    for loss_type, beta in (
        ("jsd", 0.0),
        ("jsd", 0.5),
        ("jsd", 1.0),
        ("skew_fkl", 0.0),
        ("skew_rkl", 0.0),
        ("tvd", 0.0),
    ):
        assert divergence(student, teacher, loss_type, beta=beta).isnan().all(), loss_type
    # and 0 * log 0 still counts as 0: a teacher with zero-probability tokens gives a finite forward KL
    peaked = torch.full((3, 11), float("-inf"))
    peaked[:, 0] = 0.0
    assert divergence(student, peaked, "jsd", beta=0.0).isfinite().all()


@pytest.mark.parametrize(
    "field", ["loss_temperature", "temperature", "beta", "learning_rate", "weight_decay", "max_grad_norm"]
)
def test_non_finite_config_values_are_refused(field, tmp_path):
    """Every float field must be finite; +inf only where it means something (never clip; SWITCH: never switch)."""
    with pytest.raises(ValueError, match=f"{field} must be a finite number, got nan"):
        make_args(tmp_path, **{field: float("nan")})
    if field != "max_grad_norm":  # +inf is "never clip" there
        with pytest.raises(ValueError, match=f"{field} must be a finite number, got inf"):
            make_args(tmp_path, **{field: float("inf")})


def test_a_nan_student_sampled_by_transformers_generate_is_named(tmp_path, tokenizer):
    student = build_model("qwen2", tokenizer, "student", seed=0)
    poison_norm(student)
    trainer = make_trainer(tmp_path, tokenizer, student=student, lmbda=1.0)
    with pytest.raises(NonFiniteError, match=r"student probabilities while generating .*\(source: student\)"):
        trainer.train()


def test_a_non_finite_soft_prompt_gradient_stops_before_the_prompt_step(tmp_path, tokenizer):
    trainer = nan_trainer(tmp_path, tokenizer, "promptkd")
    callback = InjectAfterStep1(lambda t: t.soft_prompt.register_hook(lambda g: g * float("inf")))
    callback.trainer = trainer
    trainer.add_callback(callback)
    prompt = {}
    trainer.add_callback(
        type(
            "Keep",
            (TrainerCallback,),
            {"on_step_end": lambda self, *a, **k: prompt.update(value=trainer.soft_prompt.detach().clone())},
        )()
    )
    with pytest.raises(NonFiniteError, match=r"soft-prompt gradient norm \(inf\) at optimizer step 2"):
        trainer.train()
    torch.testing.assert_close(trainer.soft_prompt.detach(), prompt["value"], atol=0, rtol=0)  # not stepped


# ---------------------------------------------------------------------------------------------------------- bad rows
def with_row(fmt, index, bad, n=8):
    rows = make_dataset(fmt, n).to_list()
    rows[index] = bad
    return rows


USER_ONLY = [{"role": "user", "content": "count: from 0 to 4"}]
BAD_ROWS = {  # (format, bad row 5, what the error says); each a row the old first-row check let through
    "messages ending with a user turn": (
        "messages",
        {"messages": USER_ONLY + [{"role": "assistant", "content": "0 1"}] + USER_ONLY},
        r"does not end with an assistant answer",
    ),
    "a single message": (
        "messages",
        {"messages": [{"role": "assistant", "content": "0 1"}]},
        r"does not end with an assistant answer after at least one other turn",
    ),
    "a None prompt": ("prompt_completion", {"prompt": None, "completion": "0 1"}, r"`prompt` must be a string"),
    "an empty conversation": (
        "conversational_prompt_completion",
        {"prompt": [], "completion": [{"role": "assistant", "content": "0 1"}]},
        r"`prompt` must be a non-empty list of messages",
    ),
    "a None message content": (
        "conversational_prompt_only",
        {"prompt": [{"role": "user", "content": None}]},
        r"message 0 of `prompt` has NoneType content",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_a_bad_row_past_the_first_is_refused_at_construction(case, tmp_path, tokenizer):
    fmt, bad, message = BAD_ROWS[case]
    dataset = Dataset.from_list(with_row(fmt, 5, bad))
    with pytest.raises(ValueError, match=rf"Row 5 of `train_dataset`: .*{message}"):
        make_trainer(tmp_path, tokenizer, dataset)
    with pytest.raises(ValueError, match=rf"Row 5 of `eval_dataset`: .*{message}"):
        KDTrainer(
            model=build_model("qwen2", tokenizer, "student"),
            teacher_model=build_model("qwen2", tokenizer),
            args=make_args(tmp_path),
            train_dataset=make_dataset(fmt, 8),
            eval_dataset=dataset,
            processing_class=tokenizer,
        )


def test_a_column_of_the_wrong_type_is_refused_at_construction(tmp_path, tokenizer):
    rows = [{"prompt": "count: from 0 to 3\n", "completion": 7} for _ in range(8)]
    with pytest.raises(
        ValueError,
        match=r"Row 0 of `train_dataset`: `completion` must be a string, a list of "
        r"messages or None, got int 7",
    ):
        make_trainer(tmp_path, tokenizer, Dataset.from_list(rows))


STREAMED_BAD_ROWS = {  # mixed types cannot be stored in Arrow, but a stream can yield them
    "an int completion": (
        "prompt_completion",
        {"prompt": "count: from 0 to 3\n", "completion": 3},
        r"`completion` must be a string, a list of messages or None, got int 3",
    ),
    "a text prompt among conversations": (
        "conversational_prompt_only",
        {"prompt": "count: from 0 to 3\n"},
        r"`prompt` is text but the first row's is messages",
    ),
    **{k: v for k, v in BAD_ROWS.items() if k != "an empty conversation"},
}


def streamed(rows):
    def generate():
        yield from rows

    return IterableDataset.from_generator(generate)


@pytest.mark.parametrize("case", list(STREAMED_BAD_ROWS))
def test_a_bad_row_of_a_stream_is_refused_when_it_streams(case, tmp_path, tokenizer):
    fmt, bad, message = STREAMED_BAD_ROWS[case]
    trainer = make_trainer(tmp_path, tokenizer, streamed(with_row(fmt, 5, bad)), max_steps=2, lmbda=0.0)
    with pytest.raises(ValueError, match=rf"Row 5 of `train_dataset`: .*{message}"):
        trainer.train()
    assert trainer.state.global_step < 2  # the step whose batch holds row 5 never ran


def test_a_streamed_prompt_past_the_models_positions_is_refused(tmp_path, tokenizer):
    """A Llama student with 256 positions used to train a 600-token prompt of a stream silently."""
    rows = make_dataset("prompt_completion", 8).to_list()
    rows[5]["prompt"] = "count: " + " ".join(["a"] * 600) + "\n"
    student = build_model("llama", tokenizer, "student", seed=0, context_length=256)
    teacher = build_model("llama", tokenizer, "teacher", seed=1, context_length=256)
    trainer = make_trainer(
        tmp_path, tokenizer, streamed(rows), student=student, teacher=teacher, max_steps=2, lmbda=0.0
    )
    with pytest.raises(
        ValueError,
        match=r"Row 5 of `train_dataset` has a prompt of \d+ tokens, longer than the "
        r"limit of 248",
    ):
        trainer.train()


def test_checking_100k_rows_is_cheap():
    """The all-row check runs in batches of columns: 100k conversational rows well under the time of one step."""
    import time

    from trl_kd.data import check_rows

    dataset = Dataset.from_list(make_dataset("conversational_prompt_completion", 1000).to_list() * 100)
    start = time.perf_counter()
    check_rows(dataset)
    assert time.perf_counter() - start < 30  # measured about 2 s on the 2-core CPU


def test_inf_is_kept_where_it_means_never():
    from trl_kd import SwitchConfig

    config = SwitchConfig(
        output_dir="/tmp/x",
        report_to="none",
        use_cpu=True,
        bf16=False,
        switch_threshold=float("inf"),
        max_grad_norm=float("inf"),
    )
    assert config.switch_threshold == config.max_grad_norm == float("inf")
    with pytest.raises(ValueError, match="switch_threshold must be a finite number, got nan"):
        SwitchConfig(output_dir="/tmp/x", report_to="none", use_cpu=True, bf16=False, switch_threshold=float("nan"))


# --------------------------------------------------------------------------------------- fallbacks are not silent
class MergingTokenizer:
    """Characters as ids, except that "ab" is one token: a completion starting with "b" after a prompt ending in "a"
    changes the prompt's last token."""

    def __call__(self, text, add_special_tokens=True):
        ids, i = [], 0
        while i < len(text):
            if text.startswith("ab", i):
                ids.append(1000)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return {"input_ids": ids}


def test_a_completion_tokenized_alone_is_logged_once(caplog):
    from trl_kd.data import completion_token_ids, warn_once

    warn_once.cache_clear()
    tokenizer = MergingTokenizer()
    with caplog.at_level(logging.WARNING, logger="trl_kd.data"):
        for _ in range(3):
            ids = completion_token_ids(tokenizer, "xa", tokenizer("xa")["input_ids"], "bc", [0], None)
    assert ids == [ord("b"), ord("c"), 0]
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "tokenized alone" in caplog.records[0].getMessage()


def test_prompts_unchecked_for_want_of_a_context_length_are_logged(tmp_path, tokenizer, caplog, monkeypatch):
    trainer = make_trainer(tmp_path, tokenizer)
    monkeypatch.setattr(trainer, "position_limits", dict)
    with caplog.at_level(logging.WARNING, logger="trl_kd.data"):
        trainer._check_prompt_lengths(make_dataset("prompt_only", 4), "train_dataset")
    assert "were not checked" in caplog.text and "max_prompt_length" in caplog.text
