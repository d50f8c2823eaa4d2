"""Does each method distil? Every trainer on the same budget, on a task whose answers are exact.

    python benchmarks/quality.py                   # both settings, 3 seeds (about 15 min on a 2-core CPU)
    python benchmarks/quality.py --seeds 1 --steps 40   # a quick look

The task is `trl_kd.testing`'s synthetic instructions (reverse, sort, copy, count). Two settings: *short* answers
(2-6 items) and *long* answers (10-16 items), since SWITCH's claim is about long outputs. Per setting, a teacher
(Llama-style, ~130k parameters) is fine-tuned until it knows the task, and a student 4x smaller gets a short SFT, as
the papers start from an SFT student. Then each method trains a copy of that student for the same number of steps
with the same batch and learning rate. Scores on 64 held-out prompts: ROUGE-L of greedy and of temperature-1 samples
(the MiniLLM/DistiLLM protocol) and greedy exact match, mean ± std over seeds. Prints markdown tables and writes
`docs/img/quality_<setting>.png` when matplotlib is installed.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

import torch  # noqa: E402
from transformers.trainer_callback import PrinterCallback  # noqa: E402

from trl_kd import (  # noqa: E402
    KDConfig,
    KDTrainer,
    PromptKDConfig,
    PromptKDTrainer,
    SpeculativeKDConfig,
    SpeculativeKDTrainer,
    SwitchConfig,
    SwitchTrainer,
)
from trl_kd.evaluation import rouge_l  # noqa: E402
from trl_kd.testing import build_model, build_tokenizer, make_pairs, sft_on_task  # noqa: E402

from plotting import pyplot  # noqa: E402


SETTINGS = {"short": (2, 6), "long": (10, 16)}
# name -> (trainer, config, overrides); None = plain SFT on the references
METHODS = {
    "SFT on references": None,
    "Supervised KD (lmbda 0, FKL)": (KDTrainer, KDConfig, {"lmbda": 0.0, "beta": 0.0}),
    "SeqKD (teacher samples, FKL)": (KDTrainer, KDConfig, {"lmbda": 0.0, "seq_kd": True, "beta": 0.0}),
    "GKD on-policy (lmbda 1, JSD 0.5)": (KDTrainer, KDConfig, {"lmbda": 1.0, "beta": 0.5}),
    "GKD mixed (lmbda 0.5, JSD 0.1)": (KDTrainer, KDConfig, {"lmbda": 0.5, "beta": 0.1}),
    "On-policy reverse KL (lmbda 1, beta 1)": (KDTrainer, KDConfig, {"lmbda": 1.0, "beta": 1.0}),
    "SKD (K=25, FKL)": (SpeculativeKDTrainer, SpeculativeKDConfig, {}),
    "SWITCH (calibrated to 50% teacher tokens)": (SwitchTrainer, SwitchConfig, {"target_teacher_fraction": 0.5}),
    "PromptKD (RKL, 7 prompt tokens)": (PromptKDTrainer, PromptKDConfig, {}),
}


def dataset(pairs):
    from datasets import Dataset

    return Dataset.from_list([
        {"prompt": [{"role": "user", "content": q}], "completion": [{"role": "assistant", "content": a}]}
        for q, a in pairs
    ])


@torch.no_grad()
def score(model, tokenizer, pairs, max_new_tokens, seed) -> dict[str, float]:
    model.eval()
    prompts = [
        tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q, _ in pairs
    ]
    references = [a for _, a in pairs]
    batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    out = {}
    for mode, kwargs in (("greedy", {"do_sample": False}), ("sampled", {"do_sample": True, "temperature": 1.0})):
        torch.manual_seed(seed)
        generated = model.generate(
            **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id, top_k=0, top_p=1.0, **kwargs,
        )
        texts = [t.strip() for t in tokenizer.batch_decode(generated[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
        out[f"rouge_l_{mode}"] = rouge_l(texts, references)
        if mode == "greedy":
            out["exact_match"] = 100.0 * sum(t == r for t, r in zip(texts, references)) / len(references)
    return out


def run_setting(name: str, seeds: int, steps: int, log=print) -> tuple[list[str], dict]:
    lo, hi = SETTINGS[name]
    max_new = 2 * hi + 6
    tokenizer = build_tokenizer()
    teacher = build_model("llama", tokenizer, "teacher", seed=1)
    start = time.perf_counter()
    sft_on_task(teacher, tokenizer, steps=1500 if name == "short" else 2500, min_len=lo, max_len=hi, seed=11)
    log(f"[{name}] teacher trained in {time.perf_counter() - start:.0f}s")
    base_student = build_model("llama", tokenizer, "student", seed=0)
    sft_on_task(base_student, tokenizer, steps=100, min_len=lo, max_len=hi, seed=12)
    held_out = make_pairs(64, seed=999, min_len=lo, max_len=hi)
    train_pairs = make_pairs(steps * 8, seed=21, min_len=lo, max_len=hi)

    results: dict[str, list[dict]] = {"Teacher": [score(teacher, tokenizer, held_out, max_new, s) for s in range(seeds)],
                                      "Student before distillation": [score(base_student, tokenizer, held_out, max_new, s)
                                                                      for s in range(seeds)]}
    walls: dict[str, float] = {}
    for method, spec in METHODS.items():
        results[method] = []
        for seed in range(seeds):
            student = copy.deepcopy(base_student)
            begin = time.perf_counter()
            if spec is None:
                sft_on_task(student, tokenizer, steps=steps, batch_size=8, learning_rate=1e-3, min_len=lo, max_len=hi,
                            seed=100 + seed)
            else:
                trainer_class, config_class, overrides = spec
                args = config_class(**{
                    "output_dir": f"/tmp/trl-kd-quality/{name}", "per_device_train_batch_size": 8, "max_steps": steps,
                    "learning_rate": 1e-3, "lr_scheduler_type": "constant", "max_completion_length": max_new,
                    "report_to": "none", "bf16": False, "use_cpu": not torch.cuda.is_available(),
                    "save_strategy": "no", "logging_steps": steps, "disable_tqdm": True,
                    "gradient_checkpointing": False, "seed": seed, **overrides,
                })
                trainer = trainer_class(model=student, teacher_model=copy.deepcopy(teacher), args=args,
                                        train_dataset=dataset(train_pairs), processing_class=tokenizer)
                trainer.remove_callback(PrinterCallback)
                trainer.train()
                student = trainer.accelerator.unwrap_model(trainer.model)
            walls[method] = walls.get(method, 0.0) + (time.perf_counter() - begin) / seeds
            results[method].append(score(student, tokenizer, held_out, max_new, seed))
        mean = statistics.mean(r["rouge_l_greedy"] for r in results[method])
        log(f"[{name}] {method}: greedy ROUGE-L {mean:.1f}, {walls[method]:.0f}s per run")

    def cell(rows, key):
        values = [r[key] for r in rows]
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    lo_hi = f"{lo}-{hi}"
    table = [
        f"**{name.capitalize()} answers** ({lo_hi} items; up to {max_new} new tokens; {steps} steps of batch 8 per "
        f"method; {seeds} seed(s); 64 held-out prompts)",
        "",
        "| method | ROUGE-L greedy | ROUGE-L sampled (T=1) | exact match % | wall time per run (s) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for method, rows in results.items():
        wall = f"{walls[method]:.0f}" if method in walls else "–"
        table.append(f"| {method} | {cell(rows, 'rouge_l_greedy')} | {cell(rows, 'rouge_l_sampled')} | "
                     f"{cell(rows, 'exact_match')} | {wall} |")
    return table, results


def plot(name: str, results: dict, path: str) -> None:
    plt = pyplot()
    if plt is None:
        return
    labels = list(results)
    means = [statistics.mean(r["rouge_l_greedy"] for r in results[k]) for k in labels]
    errors = [statistics.stdev(r["rouge_l_greedy"] for r in results[k]) if len(results[k]) > 1 else 0 for k in labels]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.barh(labels[::-1], means[::-1], xerr=errors[::-1], color="#4c72b0")
    ax.set_xlabel("ROUGE-L (greedy), mean ± std over seeds")
    ax.set_title(f"Distilling the synthetic task, {name} answers")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="short,long")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--plots", default="docs/img")
    args = parser.parse_args()
    torch.set_num_threads(2)
    for name in args.settings.split(","):
        table, results = run_setting(name, args.seeds, args.steps)
        print("\n".join(table) + "\n", flush=True)
        if args.plots:
            plot(name, results, os.path.join(args.plots, f"quality_{name}.png"))


if __name__ == "__main__":
    main()
