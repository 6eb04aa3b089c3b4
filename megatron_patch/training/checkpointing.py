"""Atomic, resumable, reshardable checkpoints through ``megatron.core.dist_checkpointing``.

The directory layout, integrity checks and pruning are in ``checkpoint_files``. A checkpoint is
written into ``iter_N.tmp`` and renamed to ``iter_N`` by rank 0 only after every rank has
finished writing; the ``latest`` file is replaced atomically afterwards. A crash during a save
(or a full disk, reported with the path and the size needed) therefore leaves the previous
checkpoint and the ``latest`` pointer untouched. Only the last ``--keep-last`` checkpoints are
kept. Before loading, the newest checkpoint's files are checked (global rank 0); a damaged one is
reported with the file and the damage and the newest intact one is loaded instead (or the run
stops, with ``--no-checkpoint-fallback``).

A checkpoint holds the model (including the calibrated L_o / L_v coefficients and the router's
expert bias, which are module buffers), the optimizer (reshardable), the LR scheduler, the
iteration and consumed samples (the data position), the model signature (checked before any tensor
is loaded), the job's configuration (``JobConfig.to_dict``, from which tools rebuild the model)
and the per-rank RNG states (restored when the world size is unchanged). With
``finetune`` only the model is restored and training starts at iteration 0 (Megatron's
``--finetune``).
"""

from __future__ import annotations

import errno
import os
import queue
import random
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patch.distributed import decided_on_rank0
from megatron_patch.optimizer.orthogonal import STATE_KEY as ORTHOGONAL_STATE_KEY
from megatron_patch.training.checkpoint_files import (
    LATEST_FILE,
    CheckpointMismatchError,
    checkpoint_path,
    choose_checkpoint,
    directory_bytes,
    latest_iteration,
    prune_old,
)
from megatron_patch.training.config import JobConfig
from megatron_patch.training.step import unwrap

# Flags that fix parameter shapes: a checkpoint only loads into a model with the same values.
SIGNATURE_FLAGS = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size",
    "moe_layer_freq", "swiglu", "normalization", "position_embedding_type",
    "untie_embeddings_and_output_weights", "max_position_embeddings",
)


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (a full disk); the message names the path, the size
    needed and the newest intact checkpoint."""


def model_signature(job: JobConfig, vocab_size: int, tokenizer: str) -> dict[str, Any]:
    """The flag values that determine parameter shapes, the vocabulary size and the tokenizer's
    fingerprint (``data.provenance``)."""
    flat = job.flat()
    signature = {flag: flat[flag] for flag in SIGNATURE_FLAGS}
    signature["vocab_size"] = vocab_size
    signature["tokenizer_model"] = tokenizer
    return signature


def saved_job(common: dict[str, Any]) -> Optional[JobConfig]:
    """The configuration of the run that wrote a checkpoint (its common state): ``job``, or the
    flat ``args`` of checkpoints written before the configuration had sections; None if neither
    (older still)."""
    if common.get("job") is not None:
        return JobConfig.from_dict(common["job"])
    if common.get("args") is not None:
        return JobConfig.from_flat(common["args"])
    return None


def _rng_state() -> dict[str, Any]:
    state = {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


# Optimizer state keyed by parameter (no "chained_<i>." prefix) in a reshardable format, so the
# moments map onto the parameters of another TP/PP layout.
OPTIMIZER_METADATA = {
    "chained_optim_avoid_prefix": True,
    "distrib_optim_sharding_type": "fully_reshardable",
}


def _num_optimizers(optimizer: MegatronOptimizer) -> int:
    """Dense and expert parameters get separate optimizers when experts are expert-parallel."""
    return len(getattr(optimizer, "chained_optimizers", [optimizer]))


def _sharded_state(
    model: list[torch.nn.Module],
    optimizer: Optional[MegatronOptimizer],
    scheduler: OptimizerParamScheduler,
    common: dict[str, Any],
    is_loading: bool,
) -> dict[str, Any]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model_state = unwrap(model[0]).sharded_state_dict()
    state = {"model": model_state}
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            model_state, is_loading=is_loading, metadata=OPTIMIZER_METADATA
        )
    return {
        **state,
        "scheduler": scheduler.state_dict(),
        "rng_state": ShardedObject(
            f"rng_state_world{world}", _rng_state(), (world,), (rank,), replica_id=0
        ),
        **common,
    }


def use_in_process_results_queue() -> None:
    """Give dist_checkpointing's writer an in-process results queue (synchronous saves).

    By default its first save starts a *spawned* multiprocessing Manager to host the queue: ~2-3 s
    of CPU per process, and a process in the worker's process group that a signal sent to the
    whole group (torchrun's or slurm's preemption SIGTERM) kills, so that the preemption save
    fails with BrokenPipeError. The saves here are synchronous: the function that puts the write
    results and the one that reads them both run in this process (only the per-bucket writers
    are forked, with their own queue), so a thread-safe ``queue.Queue`` is enough. (An
    ``mp.Queue`` is not: its ``put`` goes through a feeder thread, and megatron's immediate
    ``get_nowait`` can find it still empty.)
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def save_checkpoint(
    root: str,
    iteration: int,
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    *,
    consumed_samples: int,
    signature: dict[str, Any],
    keep_last: int,
    job: Optional[JobConfig] = None,
) -> Path:
    """Collective: write ``iter_<iteration>`` atomically, update ``latest``, prune old ones."""
    use_in_process_results_queue()
    final = checkpoint_path(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if dist.get_rank() == 0:
        Path(root).mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    dist.barrier()
    common = {
        "iteration": iteration,
        "consumed_samples": consumed_samples,
        "signature": signature,
        "world_size": dist.get_world_size(),
        "num_optimizers": _num_optimizers(optimizer),
        "orthogonal_optimizer_state": bool(getattr(optimizer, "representations", None)),
        # The run's configuration, so tools (e.g. the specialization analysis) rebuild the model.
        "job": job.to_dict() if job is not None else None,
    }
    try:
        dist_checkpointing.save(
            _sharded_state(model, optimizer, scheduler, common, is_loading=False), str(tmp)
        )
    except Exception as error:
        if not _no_space(error):
            raise
        raise _disk_full(root, tmp, iteration) from None
    dist.barrier()
    if dist.get_rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        pointer_tmp = Path(root) / (LATEST_FILE + ".tmp")
        pointer_tmp.write_text(f"{iteration}\n")
        os.replace(pointer_tmp, Path(root) / LATEST_FILE)
        prune_old(root, keep_last)
    dist.barrier()
    return final


def _no_space(error: BaseException) -> bool:
    """``error`` (or what it wraps, e.g. a writer process's failure) is a full disk."""
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full(root: str, tmp: Path, iteration: int) -> CheckpointWriteError:
    """The error for a full disk, after removing the partial save."""
    shutil.rmtree(tmp, ignore_errors=True)
    latest = latest_iteration(root)
    previous = checkpoint_path(root, latest) if latest is not None else None
    needed = (f"about {directory_bytes(previous) / 2**30:.2f} GiB (the size of {previous})"
              if previous is not None else "as much as the model and optimizer state")
    free = shutil.disk_usage(root).free / 2**30
    kept = (f"the newest complete checkpoint {previous} is intact" if previous is not None
            else "no earlier checkpoint exists")
    return CheckpointWriteError(
        f"no space left on the device of {root} while saving iteration {iteration} into {tmp}: "
        f"it needs {needed}, {free:.2f} GiB are free. Free space there or point --save at "
        f"another filesystem, then resume; {kept}.")


# Entries of the common state that loading relies on ("orthogonal_optimizer_state" and "job"
# came later and have defaults).
REQUIRED_COMMON = ("iteration", "consumed_samples", "signature", "world_size", "num_optimizers")


def check_common_state(common: dict[str, Any], where: Path) -> None:
    """Raise CheckpointMismatchError if the checkpoint's common state lacks what loading needs:
    a checkpoint written by an earlier layout of this package (or by another tool)."""
    missing = [key for key in REQUIRED_COMMON if key not in common]
    if missing:
        raise CheckpointMismatchError(
            f"checkpoint {where} lacks {', '.join(missing)} in its common state: it was not "
            "written by this version of megatron_patch's pretraining (its optimizer-state layout "
            "may differ too). Resume it with the version that wrote it, or start this run in a "
            "new --save/--load directory."
        )


def check_signature(saved: dict[str, Any], expected: dict[str, Any], where: Path) -> None:
    """Raise CheckpointMismatchError naming every differing shape flag."""
    diffs = [
        f"--{key.replace('_', '-')}: checkpoint {saved[key]!r}, this run {value!r}"
        for key, value in expected.items()
        if key in saved and saved[key] != value  # keys a checkpoint lacks came later
    ]
    if diffs:
        raise CheckpointMismatchError(
            f"checkpoint {where} was saved from another model shape:\n  "
            + "\n  ".join(diffs)
            + "\nPass the checkpoint's values for these flags, or point --load elsewhere."
        )


@dataclass
class Restored:
    """What ``load_checkpoint`` restored: where training continues, the saved run's
    configuration, and warnings for the user (damaged checkpoints skipped)."""

    iteration: int = 0
    consumed_samples: int = 0
    saved_job: Optional[JobConfig] = None
    path: Optional[Path] = None
    messages: list[str] = field(default_factory=list)


def load_checkpoint(
    root: str,
    model: list[torch.nn.Module],
    optimizer: MegatronOptimizer,
    scheduler: OptimizerParamScheduler,
    *,
    signature: dict[str, Any],
    finetune: bool = False,
    fallback: bool = True,
) -> Restored:
    """Collective: restore the newest intact checkpoint under ``root``.

    Args:
        finetune: restore the model only (weights and buffers); the optimizer, LR schedule, data
            position and RNG start fresh, at iteration 0.
        fallback: a damaged newest checkpoint makes way for the newest intact one (with a
            warning in ``Restored.messages``); False raises instead.

    Returns:
        The iteration and consumed samples to continue from (0 with ``finetune``, or when
        ``root`` holds no checkpoint), and the checkpoint's run configuration.

    Raises:
        CheckpointMismatchError: another model shape (or tokenizer), or no intact checkpoint,
            before any tensor is read.
    """
    iteration, messages = decided_on_rank0(lambda: choose_checkpoint(root, fallback),
                                           CheckpointMismatchError)
    if iteration is None:
        return Restored(messages=messages)
    where = checkpoint_path(root, iteration)
    common = dist_checkpointing.load_common_state_dict(str(where))
    check_common_state(common, where)
    check_signature(common["signature"], signature, where)
    if finetune:
        state = dist_checkpointing.load(
            {"model": unwrap(model[0]).sharded_state_dict()}, str(where)
        )
        unwrap(model[0]).load_state_dict(state["model"])
        return Restored(saved_job=saved_job(common), path=where, messages=messages)
    same_world = common["world_size"] == dist.get_world_size()
    # Expert parallelism on one side only changes how megatron splits the optimizer into dense and
    # expert parts; their states cannot be mapped onto each other.
    load_optimizer = common["num_optimizers"] == _num_optimizers(optimizer)
    request = _sharded_state(
        model, optimizer if load_optimizer else None, scheduler, {}, is_loading=True
    )
    if not same_world:
        del request["rng_state"]
    if load_optimizer and not common.get("orthogonal_optimizer_state"):
        if request["optimizer"].pop(ORTHOGONAL_STATE_KEY, None) is not None and dist.get_rank() == 0:
            warnings.warn(
                f"{where} holds no recorded expert representations (saved without "
                "--moe-orthogonal-subspace representations): orthogonal steps before the next "
                "recording window are plain steps."
            )
    state = dist_checkpointing.load(request, str(where))
    unwrap(model[0]).load_state_dict(state["model"])
    if load_optimizer:
        optimizer.load_state_dict(state["optimizer"])
    elif dist.get_rank() == 0:
        warnings.warn(
            f"{where} was saved with expert parallelism "
            f"{'on' if common['num_optimizers'] > 1 else 'off'} and this run has it "
            f"{'on' if _num_optimizers(optimizer) > 1 else 'off'}: model, coefficients, schedule "
            "and data position are restored, the Adam moments restart from zero."
        )
    scheduler.load_state_dict(state["scheduler"])
    if same_world:
        _set_rng_state(state["rng_state"])
    return Restored(common["iteration"], common["consumed_samples"], saved_job(common), where,
                    messages)
