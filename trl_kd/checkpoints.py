"""Safe checkpoints for the method state trl-kd adds to a `transformers` checkpoint (`trl_kd_state.pt`).

A checkpoint counts as complete when it has `trainer_state.json`, which `transformers` writes last, and, for a method
with extra training state, that state. trl-kd writes its state before anything else, atomically (a temporary file,
then a rename), so a run killed at any point leaves either a complete checkpoint or one that resume refuses to use.
The state is loaded with `weights_only=True`: it holds only tensors, numbers and dicts, so a planted pickle is refused
instead of run.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR


logger = logging.getLogger(__name__)

METHOD_STATE_NAME = "trl_kd_state.pt"
TRAINER_STATE_NAME = "trainer_state.json"


def save_method_state(state: dict[str, Any], folder: str) -> str:
    """Write `state` to `folder/trl_kd_state.pt` atomically; return the path."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, METHOD_STATE_NAME)
    partial = path + ".partial"
    try:
        torch.save(state, partial)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return path


def load_method_state(folder: str) -> dict[str, Any]:
    """Read what `save_method_state` wrote, refusing anything that is not plain tensors, numbers and containers."""
    path = os.path.join(folder, METHOD_STATE_NAME)
    if not os.path.isfile(path):
        raise ValueError(
            f"{path} is missing: this checkpoint has no trl-kd method state, so resuming from it would "
            "restart the method's own state. Resume from a complete checkpoint (resume_from_checkpoint="
            "True picks the newest one)."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, foreign, or a pickle of arbitrary objects
        raise ValueError(
            f"{path} is not a readable trl-kd method state ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}). trl-kd writes it atomically and loads "
            "only tensors, numbers and containers, so it was truncated or replaced. Resume from another "
            "checkpoint."
        ) from error


def incomplete_reason(folder: str, needs_method_state: bool) -> str | None:
    """Why `folder` is not a complete checkpoint, or `None` when it is."""
    if not os.path.isfile(os.path.join(folder, TRAINER_STATE_NAME)):
        return f"{os.path.join(folder, TRAINER_STATE_NAME)} is missing (the save was interrupted)"
    if needs_method_state and not os.path.isfile(os.path.join(folder, METHOD_STATE_NAME)):
        return f"{os.path.join(folder, METHOD_STATE_NAME)} is missing (the method's own training state)"
    return None


def resolve_checkpoint(
    resume_from_checkpoint: str | bool | None, output_dir: str, needs_method_state: bool
) -> str | None:
    """The checkpoint to resume from: `True` picks the newest complete one under `output_dir`, skipping (with a
    warning) any that a killed run left incomplete; a path must be complete."""
    if resume_from_checkpoint is None or resume_from_checkpoint is False:
        return None
    if resume_from_checkpoint is True:
        prefix = f"{PREFIX_CHECKPOINT_DIR}-"
        names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
        steps = sorted(
            (int(n[len(prefix) :]) for n in names if n.startswith(prefix) and n[len(prefix) :].isdigit()), reverse=True
        )
        for step in steps:
            folder = os.path.join(output_dir, f"{prefix}{step}")
            reason = incomplete_reason(folder, needs_method_state)
            if reason is None:
                return folder
            logger.warning("Skipping checkpoint %s: %s.", folder, reason)
        raise ValueError(f"No complete checkpoint found in output directory ({output_dir}).")
    folder = str(resume_from_checkpoint)
    reason = incomplete_reason(folder, needs_method_state)
    if reason is not None and os.path.isdir(folder):
        raise ValueError(
            f"Cannot resume from {folder}: {reason}. Resume from an earlier checkpoint, or pass "
            "resume_from_checkpoint=True to pick the newest complete one."
        )
    return folder


class MethodStateCheckpoints:
    """Mixin for a `transformers.Trainer` whose method keeps training state beyond the model, optimizer and scheduler:
    the state is written first in every checkpoint, atomically, and restored on resume."""

    def method_state_dict(self) -> dict[str, Any]:
        """Training state of a method beyond the model, optimizer and scheduler (e.g. a calibrated threshold, a soft
        prompt and its optimizer), saved in every checkpoint as `trl_kd_state.pt` and restored on resume."""
        return {}

    def load_method_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `method_state_dict` returned."""

    @property
    def has_method_state(self) -> bool:
        """Whether this method keeps training state of its own (it overrides `method_state_dict`)."""
        return type(self).method_state_dict is not MethodStateCheckpoints.method_state_dict

    def _save_checkpoint(self, model, trial):
        # first, atomically: `trainer_state.json`, written last by super(), then marks the checkpoint complete
        state = self.method_state_dict() if self.has_method_state else {}
        if state and self.args.should_save:
            checkpoint = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            save_method_state(state, os.path.join(self._get_output_dir(trial=trial), checkpoint))
        super()._save_checkpoint(model, trial)

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None and self.has_method_state:
            self.load_method_state_dict(load_method_state(checkpoint))
