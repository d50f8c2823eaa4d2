"""KDTrainer: mixing, formats, invariances, checks at construction, resume."""

import re

import pytest
import torch
from trl import DistillationConfig, DistillationTrainer

from trl_kd import KDConfig, KDTrainer
from trl_kd.testing import DATASET_FORMATS, build_model, make_dataset

from helpers import assert_changed, assert_close_to_rounding, logged, make_args, make_trainer, params


@pytest.mark.parametrize("fmt", DATASET_FORMATS)
def test_each_dataset_format_trains(tmp_path, tokenizer, fmt):
    trainer = make_trainer(tmp_path, tokenizer, make_dataset(fmt, 16))
    before = params(trainer.model)
    trainer.train()
    assert_changed(before, trainer.model)
    for key in ("kd_loss", "on_policy_fraction", "teacher_token_fraction"):
        assert all(torch.isfinite(torch.tensor(logged(trainer, key))))
    if fmt.endswith("prompt_only"):  # no completion: every row is sampled from the student
        assert logged(trainer, "on_policy_fraction") == [1.0, 1.0]


@pytest.mark.parametrize(
    "lmbda,seq_kd,on_policy,teacher_fraction",
    [(0.0, False, 0.0, 0.0), (0.5, False, None, 0.0), (1.0, False, 1.0, 0.0), (0.0, True, 0.0, 1.0)],
)
def test_lmbda_and_seq_kd_train_the_student_only(tmp_path, tokenizer, lmbda, seq_kd, on_policy, teacher_fraction):
    trainer = make_trainer(tmp_path, tokenizer, lmbda=lmbda, seq_kd=seq_kd, max_steps=3)
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
    student_before, teacher_before = params(trainer.model), params(teacher)
    trainer.train()
    assert_changed(student_before, trainer.model)
    assert all(torch.equal(teacher_before[n], p) for n, p in teacher.named_parameters())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    fractions = logged(trainer, "on_policy_fraction")
    if on_policy is None:
        assert 0.0 < sum(fractions) / len(fractions) < 1.0
    else:
        assert fractions == [on_policy] * 3
    assert logged(trainer, "teacher_token_fraction") == [teacher_fraction] * 3


def test_mixing_is_reproducible_from_the_seed(tmp_path, tokenizer):
    runs = []
    for _ in range(2):
        trainer = make_trainer(tmp_path, tokenizer, lmbda=0.5, max_steps=4)
        trainer.train()
        runs.append((logged(trainer, "on_policy_fraction"), params(trainer.model)))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])


@pytest.mark.parametrize(
    "loss_type,normalization",
    [("jsd", "tokens"), ("skew_fkl", "tokens"), ("skew_rkl", "tokens"), ("tvd", "tokens"), ("jsd", "sequences")],
)
def test_micro_batch_split_does_not_change_the_update(tmp_path, tokenizer, loss_type, normalization):
    """The same 4 rows as 4x1, 2x2 and 1x4 (micro-batch x accumulation) give the same loss and the same update."""
    results = []
    for per_device, accumulation in [(4, 1), (2, 2), (1, 4)]:
        trainer = make_trainer(
            tmp_path,
            tokenizer,
            lmbda=0.0,
            loss_type=loss_type,
            loss_normalization=normalization,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accumulation,
            max_grad_norm=0.0,
        )
        trainer.train()
        results.append((logged(trainer, "loss")[0], params(trainer.model)))
    (loss0, params0), *others = results
    for loss, p in others:
        assert loss == pytest.approx(loss0, rel=1e-5)
        for name in params0:
            assert_close_to_rounding(p[name], params0[name])
    before = params(build_model("qwen2", tokenizer, "student", seed=0))
    assert any(not torch.equal(before[n], params0[n]) for n in before)


@pytest.mark.parametrize("loss_type", ["jsd", "skew_rkl"])
def test_gradient_in_forward_gives_the_recomputed_update(tmp_path, tokenizer, loss_type):
    """`loss_gradient_in_forward` changes when the loss's gradient is taken, not the update: one SGD step with it
    and one recomputing the tiles in the backward give the same loss and parameters (the head included)."""
    results = []
    for in_forward in (True, False):
        trainer = make_trainer(
            tmp_path,
            tokenizer,
            lmbda=0.0,
            loss_type=loss_type,
            max_steps=1,
            optim="sgd",
            learning_rate=1.0,
            max_grad_norm=0.0,
            loss_chunk_size=5,
            loss_gradient_in_forward=in_forward,
        )
        trainer.train()
        results.append((logged(trainer, "loss")[0], params(trainer.model)))
    (loss, ours), (loss_recomputed, recomputed) = results
    assert loss == pytest.approx(loss_recomputed, rel=1e-5)
    for name in ours:
        assert_close_to_rounding(ours[name], recomputed[name])
    before = params(build_model("qwen2", tokenizer, "student", seed=0))
    head = trainer.model.get_output_embeddings().weight
    head_name = next(n for n, p in trainer.model.named_parameters() if p is head)
    assert not torch.equal(before[head_name], ours[head_name])


def naive_batch(tokenizer, lengths=(2, 7, 4)):
    """A hand-made micro-batch of prompt/completion rows with different completion lengths."""
    from trl.trainer.utils import pad

    prompts = [tokenizer(t)["input_ids"] for t in ("reverse: a b c\n", "sort: d c\n", "copy: x y z w\n")]
    completions = [tokenizer(" a b c d e f g h")["input_ids"][:n] for n in lengths]
    tensors = [torch.tensor(p) for p in prompts]
    return {
        "prompt_ids": pad(tensors, padding_value=tokenizer.pad_token_id, padding_side="left"),
        "prompt_mask": pad([torch.ones_like(t) for t in tensors], padding_value=0, padding_side="left"),
        "completion_ids": pad([torch.tensor(c) for c in completions], padding_value=0, padding_side="right"),
        "completion_mask": pad([torch.ones(len(c), dtype=torch.long) for c in completions], padding_value=0),
        "teacher_mask": torch.zeros(len(prompts), max(lengths), dtype=torch.long),
        "num_items_in_batch": torch.tensor(sum(lengths)),
        "num_sequences_in_batch": torch.tensor(len(prompts)),
    }


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
def test_loss_normalization_matches_a_naive_computation(tmp_path, tokenizer, normalization):
    """Forward KL from full logits, per row: the mean over all response tokens ("tokens") or each row's own mean,
    then the mean over rows ("sequences", SKD's Eq. 1)."""
    trainer = make_trainer(tmp_path, tokenizer, beta=0.0, loss_normalization=normalization)
    inputs = naive_batch(tokenizer)
    student, teacher = trainer.model, trainer.accelerator.unwrap_model(trainer.teacher_model)
    loss = trainer.distillation_loss(student, inputs, inputs["num_items_in_batch"])[0]

    per_row = []
    for i in range(3):
        prompt = inputs["prompt_ids"][i][inputs["prompt_mask"][i].bool()]
        completion = inputs["completion_ids"][i][inputs["completion_mask"][i].bool()]
        ids = torch.cat([prompt, completion])[None]
        with torch.no_grad():
            log_q = student(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1).double()
            log_p = teacher(ids).logits[0, len(prompt) - 1 : -1].log_softmax(-1).double()
        per_row.append((log_p.exp() * (log_p - log_q)).sum(-1))
    if normalization == "tokens":
        expected = torch.cat(per_row).mean()
    else:
        expected = torch.stack([row.mean() for row in per_row]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    token_mean, sequence_mean = torch.cat(per_row).mean(), torch.stack([r.mean() for r in per_row]).mean()
    assert abs(token_mean - sequence_mean) > 1e-3 * expected  # the two normalisations differ here


def test_teacher_sampling_settings_are_its_own(tmp_path, tokenizer):
    """The student's `temperature`/`top_p`/`top_k` never reach the teacher, whose settings are `teacher_*` only."""
    from trl_kd.sampler import SamplingParams

    trainer = make_trainer(tmp_path, tokenizer, temperature=0.5, top_p=0.9, top_k=10)
    assert trainer.student_sampling_params == SamplingParams(temperature=0.5, top_p=0.9, top_k=10)
    assert trainer.teacher_sampling_params == SamplingParams(temperature=1.0, top_p=1.0, top_k=0)
    config = trainer.teacher_generation_config
    assert (config.temperature, config.top_p, config.top_k) == (1.0, 1.0, 0)
    own = make_trainer(
        tmp_path / "own", tokenizer, top_k=10, teacher_temperature=0.3, teacher_top_p=0.8, teacher_top_k=5
    )
    assert own.teacher_sampling_params == SamplingParams(temperature=0.3, top_p=0.8, top_k=5)


def test_teacher_model_init_kwargs_with_a_loaded_teacher_is_refused(tmp_path, tokenizer):
    # TRL's rule: the kwargs would be silently ignored (a float32 teacher stays float32 under {"dtype": "float16"})
    with pytest.raises(ValueError, match="teacher_model_init_kwargs .* already instantiated"):
        make_trainer(tmp_path, tokenizer, teacher_model_init_kwargs={"dtype": "float16"})


def test_teacher_model_init_kwargs_apply_to_a_teacher_loaded_by_path(tmp_path, tokenizer, llama_paths):
    trainer = KDTrainer(
        model=llama_paths["student"],
        teacher_model=llama_paths["teacher"],
        args=make_args(tmp_path, teacher_model_init_kwargs={"dtype": "float16"}),
        train_dataset=make_dataset("prompt_only", 8),
        processing_class=tokenizer,
    )
    assert trainer.accelerator.unwrap_model(trainer.teacher_model).dtype == torch.float16


@pytest.mark.parametrize("trainer_class", ["KDTrainer", "SpeculativeKDTrainer"])
def test_stop_strings_end_generated_completions_and_the_loss(tmp_path, tokenizer, trainer_class, monkeypatch):
    """A stop string spanning two tokens, taken from the middle of a completion the same seeded run samples without
    it: with it, every generated completion the loss sees either contains no stop string or ends with the token that
    completes its first occurrence, on TRL's generation path (KDTrainer) and in the teacher-in-the-loop sampler
    (SKD)."""
    import trl_kd

    cls = getattr(trl_kd, trainer_class)
    loss = cls.distillation_loss

    def train_and_record(path, **overrides):
        seen = []

        def spy(self, student, inputs, num_items_in_batch):
            rows = zip(inputs["completion_ids"], inputs["completion_mask"])
            seen.extend(ids[mask.bool()].tolist() for ids, mask in rows)
            return loss(self, student, inputs, num_items_in_batch)

        monkeypatch.setattr(cls, "distillation_loss", spy)
        make_trainer(path, tokenizer, trainer_class=cls, lmbda=1.0, max_completion_length=16, **overrides).train()
        return seen

    def text(ids):
        return tokenizer.decode(ids, skip_special_tokens=False)

    probe = train_and_record(tmp_path / "probe")
    first = next(ids for ids in probe if len(ids) == 16)  # a completion of the first batch, cut by the length only
    start = next(i for i in range(4, 14) if "\ufffd" not in text(first[i : i + 2]) and first[i] > 2)
    stop = text(first[start : start + 2])
    assert len(tokenizer(stop, add_special_tokens=False)["input_ids"]) >= 2

    # the first batch is sampled as in the probe up to the stop, so that completion now ends at the stop string
    seen = train_and_record(tmp_path / "stopped", stop_strings=[stop])
    stopped = [ids for ids in seen if stop in text(ids)]
    assert any(ids == first[: len(ids)] and len(ids) <= start + 2 for ids in stopped)
    for ids in stopped:
        assert text(ids).endswith(stop) and stop not in text(ids[:-1])


def test_on_policy_loss_matches_trl_distillation_trainer(tmp_path, tokenizer):
    """With lmbda=1 and TRL's JSD, KDTrainer computes the same loss as trl.DistillationTrainer on the same samples."""
    common = dict(
        per_device_train_batch_size=4,
        max_steps=1,
        max_completion_length=8,
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=3,
        beta=0.3,
        temperature=1.0,
        disable_tqdm=True,
    )
    dataset = make_dataset("conversational_prompt_only", 8)
    losses = []
    for trainer_cls, config_cls in [(KDTrainer, KDConfig), (DistillationTrainer, DistillationConfig)]:
        extra = {"lmbda": 1.0} if config_cls is KDConfig else {}
        trainer = trainer_cls(
            model=build_model("qwen2", tokenizer, "student", seed=0),
            teacher_model=build_model("qwen2", tokenizer, "teacher", seed=1),
            args=config_cls(output_dir=str(tmp_path / config_cls.__name__), **common, **extra),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.train()
        losses.append((logged(trainer, "loss")[0], logged(trainer, "completions/mean_length")[0]))
    assert losses[0][1] == losses[1][1]  # same samples
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-4)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_other_architectures_train(tmp_path, tokenizer, arch):
    trainer = make_trainer(tmp_path, tokenizer, make_dataset("conversational_prompt_completion", 16), arch=arch)
    before = params(trainer.model)
    trainer.train()
    assert_changed(before, trainer.model)


def test_teacher_with_padded_vocabulary_is_compared_over_the_tokenizer(tmp_path, tokenizer):
    """A teacher whose embedding matrix is padded beyond the tokenizer (as Qwen2.5-0.5B vs 7B) gives exactly the loss
    of the same teacher without the padding."""
    teacher = build_model("qwen2", tokenizer, "teacher", seed=1)
    padded = build_model("qwen2", tokenizer, "teacher", seed=5, vocab_size=len(tokenizer) + 13)
    state = padded.state_dict()
    for name, tensor in teacher.state_dict().items():
        state[name][: tensor.shape[0]] = tensor
    padded.load_state_dict(state)
    losses = []
    for t in (teacher, padded):
        trainer = make_trainer(tmp_path, tokenizer, teacher=t, lmbda=0.0, max_steps=1)
        trainer.train()
        losses.append(logged(trainer, "kd_loss")[0])
        assert trainer.kd_vocab_size == len(tokenizer)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_teacher_vocabulary_smaller_than_tokenizer_is_refused(tmp_path, tokenizer):
    small = build_model("qwen2", tokenizer, "teacher", vocab_size=len(tokenizer) - 10)
    with pytest.raises(ValueError, match="teacher model has a vocabulary of .* GOLD"):
        make_trainer(tmp_path, tokenizer, teacher=small)


@pytest.mark.parametrize(
    "dataset,match",
    [
        (make_dataset("prompt_completion", 4).rename_column("prompt", "question"), "needs a `prompt` column"),
        (make_dataset("prompt_completion", 4).select([]), "is empty"),
        (
            make_dataset("messages", 4).map(lambda r: {"messages": r["messages"][:1]}),
            r"Row 0 of `train_dataset`: the conversation \['user'\] does not end with an assistant answer",
        ),
    ],
)
def test_bad_datasets_are_refused_at_init(tmp_path, tokenizer, dataset, match):
    with pytest.raises(ValueError, match=match):
        make_trainer(tmp_path, tokenizer, dataset)


def test_prompt_longer_than_the_limit_is_refused_at_init(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="longer than the limit of 3"):
        make_trainer(tmp_path, tokenizer, max_prompt_length=3)


def test_completion_longer_than_the_context_is_refused_at_init(tmp_path, tokenizer):
    # the tiny models have a context of 256 tokens: no prompt fits beside 300 completion tokens
    with pytest.raises(ValueError, match=r"`max_completion_length` \(300\) leaves no room .* context of 256"):
        make_trainer(tmp_path, tokenizer, max_completion_length=300)


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"lmbda": 1.5}, "lmbda"),
        ({"loss_type": "kl"}, "loss_type"),
        ({"skew_alpha": 0.0}, "skew_alpha"),
        ({"beta": 2.0}, "beta"),
        ({"loss_temperature": 0.0}, "loss_temperature"),
        ({"teacher_zero_stage": 2}, "teacher_zero_stage"),
        ({"teacher_zero_stage": 0, "teacher_offload": True}, "teacher_offload"),
        ({"teacher_fsdp": False, "teacher_offload": True}, "teacher_offload"),
        ({"teacher_fsdp": True, "teacher_zero_stage": 3}, "different backends"),
        ({"teacher_temperature": 0.0}, "teacher_temperature"),
        ({"teacher_temperature": float("nan")}, "teacher_temperature"),
        ({"teacher_top_k": -1}, "teacher_top_k"),
        ({"top_k": -2}, "top_k"),
        ({"loss_normalization": "batch"}, "loss_normalization"),
        ({"stop_strings": []}, "stop_strings"),
        ({"stop_strings": ["\n", ""]}, "stop_strings"),
        ({"max_draft_tokens": 0}, "max_draft_tokens"),
    ],
)
def test_bad_config_values_are_refused(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        make_args(tmp_path, **overrides)


def test_teacher_placement_without_deepspeed_is_refused(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="DeepSpeed config"):
        make_trainer(tmp_path, tokenizer, teacher_zero_stage=3)
    with pytest.raises(ValueError, match="FSDP2 config"):
        make_trainer(tmp_path, tokenizer, teacher_fsdp=True)
    with pytest.raises(ValueError, match="sharded config"):
        make_trainer(tmp_path, tokenizer, teacher_offload=True)


@pytest.mark.parametrize(
    "backend,overrides,match",
    [
        ("fsdp1", {}, "FSDP2 only"),
        ("fsdp1", {"teacher_fsdp": False}, "fsdp_version: 2"),
        ("fsdp2", {"teacher_zero_stage": 3}, "use `teacher_fsdp` under FSDP2"),
        ("deepspeed", {"teacher_fsdp": True}, "use `teacher_zero_stage` under DeepSpeed"),
    ],
)
def test_backend_and_placement_mismatches_are_refused(tmp_path, backend, overrides, match):
    """What the launch's backend can't run is refused before anything is placed (the launches themselves run in
    tests/test_distributed.py; here the accelerator's state stands for them)."""
    from types import SimpleNamespace

    from trl_kd.placement import check_distributed_backend

    fsdp = SimpleNamespace(fsdp_version=int(backend[-1])) if backend.startswith("fsdp") else None
    state = SimpleNamespace(deepspeed_plugin=object() if backend == "deepspeed" else None, fsdp_plugin=fsdp)
    with pytest.raises(ValueError, match=match):
        check_distributed_backend(SimpleNamespace(state=state), make_args(tmp_path, **overrides))
    if backend == "fsdp2":  # the same config without the mismatching field passes
        check_distributed_backend(SimpleNamespace(state=state), make_args(tmp_path))


def test_teacher_loaded_from_a_path(tmp_path, tokenizer, llama_paths):
    trainer = KDTrainer(
        model=llama_paths["student"],
        teacher_model=llama_paths["teacher"],
        args=make_args(tmp_path),
        train_dataset=make_dataset("prompt_only", 8),
        processing_class=tokenizer,
    )
    trainer.train()
    assert logged(trainer, "kd_loss")


def test_teacher_in_the_loop_rollout_trains_a_lora_student_with_gradient_checkpointing(tmp_path, tokenizer):
    """A KDTrainer whose rollout runs the block-verify engine: PEFT student, gradient checkpointing on."""
    from peft import LoraConfig

    from trl_kd.sampler import TopKRule

    class TopKTrainer(KDTrainer):
        def rollout(self, prompt_ids):
            return self.teacher_in_the_loop_rollout(prompt_ids, TopKRule(k=100), 3)

    trainer = TopKTrainer(
        model=build_model("qwen2", tokenizer, "student"),
        teacher_model=build_model("qwen2", tokenizer, "teacher", seed=1),
        args=make_args(tmp_path, lmbda=1.0, gradient_checkpointing=True, temperature=0.5, teacher_temperature=0.2),
        train_dataset=make_dataset("conversational_prompt_only", 16),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
    )
    lora = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train()
    assert any(not torch.equal(lora[n], p) for n, p in trainer.model.named_parameters() if n in lora)
    fraction = logged(trainer, "teacher_token_fraction")
    rate = logged(trainer, "acceptance_rate")
    assert len(rate) == 2 and all(0.0 < f < 1.0 for f in fraction)
    # every response token is judged once: accepted (student wrote it) or replaced (teacher wrote it)
    assert all((1 - f) == pytest.approx(r, abs=1e-9) for f, r in zip(fraction, rate))


def tokenizer_with_swapped_ids(tokenizer, first: str, second: str):
    """The same tokenizer (same size, same merges) with the ids of two tokens exchanged: it encodes some texts to
    other ids, as a teacher from another model family would, without any difference in vocabulary size."""
    import json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    for added in spec["added_tokens"]:
        added["id"] = {vocab[first]: vocab[second], vocab[second]: vocab[first]}.get(added["id"], added["id"])
    swapped = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        pad_token=tokenizer.pad_token,
        eos_token=tokenizer.eos_token,
        padding_side="left",
    )
    swapped.chat_template = tokenizer.chat_template
    return swapped


def test_a_teacher_tokenizer_of_the_same_size_that_encodes_differently_is_refused(tmp_path, tokenizer):
    from trl_kd.data import TOKENIZER_PROBE

    probe = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    first, second = tokenizer.convert_ids_to_tokens([probe[0], probe[3]])
    other = tokenizer_with_swapped_ids(tokenizer, first, second)
    assert len(other) == len(tokenizer)
    with pytest.raises(
        ValueError,
        match=r"teacher's tokenizer does not match the student's: a probe text .* first "
        r"differing at token 0.*check_teacher_tokenizer=False",
    ):
        make_trainer(tmp_path, tokenizer, teacher_processing_class=other)
    # loaded from the teacher's folder, the error names it
    teacher_dir = tmp_path / "teacher"
    build_model("qwen2", tokenizer, "teacher", seed=1, save_dir=teacher_dir)
    other.save_pretrained(teacher_dir)
    with pytest.raises(ValueError, match=rf"teacher's tokenizer \({teacher_dir}\) does not match"):
        KDTrainer(
            model=build_model("qwen2", tokenizer, "student"),
            teacher_model=str(teacher_dir),
            args=make_args(tmp_path),
            train_dataset=make_dataset("prompt_only", 8),
            processing_class=tokenizer,
        )
    # deliberately different tokenizers can be allowed
    make_trainer(tmp_path, tokenizer, teacher_processing_class=other, check_teacher_tokenizer=False).train()


def test_a_teacher_tokenizer_with_another_special_token_id_is_refused(tmp_path, tokenizer):
    from trl_kd.data import TOKENIZER_PROBE

    probe = set(tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"])
    unused = next(
        t
        for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
        if i not in probe and t not in tokenizer.all_special_tokens
    )
    other = tokenizer_with_swapped_ids(tokenizer, tokenizer.eos_token, unused)
    with pytest.raises(
        ValueError,
        match=rf"special token '{re.escape(tokenizer.eos_token)}' is id "
        rf"{tokenizer.eos_token_id} for the student and \d+ for the teacher",
    ):
        make_trainer(tmp_path, tokenizer, teacher_processing_class=other)


def test_the_same_tokenizer_saved_with_the_teacher_passes(tmp_path, tokenizer, llama_paths):
    trainer = KDTrainer(
        model=llama_paths["student"],
        teacher_model=llama_paths["teacher"],
        args=make_args(tmp_path),
        train_dataset=make_dataset("prompt_only", 8),
        processing_class=tokenizer,
    )
    assert trainer.args.check_teacher_tokenizer


def test_a_teacher_folder_without_a_tokenizer_is_not_compared(tmp_path, tokenizer, caplog):
    """`AutoTokenizer` would build an empty tokenizer from a Qwen2 config alone, and every teacher would fail."""
    import logging

    teacher_dir = tmp_path / "teacher"
    build_model("qwen2", tokenizer, "teacher", seed=1, save_dir=teacher_dir)
    with caplog.at_level(logging.WARNING, logger="trl_kd.data"):
        KDTrainer(
            model=build_model("qwen2", tokenizer, "student"),
            teacher_model=str(teacher_dir),
            args=make_args(tmp_path),
            train_dataset=make_dataset("prompt_only", 8),
            processing_class=tokenizer,
        )
    assert f"The teacher's folder {teacher_dir} holds no tokenizer" in caplog.text


def test_a_missing_model_is_named_with_how_it_was_read(tmp_path, tokenizer, monkeypatch):
    """The Hub client would say "Repo id must be in the form 'repo_name'" about a local path that does not exist, and
    "We couldn't connect" about a Hub id offline: the trainer names the model and how it read the name, before
    anything loads."""
    missing = str(tmp_path / "no-teacher")
    with pytest.raises(ValueError, match=rf"`teacher_model` '{re.escape(missing)}': no such folder"):
        KDTrainer(
            model=build_model("qwen2", tokenizer, "student"),
            teacher_model=missing,
            args=make_args(tmp_path),
            train_dataset=make_dataset("prompt_only", 8),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match=r"`model` './no-student': no such folder"):
        KDTrainer(
            model="./no-student",
            teacher_model=build_model("qwen2", tokenizer, "teacher"),
            args=make_args(tmp_path),
            train_dataset=make_dataset("prompt_only", 8),
            processing_class=tokenizer,
        )
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "is_offline_mode", lambda: True)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    with pytest.raises(ValueError, match=r"`teacher_model` 'org/no-teacher': read as a Hub id \(offline.*not in the"):
        KDTrainer(
            model=build_model("qwen2", tokenizer, "student"),
            teacher_model="org/no-teacher",
            args=make_args(tmp_path),
            train_dataset=make_dataset("prompt_only", 8),
            processing_class=tokenizer,
        )
