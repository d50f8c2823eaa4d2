"""One command for the day a GPU is lent: every trainer on real-size random-init pairs, bf16, long completions.

    python benchmarks/gpu.py                          # Qwen2 1.5B/0.5B and Llama 3B/1B shapes, 256 new tokens
    python benchmarks/gpu.py --pairs qwen2 --steps 8  # one pair, more steps
    python benchmarks/gpu.py --rows "K=25,never"      # some trainers only (DistillationTrainer always runs)
    python benchmarks/gpu.py --pairs smollm2 --completion 64,256,1024 --batch 4,16   # the real pair's shape, a grid
    python benchmarks/gpu.py --pairs smollm2 --completion 64 --rows "close student" --profile   # where SKD's step goes
    python benchmarks/gpu.py --tiny                   # tiny shapes on CPU, to check the script (CI runs it)

The models are built from configs with the shapes of Qwen2.5-1.5B/0.5B and Llama-3.2-3B/1B (random weights, nothing
downloaded) and share a word-level tokenizer of the models' vocabulary size, so sampling and the loss run over the
full vocabulary. Random models rarely write EOS, so every completion runs to `--completion` tokens. Per trainer: the
median optimizer step (first step dropped), its ratio to `DistillationTrainer`'s per generated token, completion tokens
per second, the peak GPU memory of the run, models included (`torch.cuda.max_memory_allocated`) next to `trl-kd plan`'s
single-GPU estimate for the same setting, and the acceptance and teacher-token fraction where the trainer logs them.
Prints one markdown table per pair, answer length and batch, with the device named.

The `smollm2` pair has the shape of the real pair of `benchmarks/real_model.py` (SmolLM2-135M-Instruct as the teacher,
its 8 evenly spaced layers of 30 as the student) and a student close to the teacher, so that SKD runs at an acceptance
like the real `pruned-24` student's (see `close_pair`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_kd._compat import checkpointing_field  # noqa: E402

from timing import PROFILE_PARTS, PhaseProfiler, StepTimer  # noqa: E402


def shapes(config_class, hidden, layers, heads, kv_heads, intermediate, vocab):
    """A random-init model config with the given shapes (tied embeddings, a 4,096-token context)."""
    return config_class(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        intermediate_size=intermediate,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
    )


def qwen2(hidden, layers, heads, kv_heads, intermediate, vocab=151936) -> Qwen2Config:
    return shapes(Qwen2Config, hidden, layers, heads, kv_heads, intermediate, vocab)


def llama(hidden, layers, heads, kv_heads, intermediate, vocab=128256) -> LlamaConfig:
    return shapes(LlamaConfig, hidden, layers, heads, kv_heads, intermediate, vocab)


# name -> (title, student config, teacher config): the public models' shapes; no student config: the student is the
# teacher's evenly spaced layers (PRUNED)
PAIRS = {
    "qwen2": (
        "Qwen2.5-0.5B / Qwen2.5-1.5B shapes",
        qwen2(896, 24, 14, 2, 4864),
        qwen2(1536, 28, 12, 2, 8960),
    ),
    "llama": (
        "Llama-3.2-1B / Llama-3.2-3B shapes",
        llama(2048, 16, 32, 8, 8192),
        llama(3072, 28, 24, 8, 8192),
    ),
    "smollm2": (
        "SmolLM2-135M shape, its 8-layer pruned copy",
        None,
        llama(576, 30, 9, 3, 1536, vocab=49152),
    ),
}
TINY_PAIRS = {
    "qwen2": ("tiny Qwen2 shapes", qwen2(32, 2, 4, 2, 64, vocab=512), qwen2(64, 2, 4, 2, 128, vocab=512)),
    "llama": ("tiny Llama shapes", llama(32, 2, 4, 2, 64, vocab=512), llama(64, 2, 4, 2, 128, vocab=512)),
    "smollm2": ("tiny SmolLM2-like shapes, a pruned copy", None, llama(64, 6, 4, 2, 128, vocab=512)),
}
# pair -> (layers kept by the student, layers kept by the close student), out of the teacher's
PRUNED = {"smollm2": (8, 24)}
TINY_PRUNED = {"smollm2": (2, 4)}
# the close student's knobs (see close_pair): at the SmolLM2 shape SKD's defaults accepted 93% on CPU, 95% on an H200
SHARPEN, DAMP = 5.0, 0.3


def word_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A word-level tokenizer of exactly `vocab_size` tokens ("w0" ... and the specials), so that the shared
    vocabulary, and with it sampling and the loss, is as wide as the models'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<eos>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="left"
    )


def word_dataset(vocab_size: int, rows: int, prompt_tokens: int, completion_tokens: int) -> Dataset:
    """Prompts (and completions, for the off-policy rows) of random words, exactly this many tokens long."""
    generator = torch.Generator().manual_seed(0)

    def text(n: int) -> str:
        return " ".join(f"w{i}" for i in torch.randint(3, vocab_size, (n,), generator=generator).tolist())

    return Dataset.from_dict(
        {
            "prompt": [text(prompt_tokens) for _ in range(rows)],
            "completion": [" " + text(completion_tokens) for _ in range(rows)],
        }
    )


def close_pair(teacher: torch.nn.Module, keep: int, keep_close: int):
    """The student (the teacher's ``keep`` evenly spaced layers) and a student close to the teacher (its ``keep_close``
    layers), after making the random teacher one that a close student can follow.

    Random weights give near-uniform logits over the vocabulary, where no top-25 holds a sampled token, so SKD's
    teacher would replace every draft. Two changes make the teacher's top-25 meaningful and the close student close:
    the final norm is scaled by `SHARPEN` (peaked logits, like a trained model's), and the layers the close student
    drops write `DAMP` of their output (attention and MLP output projections scaled), so that dropping them changes
    little. The teacher keeps all its layers and their cost; only the acceptance changes.
    """
    from real_assets import evenly_spaced, prune_layers

    total = teacher.config.num_hidden_layers
    kept_by_close = evenly_spaced(total, keep_close)
    with torch.no_grad():
        teacher.model.norm.weight.mul_(SHARPEN)
        for index, layer in enumerate(teacher.model.layers):
            if index not in kept_by_close:
                layer.self_attn.o_proj.weight.mul_(DAMP)
                layer.mlp.down_proj.weight.mul_(DAMP)
    return tuple(
        prune_layers(teacher, layers).to(teacher.dtype) for layers in (evenly_spaced(total, keep), kept_by_close)
    )


CLOSE = "close student"


def cases(vocab_size: int, close: bool) -> list[tuple[str, str | None, dict]]:
    """(label, registered method or None for `trl.DistillationTrainer`, config overrides), in the order they run: the
    slow rows (the teacher writing most tokens) last, so that a time limit cuts those first."""
    import trl_kd

    rows = [("trl.DistillationTrainer (on-policy, JSD)", None, {})]
    settings = {
        "gkd": [("on-policy", {"lmbda": 1.0}), ("mixed lmbda=0.5", {"lmbda": 0.5})],
        "skd": [
            ("every draft accepted (K = V)", {"acceptance_top_k": vocab_size, "temperature": 1.0, "top_p": 1.0}),
            *([(f"paper defaults (K=25), {CLOSE}", {})] if close else []),
        ],
        "switch": [("never switches (tau_0 = inf)", {"switch_threshold": float("inf")})],
    }
    for method in trl_kd.METHODS.values():
        for note, overrides in settings.get(method.name, [("defaults", {})]):
            if CLOSE in note:  # its reference: DistillationTrainer with the same student
                rows.append((f"trl.DistillationTrainer (on-policy, JSD), {CLOSE}", None, {}))
            rows.append((f"{method.trainer.__name__}, {note}", method.name, overrides))
    rows.append(("SwitchTrainer, defaults", "switch", {}))
    rows.append(("SpeculativeKDTrainer, paper defaults (K=25)", "skd", {}))
    return rows


def build_pair(pair: str, tiny: bool, dtype: torch.dtype):
    """The pair's title, student, teacher and close student (None where the pair has none), in CPU memory: each trainer
    gets copies, which it moves to the GPU, so that the peak memory is that run's alone."""
    title, student_config, teacher_config = (TINY_PAIRS if tiny else PAIRS)[pair]
    for config in (student_config, teacher_config):
        if config is not None:
            config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, None
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(teacher_config, dtype=dtype)
    pruned = TINY_PRUNED if tiny else PRUNED
    if pair in pruned:
        student, close_student = close_pair(teacher, *pruned[pair])
        return title, student, teacher, close_student
    return title, AutoModelForCausalLM.from_config(student_config, dtype=dtype), teacher, None


def logged_mean(history: list[dict], key: str) -> float | None:
    values = [row[key] for row in history if key in row]
    return statistics.mean(values) if values else None


def run_pair(pair: str, args, deadline: float) -> None:
    """Print the pair's tables (one per answer length and batch), a row as each trainer finishes; rows that would start
    after ``deadline`` (a `time.monotonic()` value) are printed as not reached, so a time limit keeps a clean table."""
    from trl import DistillationConfig, DistillationTrainer

    import trl_kd
    from trl_kd.planner import ModelSpec, plan

    cuda = torch.cuda.is_available() and not args.tiny
    dtype = torch.bfloat16 if cuda else torch.float32
    title, student, teacher, close_student = build_pair(pair, args.tiny, dtype)
    vocab = teacher.config.vocab_size
    tokenizer = word_tokenizer(vocab)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for completion in args.completion:
        for batch in args.batch:
            dataset = word_dataset(vocab, 64 * batch, args.prompt, completion)
            estimate = plan(
                ModelSpec.from_config(student.config, "student"),
                ModelSpec.from_config(teacher.config, "teacher"),
                num_gpus=1,
                gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 1024.0,
                dtype="bf16" if cuda else "fp32",
                batch_size=batch,
                prompt_length=args.prompt,
                completion_length=completion,
                gradient_checkpointing=not args.tiny,
            ).estimates[0]
            common = dict(
                output_dir="/tmp/trl-kd-gpu-bench",
                per_device_train_batch_size=batch,
                max_steps=args.steps,
                max_completion_length=completion,
                report_to="none",
                bf16=cuda,
                logging_steps=1,
                save_strategy="no",
                disable_tqdm=True,
                learning_rate=1e-6,
                use_cpu=not cuda,
                **{checkpointing_field(): not args.tiny},
            )
            header = [
                f"**{title}** ({size(student)} student, {size(teacher)} teacher, vocabulary {vocab}), on "
                f"{device_name(cuda)}: batch {batch}, {args.prompt} prompt + {completion} new tokens, "
                f"{'bf16' if cuda else 'fp32'}, {args.steps} steps (median after the first). Plan estimate (single "
                f"GPU): {estimate.peak_gib:.1f} GiB.",
                "",
                "| trainer | step (s) | vs DistillationTrainer (per token) | tokens/s | peak memory (GiB) | plan "
                "estimate (GiB) | acceptance | teacher tokens |",
                "| --- | --- | --- | --- | --- | --- | --- | --- |",
            ]
            print("\n".join(header), flush=True)
            references = {}  # seconds per generated token of DistillationTrainer, by student
            profiles = []  # with --profile: where each trainer's step goes
            for label, method, overrides in cases(vocab, close_student is not None):
                if method is not None and args.rows and not any(part in label for part in args.rows.split(",")):
                    continue
                if time.monotonic() > deadline:
                    print(f"| {label} | not reached (time limit) | – | – | – | {estimate.peak_gib:.1f} | – | – |")
                    continue
                if method is None:
                    trainer_class, config_class = DistillationTrainer, DistillationConfig
                else:
                    trainer_class, config_class = trl_kd.METHODS[method].trainer, trl_kd.METHODS[method].config
                if "defaults" not in label:  # the rows compared with the reference sample and weigh as it does
                    overrides = {"temperature": 1.0, "beta": 0.5, **overrides}
                if cuda:
                    gc.collect()
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                trainer = trainer_class(
                    model=copy.deepcopy(close_student if CLOSE in label else student),
                    teacher_model=copy.deepcopy(teacher),
                    args=config_class(**{**common, **overrides}),
                    train_dataset=dataset,
                    processing_class=tokenizer,
                )
                trainer.remove_callback(PrinterCallback)
                timer = StepTimer(sync)
                trainer.add_callback(timer)
                profiler = PhaseProfiler(trainer, sync, skip_steps=1) if args.profile else None
                trainer.train()
                history = trainer.state.log_history
                step = statistics.median(timer.times[1:] or timer.times)
                tokens = logged_mean(history, "completions/mean_length") or completion
                reference = references.setdefault(CLOSE in label, step / tokens)
                peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "not measured (CPU)"
                rates = [logged_mean(history, key) for key in ("acceptance_rate", "teacher_token_fraction")]
                print(
                    f"| {label} | {step:.2f} | {step / tokens / reference:.2f}x | {tokens * batch / step:.0f} | "
                    f"{peak} | {estimate.peak_gib:.1f} | "
                    + " | ".join("–" if rate is None else f"{rate:.2f}" for rate in rates)
                    + " |",
                    flush=True,
                )
                if profiler is not None:
                    timed = timer.times[1:] or timer.times
                    mean = statistics.mean(timed)
                    parts = profiler.phases(len(timed), mean)
                    shares = [f"{1000 * parts[p]:.1f} ({100 * parts[p] / mean:.0f}%)" for p in PROFILE_PARTS]
                    each = ", ".join(f"{t:.2f}" for t in timed)
                    profiles.append(f"| {label} | {1000 * mean:.1f} | " + " | ".join(shares) + f" | {each} |")
                trainer.accelerator.free_memory()
                del trainer
            if profiles:
                print(
                    "\nWhere a step goes (ms per step after the first, and its share; the timers synchronise at every "
                    "forward, so these steps run slower than the table's):\n",
                    "| trainer | step (ms) | " + " | ".join(PROFILE_PARTS) + " | each step (s) |",
                    "| --- | --- | " + " | ".join("---" for _ in PROFILE_PARTS) + " | --- |",
                    *profiles,
                    sep="\n",
                    flush=True,
                )
            print(flush=True)


def size(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters())
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e3:.0f}k"


def device_name(cuda: bool) -> str:
    if cuda:
        return torch.cuda.get_device_name()
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="Tiny shapes on CPU (fp32) to check the script.")
    parser.add_argument("--pairs", default="qwen2,llama", help="Comma-separated: qwen2, llama.")
    parser.add_argument("--steps", type=int, default=None, help="Optimizer steps per trainer (5; 2 with --tiny).")
    parser.add_argument("--batch", default=None, help="Sequences per step, comma-separated (4; 2 with --tiny).")
    parser.add_argument("--prompt", type=int, default=None, help="Prompt tokens (128; 8 with --tiny).")
    parser.add_argument("--completion", default=None, help="New tokens, comma-separated (256; 8 with --tiny).")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="Also split each trainer's step into phases (sampling by model, loss, backward, optimizer).",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="Seconds after which no trainer starts (shown as not reached)."
    )
    parser.add_argument(
        "--rows",
        default="",
        help="Comma-separated parts of trainer labels: only the trainers whose label holds one (and the reference).",
    )
    args = parser.parse_args(argv)
    for name, full, tiny in (("steps", 5, 2), ("batch", "4", "2"), ("prompt", 128, 8), ("completion", "256", "8")):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.batch = [int(x) for x in args.batch.split(",")]
    args.completion = [int(x) for x in args.completion.split(",")]
    deadline = time.monotonic() + (args.time_limit if args.time_limit is not None else float("inf"))
    pairs = args.pairs.split(",")
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {sorted(PAIRS)}")
    if not args.tiny and not torch.cuda.is_available():
        print("No GPU: the real-size pairs need one. Run with --tiny to check the script on CPU.", file=sys.stderr)
        sys.exit(2)
    print(f"Device: {device_name(torch.cuda.is_available() and not args.tiny)}, torch {torch.__version__}\n")
    for pair in pairs:
        run_pair(pair, args, deadline)


if __name__ == "__main__":
    main()
