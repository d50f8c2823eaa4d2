"""One command for the day a GPU is lent: every trainer on real-size random-init pairs, bf16, long completions.

    python benchmarks/gpu.py                          # Qwen2 1.5B/0.5B and Llama 3B/1B shapes, 256 new tokens
    python benchmarks/gpu.py --pairs qwen2 --steps 8  # one pair, more steps
    python benchmarks/gpu.py --rows "K=25,never"      # some trainers only (DistillationTrainer always runs)
    python benchmarks/gpu.py --tiny                   # tiny shapes on CPU, to check the script (CI runs it)

The models are built from configs with the shapes of Qwen2.5-1.5B/0.5B and Llama-3.2-3B/1B (random weights, nothing
downloaded) and share a word-level tokenizer of the models' vocabulary size, so sampling and the loss run over the
full vocabulary. Random models rarely write EOS, so every completion runs to `--completion` tokens. Per trainer: the
median optimizer step (first step dropped), completion tokens per second, and the peak GPU memory of the run, models
included
(`torch.cuda.max_memory_allocated`) next to `trl-kd plan`'s single-GPU estimate for the same setting. Prints one
markdown table per pair with the device named.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import statistics
import sys


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

from timing import StepTimer  # noqa: E402


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


# name -> (student config, teacher config): the public models' shapes
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
}
TINY_PAIRS = {
    "qwen2": ("tiny Qwen2 shapes", qwen2(32, 2, 4, 2, 64, vocab=512), qwen2(64, 2, 4, 2, 128, vocab=512)),
    "llama": ("tiny Llama shapes", llama(32, 2, 4, 2, 64, vocab=512), llama(64, 2, 4, 2, 128, vocab=512)),
}


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


def cases(vocab_size: int) -> list[tuple[str, str | None, dict]]:
    """(label, registered method or None for `trl.DistillationTrainer`, config overrides)."""
    import trl_kd

    rows = [("trl.DistillationTrainer (on-policy, JSD)", None, {})]
    settings = {
        "gkd": [("on-policy", {"lmbda": 1.0}), ("mixed lmbda=0.5", {"lmbda": 0.5})],
        "skd": [
            ("every draft accepted (K = V)", {"acceptance_top_k": vocab_size, "temperature": 1.0, "top_p": 1.0}),
            ("paper defaults (K=25)", {}),
        ],
        "switch": [("never switches (tau_0 = inf)", {"switch_threshold": float("inf")})],
    }
    for method in trl_kd.METHODS.values():
        for note, overrides in settings.get(method.name, [("defaults", {})]):
            rows.append((f"{method.trainer.__name__}, {note}", method.name, overrides))
    return rows


def run_pair(pair: str, args) -> None:
    """Print the pair's table, a row as each trainer finishes (a run cut short by a time limit keeps its rows)."""
    from trl import DistillationConfig, DistillationTrainer

    import trl_kd
    from trl_kd.planner import ModelSpec, plan

    cuda = torch.cuda.is_available() and not args.tiny
    dtype = torch.bfloat16 if cuda else torch.float32
    title, student_config, teacher_config = (TINY_PAIRS if args.tiny else PAIRS)[pair]
    vocab = student_config.vocab_size
    tokenizer = word_tokenizer(vocab)
    for config in (student_config, teacher_config):
        config.pad_token_id, config.eos_token_id, config.bos_token_id = 0, 1, None
    torch.manual_seed(0)
    # kept in CPU memory: each trainer gets copies, which it moves to the GPU, so the peak is that run's alone
    student = AutoModelForCausalLM.from_config(student_config, dtype=dtype)
    teacher = AutoModelForCausalLM.from_config(teacher_config, dtype=dtype)
    dataset = word_dataset(vocab, 64 * args.batch, args.prompt, args.completion)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    estimate = plan(
        ModelSpec.from_config(student_config, "student"),
        ModelSpec.from_config(teacher_config, "teacher"),
        num_gpus=1,
        gpu_memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else 1024.0,
        dtype="bf16" if cuda else "fp32",
        batch_size=args.batch,
        prompt_length=args.prompt,
        completion_length=args.completion,
        gradient_checkpointing=not args.tiny,
    ).estimates[0]
    common = dict(
        output_dir="/tmp/trl-kd-gpu-bench",
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        max_completion_length=args.completion,
        report_to="none",
        bf16=cuda,
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        learning_rate=1e-6,
        use_cpu=not cuda,
        temperature=1.0,
        beta=0.5,
        **{checkpointing_field(): not args.tiny},
    )
    header = [
        f"**{title}** ({size(student)} student, {size(teacher)} teacher, vocabulary {vocab}), on {device_name(cuda)}: "
        f"batch {args.batch}, {args.prompt} prompt + {args.completion} new tokens, {'bf16' if cuda else 'fp32'}, "
        f"{args.steps} steps (median after the first). Plan estimate (single GPU): {estimate.peak_gib:.1f} GiB.",
        "",
        "| trainer | step (s) | vs DistillationTrainer | tokens/s | peak memory (GiB) | plan estimate (GiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    print("\n".join(header), flush=True)
    reference = None
    for label, method, overrides in cases(vocab):
        if method is not None and args.rows and not any(part in label for part in args.rows.split(",")):
            continue
        if method is None:
            trainer_class, config_class = DistillationTrainer, DistillationConfig
        else:
            trainer_class, config_class = trl_kd.METHODS[method].trainer, trl_kd.METHODS[method].config
        if cuda:
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        trainer = trainer_class(
            model=copy.deepcopy(student),
            teacher_model=copy.deepcopy(teacher),
            args=config_class(**{**common, **overrides}),
            train_dataset=dataset,
            processing_class=tokenizer,
        )
        trainer.remove_callback(PrinterCallback)
        timer = StepTimer(sync)
        trainer.add_callback(timer)
        trainer.train()
        step = statistics.median(timer.times[1:] or timer.times)
        reference = reference or step
        tokens = statistics.mean(
            [row["completions/mean_length"] for row in trainer.state.log_history if "completions/mean_length" in row]
            or [args.completion]
        )
        peak = f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if cuda else "not measured (CPU)"
        print(
            f"| {label} | {step:.2f} | {step / reference:.2f}x | {tokens * args.batch / step:.0f} | {peak} | "
            f"{estimate.peak_gib:.1f} |",
            flush=True,
        )
        trainer.accelerator.free_memory()
        del trainer
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
    parser.add_argument("--batch", type=int, default=None, help="Sequences per step (4; 2 with --tiny).")
    parser.add_argument("--prompt", type=int, default=None, help="Prompt tokens (128; 8 with --tiny).")
    parser.add_argument("--completion", type=int, default=None, help="New tokens (256; 8 with --tiny).")
    parser.add_argument(
        "--rows",
        default="",
        help="Comma-separated parts of trainer labels: only the trainers whose label holds one (and the reference).",
    )
    args = parser.parse_args(argv)
    for name, full, tiny in (("steps", 5, 2), ("batch", 4, 2), ("prompt", 128, 8), ("completion", 256, 8)):
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    pairs = args.pairs.split(",")
    unknown = [p for p in pairs if p not in PAIRS]
    if unknown:
        parser.error(f"unknown pair(s) {unknown}; choose from {sorted(PAIRS)}")
    if not args.tiny and not torch.cuda.is_available():
        print("No GPU: the real-size pairs need one. Run with --tiny to check the script on CPU.", file=sys.stderr)
        sys.exit(2)
    print(f"Device: {device_name(torch.cuda.is_available() and not args.tiny)}, torch {torch.__version__}\n")
    for pair in pairs:
        run_pair(pair, args)


if __name__ == "__main__":
    main()
