"""Test-only shim (tests/scale/test_fsdp.py): lets accelerate run its FSDP2 path on CPU processes over gloo.

accelerate 1.15 turns a launch with an FSDP config into ``DistributedType.FSDP`` only for accelerator devices
(CUDA, XPU, NPU, ...): a CPU-only multi-process launch becomes ``MULTI_CPU`` and the FSDP plugin is dropped, so
``finegrain <command> --accelerate_config fsdp2`` on CPU trains with DDP instead (docs/scaling.md, "FSDP2 on CPU").
PyTorch's ``fully_shard`` itself runs on CPU with gloo (torch 2.13). With ``FINEGRAIN_TEST_FSDP_ON_CPU=1`` in the
environment and this directory on ``PYTHONPATH``, every Python process (the launcher's children included) patches
``AcceleratorState`` so that such a launch keeps ``DistributedType.FSDP`` and its plugin, and prints one line per
sharded model, which the test counts. Nothing else changes: finegrain's loop, accelerate's ``fsdp2_prepare_model``,
``clip_grad_norm_`` and ``get_state_dict`` run as they would on GPUs.
"""

import os

if os.environ.get("FINEGRAIN_TEST_FSDP_ON_CPU") == "1":
    import accelerate.accelerator as _accelerator
    import accelerate.state as _state
    from accelerate.utils import DistributedType as _DistributedType

    _init = _state.AcceleratorState.__init__

    def _fsdp_on_cpu_init(self, *args, fsdp_plugin=None, **kwargs):
        _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == _DistributedType.MULTI_CPU and fsdp_plugin is not None:
            self.distributed_type = _DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            # every later AcceleratorState() copies the partial state's type over its own
            _state.PartialState._shared_state["distributed_type"] = _DistributedType.FSDP

    _state.AcceleratorState.__init__ = _fsdp_on_cpu_init

    _prepare = _accelerator.fsdp2_prepare_model

    def _announced_prepare(accelerator, model):
        out = _prepare(accelerator, model)
        sharded = sum(type(p).__name__ == "DTensor" for p in out.parameters())
        # one write(2) of a short line, so that the two ranks' lines cannot interleave on the shared pipe
        # (print writes the text and its newline apart; CI once read "...parametersfsdp2-on-cpu: rank 1 ...")
        os.write(2, f"fsdp2-on-cpu: rank {accelerator.process_index} sharded {sharded} parameters\n".encode())
        return out

    _accelerator.fsdp2_prepare_model = _announced_prepare
