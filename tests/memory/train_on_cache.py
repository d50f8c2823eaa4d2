"""Train supervised KD for one epoch from a teacher cache with no teacher, sampling this process's resident anonymous
memory (its own, not the page cache a memory map fills) before the trainer is built, then every 10 ms, and after the
first step; then read the whole cache into memory, as a control that the measurement sees the cache when it is
held. Prints one JSON line. Run by
tests/test_teacher_cache.py::test_a_cache_several_times_the_memory_headroom_trains_with_flat_memory."""

import json
import os
import sys
import threading
import time

import torch
from datasets import concatenate_datasets, load_from_disk
from transformers import AutoTokenizer, TrainerCallback

from trl_kd import KDConfig, KDTrainer
from trl_kd.teacher_cache import SHARD_PATTERN, TeacherCacheManifest
from trl_kd.testing import build_model


def anonymous_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


class Peak(TrainerCallback):
    """The peak from the trainer's construction on, the baseline after the first step (optimizer states and autograd
    buffers exist by then) and the peak after it."""

    def __init__(self):
        self.peak, self.baseline, self.peak_after_first_step, self.running = 0, None, 0, True
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while self.running:
            rss = anonymous_rss()
            self.peak = max(self.peak, rss)
            if self.baseline is not None:
                self.peak_after_first_step = max(self.peak_after_first_step, rss)
            time.sleep(0.01)

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            self.baseline = anonymous_rss()


def main(cache: str, tokenizer_dir: str, output_dir: str) -> None:
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    args = KDConfig(
        output_dir=output_dir, lmbda=0.0, teacher_cache=cache, per_device_train_batch_size=8, num_train_epochs=1,
        max_completion_length=64, learning_rate=1e-3, report_to="none", bf16=False, save_strategy="no",
        disable_tqdm=True, logging_steps=1000,
    )  # fmt: skip
    student = build_model("qwen2", tokenizer, "student", seed=0)
    before_trainer = anonymous_rss()
    peak = Peak()
    trainer = KDTrainer(model=student, teacher_model=None, args=args, processing_class=tokenizer, callbacks=[peak])
    trainer.train()
    peak.running = False
    manifest = TeacherCacheManifest.load(cache)
    before = anonymous_rss()
    shards = [os.path.join(cache, SHARD_PATTERN.format(index=i)) for i in range(manifest.num_shards)]
    held = concatenate_datasets([load_from_disk(p, keep_in_memory=True) for p in shards])
    held_growth = anonymous_rss() - before
    print(
        json.dumps(
            {
                "rows_trained": trainer.state.global_step * args.per_device_train_batch_size,
                "rows": len(held),
                "before_trainer": before_trainer,
                "peak": peak.peak,
                "baseline": peak.baseline,
                "peak_after_first_step": peak.peak_after_first_step,
                "held_growth": held_growth,
            }
        )
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
