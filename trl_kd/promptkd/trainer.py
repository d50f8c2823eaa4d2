from __future__ import annotations

import math
import os
import textwrap
from typing import Any

import torch
from transformers import get_scheduler

from ..guards import NonFiniteError, check_grad_norm, finite_flags, non_finite_source
from ..kd.trainer import KDTrainer, sequences
from ..losses import LMHead, chunked_kd_loss, response_hidden_states
from ..placement import fsdp2_gathered, fsdp2_units
from .config import PromptKDConfig


PROMPT_ADAPTER_DIR = "teacher_prompt"


def _has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether a forward of `model` in its current mode drops anything: a `Dropout` module with `p > 0` in train
    mode, or a functional attention dropout named in the config (Llama-style `attention_dropout`)."""
    if not model.training:
        return False
    if any(isinstance(m, torch.nn.modules.dropout._DropoutNd) and m.p > 0 for m in model.modules()):
        return True
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    return bool(getattr(text_config, "attention_dropout", 0) or 0)


class PromptKDTrainer(KDTrainer):
    r"""PromptKD: distilling student-friendly knowledge through a soft prompt on the teacher.

    From *PromptKD: Distilling Student-Friendly Knowledge for Generative Language Models via Prompt Tuning* (Kim et
    al., Findings of EMNLP 2024, arXiv 2402.12842). A few soft-prompt vectors are prepended to the frozen teacher's
    input and trained so that the prompted teacher stays close to the student ("student-friendly") while a decaying
    regulariser keeps it close to the original teacher. Each training step, on one batch:

    1. the student samples the responses (on-policy, temperature 1);
    2. the prompt takes one AdamW step on `KL(p_phi || q) + w_s * KL(p_phi || p)`, where `p_phi` is the prompted
       teacher (gradients reach the prompt only), `q` the student and `p` the teacher without the prompt, and
       `w_s = prompt_reg_coef * (1 - s / S)` decays linearly over training;
    3. the student takes its step on reverse KL `KL(q || p_phi)` against the *updated* prompted teacher.

    Teacher distributions are read at real-token positions only. The prompt has its own optimizer and learning-rate
    schedule (the student's schedule type and warm-up), is averaged across processes, saved in checkpoints and
    restored on resume, and exported next to the student as a PEFT prompt-tuning adapter of the teacher
    (`teacher_prompt/`, loadable with `peft.PeftModel.from_pretrained(teacher, path)`).

    As in the official code: with gradient accumulation the prompt's gradient accumulates over the micro-batches and
    the prompt steps once per optimizer step, at the last micro-batch, before that micro-batch's student loss; the
    student samples and gives the prompt step its target in eval mode, and the prompted teacher runs in train mode
    (dropout on, for models that have it) for the prompt loss and in eval mode as the student's target.

    Metrics logged besides [`KDTrainer`][trl_kd.KDTrainer]'s: `prompt_loss` (`KL(p_phi || q)`), `prompt_reg_loss`
    (`KL(p_phi || p)`), `prompt_reg_weight` and `prompt_learning_rate`.

    Example:

    ```python
    from trl_kd import PromptKDConfig, PromptKDTrainer

    trainer = PromptKDTrainer(
        model="openai-community/gpt2",
        teacher_model="openai-community/gpt2-xl",
        args=PromptKDConfig(output_dir="gpt2-promptkd", num_prompt_tokens=7),
        train_dataset=dataset,  # "prompt" (completions are not used) or "messages"
    )
    trainer.train()
    ```
    """

    _tag_names = ["trl", "trl-kd", "distillation", "promptkd"]
    _name = "PromptKD"
    _paper = {
        "title": "PromptKD: Distilling Student-Friendly Knowledge for Generative Language Models via Prompt Tuning",
        "id": "2402.12842",
        # docstyle-ignore
        "citation": textwrap.dedent("""\
            @inproceedings{kim2024promptkd,
                title        = {{PromptKD: Distilling Student-Friendly Knowledge for Generative Language Models via
                                 Prompt Tuning}},
                author       = {Gyeongman Kim and Doohyuk Jang and Eunho Yang},
                year         = 2024,
                booktitle    = {Findings of the Association for Computational Linguistics: EMNLP 2024},
                pages        = {6266--6282},
                url          = {https://arxiv.org/abs/2402.12842},
            }"""),
    }
    config_class = PromptKDConfig

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.soft_prompt = torch.nn.Parameter(self._initial_prompt())
        self.prompt_optimizer = torch.optim.AdamW(
            [self.soft_prompt],
            lr=self.prompt_learning_rate,
            betas=(self.args.adam_beta1, self.args.adam_beta2),
            eps=self.args.adam_epsilon,
            weight_decay=self.args.prompt_weight_decay,
        )
        self.prompt_scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    @property
    def teacher_prefix_tokens(self) -> int:
        return self.args.num_prompt_tokens

    @property
    def prompt_learning_rate(self) -> float:
        lr = self.args.prompt_learning_rate
        return self.args.learning_rate if lr is None else lr

    @property
    def _teacher(self) -> torch.nn.Module:
        # The module itself, not the DeepSpeed engine: a grad-carrying call through the engine would register
        # backward hooks that break the student engine's backward. ZeRO-3 gathers through module hooks either way.
        return self.accelerator.unwrap_model(self.teacher_model)

    def _initial_prompt(self) -> torch.Tensor:
        embedding = self._teacher.get_input_embeddings()
        n = self.args.num_prompt_tokens
        device = self.accelerator.device
        # an FSDP2 teacher's embeddings are gathered for the read and resharded after
        with torch.no_grad(), fsdp2_gathered(self._teacher):
            if self.args.prompt_init_text is not None:
                ids = self._tokenizer(
                    self.args.prompt_init_text, add_special_tokens=self.args.prompt_init_special_tokens
                )["input_ids"]
                ids = (ids * math.ceil(n / len(ids)))[:n]  # tiled or truncated to n tokens, as PEFT does
                return embedding(torch.tensor(ids, device=device)).float().clone()
            generator = torch.Generator().manual_seed(self.args.seed)
            sample = torch.randint(0, self.kd_vocab_size, (min(1024, self.kd_vocab_size),), generator=generator)
            scale = embedding(sample.to(device)).float().std()
            hidden = self._teacher.config.get_text_config().hidden_size
            return (torch.randn(n, hidden, generator=generator) * scale.cpu()).to(device)

    # ------------------------------------------------------------------------------------------------ teacher
    def prompted_teacher_hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, num_completion_tokens: int, train: bool = False
    ) -> torch.Tensor:
        """Hidden states of the prompted teacher at the completion positions; gradients reach `soft_prompt` only.
        `train=True` runs the teacher in train mode (dropout on), as the official code does for the prompt loss."""
        teacher = self._teacher
        teacher.train(train)
        try:
            if self._teacher_partitioned and fsdp2_units(teacher):
                # through the FSDP2 root, whose forward reshards the embeddings-head unit the backbone call leaves
                # gathered (its head never runs a forward of its own)
                return self._forward_redirection(
                    teacher, teacher, self._prompted_forward, teacher, input_ids, attention_mask, num_completion_tokens
                )
            return self._prompted_forward(teacher, input_ids, attention_mask, num_completion_tokens)
        finally:
            teacher.eval()

    def _prompted_forward(self, teacher, input_ids, attention_mask, num_completion_tokens):
        embeds = teacher.get_input_embeddings()(input_ids)
        batch = input_ids.shape[0]
        prompt = self.soft_prompt.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        mask = torch.cat([attention_mask.new_ones(batch, prompt.shape[1]), attention_mask], dim=1)
        return response_hidden_states(
            teacher, mask, num_completion_tokens, inputs_embeds=torch.cat([prompt, embeds], dim=1)
        )

    def teacher_hidden_states(self, input_ids, attention_mask, num_completion_tokens):
        """The student learns from the prompted teacher."""
        with torch.no_grad():
            return self.prompted_teacher_hidden_states(input_ids, attention_mask, num_completion_tokens)

    # ------------------------------------------------------------------------------------------------ rollouts
    def rollout(self, prompt_ids: list[list[int]]):
        """The student samples in eval mode (no dropout), as in the official code."""
        was_training = self.model.training
        self.model.eval()
        try:
            return super().rollout(prompt_ids)
        finally:
            self.model.train(was_training)

    # ----------------------------------------------------------------------------------------------- prompt step
    def prompt_reg_weight(self) -> float:
        """`prompt_reg_coef * (1 - s / S)`: the regulariser's weight for the optimizer step being taken, `s` counted
        from 1 as in the official code (so the last step's weight is 0)."""
        total = max(self.state.max_steps, 1)
        return self.args.prompt_reg_coef * max(0.0, 1.0 - (self.state.global_step + 1) / total)

    def _ensure_prompt_scheduler(self) -> torch.optim.lr_scheduler.LRScheduler:
        if self.prompt_scheduler is None:
            total = max(self.state.max_steps, 1)
            self.prompt_scheduler = get_scheduler(
                self.args.lr_scheduler_type,
                self.prompt_optimizer,
                num_warmup_steps=self.args.get_warmup_steps(total),
                num_training_steps=total,
                scheduler_specific_kwargs=self.args.lr_scheduler_kwargs,
            )
        return self.prompt_scheduler

    def update_prompt(
        self, inputs: dict[str, torch.Tensor], num_items_in_batch: torch.Tensor | None, student_hidden: torch.Tensor
    ) -> None:
        """Accumulate the soft prompt's gradient of `KL(p_phi || q) + w * KL(p_phi || p)` on this micro-batch, given
        the student's detached eval-mode `(B, C, H)` hidden states on it, and take the prompt's AdamW step at the
        last micro-batch of the optimizer step (the loss is normalised over the whole accumulated batch, as the
        student's)."""
        scheduler = self._ensure_prompt_scheduler()
        input_ids, attention_mask, n = sequences(inputs)
        student = self.accelerator.unwrap_model(self.model_wrapped)
        with torch.no_grad():
            teacher_hidden = KDTrainer.teacher_hidden_states(self, input_ids, attention_mask, n)
        prompted = self.prompted_teacher_hidden_states(input_ids, attention_mask, n, train=True)
        teacher_head, student_head = LMHead.from_model(self._teacher), LMHead.from_model(student)
        token_weights, denominator = self.loss_normalizer(inputs, num_items_in_batch)
        # beta=1 is KL(first || second): the prompted teacher goes first, as the side that receives gradients
        common = dict(
            loss_mask=inputs["completion_mask"],
            vocab_size=self.kd_vocab_size,
            loss_type="jsd",
            beta=1.0,
            temperature=self.args.loss_temperature,
            num_items_in_batch=denominator,
            chunk_size=self.args.loss_chunk_size,
            token_weights=token_weights,
            gradient_in_forward=self.args.loss_gradient_in_forward,
        )
        student_hidden = student_hidden.to(prompted.device)
        to_student = chunked_kd_loss(prompted, student_hidden, teacher_head, student_head, **common)
        to_teacher = chunked_kd_loss(prompted, teacher_hidden, teacher_head, teacher_head, **common)
        weight = self.prompt_reg_weight()
        learning_rate = self.prompt_optimizer.param_groups[0]["lr"]
        sums = torch.stack([to_student[1], to_teacher[1], to_student[3].to(to_student[1])])
        sums = self.accelerator.reduce(sums.detach().float(), "sum")
        if not sums.isfinite().all():  # reduced, so every process decides alike
            # the teacher's side is both the plain and the prompted teacher
            teacher_side = torch.cat([teacher_hidden.flatten(), prompted.flatten().to(teacher_hidden)])
            source = non_finite_source(self.accelerator, finite_flags(student_hidden, teacher_side))
            raise NonFiniteError(source, "prompt loss (PromptKD's prompt step)", self.state.global_step + 1)
        if self.prompt_learning_rate > 0:
            (to_student[0] + weight * to_teacher[0]).backward()
        if self.accelerator.sync_gradients:
            grad = self.soft_prompt.grad
            if grad is not None:
                if self.accelerator.num_processes > 1:
                    # each process's loss is scaled by the process count (see `num_items_in_batch`): sum, then average
                    torch.distributed.all_reduce(grad)
                    grad /= self.accelerator.num_processes
                check_grad_norm(grad.norm(), self.state.global_step + 1, False, "soft-prompt gradient norm")
                if self.args.max_grad_norm is not None and self.args.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_([self.soft_prompt], self.args.max_grad_norm)
                self.prompt_optimizer.step()
            self.prompt_optimizer.zero_grad(set_to_none=True)
            scheduler.step()

        count = sums[2].clamp(min=1)
        metrics = self._metrics["train"]
        metrics["prompt_loss"].append((sums[0] / count).item())
        metrics["prompt_reg_loss"].append((sums[1] / count).item())
        metrics["prompt_reg_weight"].append(weight)
        metrics["prompt_learning_rate"].append(learning_rate)

    def _student_target_hidden_states(
        self, student: torch.nn.Module, inputs: dict[str, torch.Tensor], train_hidden: torch.Tensor
    ) -> torch.Tensor:
        """The student's eval-mode hidden states for the prompt step: the training forward's, detached, when the
        student has no active dropout (identical then); otherwise one more no-grad forward in eval mode."""
        if not _has_active_dropout(student):
            return train_hidden.detach()
        was_training = student.training
        student.eval()
        try:
            with torch.no_grad():
                return self.hidden_states(student, *sequences(inputs))
        finally:
            student.train(was_training)

    def distillation_loss(self, student, inputs, num_items_in_batch):
        """The prompt step, then the student's loss against the (at an optimizer step, updated) prompted teacher.
        Without dropout one student forward serves both: its detached hidden states are the prompt step's `q`, and
        the prompt step leaves the student as it was."""
        input_ids, attention_mask, n = sequences(inputs)
        student_hidden = self.hidden_states(student, input_ids, attention_mask, n)
        if self.model.training:
            target = self._student_target_hidden_states(student, inputs, student_hidden)
            self.update_prompt(inputs, num_items_in_batch, target)
        teacher_hidden = self.teacher_hidden_states(input_ids, attention_mask, n)
        return self.loss_from_hidden_states(student, student_hidden, teacher_hidden, inputs, num_items_in_batch)

    # ------------------------------------------------------------------------------------------- state and export
    def method_state_dict(self) -> dict[str, Any]:
        return {
            "soft_prompt": self.soft_prompt.detach().cpu(),
            "prompt_optimizer": self.prompt_optimizer.state_dict(),
            "prompt_scheduler": self._ensure_prompt_scheduler().state_dict(),
        }

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            self.soft_prompt.copy_(state["soft_prompt"].to(self.soft_prompt.device))
        scheduler = self._ensure_prompt_scheduler()  # first: creating a scheduler resets the optimizer's lr
        self.prompt_optimizer.load_state_dict(state["prompt_optimizer"])
        scheduler.load_state_dict(state["prompt_scheduler"])

    def save_prompt_adapter(self, directory: str) -> None:
        """Write the learned prompt as a PEFT prompt-tuning adapter of the teacher (`adapter_config.json` and
        `adapter_model.safetensors`); `peft.PeftModel.from_pretrained(teacher, directory)` gives the prompted
        teacher."""
        from peft import PromptTuningConfig
        from safetensors.torch import save_file

        text_config = self._teacher.config.get_text_config()
        config = PromptTuningConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=self.args.num_prompt_tokens,
            token_dim=text_config.hidden_size,
            num_transformer_submodules=1,
            num_attention_heads=text_config.num_attention_heads,
            num_layers=text_config.num_hidden_layers,
            # the weights are in the file; "RANDOM" keeps PEFT from re-initialising from text with a tokenizer
            prompt_tuning_init="RANDOM",
            base_model_name_or_path=self._teacher.config._name_or_path or None,
        )
        os.makedirs(directory, exist_ok=True)
        config.save_pretrained(directory)
        weights = self.soft_prompt.detach().to(self._teacher.get_input_embeddings().weight.dtype).cpu().contiguous()
        save_file({"prompt_embeddings": weights}, os.path.join(directory, "adapter_model.safetensors"))

    def model_card_sections(self) -> list[str]:
        return [
            "### Teacher prompt",
            "",
            f"PromptKD trained a soft prompt of {self.args.num_prompt_tokens} virtual tokens on the frozen teacher. "
            f"It is saved in `{PROMPT_ADAPTER_DIR}/` as a PEFT prompt-tuning adapter of the teacher:",
            "",
            "```python",
            "from peft import PeftModel",
            "",
            f'prompted_teacher = PeftModel.from_pretrained(teacher, "{PROMPT_ADAPTER_DIR}")',
            "```",
            "",
        ]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call)
        if self.args.should_save:
            self.save_prompt_adapter(os.path.join(output_dir or self.args.output_dir, PROMPT_ADAPTER_DIR))
