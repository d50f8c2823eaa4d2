"""PromptKDTrainer: the prompt trains and the teacher doesn't, reduction to on-policy reverse KL, the regulariser's
schedule, exact resume, and the exported PEFT adapter."""

import copy

import pytest
import torch

from trl_kd import KDTrainer, PromptKDConfig, PromptKDTrainer
from trl_kd.testing import make_dataset

from helpers import assert_changed, assert_close_to_rounding, logged, make_args, make_trainer, params


def promptkd_trainer(tmp_path, tokenizer, student=None, teacher=None, **overrides):
    overrides.setdefault("max_completion_length", 8)
    return make_trainer(
        tmp_path,
        tokenizer,
        make_dataset("conversational_prompt_completion", 16),
        trainer_class=PromptKDTrainer,
        student=student,
        teacher=teacher,
        **overrides,
    )


def test_prompt_trains_and_the_teacher_does_not(tmp_path, tokenizer):
    trainer = promptkd_trainer(tmp_path, tokenizer, max_steps=3)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    prompt, student_before, teacher_before = (
        trainer.soft_prompt.detach().clone(),
        params(trainer.model),
        params(teacher),
    )
    trainer.train()
    assert not torch.equal(prompt, trainer.soft_prompt.detach())
    assert_changed(student_before, trainer.model)
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    assert not any(p.requires_grad for p in teacher.parameters())
    for key in ("prompt_loss", "prompt_reg_loss", "kd_loss"):
        values = logged(trainer, key)
        assert len(values) == 3 and all(v >= 0 for v in values), key


def test_each_step_runs_the_student_once_for_both_the_prompt_and_the_student(tmp_path, tokenizer, monkeypatch):
    trainer = promptkd_trainer(tmp_path, tokenizer, max_steps=2)
    student, teacher = trainer.model, trainer.accelerator.unwrap_model(trainer.teacher_model)
    calls = {"student": 0, "teacher": 0, "other": 0}
    hidden_states = PromptKDTrainer.hidden_states

    def counting(model, *args):
        calls["student" if model is student else "teacher" if model is teacher else "other"] += 1
        return hidden_states(model, *args)

    monkeypatch.setattr(PromptKDTrainer, "hidden_states", staticmethod(counting))
    trainer.train()
    # per step: one student forward (its detached states serve the prompt step) and one unprompted teacher forward
    # for the regulariser; the prompted teacher runs through `prompted_teacher_hidden_states`
    assert calls == {"student": 2, "teacher": 2, "other": 0}


def test_prompt_starts_from_the_init_text_embeddings(tmp_path, tokenizer):
    trainer = promptkd_trainer(tmp_path, tokenizer, num_prompt_tokens=9)
    ids = tokenizer("Suppose you are a student.")["input_ids"]
    expected_ids = (ids * 9)[:9]
    embedding = trainer.accelerator.unwrap_model(trainer.teacher_model).get_input_embeddings().weight
    torch.testing.assert_close(trainer.soft_prompt.detach(), embedding[expected_ids].detach())
    random_init = promptkd_trainer(tmp_path / "random", tokenizer, prompt_init_text=None)
    assert random_init.soft_prompt.shape == (7, embedding.shape[1])


def test_init_text_keeps_the_tokenizers_special_tokens_as_the_official_code(tmp_path, tokenizer):
    """A tokenizer that prepends BOS (as OPT's and LLaMA's do): the first virtual token is BOS unless
    `prompt_init_special_tokens=False`."""
    from tokenizers import processors

    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.bos_token = "<|im_start|>"
    bos = bos_tokenizer.bos_token_id
    bos_tokenizer._tokenizer.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", special_tokens=[("<|im_start|>", bos)]
    )
    text_ids = bos_tokenizer("Suppose you are a student.", add_special_tokens=False)["input_ids"]
    assert bos_tokenizer("Suppose you are a student.")["input_ids"] == [bos] + text_ids
    for special, expected in ((True, [bos] + text_ids[:6]), (False, text_ids[:7])):
        trainer = promptkd_trainer(tmp_path / str(special), bos_tokenizer, prompt_init_special_tokens=special)
        embedding = trainer.accelerator.unwrap_model(trainer.teacher_model).get_input_embeddings().weight
        torch.testing.assert_close(trainer.soft_prompt.detach(), embedding[expected].detach())


def test_regulariser_weight_decays_linearly(tmp_path, tokenizer):
    # s counts optimizer steps from 1, as the official code: the last step's weight is 0
    trainer = promptkd_trainer(tmp_path, tokenizer, max_steps=4, prompt_reg_coef=2.0)
    trainer.train()
    assert logged(trainer, "prompt_reg_weight") == pytest.approx([1.5, 1.0, 0.5, 0.0])


def test_prompt_steps_once_per_optimizer_step_whatever_the_accumulation(tmp_path, tokenizer):
    """The same 4 rows as 4x1, 2x2 and 1x4 (micro-batch x accumulation): the prompt's gradient accumulates over the
    micro-batches and it takes one AdamW step per optimizer step, so its value after the step is the same."""
    prompts, steps = [], []
    for per_device, accumulation in [(4, 1), (2, 2), (1, 4)]:
        trainer = promptkd_trainer(
            tmp_path / f"{per_device}x{accumulation}",
            tokenizer,
            max_steps=1,
            learning_rate=0.0,
            prompt_learning_rate=0.05,
            lr_scheduler_type="constant",
            warmup_steps=0,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
        )
        initial = trainer.soft_prompt.detach().clone()
        trainer.train()
        prompts.append(trainer.soft_prompt.detach().clone())
        steps.append(trainer.prompt_optimizer.state_dict()["state"][0]["step"].item())
    assert steps == [1, 1, 1]
    assert not torch.equal(prompts[0], initial)
    for other in prompts[1:]:
        assert_close_to_rounding(other, prompts[0])


def test_student_samples_in_eval_mode_and_the_prompted_teacher_trains_in_train_mode(tmp_path, tokenizer, monkeypatch):
    """The official modes, on GPT-2 models (which have dropout): the student samples and gives the prompt step its
    target in eval mode; the prompted teacher runs in train mode for the prompt loss and in eval mode as the
    student's target."""
    from trl_kd.testing import build_model

    student, teacher = build_model("gpt2", tokenizer, "student"), build_model("gpt2", tokenizer, "teacher", seed=1)
    assert student.config.resid_pdrop > 0
    trainer = promptkd_trainer(tmp_path, tokenizer, student=student, teacher=teacher, max_steps=1)
    seen = {"rollout": [], "prompted": [], "student": []}
    rollout, prompted_forward = KDTrainer.rollout, PromptKDTrainer._prompted_forward
    hidden_states = KDTrainer.hidden_states

    def spy_rollout(self, prompt_ids):
        seen["rollout"].append(self.model.training)
        return rollout(self, prompt_ids)

    def spy_prompted(self, model, *args):
        seen["prompted"].append((model.training, torch.is_grad_enabled()))
        return prompted_forward(self, model, *args)

    def spy_hidden(model, *args):
        if model is trainer.model:
            seen["student"].append((model.training, torch.is_grad_enabled()))
        return hidden_states(model, *args)

    monkeypatch.setattr(KDTrainer, "rollout", spy_rollout)
    monkeypatch.setattr(PromptKDTrainer, "_prompted_forward", spy_prompted)
    monkeypatch.setattr(PromptKDTrainer, "hidden_states", staticmethod(spy_hidden))
    trainer.train()
    assert seen["rollout"] == [False]
    assert seen["prompted"] == [(True, True), (False, False)]  # the prompt loss, then the student's target
    assert seen["student"] == [(True, True), (False, False)]  # the student's loss, then the prompt step's target
    assert trainer.model.training and not teacher.training


def test_prompt_length_check_counts_the_soft_prompt(tmp_path, tokenizer):
    """GPT-2 has learned absolute positions: the prompted teacher places 7 virtual tokens before the prompt, so a
    prompt that fits the student but not the teacher must be refused when the trainer is built (it used to crash
    mid-training with an IndexError)."""
    from datasets import Dataset

    from trl_kd.testing import build_model

    def models():
        return {
            "student": build_model("gpt2", tokenizer, "student", context_length=32),
            "teacher": build_model("gpt2", tokenizer, "teacher", seed=1, context_length=32),
        }

    def prompt(num_tokens):
        text = "reverse:" + " a" * (num_tokens - 2)
        assert len(tokenizer(text)["input_ids"]) == num_tokens
        return Dataset.from_dict({"prompt": [text] * 4})

    common = dict(trainer_class=PromptKDTrainer, max_completion_length=8, max_steps=1)
    with pytest.raises(ValueError, match="Row 0 .* prompt of 20 tokens, longer than the limit of 17"):
        make_trainer(tmp_path / "long", tokenizer, prompt(20), **models(), **common)
    with pytest.raises(ValueError, match="soft-prompt"):
        make_trainer(tmp_path / "explicit", tokenizer, prompt(10), **models(), max_prompt_length=20, **common)
    trainer = make_trainer(tmp_path / "fits", tokenizer, prompt(17), **models(), **common)
    trainer.train()
    assert logged(trainer, "prompt_loss")


def peft_prompted_teacher(teacher, adapter_dir):
    from peft import PeftModel

    return PeftModel.from_pretrained(copy.deepcopy(teacher), adapter_dir).eval()


def test_zero_prompt_learning_rate_is_on_policy_reverse_kl_against_the_prompted_teacher(tmp_path, tokenizer):
    """Reference: a plain KDTrainer (beta=1, lmbda=1) whose teacher is PEFT's prompt-tuned teacher loaded from the
    adapter PromptKD exports. Batch size 1, so no left padding (PEFT counts positions from the first slot)."""
    overrides = dict(
        per_device_train_batch_size=1,
        max_steps=3,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        warmup_steps=0,
        weight_decay=0.01,
    )
    promptkd = promptkd_trainer(tmp_path / "promptkd", tokenizer, prompt_learning_rate=0.0, **overrides)
    adapter_dir = tmp_path / "adapter"
    promptkd.save_prompt_adapter(str(adapter_dir))
    promptkd.train()

    teacher = promptkd.accelerator.unwrap_model(promptkd.teacher_model)
    prompted = peft_prompted_teacher(teacher, str(adapter_dir))

    class PeftTeacherKD(KDTrainer):
        def teacher_hidden_states(self, input_ids, attention_mask, num_completion_tokens):
            with torch.no_grad():
                out = prompted(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
            return out.hidden_states[-1][:, -num_completion_tokens - 1 : -1]

    reference = make_trainer(
        tmp_path / "reference",
        tokenizer,
        make_dataset("conversational_prompt_completion", 16),
        trainer_class=PeftTeacherKD,
        max_completion_length=8,
        lmbda=1.0,
        beta=1.0,
        **overrides,
    )
    reference.train()
    for name, value in params(reference.model).items():
        assert_close_to_rounding(params(promptkd.model)[name], value)
    assert logged(promptkd, "kd_loss") == pytest.approx(logged(reference, "kd_loss"), rel=1e-5)


def test_exported_adapter_reproduces_the_prompted_teacher(tmp_path, tokenizer):
    trainer = promptkd_trainer(tmp_path, tokenizer, max_steps=2)
    trainer.train()
    trainer.save_model()
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    prompted = peft_prompted_teacher(teacher, str(tmp_path / "out" / "teacher_prompt"))
    input_ids = torch.tensor([tokenizer("reverse: a b c\nc b a")["input_ids"]])
    mask = torch.ones_like(input_ids)
    n = input_ids.shape[1] - 1
    with torch.no_grad():
        ours = trainer.prompted_teacher_hidden_states(input_ids, mask, n) @ teacher.lm_head.weight.T
        theirs = prompted(input_ids=input_ids, attention_mask=mask).logits[:, -n - 1 : -1]
    assert_close_to_rounding(ours, theirs)
    assert not torch.equal(trainer.soft_prompt.detach(), trainer._initial_prompt())  # a trained prompt was exported


def test_resume_restores_prompt_and_optimizer_exactly(tmp_path, tokenizer):
    overrides = dict(max_steps=4, save_strategy="steps", save_steps=2, lmbda=1.0)
    full = promptkd_trainer(tmp_path / "full", tokenizer, **overrides)
    full.train()
    interrupted = promptkd_trainer(tmp_path / "resumed", tokenizer, **overrides)
    interrupted.train()
    resumed = promptkd_trainer(tmp_path / "resumed", tokenizer, **overrides)
    resumed.train(resume_from_checkpoint=str(tmp_path / "resumed" / "out" / "checkpoint-2"))
    torch.testing.assert_close(resumed.soft_prompt.detach(), full.soft_prompt.detach(), atol=0, rtol=0)
    for name, value in params(full.model).items():
        torch.testing.assert_close(params(resumed.model)[name], value, atol=0, rtol=0)
    assert (
        resumed.prompt_optimizer.state_dict()["state"][0]["step"]
        == full.prompt_optimizer.state_dict()["state"][0]["step"]
    )
    assert logged(resumed, "prompt_loss")[-2:] == pytest.approx(logged(full, "prompt_loss")[-2:])


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_prompt_tokens": 0}, "num_prompt_tokens"),
        ({"prompt_learning_rate": -1.0}, "prompt_learning_rate"),
        ({"prompt_reg_coef": -0.5}, "prompt_reg_coef"),
        ({"prompt_init_text": "  "}, "prompt_init_text"),
        ({"prompt_init_special_tokens": "yes"}, "prompt_init_special_tokens"),
        ({"prompt_reg_coef": float("nan")}, "prompt_reg_coef"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, PromptKDConfig, **overrides)


def test_defaults_follow_the_official_code(tmp_path):
    args = PromptKDConfig(output_dir=str(tmp_path), bf16=False)
    assert (args.num_prompt_tokens, args.prompt_init_text, args.prompt_weight_decay) == (
        7,
        "Suppose you are a student.",
        0.01,
    )
    assert (args.beta, args.lmbda, args.temperature, args.prompt_reg_coef) == (1.0, 1.0, 1.0, 1.0)
    assert (args.top_k, args.top_p, args.prompt_init_special_tokens) == (0, 1.0, True)
    # the official GPT-2 base scripts: 5e-5, 100 warm-up steps then constant, weight decay 0.01, clipping at 1.0
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.max_grad_norm) == (5e-5, 100, 0.01, 1.0)
    assert args.lr_scheduler_type == "constant_with_warmup"


def test_model_card_cites_the_paper(tmp_path, tokenizer):
    trainer = promptkd_trainer(tmp_path, tokenizer)
    trainer.create_model_card(model_name="tiny-promptkd")
    card = (tmp_path / "out" / "README.md").read_text()
    assert "2402.12842" in card and "### Teacher prompt" in card and "teacher_prompt" in card
