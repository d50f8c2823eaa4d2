"""Guards: a config refuses a value outside its field's `choices`; training stops at the first NaN or inf, names where
it came from, and saves nothing after it.

The finite checks ride on values the trainers already compute: the config when it is built, the probabilities each
sampler draws from, the gathered `kd_loss` of every micro-batch (already read for logging), the hidden states of both
models in the loss (a flag, read only when the loss is not finite) and the gradient norm `transformers` computes before
each optimizer step. See docs/failure_modes.md.
"""

from __future__ import annotations

import dataclasses
import math
from contextlib import contextmanager

import torch


LIKELY_FIX = {
    "teacher": "the teacher's weights or dtype produce them (an fp16 teacher can overflow: load it in bf16 or fp32, "
    "e.g. teacher_model_init_kwargs={'dtype': 'bfloat16'}); check the teacher alone on this batch",
    "student": "the student's weights are no longer finite (an earlier update with too high a learning_rate, or an "
    "fp16 overflow): lower learning_rate, keep max_grad_norm > 0, prefer bf16 to fp16",
    "loss": "both models' hidden states are finite, so the divergence is not: check the LM heads' weights and "
    "loss_temperature",
    "gradients": "lower learning_rate, keep max_grad_norm > 0 (gradient clipping), prefer bf16 to fp16",
}


class NonFiniteError(FloatingPointError):
    """A NaN or inf reached training; raised before the optimizer step it would corrupt, so no checkpoint holds it.

    Attributes:
        source: `"teacher"`, `"student"`, `"loss"` or `"gradients"`.
        what: the value that was not finite.
        step: the optimizer step being computed (1-based), when known.
    """

    def __init__(self, source: str, what: str, step: int | None = None):
        self.source, self.what, self.step = source, what, step
        at = f" at optimizer step {step}" if step is not None else ""
        super().__init__(
            f"Non-finite {what}{at} (source: {source}). Likely fix: {LIKELY_FIX[source]}. Training "
            "stopped before this step's update, and nothing was saved after it."
        )


def check_finite_fields(config, allow_inf: tuple[str, ...] = ()) -> None:
    """Refuse a config whose float fields are NaN or infinite (those in `allow_inf` may be +inf), naming the
    field."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            if f.name in allow_inf and value == math.inf:
                continue
            raise ValueError(f"{f.name} must be a finite number, got {value}.")


def check_choices(config) -> None:
    """Refuse a value outside the `choices` in its field's metadata, naming the field, for every field declared
    below TRL (trl-kd's configs and any subclass; TRL's and `transformers`' own fields are theirs to check)."""
    ours = {
        name
        for cls in type(config).__mro__
        if cls.__module__.split(".")[0] not in ("trl", "transformers", "builtins")
        for name in vars(cls).get("__annotations__", {})
    }
    for f in dataclasses.fields(config):
        if f.name in ours and "choices" in f.metadata:
            allowed = tuple(f.metadata["choices"])
            if getattr(config, f.name) not in allowed:
                raise ValueError(f"{f.name} must be one of {allowed}, got {getattr(config, f.name)!r}.")


def non_finite_source(accelerator, flags: torch.Tensor | None) -> str:
    """From `finite_flags(student_hidden, teacher_hidden)`: `"teacher"` or `"student"` if that model's hidden states
    were not finite on some process, else `"loss"`. A collective: every process must call it."""
    if flags is None:
        return "loss"
    student_ok, teacher_ok = accelerator.gather(flags[None]).min(0).values.tolist()
    return "teacher" if not teacher_ok else "student" if not student_ok else "loss"


def check_sampling_probs(probs: torch.Tensor, source: str) -> None:
    """Before `torch.multinomial`: NaN probabilities (from NaN or +inf logits) would crash it without naming the
    model."""
    if torch.isnan(probs).any():
        raise NonFiniteError(source, f"{source} logits while sampling")


def finite_flags(*tensors: torch.Tensor) -> torch.Tensor:
    """One int flag per tensor, 1 where every element is finite; computed on the device, read only on failure."""
    return torch.stack([t.isfinite().all() for t in tensors]).int()


def check_grad_norm(grad_norm, step: int, loss_scaled: bool, what: str = "gradient norm") -> None:
    """Before the optimizer step. With fp16 loss scaling an inf norm is expected now and then: the scaler skips
    that step itself."""
    if grad_norm is not None and not loss_scaled and not math.isfinite(float(grad_norm)):
        raise NonFiniteError("gradients", f"{what} ({float(grad_norm)})", step)


@contextmanager
def sampling_from(source: str, step: int):
    """Around a rollout: add the step to a sampler's `NonFiniteError`, and name the model when
    `transformers.generate` fails on a NaN/inf probability tensor."""
    try:
        yield
    except NonFiniteError as error:
        if error.step is not None:
            raise
        raise NonFiniteError(error.source, error.what, step) from error
    except RuntimeError as error:
        if "inf" in str(error) and "nan" in str(error) and "probability" in str(error):
            raise NonFiniteError(source, f"{source} probabilities while generating", step) from error
        raise
