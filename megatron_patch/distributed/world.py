"""Distributed start-up, used by everything that runs megatron-core: the trainer, the layout
checker, the analysis, the benchmarks and the tests.

    init_world(...)            torch.distributed default group (nccl on GPU, gloo + the CPU shims
                               of ``megatron_patch.cpu_compat`` without one) -> this rank's device
    init_model_parallel(...)   megatron's parallel state for a ``Layout`` and every RNG seeded
                               -> the ``ProcessGroupCollection`` to pass on explicitly
    spawn(fn, nprocs, ...)     ``fn(rank, ...)`` in nprocs new processes forming one world
    shutdown()                 tear both down
"""

from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_patch.distributed.layout import Layout

BACKENDS = ("auto", "nccl", "gloo")
T = TypeVar("T")


def decided_on_rank0(decide: Callable[[], T], errors: type[Exception]) -> T:
    """Run ``decide`` on global rank 0 only (file-system decisions: one reader, one answer);
    collective over the default group: every rank returns its result, or raises the error of
    type ``errors`` it raised."""
    outcome: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome[0] = decide()
        except errors as error:
            outcome[0] = error
    dist.broadcast_object_list(outcome, src=0)
    if isinstance(outcome[0], errors):
        raise outcome[0]
    return outcome[0]


def world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else slurm's, else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def free_port() -> int:
    """A TCP port on localhost that is free now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_backend(backend: str = "auto") -> str:
    """``"auto"`` -> ``"nccl"`` with CUDA, else ``"gloo"``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    return backend


def init_world(
    backend: str = "auto",
    *,
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    local_rank: Optional[int] = None,
    store: Optional[dist.Store] = None,
) -> torch.device:
    """Create the default process group of this process unless one exists; returns its device.

    Rank and world size default to the launcher's environment (``world_from_environment``); a
    single process without a launcher rendezvous on a free localhost port. gloo installs the CPU
    shims of ``megatron_patch.cpu_compat`` (before any megatron model exists); nccl selects
    ``cuda:local_rank``.
    """
    env_rank, env_world, env_local = world_from_environment()
    rank = env_rank if rank is None else rank
    world_size = env_world if world_size is None else world_size
    local_rank = env_local if local_rank is None else local_rank
    backend = resolve_backend(backend)
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_patch.cpu_compat import apply_cpu_gloo_patches

        apply_cpu_gloo_patches()
        device = torch.device("cpu")
    if not dist.is_initialized():
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        elif world_size == 1 and "MASTER_PORT" not in os.environ:
            # An explicit init_method: MASTER_PORT in os.environ would leak into subprocesses.
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}",
                                    rank=0, world_size=1)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            dist.init_process_group(backend, rank=rank, world_size=world_size)
    return device


def init_model_parallel(layout: Layout, seed: int):
    """(Re)build megatron's parallel state for ``layout`` over the initialized world and seed
    every RNG (torch's and megatron's model-parallel tracker).

    Returns:
        The ``ProcessGroupCollection`` of megatron's groups, to be passed to whatever reduces
        over them.
    """
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if layout.world_size != dist.get_world_size():
        raise ValueError(
            f"layout {layout} needs {layout.world_size} processes, the world has "
            f"{dist.get_world_size()}"
        )
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    return ProcessGroupCollection.use_mpu_process_groups()


def shutdown() -> None:
    """Tear down megatron's parallel state and the default process group."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def spawn(fn: Callable[..., Any], nprocs: int, *args: Any, backend: str = "auto") -> None:
    """Run ``fn(rank, *args)`` in ``nprocs`` new processes that form one world.

    Each process initializes the world (``init_world``; rendezvous through a file in a temporary
    directory, so there is no port to race for), runs ``fn`` and shuts down, also on error. With
    gloo each process uses one thread: the world shares the machine's cores. ``fn`` must be a
    top-level (picklable) function.
    """
    with tempfile.TemporaryDirectory(prefix="megatron_patch_world_") as workdir:
        mp.spawn(_spawned, args=(fn, nprocs, str(Path(workdir) / "store"), backend, args),
                 nprocs=nprocs, join=True)


def _spawned(rank: int, fn: Callable[..., Any], nprocs: int, store_path: str, backend: str,
             args: tuple) -> None:
    if resolve_backend(backend) == "gloo":
        torch.set_num_threads(1)
    init_world(backend, rank=rank, world_size=nprocs, local_rank=rank,
               store=dist.FileStore(store_path, nprocs))
    try:
        fn(rank, *args)
    finally:
        shutdown()
