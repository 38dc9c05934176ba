"""``accelerate launch ... tests/fsdp2_on_cpu.py ARGS``: the ``t3s`` command with accelerate's FSDP
branch on CPU processes.

accelerate applies an FSDP config only to accelerator processes (its `AcceleratorState`
never sets ``DistributedType.FSDP`` for ``MULTI_CPU``), so on a CPU machine the shipped
`examples/accelerate_fsdp2.yaml` trains with DDP. FSDP2 itself (``fully_shard`` over
gloo) runs on CPU; this launcher turns the FSDP branch on for CPU processes, as
accelerate does for GPU ones, so that the command's stages run with their model
sharded by accelerate's own `fsdp2_prepare_model`, as on GPUs. Test use only.
"""

import os
import sys

from accelerate import state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if (self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None
            and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"):
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        # as accelerate does at the end of its own FSDP branch: later AcceleratorState()
        # calls copy PartialState's distributed_type back
        state.PartialState._shared_state["distributed_type"] = self.distributed_type


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from t3s.cli import main
    sys.exit(main(sys.argv[1:]))
