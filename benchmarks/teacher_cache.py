"""The offline teacher cache (trl_kd.teacher_cache): its size, how far its top-k loss is from the live teacher's,
and what a supervised-KD step costs with it. Prints markdown tables for docs/offline_teacher.md.

    python benchmarks/teacher_cache.py              # the tiny Qwen2 pair of trl_kd.testing, teacher fine-tuned
    python benchmarks/teacher_cache.py --pair real  # SmolLM2-135M-Instruct and its 8-layer pruned student
                                                    # (after `python benchmarks/real_model.py prepare`)

Tiny pair: the teacher is fine-tuned on the synthetic task first (`sft_on_task`, 400 steps), so its distributions
are peaked as a trained model's are; batch 8, up to 32 completion tokens. Real pair: the teacher's greedy answers to
the real-model benchmark's train prompts as the completions; batch 4, up to 64 completion tokens. Sizes are the
Arrow shards on disk per million completion tokens. The loss gap is the token-mean divergence from each cache against
the live teacher's full-vocabulary divergence, on the same student and rows. Step times are medians (first 2 steps
dropped) of interleaved runs on the same rows: `trl.SFTTrainer` (a plain SFT step of the student), supervised KD
(`KDTrainer`, `lmbda=0`) with the live teacher, and supervised KD from the cache with no teacher loaded.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


KS = (8, 32, 64, 128)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pair", choices=["tiny", "real"], default="tiny")
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    sys.path.insert(0, os.path.dirname(__file__))
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    from trl_kd import KDConfig, KDTrainer
    from trl_kd.losses import LMHead, chunked_token_divergence, chunked_topk_token_divergence
    from trl_kd.teacher_cache import cache_teacher, load_teacher_cache
    from trl_kd.testing import build_model, build_tokenizer, make_dataset, sft_on_task

    from speed import _bench_args
    from timing import StepTimer

    torch.set_num_threads(2)
    if args.pair == "real":
        from datasets import Dataset

        from real_model import Budget, RealData

        data = RealData("pruned-8", Budget(train_prompts=args.rows))
        tokenizer, teacher, student = data.tokenizer, data.teacher, data.student
        dataset = Dataset.from_list(
            [{"prompt": e.prompt, "completion": e.completion_text} for e in data.splits["train"]]
        )
        batch, completion, ks = 4, 64, KS  # no whole-vocabulary cache: 49,152 values per token
    else:
        tokenizer = build_tokenizer()
        teacher = build_model("qwen2", tokenizer, "teacher", seed=1)
        sft_on_task(teacher, tokenizer, steps=400, min_len=6, max_len=12)
        teacher.eval()
        student = build_model("qwen2", tokenizer, "student", seed=0)
        dataset = make_dataset("conversational_prompt_completion", args.rows, min_len=6, max_len=12)
        batch, completion, ks = 8, 32, (*KS, len(tokenizer))
    work = tempfile.mkdtemp(prefix="trl-kd-cache-bench-")
    vocab = len(tokenizer)

    # 1. size and loss gap
    size_rows, gap_rows = [], []
    live_gap = {}
    for k in ks:
        out = os.path.join(work, f"k{k}")
        cache_teacher(
            teacher, tokenizer, dataset, out, k=k, max_completion_length=completion, batch_size=32, progress=False
        )
        cache, _ = load_teacher_cache(out)
        tokens = sum(len(c) for c in cache["teacher_completion_ids"])
        size = sum(
            os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs if f.endswith(".arrow")
        )
        if k in KS:
            size_rows.append(f"| {k} | {size / tokens * 1e6 / 2**20:.0f} MiB |")
        # the student's and the live teacher's states at the cached positions, row by row
        student_hidden, teacher_hidden, ids, values, tails = [], [], [], [], []
        with torch.no_grad():
            for row in cache.select(range(64)):
                sequence = torch.tensor([row["teacher_prompt_ids"] + row["teacher_completion_ids"]])
                start, n = len(row["teacher_prompt_ids"]) - 1, len(row["teacher_completion_ids"])
                student_hidden.append(student.model(sequence).last_hidden_state[0, start : start + n])
                teacher_hidden.append(teacher.model(sequence).last_hidden_state[0, start : start + n])
                ids.append(torch.tensor(row["teacher_topk_ids"], dtype=torch.long))
                values.append(torch.tensor(row["teacher_topk_logprobs"]))
                tails.append(torch.tensor(row["teacher_tail_logprob"]))
            h_s, h_t = torch.cat(student_hidden), torch.cat(teacher_hidden)
            for loss, beta in (("forward KL", 0.0), ("JSD (beta 0.5)", 0.5), ("reverse KL", 1.0)):
                live, _ = chunked_token_divergence(
                    h_s, h_t, LMHead.from_model(student), LMHead.from_model(teacher), vocab, "jsd", beta
                )
                cached, _ = chunked_topk_token_divergence(
                    h_s, LMHead.from_model(student), vocab, torch.cat(ids), torch.cat(values), torch.cat(tails),
                    "jsd", beta,
                )  # fmt: skip
                live_gap.setdefault(loss, {})[k] = (live.mean().item(), cached.mean().item())
    for loss, by_k in live_gap.items():
        live = by_k[KS[0]][0]
        cells = " | ".join(f"{by_k[k][1]:.4f} ({100 * (by_k[k][1] - live) / live:+.1f}%)" for k in ks)
        gap_rows.append(f"| {loss} | {live:.4f} | {cells} |")

    # 2. step time: SFT, supervised KD live, supervised KD from the top-64 cache
    common = _bench_args(args.steps, batch, completion, lmbda=0.0, beta=0.0)
    sft = {k: v for k, v in common.items() if k not in ("lmbda", "beta", "max_completion_length")}
    cases = {
        "trl.SFTTrainer (the same student and rows)": lambda: SFTTrainer(
            model=copy.deepcopy(student),
            args=SFTConfig(**sft, max_length=None),
            train_dataset=dataset,
            processing_class=tokenizer,
        ),
        "KDTrainer lmbda=0, live teacher": lambda: KDTrainer(
            model=copy.deepcopy(student),
            teacher_model=copy.deepcopy(teacher),
            args=KDConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
        ),
        "KDTrainer lmbda=0, top-64 cache, no teacher": lambda: KDTrainer(
            model=copy.deepcopy(student),
            teacher_model=None,
            args=KDConfig(**common, teacher_cache=os.path.join(work, "k64")),
            processing_class=tokenizer,
        ),
    }
    times = {label: [] for label in cases}
    for _ in range(args.repeat):
        for label, build in cases.items():
            trainer = build()
            trainer.remove_callback(PrinterCallback)
            timer = StepTimer()
            trainer.add_callback(timer)
            trainer.train()
            times[label].append(statistics.median(timer.times[2:]))
    sft_time = statistics.median(times[next(iter(cases))])
    step_rows = [
        f"| {label} | {1000 * statistics.median(v):.0f} | {statistics.median(v) / sft_time:.2f}x |"
        for label, v in times.items()
    ]
    shutil.rmtree(work, ignore_errors=True)

    print(f"Cache size, {args.rows} rows, float16 values, ids uint16 (vocabulary {vocab}), Arrow on disk:\n")
    print("| k | per million completion tokens |\n| --- | --- |\n" + "\n".join(size_rows) + "\n")
    pair = "SmolLM2-135M-Instruct and its 8-layer pruned copy" if args.pair == "real" else "the tiny pair"
    print(
        f"Token-mean divergence of the untrained student from the teacher ({pair}) over 64 rows: live (full "
        "vocabulary), and from each cache (difference to live):\n"
    )
    header = " | ".join(f"k = {k}" for k in ks)
    print(f"| loss | live | {header} |\n| --- | --- | {' | '.join('---' for _ in ks)} |")
    print("\n".join(gap_rows) + "\n")
    print(
        f"Step time ({pair}), batch {batch}, up to {completion} completion tokens, fp32, 2 threads, median of "
        f"{args.repeat} interleaved runs:\n"
    )
    print("| trainer | step (ms) | vs SFT |\n| --- | --- | --- |\n" + "\n".join(step_rows))


if __name__ == "__main__":
    main()
