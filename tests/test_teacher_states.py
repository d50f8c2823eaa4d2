"""The loss from the teacher states the sampler kept (`reuse_teacher_states`) against the loss that runs the teacher
again: same loss and gradients, and no second teacher forward where every row was sampled."""

import pytest
import torch

from trl_kd import SpeculativeKDTrainer, SwitchTrainer
from trl_kd.testing import build_model, make_dataset

from helpers import assert_close_to_rounding, make_trainer


def sharp_pair(tokenizer):
    """Models with large random weights, so the two disagree often and both write tokens."""
    student = build_model("qwen2", tokenizer, "student", seed=0, initializer_range=0.4)
    teacher = build_model("qwen2", tokenizer, "teacher", seed=1, initializer_range=0.4)
    return student, teacher


CASES = {
    # sampled drafts, about half accepted: accepted and replaced tokens, EOS and length cuts
    "skd": (SpeculativeKDTrainer, {"acceptance_top_k": 160, "temperature": 1.0, "top_p": 1.0}),
    # dataset rows beside sampled ones: only those get a teacher forward
    "skd_mixed": (SpeculativeKDTrainer, {"acceptance_top_k": 160, "temperature": 1.0, "top_p": 1.0, "lmbda": 0.5}),
    "skd_stop_strings": (SpeculativeKDTrainer, {"acceptance_top_k": 160, "temperature": 1.0, "stop_strings": ["a"]}),
    "skd_fixed_draft": (SpeculativeKDTrainer, {"acceptance_top_k": 160, "temperature": 1.0, "adaptive_draft": False}),
    "switch": (SwitchTrainer, {"switch_threshold": 0.65, "switch_decay": 0.01}),
    "switch_reverse_kl_tokens": (
        SwitchTrainer,
        {
            "switch_threshold": 0.65,
            "switch_decay": 0.01,
            "beta": 1.0,
            "loss_normalization": "tokens",
            "teacher_greedy": True,
        },
    ),
}


def build(tmp_path, tokenizer, case, **extra):
    trainer_class, overrides = CASES[case]
    student, teacher = sharp_pair(tokenizer)
    trainer = make_trainer(
        tmp_path,
        tokenizer,
        make_dataset("prompt_completion", 16, seed=3),
        trainer_class=trainer_class,
        student=student,
        teacher=teacher,
        max_completion_length=12,
        per_device_train_batch_size=8,
        **{**overrides, **extra},
    )
    # random models rarely write EOS: let one token in fourteen end a row, so rows end early and leave the batch
    trainer.eos_token_ids = [*trainer.eos_token_ids, *range(40, 64)]
    return trainer


def count_teacher_rows(trainer):
    """Record how many rows each teacher forward of the loss runs over."""
    calls = []
    original = trainer.teacher_hidden_states

    def counted(input_ids, attention_mask, num_completion_tokens):
        calls.append(input_ids.shape[0])
        return original(input_ids, attention_mask, num_completion_tokens)

    trainer.teacher_hidden_states = counted
    return calls


def loss_and_gradients(trainer, inputs):
    model = trainer.model
    model.zero_grad()
    loss = trainer.compute_loss(model, inputs, num_items_in_batch=inputs["num_items_in_batch"])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_reused_states_give_the_recomputed_loss_and_gradients(tmp_path, tokenizer, case):
    trainer = build(tmp_path, tokenizer, case)
    trainer.model.train()
    torch.manual_seed(0)
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(8)])
    rows = batch["teacher_hidden_rows"]
    lengths = batch["completion_mask"].sum(1)
    assert rows.any() and 0 < batch["teacher_mask"].sum() < lengths.sum()  # both models wrote sampled tokens
    if case == "skd_mixed":
        assert not rows.all()
    if case in ("skd", "switch"):
        assert (lengths < 12).any() and (lengths == 12).any()  # rows ended on EOS and at the budget

    calls = count_teacher_rows(trainer)
    reused_loss, reused_grads = loss_and_gradients(trainer, batch)
    assert calls == ([] if rows.all() else [int((~rows).sum())])  # the teacher ran over the dataset rows only

    recomputed = {k: v for k, v in batch.items() if k not in ("teacher_hidden", "teacher_hidden_rows")}
    recomputed_loss, recomputed_grads = loss_and_gradients(trainer, recomputed)
    assert calls[-1] == 8
    assert_close_to_rounding(reused_loss, recomputed_loss)
    assert reused_grads.keys() == recomputed_grads.keys() and reused_grads
    for name in reused_grads:
        assert_close_to_rounding(reused_grads[name], recomputed_grads[name], msg=name)


def test_training_runs_the_teacher_only_in_the_sampler(tmp_path, tokenizer):
    trainer = build(tmp_path, tokenizer, "skd")
    calls = count_teacher_rows(trainer)
    trainer.train()
    assert calls == [] and trainer.state.global_step == 2

    off = build(tmp_path / "off", tokenizer, "skd", reuse_teacher_states=False)
    calls = count_teacher_rows(off)
    off.train()
    assert calls == [8, 8]


def test_rows_without_states_are_marked(tmp_path, tokenizer):
    """Seq-KD rows (sampled by the teacher's `generate`) and dataset rows carry no kept states."""
    trainer = build(tmp_path, tokenizer, "skd_mixed", seq_kd=True)
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in range(8)])
    rows = batch["teacher_hidden_rows"]
    assert rows.any() and not rows.all()
    width = batch["completion_ids"].shape[1]
    assert batch["teacher_hidden"].shape == (8, width, trainer.teacher_model.config.hidden_size)
    assert not batch["teacher_hidden"][~rows].any()
