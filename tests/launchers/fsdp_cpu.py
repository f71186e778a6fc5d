"""`python -m torch.distributed.run … tests/launchers/fsdp_cpu.py unlearn …`: the `sku` CLI with
accelerate's FSDP2 on CPU processes over gloo, for tests on a machine without GPUs.

accelerate enables FSDP for GPU kinds only: on CPU `--use_fsdp` silently becomes MULTI_CPU
(DDP), which `sku unlearn` refuses. This launcher turns that one decision around once
AcceleratorState is built, from the same FSDP_* environment `accelerate launch --use_fsdp`
sets, so everything after it runs as on GPUs: fsdp2_prepare_model's fully_shard, the sharded
save_state/load_state, get_state_dict's gather of the full state on the main process.
"""

import sys

from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

_init = AcceleratorState.__init__


def _init_with_fsdp(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU:
        plugin = FullyShardedDataParallelPlugin()  # reads FSDP_VERSION, FSDP_AUTO_WRAP_POLICY…
        if self._mixed_precision != "no":
            plugin.set_mixed_precision(self._mixed_precision)
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, plugin


AcceleratorState.__init__ = _init_with_fsdp

if __name__ == "__main__":
    from sku.cli import main

    sys.exit(main())
