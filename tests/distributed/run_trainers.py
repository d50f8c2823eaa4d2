"""Trains every trl-kd trainer a few steps in the current (multi-process) launch and writes what each rank saw.

Launched by `tests/test_distributed.py` (DDP through `torch.distributed.run`; DeepSpeed and FSDP2 through `accelerate
launch`, FSDP2 over gloo with `fsdp_over_gloo`; 2 nodes through two `accelerate launch`es) on CPU; writes
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
from transformers import TrainerCallback  # noqa: E402

from trl_kd import METHODS, KDConfig, KDTrainer  # noqa: E402
from trl_kd._compat import checkpointing_field  # noqa: E402
from trl_kd.placement import fsdp2_units  # noqa: E402
from trl_kd.sampler import Rule  # noqa: E402
from trl_kd.teacher_cache import cache_teacher  # noqa: E402
from trl_kd.testing import build_model, build_tokenizer, make_dataset  # noqa: E402


sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fsdp_over_gloo  # noqa: E402


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


class RankDependentLengthTrainer(KDTrainer):
    """On-policy rows sampled by `transformers.generate` (TRL's generation): rank 0 writes every token up to the
    limit, rank 1 at most two, so rank 1 finishes first and must keep joining the sharded student's forwards."""

    rounds: tuple[int, ...] | list[int] = ()

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.accelerator.process_index % 2 == 0:
            self.generation_config.min_new_tokens = self.max_completion_length
        else:
            self.generation_config.max_new_tokens = 2

    def rollout(self, prompt_ids):
        out = super().rollout(prompt_ids)
        self.rounds = [*self.rounds, max(len(ids) for ids in out.completion_ids)]  # tokens written, one per forward
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
    # every method with the teacher placed apart from the student: sharded beside ZeRO-2 (DeepSpeed launches),
    # replicated beside an FSDP2 student (FSDP2 launches)
    **{
        f"{method}_teacher_sharded": (*_classes(method), {**overrides, "teacher_zero_stage": 3})
        for method, overrides in METHOD_CASES.items()
    },
    **{
        f"{method}_teacher_whole_fsdp": (*_classes(method), {**overrides, "teacher_fsdp": False})
        for method, overrides in METHOD_CASES.items()
    },
    # per-sequence normalisation: its loss must not depend on the process count either
    "gkd_sequences": (*_classes("gkd"), {"lmbda": 0.0, "loss_normalization": "sequences"}),
    # teacher placement independent of the student's stage (DeepSpeed launches only)
    "gkd_teacher_replicated": (*_classes("gkd"), {"lmbda": 0.0, "teacher_zero_stage": 0}),
    "skd_teacher_offloaded": (*_classes("skd"), {"teacher_zero_stage": 3, "teacher_offload": True}),
    "gkd_teacher_offloaded_fsdp": (*_classes("gkd"), {"lmbda": 0.0, "teacher_offload": True}),
    # a Llama teacher beside the Qwen2 student (same tokenizer): FSDP2 wraps each model's own decoder layers
    "gkd_other_family_teacher": (*_classes("gkd"), {"lmbda": 0.0}),
    "switch_teacher_replicated": (*_classes("switch"), {"teacher_zero_stage": 0, "switch_threshold": 0.005}),
    "skd_sampled": (*_classes("skd"), {"acceptance_top_k": 150, "temperature": 1.0}),
    "uneven": (RankDependentTrainer, KDConfig, {"lmbda": 1.0}),
    # transformers' generation with ranks writing different numbers of tokens: each model gathered once per rollout
    # (the default), and layer by layer in every forward (then `generate` must keep the ranks in step)
    "uneven_generation": (RankDependentLengthTrainer, KDConfig, {"lmbda": 1.0}),
    "uneven_generation_layerwise": (
        RankDependentLengthTrainer,
        KDConfig,
        {"lmbda": 1.0, "ds3_gather_for_generation": False},
    ),
    "skd_layerwise": (*_classes("skd"), {**METHOD_CASES["skd"], "ds3_gather_for_generation": False}),
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
# deterministic cases (compared with one process) -> the case whose single-process losses they must equal: where
# the teacher lives, and whether models are gathered per rollout or per layer, must not change the loss
PARITY_CASES = {
    **{method: method for method in METHOD_CASES},
    "gkd_sequences": "gkd_sequences",
    "gkd_teacher_replicated": "gkd",
    "skd_layerwise": "skd",
    **{f"{method}_teacher_sharded": method for method in METHOD_CASES},
    **{f"{method}_teacher_whole_fsdp": method for method in METHOD_CASES},
    "gkd_teacher_offloaded_fsdp": "gkd",
}
DEEPSPEED_ONLY = (
    *(f"{method}_teacher_sharded" for method in METHOD_CASES),
    "gkd_teacher_replicated",
    "skd_teacher_offloaded",
    "switch_teacher_replicated",
)
FSDP_ONLY = (
    *(f"{method}_teacher_whole_fsdp" for method in METHOD_CASES),
    "gkd_teacher_offloaded_fsdp",
    "gkd_other_family_teacher",
)
# the teacher folder a case loads, when not `teacher`
TEACHERS = {"gkd_other_family_teacher": "teacher_llama"}
# the cases of the launches that check one more backend for every trainer (ZeRO-3 offload, 2 nodes)
METHODS_ONLY = tuple(METHOD_CASES)
# resumed from a checkpoint half-way (PromptKD: its soft prompt and prompt optimizer are extra trainable state)
RESUME_CASE = "promptkd"


MAX_COMPLETION_LENGTH = 10


def save_models(directory: str) -> None:
    """The tokenizer and tiny student/teacher every case loads. Loaded from disk (not built in each process) so that
    the weights are the same under ZeRO-3's partitioned initialisation as in one process. Also the teacher's
    whole-vocabulary fp32 cache over the training rows, for `gkd_cached`."""
    tokenizer = build_tokenizer()
    build_model("llama", tokenizer, "teacher", seed=1, save_dir=os.path.join(directory, "teacher_llama"))
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


def build_trainer(name: str, output_dir: str, per_device_batch: int, models: str, steps: int = 2, **extra):
    trainer_cls, config_cls, overrides = CASES[name]
    overrides = {**overrides, **extra}
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
        seed=3,
        disable_tqdm=True,
        **{checkpointing_field(): False},
        use_cpu=not torch.cuda.is_available(),
        **{"save_strategy": "no", **overrides},
    )
    cached = args.teacher_cache is not None
    if cached:  # the case names the cache folder written beside the models; no teacher is loaded
        args.teacher_cache = os.path.join(models, args.teacher_cache)
    return trainer_cls(
        model=os.path.join(models, "student"),
        teacher_model=None if cached else os.path.join(models, TEACHERS.get(name, "teacher")),
        args=args,
        train_dataset=training_rows(),
        processing_class=tokenizer,
    )


def local_and_full_numel(module: torch.nn.Module) -> tuple[int, int]:
    """Parameters this process holds (a ZeRO-3 partition, an FSDP2 shard) and the model's."""
    from torch.distributed.tensor import DTensor

    def local(p):
        if hasattr(p, "ds_tensor"):
            return p.ds_tensor.numel()
        return p.to_local().numel() if isinstance(p, DTensor) else p.numel()

    return sum(map(local, module.parameters())), sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


class StopAfter(TrainerCallback):
    """Ends training after `step` optimizer steps, once that step's checkpoint is written: a run killed there."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def resumed_losses(name: str, out_dir: str, per_device_batch: int, models: str) -> dict[str, list[float]]:
    """Losses of 4 steps in one go and of the same run killed after step 2 and resumed from its checkpoint."""
    straight = build_trainer(name, os.path.join(out_dir, "straight"), per_device_batch, models, steps=4)
    straight.train()
    saving = dict(save_strategy="steps", save_steps=2, save_only_model=False)
    first = build_trainer(name, os.path.join(out_dir, "resumed"), per_device_batch, models, steps=4, **saving)
    first.add_callback(StopAfter(2))
    first.train()
    # a fresh trainer, as after a crash
    second = build_trainer(name, os.path.join(out_dir, "resumed"), per_device_batch, models, steps=4, **saving)
    second.train(resume_from_checkpoint=os.path.join(out_dir, "resumed", "checkpoint-2"))
    return {
        "straight": [row["loss"] for row in straight.state.log_history if "loss" in row],
        "resumed": [row["loss"] for row in second.state.log_history if "loss" in row],
    }


def teacher_offload_device(engine) -> str | None:
    """Where the sharded teacher's parameters live between uses, if it is offloaded: DeepSpeed's parameter offload,
    or FSDP2's `CPUOffloadPolicy`."""
    from torch.distributed.fsdp import CPUOffloadPolicy

    if engine is None:
        return None
    if units := fsdp2_units(engine):
        groups = [group for unit in units for group in unit._get_fsdp_state()._fsdp_param_groups]
        return "cpu" if all(isinstance(group.offload_policy, CPUOffloadPolicy) for group in groups) else None
    offload = getattr(engine, "zero_offload_param", lambda: None)()
    device = getattr(offload, "device", None)
    return None if device is None else str(getattr(device, "value", device))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", required=True, help="a folder written by `save_models`")
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--per-device-batch", type=int, default=2)
    parser.add_argument("--resume", action="store_true", help=f"also resume `{RESUME_CASE}` from a checkpoint")
    args = parser.parse_args()
    if os.environ.get(fsdp_over_gloo.ENV) == "1":
        fsdp_over_gloo.install()
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    for name in args.cases.split(","):
        if (name in DEEPSPEED_ONLY and not deepspeed) or (name in FSDP_ONLY and not fsdp):
            continue
        out_dir = os.path.join(args.out, name)
        trainer = build_trainer(name, out_dir, args.per_device_batch, args.models)
        teacher = trainer.accelerator.unwrap_model(trainer.teacher_model) if trainer.teacher_model else None
        teacher_counts = local_and_full_numel(teacher) if teacher is not None else (0, 0)
        student_counts = local_and_full_numel(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        trainer.train()
        student_counts_after = local_and_full_numel(trainer.accelerator.unwrap_model(trainer.model_wrapped))
        models = (teacher, trainer.model_wrapped)
        units = [len(fsdp2_units(model)) if model is not None else 0 for model in models]
        layers = [0 if m is None else trainer.accelerator.unwrap_model(m).config.num_hidden_layers for m in models]
        trainer.save_model(out_dir)
        history = trainer.state.log_history
        result = {
            "rank": trainer.accelerator.process_index,
            "world": trainer.accelerator.num_processes,
            "distributed_type": str(trainer.accelerator.distributed_type),
            "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage
            if trainer.is_deepspeed_enabled
            else None,
            "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version if trainer.is_fsdp_enabled else None,
            "node_rank": int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0))),
            "teacher_numel": teacher_counts,
            "teacher_offload": teacher_offload_device(trainer.teacher_model) == "cpu",
            "student_numel": student_counts,
            "student_numel_after": student_counts_after,
            # FSDP2 units (decoder layers, embeddings, head, root) of the teacher and the student; 0 when not FSDP2
            "fsdp_units": units,
            "layers": layers,
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
    if args.resume:
        out_dir = os.path.join(args.out, "resume")
        losses = resumed_losses(RESUME_CASE, out_dir, args.per_device_batch, args.models)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
            json.dump(losses, f)
        print(f"DONE resume rank {rank}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
