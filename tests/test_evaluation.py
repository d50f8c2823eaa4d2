"""Generation metrics against hand-computed values, and best-checkpoint selection by ROUGE-L."""

import pytest
import torch

from trl_kd import KDTrainer
from trl_kd.evaluation import GenerationEvalCallback, generation_metrics, rouge_l
from trl_kd.testing import build_model, make_dataset

from helpers import logged, make_args


def test_rouge_l_on_hand_computed_cases():
    assert rouge_l(["a b c d"], ["a b c d"]) == pytest.approx(100.0)
    assert rouge_l(["x y"], ["a b"]) == 0.0
    # LCS "a c" of "a b c" and "a c": precision 2/3, recall 1, F1 0.8
    assert rouge_l(["a b c"], ["a c"]) == pytest.approx(80.0)
    assert rouge_l(["a b c", "x"], ["a c", "x"]) == pytest.approx(90.0)


def test_generation_metrics_against_a_naive_loop(tokenizer):
    student = build_model("qwen2", tokenizer, "student", seed=0, initializer_range=0.4)
    teacher = build_model("qwen2", tokenizer, "teacher", seed=1, initializer_range=0.4)
    prompts = [tokenizer(t)["input_ids"] for t in ("reverse: a b\n", "count: from 1 to 3\n", "copy: x\n")]
    references = ["b a", "1 2 3", "x"]
    metrics = generation_metrics(student, teacher, tokenizer, prompts, references, max_new_tokens=6, batch_size=2)
    # naive: one prompt at a time, no padding; greedy continuation and argmax comparison token by token
    agree = total = 0
    predictions = []
    for ids in prompts:
        sequence = list(ids)
        for _ in range(6):
            with torch.no_grad():
                s = student(torch.tensor([sequence])).logits[0, -1, : len(tokenizer)]
                t = teacher(torch.tensor([sequence])).logits[0, -1, : len(tokenizer)]
            agree += int(s.argmax() == t.argmax())
            total += 1
            sequence.append(int(s.argmax()))
            if sequence[-1] == tokenizer.eos_token_id:
                break
        predictions.append(tokenizer.decode(sequence[len(ids) :], skip_special_tokens=True))
    assert metrics["rouge_l"] == pytest.approx(rouge_l(predictions, references))
    assert metrics["top1_agreement"] == pytest.approx(agree / total)
    assert metrics["exact_match"] == sum(p.strip() == r for p, r in zip(predictions, references)) / 3


def test_best_checkpoint_is_selected_by_rouge_l(tmp_path, tokenizer):
    eval_dataset = make_dataset("prompt_completion", 4, seed=3)
    trainer = KDTrainer(
        model=build_model("qwen2", tokenizer, "student"),
        teacher_model=build_model("qwen2", tokenizer, "teacher", seed=1),
        args=make_args(
            tmp_path,
            max_steps=3,
            eval_strategy="steps",
            eval_steps=1,
            save_strategy="steps",
            save_steps=1,
            load_best_model_at_end=True,
            metric_for_best_model="rouge_l",
            greater_is_better=True,
            per_device_eval_batch_size=4,
        ),
        train_dataset=make_dataset("prompt_completion", 16),
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )
    prompts = [tokenizer(r["prompt"])["input_ids"] for r in eval_dataset]
    trainer.add_callback(GenerationEvalCallback(trainer, prompts, list(eval_dataset["completion"]), max_new_tokens=8))
    trainer.train()
    scores = logged(trainer, "eval_rouge_l")
    assert len(scores) == 4  # three evaluations and the end of training
    assert trainer.state.best_metric == pytest.approx(max(scores[:3]))
    best_step = scores[:3].index(max(scores[:3])) + 1
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best_step}")
    assert len(logged(trainer, "eval_rouge_l_before")) == 1
    # the teacher's score, logged once beside the student's "before", is its own greedy ROUGE-L
    teacher_scores = logged(trainer, "eval_teacher_rouge_l")
    expected = generation_metrics(trainer.teacher_model, None, tokenizer, prompts, list(eval_dataset["completion"]), 8)
    assert teacher_scores == [pytest.approx(expected["rouge_l"])]
