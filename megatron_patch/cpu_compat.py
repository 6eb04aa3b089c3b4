"""CPU/gloo compatibility shims for megatron-core 0.16.1 to 0.19 (used only when no GPU is present).

megatron-core assumes CUDA devices and NCCL. To run its parallel layouts (TP with SP, PP with the
1F1B schedule, EP with the alltoall dispatcher, ETP, DP with megatron DDP, dist_checkpointing) as
several gloo processes on one CPU machine, `apply_cpu_gloo_patches()` installs the shims below.
It does nothing when `torch.cuda.is_available()`, so the GPU path is never altered, and it is
idempotent. Every shim replaces something that would otherwise raise on a CPU-only machine
(missing CUDA runtime, a collective gloo rejects, an assert) or, for `torch.cuda.manual_seed`,
silently do nothing, so working code paths keep their behaviour.

Shims, and why:

1. `torch.cuda.current_device` -> CPU device. Called for `device=` of new tensors throughout
   (router, experts, attention, p2p communication, mappings, checkpointing).
2. `torch.cuda.synchronize` -> no-op. p2p communication (PP) and checkpoint saving call it.
3. `torch.cuda.Stream` / `current_stream` / `stream` -> inert stand-ins. The alltoall token
   dispatcher builds a device-to-host side stream, records an event on it and synchronizes
   with it; on CPU every operation is already synchronous.
4. `torch.cuda.manual_seed` -> `torch.manual_seed` (so `model_parallel_cuda_manual_seed` seeds
   the default generator of the device in use, as on GPU), and the RNG tracker class it creates
   -> `CpuRNGStatesTracker`, which keeps named states of the CPU generator and swaps them in
   `fork()` (the CUDA tracker reads CUDA generator states). Apply the patches before the
   tracker is first created.
5. `torch.Tensor.cuda` -> identity. Tied word embeddings move the shared weight with `.cuda()`
   before all-reducing it over the embedding group (first and last pipeline stage).
6. `device="cuda"` literals in `pipeline_parallel.schedules` (token counter) and `moe_utils`
   (tracker initialisation in `track_moe_metrics`): those modules see a `torch` whose tensor
   factories map a CUDA device to the CPU (`_CpuFactoryTorch`).
7. gloo `all_to_all_single` rejects tensors as split sizes; on GPU the alltoall dispatcher hands
   it numpy arrays (moved to host), on CPU the splits stay tensors. Converted to Python lists.
8. gloo `all_gather` rejects tensors of different shapes (the alltoall dispatcher's uneven
   gather over the expert-TP group when ETP > 1). Emulated by padding dim 0 to the largest size.
9. `WrappedTorchNorm` (the local spec's norm without apex/TE) asserts `not sequence_parallel`.
   With SP the norm is built as usual and its parameters are tagged `sequence_parallel = True`,
   exactly as megatron's `FusedLayerNorm` does, so `finalize_model_grads` all-reduces their grads
   over the TP group (each TP rank only sees its sequence shard).
10. megatron's optimizer (`get_megatron_optimizer`): its `device="cuda"` scalars (FP32Optimizer,
    grad-norm helpers in `clip_grads` and `megatron.core.utils`) see the CPU-mapping `torch`, and
    `clip_grad_by_total_norm_fp32` (asserts CUDA tensors, scales with a CUDA kernel) is replaced
    by a plain in-place scaling. The training loop thus runs megatron's optimizer on CPU too.
11. Activation recomputation (`tensor_parallel.checkpoint`, used by `--recompute-granularity`
    and MoE recompute) saves and restores the CUDA RNG state around the recomputed forward. On
    CPU there is none: `_get_cuda_rng_state` returns the CPU state and `_set_cuda_rng_state` does
    nothing (the CPU state itself is restored by megatron's `_set_all_rng_states`).

12. DeepSpeed (optional, `megatron_patch.deepspeed`): on its CPU accelerator the first
    `deepspeed.init_distributed` JIT-compiles a shared-memory all-reduce op (a C++ build of one
    to two minutes on every fresh machine). `use_gloo_for_deepspeed_comm()` makes
    `deepspeed.comm` use plain gloo collectives instead, which give the same results.
13. Megatron-LM's own training loop (`megatron.training`, used by `megatron_patch.megatron_lm`):
    `apply_megatron_training_patches()` gives its modules a `torch.cuda` of one device, the CPU,
    and skips its CUDA JIT warm-up (see that function).
14. Multi-latent attention (DeepSeek-V2/V3 models imported by `megatron_patch.hf`): without
    Transformer Engine, megatron-core's TE extension still imports, with mock objects for its
    classes, so `multi_latent_attention.HAVE_TE` is True and `MLASelfAttention` calls
    `isinstance(linear_proj, <mock TELinear>)`, which raises. `HAVE_TE` is set to whether
    `TELinear` is a class.

Not needed and not shimmed: context parallel, virtual pipeline, overlap_grad_reduce, persistent
async checkpoint save. dist_checkpointing save additionally needs `psutil` installed and a
`if __name__ == "__main__":` guard in the saving script (its writer process is spawned).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import types
from typing import Any, Iterator, Optional, Sequence

import torch
import torch.distributed

_APPLIED = False
_CPU = torch.device("cpu")


# --- 3. inert CUDA stream/event stand-ins ------------------------------------------------------


class _CpuEvent:
    """Stand-in for `torch.cuda.Event`: CPU work is synchronous, so it is always complete."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuStream:
    """Stand-in for `torch.cuda.Stream`: one synchronous queue, nothing to wait for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, stream: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Optional[_CpuEvent] = None) -> _CpuEvent:
        return event if event is not None else _CpuEvent()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _CpuStream()


# --- 4. CPU RNG tracker ------------------------------------------------------------------------


def _make_cpu_rng_tracker_class() -> type:
    """Build `CpuRNGStatesTracker` (subclass of megatron's tracker, so isinstance checks hold)."""
    from megatron.core.tensor_parallel import random as mc_random

    class CpuRNGStatesTracker(mc_random.CudaRNGStatesTracker):
        """Named states of the CPU default generator; `fork(name)` runs its body on that state.

        Same contract as `CudaRNGStatesTracker`: the state advanced inside a fork is kept for the
        next fork of the same name, and the caller's state is restored on exit (nesting works).
        """

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            self.seeds_.add(seed)
            if name in self.states_:
                raise Exception(f"cpu rng state {name} already exists")
            outer_state = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer_state)

        @contextlib.contextmanager
        def fork(self, name: str = mc_random._MODEL_PARALLEL_RNG_TRACKER_NAME) -> Iterator[None]:
            if name not in self.states_:
                raise Exception(f"cpu rng state {name} is not added")
            outer_state = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer_state)

    return CpuRNGStatesTracker


# --- 6. `torch` seen by modules that hard-code device="cuda" -----------------------------------


def _cpu_if_cuda(device: Any) -> Any:
    if device is not None and torch.device(device).type == "cuda":
        return _CPU
    return device


def _on_cpu(factory: Any) -> staticmethod:
    """``factory`` with a CUDA ``device`` argument mapped to the CPU."""

    def create(*args: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return factory(*args, device=_cpu_if_cuda(device), **kwargs)

    return staticmethod(create)


class _CpuFactoryTorch(types.ModuleType):
    """The `torch` module, except that tensor factories map a CUDA `device` to the CPU."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    zeros = _on_cpu(torch.zeros)
    ones = _on_cpu(torch.ones)
    empty = _on_cpu(torch.empty)
    empty_like = _on_cpu(torch.empty_like)
    full = _on_cpu(torch.full)
    tensor = _on_cpu(torch.tensor)
    arange = _on_cpu(torch.arange)
    rand = _on_cpu(torch.rand)
    randn = _on_cpu(torch.randn)


class _OneDeviceCuda(types.ModuleType):
    """`torch.cuda` as Megatron-LM's training loop must see it on CPU (shim 13): one device (the
    CPU), no-op device and memory management, the CPU's RNG state; the rest is `torch.cuda`."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)

    is_available = staticmethod(lambda: True)
    device_count = staticmethod(lambda: 1)
    set_device = staticmethod(lambda device: None)
    empty_cache = staticmethod(lambda: None)
    reset_peak_memory_stats = staticmethod(lambda device=None: None)
    memory_allocated = staticmethod(lambda device=None: 0)
    max_memory_allocated = staticmethod(lambda device=None: 0)
    memory_reserved = staticmethod(lambda device=None: 0)
    max_memory_reserved = staticmethod(lambda device=None: 0)
    get_rng_state = staticmethod(lambda device="cuda": torch.get_rng_state())
    set_rng_state = staticmethod(lambda state, device="cuda": torch.set_rng_state(state))


class _OneDeviceTorch(_CpuFactoryTorch):
    """`_CpuFactoryTorch` whose `cuda` is `_OneDeviceCuda`."""

    cuda = _OneDeviceCuda("torch.cuda")


# --- 7./8. gloo collectives --------------------------------------------------------------------


def _as_split_list(split_sizes: Any) -> Optional[list]:
    if split_sizes is None:
        return None
    if torch.is_tensor(split_sizes):
        return split_sizes.tolist()
    return [int(s) for s in split_sizes]


def _wrap_all_to_all_single(original):
    def all_to_all_single(
        output: torch.Tensor,
        input: torch.Tensor,
        output_split_sizes: Any = None,
        input_split_sizes: Any = None,
        group: Any = None,
        async_op: bool = False,
    ):
        """`all_to_all_single` with tensor/array split sizes given to gloo as Python lists."""
        return original(
            output,
            input,
            output_split_sizes=_as_split_list(output_split_sizes),
            input_split_sizes=_as_split_list(input_split_sizes),
            group=group,
            async_op=async_op,
        )

    return all_to_all_single


def _wrap_all_gather(original):
    def all_gather(
        tensor_list: Sequence[torch.Tensor],
        tensor: torch.Tensor,
        group: Any = None,
        async_op: bool = False,
    ):
        """`all_gather`; outputs of different dim-0 sizes are gathered through padded buffers."""
        if len({tuple(t.shape) for t in tensor_list}) <= 1:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        assert not async_op, "uneven all_gather emulation on gloo is synchronous only"
        rows = max(t.shape[0] for t in tensor_list)
        padded = tensor.new_zeros((rows, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        buffers = [torch.empty_like(padded) for _ in tensor_list]
        original(buffers, padded, group=group)
        for out, buf in zip(tensor_list, buffers):
            out.copy_(buf[: out.shape[0]])
        return None

    return all_gather


# --- 9. sequence-parallel tagging of the plain torch norm --------------------------------------


def _patch_wrapped_torch_norm() -> None:
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    original_new = WrappedTorchNorm.__new__

    def __new__(cls, config, hidden_size, *args: Any, **kwargs: Any) -> torch.nn.Module:
        if not config.sequence_parallel:
            return original_new(cls, config, hidden_size, *args, **kwargs)
        norm = original_new(
            cls, dataclasses.replace(config, sequence_parallel=False), hidden_size, *args, **kwargs
        )
        for param in norm.parameters():
            param.sequence_parallel = True
        return norm

    WrappedTorchNorm.__new__ = staticmethod(__new__)


def _clip_grad_by_total_norm_fp32_cpu(
    parameters: Sequence[torch.Tensor],
    max_norm: float,
    total_norm: float,
    use_decoupled_grad: bool = False,
) -> None:
    """megatron's `clip_grad_by_total_norm_fp32` without its CUDA-tensor assert and CUDA buffer."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _patch_megatron_optimizer(cpu_torch: types.ModuleType) -> None:
    """Let megatron's own optimizer stack (FP32Optimizer over torch AdamW, ChainedOptimizer with
    model-parallel grad norms) run on CPU: its `device="cuda"` scalars map to the CPU and the
    grad clipping skips the CUDA-only multi-tensor kernel."""
    from megatron.core import utils as mc_utils
    from megatron.core.optimizer import clip_grads, optimizer

    for module in (optimizer, clip_grads, mc_utils):
        module.torch = cpu_torch
    optimizer.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32_cpu


def apply_cpu_gloo_patches() -> None:
    """Install the CPU/gloo shims listed in the module docstring; no-op if CUDA is available.

    Call once per process before building megatron models or process groups (it imports
    megatron-core). Idempotent.
    """
    global _APPLIED
    if _APPLIED or torch.cuda.is_available():
        return

    torch.cuda.current_device = lambda: _CPU
    torch.cuda.synchronize = lambda device=None: None
    torch.cuda.Stream = _CpuStream
    torch.cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    torch.cuda.stream = lambda stream: contextlib.nullcontext()
    torch.cuda.manual_seed = torch.manual_seed
    torch.Tensor.cuda = lambda self, *args, **kwargs: self

    torch.distributed.all_to_all_single = _wrap_all_to_all_single(
        torch.distributed.all_to_all_single
    )
    torch.distributed.all_gather = _wrap_all_gather(torch.distributed.all_gather)

    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer.moe import moe_utils

    cpu_torch = _CpuFactoryTorch("torch")  # one stand-in for all such modules
    for module in (schedules, moe_utils):
        module.torch = cpu_torch

    mc_random.CudaRNGStatesTracker = _make_cpu_rng_tracker_class()
    mc_random._get_cuda_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    mc_random._set_cuda_rng_state = lambda *args, **kwargs: None
    _patch_wrapped_torch_norm()
    _patch_megatron_optimizer(cpu_torch)
    from megatron.core.transformer import multi_latent_attention

    multi_latent_attention.HAVE_TE = isinstance(multi_latent_attention.TELinear, type)
    _APPLIED = True


def apply_megatron_training_patches() -> None:
    """Shim 13: Megatron-LM's training loop (``megatron.training``, megatron-core 0.19's wheel) on
    CPU; no-op if CUDA is available. Call after ``apply_cpu_gloo_patches`` and before
    ``pretrain()`` (imports ``megatron.training``).

    ``pretrain()`` asserts CUDA, creates model-parallel groups and seeds only with a CUDA device,
    warms up JIT fusions on CUDA tensors and makes CUDA tensors for flags, timestamps and loss
    logging; its rerun state machine saves the CUDA RNG state. Those modules see a `torch` whose
    `cuda` is one device, the CPU (`_OneDeviceTorch`), and the JIT warm-up is skipped (there is
    nothing to compile for on CPU).
    """
    if torch.cuda.is_available():
        return
    from megatron.core import rerun_state_machine
    from megatron.training import checkpointing, initialize, training
    from megatron.training.utils import common_utils

    one_device = _OneDeviceTorch("torch")
    for module in (initialize, training, common_utils, checkpointing, rerun_state_machine):
        module.torch = one_device
    training.set_jit_fusion_options = lambda *args, **kwargs: None


def use_gloo_for_deepspeed_comm() -> None:
    """Shim 12: `deepspeed.comm` on CPU uses gloo, not its JIT-built shared-memory op.

    Call before `deepspeed.init_distributed`; no-op if CUDA is available. Imports deepspeed.
    """
    if torch.cuda.is_available():
        return
    # `deepspeed.comm.torch` as an attribute is the torch package; the backend module is by name.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
