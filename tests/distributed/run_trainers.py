"""Trains every trl-kd trainer a few steps in the current (multi-process) launch and writes what each rank saw.

Launched by `tests/test_distributed.py` (DDP through `torch.distributed.run`, DeepSpeed through `accelerate launch`) on
CPU; writes
`<out>/<case>/rank<i>.json` (first-step losses, per-rank parameter counts, rollout rounds) and saves each student.
Every case is built from `CASES`, which the test also uses for its single-process references.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from trl_kd import METHODS, KDConfig, KDTrainer  # noqa: E402
from trl_kd._compat import checkpointing_field  # noqa: E402
from trl_kd.sampler import Rule  # noqa: E402
from trl_kd.teacher_cache import cache_teacher  # noqa: E402
from trl_kd.testing import build_model, build_tokenizer, make_dataset  # noqa: E402


class RankDependentTrainer(KDTrainer):
    """Rank 0's rule accepts every drafted token, rank 1's rejects every one, so rank 1 needs several times as many
    sampling rounds: the engine must keep both ranks' forwards (and ZeRO-3 gathers) in step."""

    class _Rule(Rule):
        def __init__(self, reject_all: bool):
            self.reject_all = reject_all

        def reject(self, proposal):
            return torch.full_like(proposal.draft, self.reject_all, dtype=torch.bool)

    rounds: tuple[int, ...] | list[int] = ()

    def rollout(self, prompt_ids):
        rule = self._Rule(reject_all=self.accelerator.process_index % 2 == 1)
        out = self.teacher_in_the_loop_rollout(prompt_ids, rule, 4)  # KDConfig's sampling: temperature 1, no top-p
        self.rounds = [*self.rounds, out.counts["rounds"]]
        return out


class RankDependentRowsTrainer(METHODS["skd"].trainer):
    """Rank 0 samples every row, rank 1 trains on every dataset completion: under ZeRO-3 rank 0, whose loss reuses
    the sampler's teacher states, must still join the teacher forward rank 1 runs."""

    def _row_uniforms(self, n, mode):
        return torch.full((n,), float(self.accelerator.process_index % 2))


def _classes(method: str) -> tuple[type, type]:
    return METHODS[method].trainer, METHODS[method].config


# One deterministic case per registered method (dataset completions, or a teacher that writes every token
# greedily), so its losses can be compared with one process; a method registered without one fails
# `test_every_registered_method_has_a_distributed_case`.
METHOD_CASES = {
    "gkd": {"lmbda": 0.0},
    "skd": {"acceptance_top_k": 0, "teacher_top_p": 1e-6},
    "switch": {"switch_threshold": 0.0, "teacher_greedy": True},
    # dataset completions; the first logged loss is computed after one prompt step, so it checks the prompt's
    # gradient averaging across processes too
    "promptkd": {"lmbda": 0.0},
}
# name -> (trainer class, config class, config overrides)
CASES = {
    **{method: (*_classes(method), overrides) for method, overrides in METHOD_CASES.items()},
    # per-sequence normalisation: its loss must not depend on the process count either
    "gkd_sequences": (*_classes("gkd"), {"lmbda": 0.0, "loss_normalization": "sequences"}),
    # teacher placement independent of the student's stage (DeepSpeed launches only)
    "gkd_teacher_sharded": (*_classes("gkd"), {"lmbda": 0.0, "teacher_zero_stage": 3}),
    "gkd_teacher_replicated": (*_classes("gkd"), {"lmbda": 0.0, "teacher_zero_stage": 0}),
    "skd_teacher_offloaded": (*_classes("skd"), {"teacher_zero_stage": 3, "teacher_offload": True}),
    "switch_teacher_replicated": (*_classes("switch"), {"teacher_zero_stage": 0, "switch_threshold": 0.005}),
    "skd_sampled": (*_classes("skd"), {"acceptance_top_k": 150, "temperature": 1.0}),
    "uneven": (RankDependentTrainer, KDConfig, {"lmbda": 1.0}),
    # the loss from the sampler's teacher states against a teacher forward (`reuse_teacher_states`)
    "skd_recomputed": (*_classes("skd"), {**METHOD_CASES["skd"], "reuse_teacher_states": False}),
    "switch_recomputed": (*_classes("switch"), {**METHOD_CASES["switch"], "reuse_teacher_states": False}),
    "skd_rank_rows": (RankDependentRowsTrainer, METHODS["skd"].config, {**METHOD_CASES["skd"], "lmbda": 0.5}),
    # supervised KD from an offline whole-vocabulary fp32 teacher cache, with no teacher loaded: gkd's losses
    "gkd_cached": (*_classes("gkd"), {"lmbda": 0.0, "teacher_cache": "teacher_cache"}),
    "skd_rank_rows_recomputed": (
        RankDependentRowsTrainer,
        METHODS["skd"].config,
        {**METHOD_CASES["skd"], "lmbda": 0.5, "reuse_teacher_states": False},
    ),
}
# pairs of cases whose losses must agree: teacher states reused, and recomputed
REUSE_PAIRS = (
    ("skd", "skd_recomputed"),
    ("switch", "switch_recomputed"),
    ("skd_rank_rows", "skd_rank_rows_recomputed"),
)
PARITY_CASES = (*METHOD_CASES, "gkd_sequences", "gkd_teacher_sharded", "gkd_teacher_replicated")
DEEPSPEED_ONLY = (
    "gkd_teacher_sharded",
    "gkd_teacher_replicated",
    "skd_teacher_offloaded",
    "switch_teacher_replicated",
)


MAX_COMPLETION_LENGTH = 10


def save_models(directory: str) -> None:
    """The tokenizer and tiny student/teacher every case loads. Loaded from disk (not built in each process) so that
    the weights are the same under ZeRO-3's partitioned initialisation as in one process. Also the teacher's
    whole-vocabulary fp32 cache over the training rows, for `gkd_cached`."""
    tokenizer = build_tokenizer()
    for role, seed in (("student", 0), ("teacher", 1)):
        model = build_model("qwen2", tokenizer, role, seed=seed, save_dir=os.path.join(directory, role))
    cache_teacher(
        model.eval(),
        tokenizer,
        training_rows(),
        os.path.join(directory, "teacher_cache"),
        k=len(tokenizer),
        max_completion_length=MAX_COMPLETION_LENGTH,
        value_dtype="float32",
        progress=False,
    )


def training_rows():
    return make_dataset("conversational_prompt_completion", 32, seed=5)


def build_trainer(name: str, output_dir: str, per_device_batch: int, models: str, steps: int = 2):
    trainer_cls, config_cls, overrides = CASES[name]
    tokenizer = build_tokenizer()  # deterministic; AutoTokenizer on a Qwen2 folder would load Qwen2Tokenizer instead
    args = config_cls(
        output_dir=output_dir,
        per_device_train_batch_size=per_device_batch,
        max_steps=steps,
        max_completion_length=MAX_COMPLETION_LENGTH,
        learning_rate=0.05,
        report_to="none",
        bf16=False,
        logging_steps=1,
        save_strategy="no",
        seed=3,
        disable_tqdm=True,
        **{checkpointing_field(): False},
        use_cpu=not torch.cuda.is_available(),
        **overrides,
    )
    cached = args.teacher_cache is not None
    if cached:  # the case names the cache folder written beside the models; no teacher is loaded
        args.teacher_cache = os.path.join(models, args.teacher_cache)
    return trainer_cls(
        model=os.path.join(models, "student"),
        teacher_model=None if cached else os.path.join(models, "teacher"),
        args=args,
        train_dataset=training_rows(),
        processing_class=tokenizer,
    )


def local_and_full_numel(module: torch.nn.Module) -> tuple[int, int]:
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in module.parameters())
    full = sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())
    return local, full


def teacher_offload_device(engine) -> str | None:
    offload = getattr(engine, "zero_offload_param", lambda: None)()
    device = getattr(offload, "device", None)
    return None if device is None else str(getattr(device, "value", device))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", required=True, help="a folder written by `save_models`")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--per-device-batch", type=int, default=2)
    args = parser.parse_args()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    for name in args.cases.split(","):
        if name in DEEPSPEED_ONLY and not deepspeed:
            continue
        out_dir = os.path.join(args.out, name)
        trainer = build_trainer(name, out_dir, args.per_device_batch, args.models)
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model) if trainer.teacher_model else None
        teacher_counts = local_and_full_numel(teacher) if teacher is not None else (0, 0)
        student_counts = local_and_full_numel(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        trainer.train()
        student_counts_after = local_and_full_numel(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        trainer.save_model(out_dir)
        history = trainer.state.log_history
        result = {
            "rank": trainer.accelerator.process_index,
            "world": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.is_deepspeed_enabled
            else None,
            "teacher_numel": teacher_counts,
            "teacher_offload": teacher_offload_device(trainer.teacher_model) == "cpu",
            "student_numel": student_counts,
            "student_numel_after": student_counts_after,
            "kd_loss": [row["kd_loss"] for row in history if "kd_loss" in row],
            "loss": [row["loss"] for row in history if "loss" in row],
            "teacher_token_fraction": [
                row["teacher_token_fraction"] for row in history if "teacher_token_fraction" in row
            ],
            "rounds": list(getattr(trainer, "rounds", [])),
            "soft_prompt": trainer.soft_prompt.detach().flatten()[:8].tolist()
            if hasattr(trainer, "soft_prompt")
            else None,
        }
        with open(os.path.join(out_dir, f"rank{result['rank']}.json"), "w") as f:
            json.dump(result, f)
        trainer.accelerator.wait_for_everyone()
        print(f"DONE {name} rank {result['rank']}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
