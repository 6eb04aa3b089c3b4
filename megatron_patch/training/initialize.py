"""Process groups and seeds: torchrun/slurm environment -> torch.distributed -> megatron parallel state."""

from __future__ import annotations

import argparse
import os
import socket

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from megatron_patch.training.arguments import validate_args


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def world_from_environment() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's variables, else slurm's, else one process."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def initialize(args: argparse.Namespace) -> torch.device:
    """Validate sizes, create the process groups, seed every RNG; returns this rank's device.

    On a machine without GPUs the gloo backend is used and ``megatron_patch.cpu_compat`` shims
    are installed; on GPUs, NCCL and ``cuda:LOCAL_RANK``.
    """
    rank, world_size, local_rank = world_from_environment()
    validate_args(args, world_size)
    backend = args.distributed_backend
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        from megatron_patch.cpu_compat import apply_cpu_gloo_patches

        apply_cpu_gloo_patches()
        device = torch.device("cpu")
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if world_size == 1:
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    init_model_parallel(
        tp=args.tensor_model_parallel_size,
        pp=args.pipeline_model_parallel_size,
        ep=args.expert_model_parallel_size,
        etp=args.expert_tensor_parallel_size,
        seed=args.seed,
    )
    return device


def init_model_parallel(*, tp: int, pp: int, ep: int, etp: int, seed: int) -> None:
    """(Re)build megatron's parallel state over the initialized world and seed every RNG
    (torch's and megatron's model-parallel tracker)."""
    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def shutdown() -> None:
    """Tear down the parallel state and the process group."""
    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
