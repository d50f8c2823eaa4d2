"""`fsdp2_gathered` on a real FSDP2 model (one gloo process, in a subprocess so no process group outlives it): the
model is whole inside, sharded again after, and each unit's reshard-after-forward setting is restored."""

import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent(
    """
    import os, socket
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from trl_kd._compat import fsdp2_reshards_after_forward
    from trl_kd.placement import fsdp2_gathered, fsdp2_units, is_partitioned
    from trl_kd.testing import build_model, build_tokenizer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    model = build_model("qwen2", build_tokenizer(), "teacher", seed=1)
    assert not is_partitioned(model)
    for layer in model.model.layers:
        fully_shard(layer, reshard_after_forward=True)
    fully_shard(model, reshard_after_forward=False)
    units = fsdp2_units(model)
    assert units[0] is model and len(units) == len(model.model.layers) + 1 and is_partitioned(model)

    def sharded():
        return [isinstance(p, DTensor) for p in model.parameters()]

    flags = [fsdp2_reshards_after_forward(unit) for unit in units]
    assert flags == [False] + [True] * len(model.model.layers), flags
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.reshard()  # the root keeps its parameters gathered after its forward (reshard_after_forward=False)
    assert all(sharded())
    with fsdp2_gathered(model), torch.no_grad():
        assert not any(sharded())  # whole: plain tensors, readable directly
        assert not any(fsdp2_reshards_after_forward(unit) for unit in units)
        # the backbone alone (no root forward), twice: nothing is resharded in between
        for _ in range(2):
            hidden = model.model(input_ids=ids).last_hidden_state
            assert not any(sharded())
        logits = hidden @ model.lm_head.weight.t()
    assert all(sharded())
    assert [fsdp2_reshards_after_forward(unit) for unit in units] == flags
    torch.testing.assert_close(logits, expected)
    with fsdp2_gathered(model, gather=False):
        assert all(sharded())
    from transformers.distributed.fsdp import is_fsdp_managed_module
    assert is_fsdp_managed_module(model)  # so `generate` keeps processes in step (`synced_gpus`)
    torch.distributed.destroy_process_group()
    print("OK")
    """
)


def test_gathered_for_a_rollout_and_sharded_again():
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout[-2000:] + out.stderr[-4000:]
