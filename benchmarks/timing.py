"""The step timer every benchmark uses, so that each trainer's step is timed the same way (TRL's `step_time` metric
is logged by some trainers only)."""

from __future__ import annotations

import time
from collections.abc import Callable

from transformers import TrainerCallback


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
