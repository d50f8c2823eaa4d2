"""Speed of the block-verify sampler (trl_kd.sampler) against the token-by-token reference and against the floor.

    python benchmarks/sampler.py [--batch 8] [--new-tokens 64]

For gamma in {1, 2, 5, 8} and the adaptive draft length (from 5, at most 16) at high and low acceptance (SKD top-K
rule; random-init models rank tokens at random, so acceptance is about K/V), it prints the time per generated token
and the teacher and student forwards per generated token, and compares with (a) the token-by-token reference
(`reference_sample`, no KV cache) and (b) the floor every on-policy KD method pays: student `generate` of the same
length plus one teacher forward over the result. The sampler keeps the teacher's hidden states, as the trainers run
it (`reuse_teacher_states`), which is what lets them skip that teacher forward.
"""

from __future__ import annotations

import argparse
import os
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402

from trl_kd.sampler import SamplingParams, TopKRule, block_verify_sample, reference_sample  # noqa: E402


VOCAB = 1024


def model(hidden: int, layers: int, seed: int, device: str) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=8,
        num_key_value_heads=2,
        intermediate_size=hidden * 3,
        max_position_embeddings=1024,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )
    return Qwen2ForCausalLM(config).to(device).eval()


def timed(fn, device: str) -> tuple[float, object]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    student, teacher = model(256, 4, 0, device), model(512, 8, 1, device)
    torch.manual_seed(0)
    prompts = torch.randint(2, VOCAB, (args.batch, args.prompt_tokens)).tolist()
    common = dict(
        max_new_tokens=args.new_tokens,
        eos_token_ids=[],
        pad_token_id=0,
        student_params=SamplingParams(temperature=0.5),
        teacher_params=SamplingParams(temperature=0.2),
    )
    tokens = args.batch * args.new_tokens

    def floor():
        ids = torch.tensor(prompts, device=device)
        with torch.no_grad():
            out = student.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=0.5,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=0,
            )
            teacher(out)
        return out

    timed(floor, device)  # warm-up
    floor_time, _ = timed(floor, device)
    print(
        f"Device: {torch.cuda.get_device_name() if device == 'cuda' else 'CPU'}, batch {args.batch}, "
        f"{args.new_tokens} new tokens, prompt {args.prompt_tokens}, vocab {VOCAB}, student 256x4, teacher 512x8.\n"
    )
    print(f"Floor (student generate + one teacher forward): {floor_time / tokens * 1e3:.2f} ms/token\n")
    print(
        "| acceptance target | gamma | acceptance | ms/token | teacher fwd/token | student fwd/token | vs reference | "
        "vs floor |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, k in [("high (K = 0.9 V)", int(0.9 * VOCAB)), ("low (K = 0.3 V)", int(0.3 * VOCAB))]:
        ref_time, ref = timed(lambda: reference_sample(student, teacher, prompts, TopKRule(k), **common), device)
        for gamma in (1, 2, 5, 8, "adaptive"):
            draft = (
                {"num_draft_tokens": 5, "adaptive_draft": True} if gamma == "adaptive" else {"num_draft_tokens": gamma}
            )
            t, out = timed(
                lambda: block_verify_sample(
                    student, teacher, prompts, TopKRule(k), keep_teacher_hidden=True, **draft, **common
                ),
                device,
            )
            c = out.counts
            per_token = args.batch / tokens  # forwards run for the whole batch: per token of one row
            print(
                f"| {label} | {gamma} | {c['accepted'] / c['drafted']:.2f} | {t / tokens * 1e3:.2f} | "
                f"{c['teacher_forwards'] * per_token:.2f} | {c['student_forwards'] * per_token:.2f} | "
                f"{ref_time / t:.1f}x faster | {t / floor_time:.2f}x |"
            )
        print(
            f"| {label} | reference | {ref.counts['accepted'] / ref.counts['drafted']:.2f} | "
            f"{ref_time / tokens * 1e3:.2f} | 1.00 | 1.00 | — | {ref_time / floor_time:.2f}x |"
        )


if __name__ == "__main__":
    main()
