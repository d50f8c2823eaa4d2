from __future__ import annotations

import functools
import math
import zlib
from typing import Any

import torch
from datasets import Dataset, IterableDataset
from transformers import GenerationConfig, PreTrainedModel, PreTrainedTokenizerBase, TrainerCallback
from trl import DistillationTrainer
from trl.trainer.utils import pad

from .._compat import HandOver, quiet_checkpointing_aliases
from ..checkpoints import MethodStateCheckpoints, resolve_checkpoint
from ..cross_tokenizer import CrossTokenizerTeacher, teacher_eos_ids
from ..data import (
    check_prompt_lengths,
    check_teacher_tokenizer,
    check_vocabularies,
    completion_token_ids,
    context_lengths,
    each_dataset,
    load_tokenizer,
    prepare_dataset,
    prompt_length_limit,
)
from ..errors import check_models_found
from ..evaluation import rollout_metrics, teacher_token_metrics
from ..guards import NonFiniteError, check_grad_norm, finite_flags, non_finite_source, sampling_from
from ..losses import LMHead, chunked_kd_loss, loss_weights, response_hidden_states, stack_rows
from ..placement import (
    any_process,
    check_distributed_backend,
    fsdp2_gathered,
    is_partitioned,
    load_teacher,
    prepare_teacher,
    smallest_over_processes,
    unwrapped_for_generation,
)
from ..sampler import Rollout, Rule, SamplingParams, StopStrings, block_verify_sample, generate_completions
from ..teacher_cache import CACHE_COLUMNS, OfflineTeacher, cached_topk
from .card import DistillationCard
from .config import KDConfig


def sequences(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`prompt + completion` token ids and attention mask of a training batch, and the completion width."""
    input_ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1)
    attention_mask = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1)
    return input_ids, attention_mask, inputs["completion_ids"].shape[1]


class KDTrainer(DistillationCard, MethodStateCheckpoints, DistillationTrainer):
    r"""Generalized knowledge distillation (GKD) on top of `trl.DistillationTrainer`.

    From *On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes* (Agarwal et al., ICLR
    2024, arXiv 2306.13649). Each row of a batch is trained with probability `lmbda` on a completion sampled from the
    student, otherwise on its dataset completion (or, with `seq_kd`, on a teacher sample); the loss is a token-level
    divergence between teacher and student (`KDConfig.loss_type`), averaged over all response tokens of the global
    batch so that gradient accumulation and the number of processes don't change it.

    The teacher is frozen and in eval mode. Teacher and student must share a tokenizer; their embedding matrices may
    be padded to different sizes (distributions are compared over the tokenizer's range), but a model whose
    vocabulary doesn't cover the tokenizer is refused. Datasets are checked when the trainer is built: a `prompt`
    column (standard or conversational, optionally with `completion`) or a `messages` column. With an offline
    `teacher_cache` (`trl-kd cache-teacher`) the dataset-completion rows read the teacher's top-k from disk, and with
    `lmbda=0` `teacher_model` may be `None`.

    Method trainers customise two public hooks:

    * [`~KDTrainer.rollout`]`(prompt_ids: list[list[int]]) -> Rollout` — who writes each training token for the rows
      the student samples. The default samples from the student (TRL's generation, vLLM included).
    * [`~KDTrainer.distillation_loss`]`(student, inputs, num_items_in_batch) -> (loss, divergence_sum, entropy_sum,
      num_tokens)` — the loss of one micro-batch; `inputs` holds `prompt_ids`, `prompt_mask`, `completion_ids`,
      `completion_mask` and `teacher_mask` (1 where the teacher wrote the token).

    Metrics logged: `on_policy_fraction`, `teacher_token_fraction`, `kd_loss`, besides TRL's.

    Example:

    ```python
    from trl_kd import KDConfig, KDTrainer

    trainer = KDTrainer(
        model="Qwen/Qwen2.5-0.5B-Instruct",
        teacher_model="Qwen/Qwen2.5-7B-Instruct",
        args=KDConfig(output_dir="qwen-kd", lmbda=0.5, beta=0.5),
        train_dataset=dataset,  # "prompt" [+ "completion"] or "messages"
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-kd", "distillation", "gkd"]
    _name = "GKD"
    config_class = KDConfig
    position_buckets: int = 0
    """Log `teacher_token_fraction/bucket_<b>_of_<n>` over this many equal parts of each response (0 = off)."""
    teacher_prefix_tokens: int = 0
    """Positions the teacher sees before each prompt (PromptKD's soft prompt), counted in the length checks."""

    def __init__(
        self,
        model: str | PreTrainedModel,
        teacher_model: str | PreTrainedModel | None = None,
        args: KDConfig | None = None,
        train_dataset: Dataset | IterableDataset | None = None,
        eval_dataset: Dataset | IterableDataset | dict[str, Dataset | IterableDataset] | None = None,
        processing_class: PreTrainedTokenizerBase | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        quantization_config: Any = None,
        peft_config: Any = None,
        teacher_processing_class: PreTrainedTokenizerBase | None = None,
    ):
        if args is None:
            name = model if isinstance(model, str) else model.config._name_or_path
            suffix = self._name.replace(" ", "")
            args = self.config_class(output_dir=f"{(name or 'model').split('/')[-1]}-{suffix}")
        if not isinstance(args, self.config_class):
            raise TypeError(
                f"`args` must be a {self.config_class.__name__} (or a subclass), got {type(args).__name__}."
            )
        teacher_model = teacher_model if teacher_model is not None else args.teacher_model_name_or_path
        self.offline_teacher = None if args.teacher_cache is None else OfflineTeacher(args.teacher_cache, args.seq_kd)
        if self.offline_teacher is not None:
            train_dataset = self.offline_teacher.training_rows(train_dataset)
        if teacher_model is None and not (args.teacher_cache is not None and args.lmbda == 0):
            raise ValueError(
                "No teacher: pass `teacher_model` or set `teacher_model_name_or_path` in the config (training without "
                "a teacher needs an offline `teacher_cache` and `lmbda=0`)."
            )
        teacher_source = teacher_model
        if teacher_model is not None and not isinstance(teacher_model, str):
            teacher_source = teacher_model.config._name_or_path
        check_models_found(
            model=(model, (args.model_init_kwargs or {}).get("revision")),
            teacher_model=(teacher_model, args.teacher_model_revision),
        )
        if self.offline_teacher is None:  # else `training_rows` prepared it
            train_dataset = prepare_dataset(train_dataset, "train_dataset")
        eval_dataset = each_dataset(prepare_dataset, eval_dataset, "eval_dataset")
        if teacher_model is not None:
            teacher_model = load_teacher(teacher_model, args)

        # The teacher is prepared below, after our own vocabulary check (TRL's refuses differently padded heads).
        super().__init__(
            model=model,
            teacher_model=None,
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            quantization_config=quantization_config,
            peft_config=peft_config,
        )
        check_distributed_backend(self.accelerator, args)
        # across tokenizers the teacher scores its own tokens: its vocabulary is not the student's to cover
        teacher_scoring_ours = None if args.cross_tokenizer else teacher_model
        self.kd_vocab_size = check_vocabularies(self._tokenizer, student=self.model, teacher=teacher_scoring_ours)
        if self.offline_teacher is not None:
            self.offline_teacher.check(
                self._tokenizer, args.loss_temperature, self.kd_vocab_size, self.max_completion_length
            )
        self.cross_tokenizer = None
        if args.cross_tokenizer:
            need = "cross_tokenizer=True needs the teacher's tokenizer"
            self.cross_tokenizer = CrossTokenizerTeacher.from_config(
                args,
                self._tokenizer,
                teacher_processing_class or load_tokenizer(teacher_source, need),
                self.kd_vocab_size,
                teacher_model.config.get_text_config().vocab_size,
                self.eos_token_ids,
                teacher_eos_ids(teacher_model),
            )
        elif args.check_teacher_tokenizer and teacher_model is not None:
            check_teacher_tokenizer(self._tokenizer, teacher_processing_class, teacher_source)
        self.teacher_model = None if teacher_model is None else prepare_teacher(teacher_model, self.accelerator, args)
        # a teacher replicated beside a sharded student (`teacher_zero_stage=0`, `teacher_fsdp=False`) has nothing to
        # gather
        self._teacher_partitioned = teacher_model is not None and is_partitioned(self.teacher_model)
        self._gather_teacher = args.ds3_gather_for_generation and self._teacher_partitioned

        # a streamed dataset comes back wrapped, to be checked row by row as it streams
        self.train_dataset = self._check_prompt_lengths(self.train_dataset, "train_dataset")
        self.eval_dataset = each_dataset(self._check_prompt_lengths, self.eval_dataset, "eval_dataset")

        # Tokens beyond the tokenizer (embedding padding) are never sampled.
        self.generation_config.suppress_tokens = self._padding_token_ids(self.model) or None
        teacher_ids = {} if self.cross_tokenizer is None else self.cross_tokenizer.teacher_generation_ids
        self.teacher_generation_config = self.teacher_sampling_params.generation_config(
            **{**self.generation_kwargs, **teacher_ids},
            suppress_tokens=(teacher_scoring_ours is not None and self._padding_token_ids(teacher_model)) or None,
        )
        self.stop_strings = StopStrings(self._tokenizer, args.stop_strings) if args.stop_strings else None
        self._eval_rollouts = 0
        self._handed = HandOver()
        self.dataset_name: str | None = None  # shown in the model card; the example scripts set it

    # ------------------------------------------------------------------------------------------------ set-up checks
    def _padding_token_ids(self, model: PreTrainedModel) -> list[int]:
        return list(range(self.kd_vocab_size, model.config.get_text_config().vocab_size))

    def position_limits(self) -> dict[str, int]:
        """Longest `prompt + completion` each model can place, by role (see `trl_kd.data.context_lengths`)."""
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        return context_lengths(self.teacher_prefix_tokens, student=self.model, teacher=teacher)

    def _check_prompt_lengths(self, dataset: Dataset | IterableDataset, name: str) -> Dataset | IterableDataset:
        args = self.args
        limits = self.position_limits()
        limit = prompt_length_limit(
            limits, args.max_completion_length, args.max_prompt_length, self.teacher_prefix_tokens
        )
        return check_prompt_lengths(dataset, lambda prompts: self._tokenize_prompts(prompts)[0], limit, name)

    # ------------------------------------------------------------------------------------------------------ rollouts
    @property
    def student_sampling_params(self) -> SamplingParams:
        """The student's sampling settings (`temperature`, `top_p`, `top_k`)."""
        return SamplingParams(temperature=self.args.temperature, top_p=self.args.top_p, top_k=self.args.top_k or 0)

    @property
    def teacher_sampling_params(self) -> SamplingParams:
        """The teacher's sampling settings (`teacher_temperature`, `teacher_top_p`, `teacher_top_k`): never the
        student's."""
        args = self.args
        return SamplingParams(temperature=args.teacher_temperature, top_p=args.teacher_top_p, top_k=args.teacher_top_k)

    def rollout(self, prompt_ids: list[list[int]]) -> Rollout:
        """Generation hook: sample completions for the on-policy rows and say who wrote each token.

        The default samples every token from the student with TRL's generation (`transformers` or vLLM), so the
        teacher wrote none. Method trainers (SKD, SWITCH) override it to let the teacher write some tokens. Every
        process calls it in step (a process without on-policy rows calls it with one dummy prompt), so collectives
        such as ZeRO-3 parameter gathers stay aligned.

        Args:
            prompt_ids: the prompts' token ids, one list per row, unpadded.

        Returns:
            [`Rollout`][trl_kd.Rollout] with one completion per prompt.
        """
        with fsdp2_gathered(self.model_wrapped, self.args.ds3_gather_for_generation and not self.args.use_vllm):
            completion_ids = super()._generate_single_turn(prompt_ids, None, {})
        return Rollout(completion_ids, [[False] * len(ids) for ids in completion_ids])

    def teacher_in_the_loop_rollout(self, prompt_ids: list[list[int]], rule: Rule, num_draft_tokens: int) -> Rollout:
        """Rollout where `rule` decides, token by token, whether the teacher writes instead of the student, run by
        the block-verify engine ([`trl_kd.sampler.block_verify_sample`][trl_kd.sampler.block_verify_sample]) with
        `student_sampling_params` and `teacher_sampling_params`. Gradient checkpointing is off and ZeRO-3 parameters
        are gathered while it runs; with several processes every process runs the same rounds and draft lengths.
        The draft length starts at `num_draft_tokens` and adapts with `adaptive_draft`; with `reuse_teacher_states`
        the teacher's hidden states come back for the loss.
        """
        args = self.args
        sync, sync_draft_length = None, None
        if self.accelerator.num_processes > 1:
            sync = functools.partial(any_process, self.accelerator)
            sync_draft_length = functools.partial(smallest_over_processes, self.accelerator)
        with (
            unwrapped_for_generation(
                self.model_wrapped,
                self.accelerator,
                args.ds3_gather_for_generation,
                gradient_checkpointing_kwargs=args.gradient_checkpointing_kwargs,
            ) as student,
            unwrapped_for_generation(self.teacher_model, self.accelerator, self._gather_teacher) as teacher,
        ):
            return block_verify_sample(
                student,
                teacher,
                prompt_ids,
                rule,
                max_new_tokens=self.max_completion_length,
                eos_token_ids=self.eos_token_ids,
                pad_token_id=self._tokenizer.pad_token_id,
                vocab_size=self.kd_vocab_size,
                num_draft_tokens=num_draft_tokens,
                student_params=self.student_sampling_params,
                teacher_params=self.teacher_sampling_params,
                sync_continue=sync,
                stop=self.stop_strings,
                adaptive_draft=args.adaptive_draft,
                max_draft_tokens=args.max_draft_tokens,
                draft_schedule=args.draft_schedule,
                sync_draft_length=sync_draft_length,
                keep_teacher_hidden=args.reuse_teacher_states,
            )

    def sample_from(
        self, model: torch.nn.Module, prompt_ids: list[list[int]], generation_config: GenerationConfig
    ) -> list[list[int]]:
        """Sample one completion per prompt from `model` (e.g. the teacher engine) with `transformers.generate`,
        cut after the first of the config's EOS ids. Gathers ZeRO-3 parameters as TRL does for the student."""
        gather = self.args.ds3_gather_for_generation and (model is not self.teacher_model or self._gather_teacher)
        eos = generation_config.eos_token_id
        with unwrapped_for_generation(model, self.accelerator, gather) as unwrapped, torch.no_grad():
            return generate_completions(
                unwrapped,
                prompt_ids,
                generation_config,
                pad_token_id=generation_config.pad_token_id,
                eos_token_ids=[eos] if isinstance(eos, int) else list(eos or self.eos_token_ids),
                device=self.accelerator.device,
            )

    def teacher_samples(self, prompt_ids: list[list[int]], prompts: list) -> list[list[int]]:
        """One teacher sample per prompt (`seq_kd` rows), as student tokens. Across tokenizers the teacher reads
        its own form of the prompt, and its text is re-tokenized for the student."""
        config, bridge = self.teacher_generation_config, self.cross_tokenizer
        if bridge is None:
            return self.sample_from(self.teacher_model, prompt_ids, config)
        sampled = self.sample_from(self.teacher_model, [bridge.prompt_ids(p) for p in prompts], config)
        return [bridge.student_completion(ids, self.max_completion_length) for ids in sampled]

    def _row_uniforms(self, n: int, mode: str) -> torch.Tensor:
        # Seeded by (seed, step, process) rather than the global RNG, so decisions are reproducible from the seed and
        # identical after resuming from a checkpoint.
        step = self.state.global_step if mode == "train" else self._eval_rollouts
        key = f"{self.args.seed}/{mode}/{step}/{self.accelerator.process_index}".encode()
        generator = torch.Generator().manual_seed(zlib.crc32(key))
        return torch.rand(n, generator=generator)

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
        with self._handed.scope(rows=inputs) as handed, quiet_checkpointing_aliases():
            output = super()._generate_and_score_completions(inputs)
            teacher_masks, teacher_hidden = handed["teacher_mask"], handed.get("teacher_hidden")
            teacher_topk = handed.get("teacher_topk")
        masks = [torch.tensor(m, dtype=torch.long) for m in teacher_masks]
        teacher_mask = pad(masks, padding_value=0, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of)
        width = output["completion_ids"].shape[1]
        teacher_mask = torch.nn.functional.pad(teacher_mask, (0, width - teacher_mask.shape[1]))
        output["teacher_mask"] = teacher_mask.to(self.accelerator.device)
        if teacher_hidden is not None:
            # split into micro-batches with the rest of the batch
            output["teacher_hidden"], output["teacher_hidden_rows"] = stack_rows(teacher_hidden, width)
        if teacher_topk is not None:
            output.update(self.offline_teacher.batch(teacher_topk, width, self.accelerator.device))
        if self.cross_tokenizer is not None:
            prompts = [row["prompt"] for row in inputs]
            output.update(self.cross_tokenizer.batch(prompts, output["completion_ids"], output["completion_mask"]))
        mode = "train" if self.model.training else "eval"
        # sequences with a response token, over the whole generation batch of every process (as TRL counts tokens)
        has_tokens = (output["completion_mask"].sum(1) > 0).sum()
        output["num_sequences_in_batch"] = self.accelerator.gather(has_tokens).sum()
        fractions = teacher_token_metrics(
            self.accelerator, output["completion_mask"], output["teacher_mask"], self.position_buckets
        )
        self._log_metrics(mode, fractions)
        return output

    def _log_metrics(self, mode: str, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self._metrics[mode][key].append(value)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, has_tool_images=False):
        # Called by TRL once per generation batch, inside `_generate_and_score_completions`, which hands over the
        # rows. Decides per row who writes the completion: the student (rollout hook), the dataset, or the teacher
        # (seq_kd).
        if images is not None or multimodal_fields:
            raise NotImplementedError("trl-kd trainers support text-only models.")
        mode = "train" if self.model.training else "eval"
        rows = self._handed["rows"]
        n = len(prompt_ids)
        uniforms = self._row_uniforms(n, mode)
        if mode == "eval":
            self._eval_rollouts += 1
        has_completion = [row.get("completion") is not None for row in rows]
        on_policy = [
            bool(u < self.args.lmbda) or (not c and not self.args.seq_kd) for u, c in zip(uniforms, has_completion)
        ]
        student_rows = [i for i in range(n) if on_policy[i]]
        # rows of an offline teacher cache read their completion (and, in the loss, the teacher) from it
        cached = [self.offline_teacher is not None and self.offline_teacher.is_cached(row) for row in rows]
        teacher_rows = [i for i in range(n) if not on_policy[i] and self.args.seq_kd and not cached[i]]

        completions: list[list[int]] = [[] for _ in range(n)]
        teacher_mask: list[list[bool]] = [[] for _ in range(n)]
        teacher_hidden: list[torch.Tensor | None] = [None] * n
        counts: dict[str, int] = {}
        if any_process(self.accelerator, bool(student_rows)):
            with sampling_from("student", self.state.global_step + 1):
                rollout = self.rollout([prompt_ids[i] for i in (student_rows or [0])])
            # the counters' keys even from a dummy rollout: every process reduces the same key set
            counts = rollout.counts if student_rows else dict.fromkeys(rollout.counts, 0)
            if student_rows:
                for i, ids, mask in zip(student_rows, rollout.completion_ids, rollout.teacher_mask):
                    completions[i], teacher_mask[i] = ids, mask
                if rollout.teacher_hidden is not None:
                    for i, hidden in zip(student_rows, rollout.teacher_hidden):
                        teacher_hidden[i] = hidden
        if any_process(self.accelerator, bool(teacher_rows)):
            chosen = teacher_rows or [0]
            with sampling_from("teacher", self.state.global_step + 1):
                sampled = self.teacher_samples([prompt_ids[i] for i in chosen], [rows[i]["prompt"] for i in chosen])
            for i, ids in zip(teacher_rows, sampled):
                completions[i], teacher_mask[i] = ids, [True] * len(ids)
        if self.stop_strings is not None:  # generated rows end at a stop string (the sampler already stopped there)
            for i in set(student_rows) | set(teacher_rows):
                completions[i] = self.stop_strings.cut(completions[i])
                teacher_mask[i] = teacher_mask[i][: len(completions[i])]
                if teacher_hidden[i] is not None:
                    teacher_hidden[i] = teacher_hidden[i][: len(completions[i])]
        teacher_topk: list[tuple[torch.Tensor, ...] | None] = [None] * n
        for i in range(n):
            if on_policy[i]:
                continue
            if cached[i]:
                ours = None if self.args.seq_kd else self._dataset_completion(rows[i], prompt_ids[i])
                completions[i], teacher_topk[i] = self.offline_teacher.completion(
                    rows[i], prompt_ids[i], ours, self.max_completion_length
                )
                teacher_mask[i] = [self.args.seq_kd] * len(completions[i])
            elif not self.args.seq_kd:
                completions[i] = self._dataset_completion(rows[i], prompt_ids[i])
                teacher_mask[i] = [False] * len(completions[i])

        self._handed["teacher_mask"] = teacher_mask
        if any(hidden is not None for hidden in teacher_hidden):
            self._handed["teacher_hidden"] = teacher_hidden
        if any(top is not None for top in teacher_topk):
            self._handed["teacher_topk"] = teacher_topk
        # every process gets here, with the same counter keys (a dummy rollout where it had no on-policy row)
        self._log_metrics(mode, rollout_metrics(self.accelerator, len(student_rows), n, counts))
        return completions

    def _dataset_completion(self, row: dict[str, Any], prompt_ids: list[int]) -> list[int]:
        return completion_token_ids(
            self._tokenizer,
            row["prompt"],
            prompt_ids,
            row["completion"],
            self.eos_token_ids,
            self.max_completion_length,
            self.chat_template_kwargs,
        )

    # ---------------------------------------------------------------------------------------------------------- loss
    @staticmethod
    def hidden_states(
        model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int
    ) -> torch.Tensor:
        """Last hidden states that predict the `num_completion_tokens` completion tokens, shape `(B, C, H)` (see
        [`response_hidden_states`][trl_kd.losses.response_hidden_states])."""
        return response_hidden_states(model, attention_mask, num_completion_tokens, input_ids=input_ids)

    def teacher_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int
    ) -> torch.Tensor:
        """Teacher hidden states for the completion positions, without gradient, routed through the teacher's
        DeepSpeed/FSDP wrapper so sharded parameters are gathered."""
        self.teacher_model.eval()
        unwrapped = self.accelerator.unwrap_model(self.teacher_model)
        with torch.no_grad():
            return self._forward_redirection(
                self.teacher_model,
                unwrapped,
                self.hidden_states,
                unwrapped,
                input_ids,
                attention_mask,
                num_completion_tokens,
            )

    def distillation_loss(
        self, student: torch.nn.Module, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Loss hook: the distillation loss of one micro-batch.

        Args:
            student: the unwrapped student (a `PeftModel` with LoRA).
            inputs: `prompt_ids`, `prompt_mask` (left-padded), `completion_ids`, `completion_mask`, `teacher_mask`
                (right-padded, `(B, C)`).
            num_items_in_batch: response tokens of the global batch divided by the number of processes.

        Returns:
            `(loss, divergence_sum, entropy_sum, num_tokens)`: the normalised loss and the local raw sums used for
            metrics.
        """
        input_ids, attention_mask, num_completion_tokens = sequences(inputs)
        student_hidden = self.hidden_states(student, input_ids, attention_mask, num_completion_tokens)
        if self.cross_tokenizer is not None:  # the teacher reads its own tokens of the same text
            teacher_ids, teacher_mask = inputs["xt_input_ids"], inputs["xt_attention_mask"]
            width = int(inputs["xt_completion_lengths"].max())
            teacher_hidden = self.teacher_hidden_states(teacher_ids, teacher_mask, width)
            teacher = LMHead.from_model(self.accelerator.unwrap_model(self.teacher_model))
            return self.cross_tokenizer.loss(
                LMHead.from_model(student), student_hidden, teacher, teacher_hidden, inputs, num_items_in_batch
            )
        teacher_hidden = self.loss_teacher_hidden_states(inputs, input_ids, attention_mask, num_completion_tokens)
        return self.loss_from_hidden_states(student, student_hidden, teacher_hidden, inputs, num_items_in_batch)

    def loss_teacher_hidden_states(
        self,
        inputs: dict[str, torch.Tensor],
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        num_completion_tokens: int,
    ) -> torch.Tensor:
        """The teacher's `(B, C, H)` hidden states for the loss: those the sampler kept (`reuse_teacher_states`;
        rows sampled with the teacher in the loop), and a teacher forward over the rows that need one (dataset
        completions, teacher samples), not over rows an offline `teacher_cache` covers (their states are zeros,
        unused: the loss reads the cache). A step whose rows were all sampled runs the teacher inside the sampler only.
        """
        kept, cached = inputs.get("teacher_hidden"), inputs.get("teacher_topk_rows")
        covered = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        for rows in (inputs.get("teacher_hidden_rows"), cached):
            if rows is not None:
                covered |= rows.bool()
        missing = (~covered).nonzero().squeeze(1)
        if self.teacher_model is None:
            if missing.numel():
                raise ValueError(
                    f"{missing.numel()} rows of this batch are not in the teacher cache and there is no teacher to "
                    "run on them: pass a `teacher_model`, or train on cached rows only (`lmbda=0`)."
                )
            return input_ids.new_zeros(*input_ids.shape[:1], num_completion_tokens, 1, dtype=torch.float32)
        needs_forward = bool(missing.numel())
        # a sharded teacher's forward is a collective: all processes run one, or none (decided before any returns)
        if self._teacher_partitioned:
            needs_forward = any_process(self.accelerator, needs_forward)
        if kept is None and cached is None:  # every row needs the teacher
            return self.teacher_hidden_states(input_ids, attention_mask, num_completion_tokens)
        if kept is not None:
            hidden = kept[:, :num_completion_tokens]
        else:
            width = self.accelerator.unwrap_model(self.teacher_model).config.get_text_config().hidden_size
            dtype = self.accelerator.unwrap_model(self.teacher_model).dtype
            hidden = torch.zeros(
                *input_ids.shape[:1], num_completion_tokens, width, dtype=dtype, device=input_ids.device
            )
        if needs_forward:
            rows = missing if missing.numel() else missing.new_zeros(1)  # one row to stay in step, discarded
            computed = self.teacher_hidden_states(input_ids[rows], attention_mask[rows], num_completion_tokens)
            if missing.numel():
                hidden = hidden.clone()
                hidden[missing] = computed.to(hidden.dtype)
        return hidden

    def loss_normalizer(
        self, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """`(token_weights, denominator)` of the loss under `loss_normalization` (see `trl_kd.losses.loss_weights`)."""
        return loss_weights(
            inputs["completion_mask"],
            self.args.loss_normalization,
            num_items_in_batch,
            inputs.get("num_sequences_in_batch"),
            self.accelerator.num_processes,
        )

    def loss_from_hidden_states(
        self,
        student: torch.nn.Module,
        student_hidden: torch.Tensor,
        teacher_hidden: torch.Tensor,
        inputs: dict[str, torch.Tensor],
        num_items_in_batch: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The configured divergence between the two models' next-token distributions at the completion positions,
        from their `(B, C, H)` hidden states (the second half of `distillation_loss`)."""
        teacher = None if self.teacher_model is None else self.accelerator.unwrap_model(self.teacher_model)
        token_weights, denominator = self.loss_normalizer(inputs, num_items_in_batch)
        # read only if the loss is not finite, to name the source (no sync on a healthy step)
        self._handed["hidden_finite"] = finite_flags(student_hidden, teacher_hidden)
        return chunked_kd_loss(
            student_hidden,
            teacher_hidden.to(student_hidden.device),
            LMHead.from_model(student),
            None if teacher is None else LMHead.from_model(teacher),
            inputs["completion_mask"],
            self.kd_vocab_size,
            loss_type=self.args.loss_type,
            beta=self.args.beta,
            skew_alpha=self.args.skew_alpha,
            temperature=self.args.loss_temperature,
            num_items_in_batch=denominator,
            chunk_size=self.args.loss_chunk_size,
            token_weights=token_weights,
            teacher_topk=cached_topk(inputs),
            gradient_in_forward=self.args.loss_gradient_in_forward,
        )

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        loss, divergence_sum, entropy_sum, num_tokens = self.distillation_loss(
            unwrapped_student, inputs, num_items_in_batch
        )
        self._handed["kd_sums"] = (divergence_sum, num_tokens)
        return loss, entropy_sum.detach(), num_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        with self._handed.scope() as handed:
            output = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            sums, hidden_finite = handed["kd_sums"], handed.get("hidden_finite")
        divergence_sum, num_tokens = (self.accelerator.gather_for_metrics(t.reshape(1)).sum() for t in sums)
        mode = "train" if self.model.training else "eval"
        kd_loss = (divergence_sum / num_tokens.clamp(min=1)).item()
        if not math.isfinite(kd_loss):  # gathered, so every process decides alike (and calls the collective)
            source = non_finite_source(self.accelerator, hidden_finite)
            what = f"{source} hidden states" if source != "loss" else "distillation loss"
            raise NonFiniteError(source, what, self.state.global_step + 1)
        self._metrics[mode]["kd_loss"].append(kd_loss)
        return output

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        loss_scaled = self.accelerator.scaler is not None or (self.is_deepspeed_enabled and self.args.fp16)
        check_grad_norm(grad_norm, self.state.global_step + 1, loss_scaled)
        return grad_norm

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        """`transformers.Trainer.train`, except that `resume_from_checkpoint=True` picks the newest *complete*
        checkpoint and an incomplete one (a run killed while saving) is refused with the missing file named."""
        resume_from_checkpoint = resolve_checkpoint(
            resume_from_checkpoint, self.args.output_dir, self.has_method_state
        )
        output = super().train(resume_from_checkpoint, *args, **kwargs)
        # TRL writes the card at checkpoints only; the final one has the final metrics
        name = (self.args.hub_model_id or self.args.output_dir).rstrip("/").split("/")[-1]
        self.create_model_card(model_name=name)
        return output

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = ["prompt", "completion"]
            if self.args.teacher_cache is not None:
                self._signature_columns += list(CACHE_COLUMNS)
