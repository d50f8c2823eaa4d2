"""Run accelerate's FSDP2 path on CPU processes over gloo, for the tests.

Accelerate only enters FSDP mode for accelerator backends: on CPU it reports `MULTI_CPU` and drops the FSDP plugin, so
the student would silently run under DDP. `install()` changes that one decision: when an `AcceleratorState` is built
with an FSDP plugin on a `MULTI_CPU` launch, the state's distributed type becomes `FSDP` and the plugin is kept.
Everything after it is the real code path: accelerate's `fsdp2_prepare_model` (`fully_shard` per decoder layer,
the embeddings and head units, rank 0's weights broadcast with `cpu_ram_efficient_loading`), FSDP2's all-gathers and
reduce-scatters (over gloo), transformers' FSDP checkpointing, and trl-kd's teacher sharding. Not exercised here:
NCCL, CUDA streams and mixed-precision kernels (see docs/distributed.md).
"""

from __future__ import annotations

import accelerate.state
from accelerate.utils import DistributedType


ENV = "TRL_KD_TEST_FSDP_OVER_GLOO"  # set by tests/test_distributed.py; run_trainers.py then calls `install()`


def install() -> None:
    original = accelerate.state.AcceleratorState.__init__
    if getattr(original, "_fsdp_over_gloo", False):
        return

    def __init__(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # the shared state: later `AcceleratorState()`s copy the distributed type from `PartialState`
            accelerate.state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    __init__._fsdp_over_gloo = True
    accelerate.state.AcceleratorState.__init__ = __init__
