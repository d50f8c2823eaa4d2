"""The step timer and the phase profiler every benchmark uses, so that each trainer's step is timed and split the same
way (TRL's `step_time` metric is logged by some trainers only)."""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable

from transformers import TrainerCallback


# where a step goes, as `PhaseProfiler.phases` splits it
PROFILE_PARTS = (
    "sampling: student",
    "sampling: teacher",
    "teacher forward (loss)",
    "student forward + loss",
    "backward",
    "optimizer",
    "bookkeeping",
)


class StepTimer(TrainerCallback):
    """Seconds per optimizer step, in `times`. `sync` runs before each reading (on a GPU, the device's synchronise,
    so that queued kernels count in the step that launched them); on a CPU nothing needs it."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync, self.times, self._start = sync or (lambda: None), [], None

    def on_step_begin(self, args, state, control, **kwargs):
        self.sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.sync()
        self.times.append(time.perf_counter() - self._start)


class PhaseProfiler(TrainerCallback):
    """Where a trainer's steps go. Timers wrap its hooks: sampling (`_generate_single_turn`), the loss
    (`compute_loss`) and the backward (`accelerator.backward`); hooks on both backbones time each model's forwards
    and name the region they ran in; the optimizer step is timed between the `on_pre_optimizer_step` and
    `on_optimizer_step` callbacks, so clipping is in it. `spent` holds seconds by region ("sampling", "loss",
    "backward", "optimizer", "<role> forward in <region>"), `teacher_forwards` counts the teacher's backbone calls.
    `sync` runs at every reading: on a GPU the device's synchronise, which also serialises the launches it measures.
    The first `skip_steps` steps (warm-up) are not counted. Install it after any other wrapper of those hooks that
    should be timed inside it."""

    def __init__(self, trainer, sync: Callable[[], None] | None = None, skip_steps: int = 0):
        from trl_kd.losses import backbone

        self.sync, self.skip_steps = sync or (lambda: None), skip_steps
        self.spent: dict[str, float] = defaultdict(float)
        self.teacher_forwards = 0
        self._where: list[str] = []  # the enclosing timed region, innermost last
        self._wrap(trainer, "_generate_single_turn", "sampling")
        self._wrap(trainer, "compute_loss", "loss")
        self._wrap(trainer.accelerator, "backward", "backward")
        self._time_forwards(backbone(trainer.model), "student")
        self._time_forwards(backbone(trainer.teacher_model), "teacher")
        trainer.add_callback(self)

    def reset(self) -> None:
        """Forget what was timed so far (a warm-up step)."""
        self.spent.clear()
        self.teacher_forwards = 0

    @contextlib.contextmanager
    def _region(self, name: str):
        self._where.append(name)
        self.sync()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.sync()
            self.spent[name] += time.perf_counter() - start
            self._where.pop()

    def _wrap(self, owner, name: str, region: str) -> None:
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            with self._region(region):
                return original(*args, **kwargs)

        setattr(owner, name, timed)

    def _time_forwards(self, module, role: str) -> None:
        starts = []

        def begin(*_):
            self.sync()
            starts.append(time.perf_counter())
            if role == "teacher":
                self.teacher_forwards += 1

        def end(*_):
            self.sync()
            inside = self._where[-1] if self._where else "other"
            self.spent[f"{role} forward in {inside}"] += time.perf_counter() - starts.pop()

        module.register_forward_pre_hook(begin)
        module.register_forward_hook(end)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.skip_steps:
            self.reset()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sync()
        self._optimizer_start = time.perf_counter()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sync()
        self.spent["optimizer"] += time.perf_counter() - self._optimizer_start

    def phases(self, steps: int, step_seconds: float) -> dict[str, float]:
        """Seconds per step in each of `PROFILE_PARTS`, over `steps` steps of `step_seconds` each (a mean);
        bookkeeping is the rest of the step: batch assembly, padding, metric reductions, logging."""
        per_step = {key: value / steps for key, value in self.spent.items()}
        teacher_sampling = per_step.get("teacher forward in sampling", 0.0)
        teacher_loss = per_step.get("teacher forward in loss", 0.0)
        parts = {
            "sampling: student": per_step.get("sampling", 0.0) - teacher_sampling,
            "sampling: teacher": teacher_sampling,
            "teacher forward (loss)": teacher_loss,
            "student forward + loss": per_step.get("loss", 0.0) - teacher_loss,
            "backward": per_step.get("backward", 0.0),
            "optimizer": per_step.get("optimizer", 0.0),
        }
        parts["bookkeeping"] = step_seconds - sum(parts.values())
        return parts
