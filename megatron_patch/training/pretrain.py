"""Pretraining entry point: ``python -m megatron_patch.training.pretrain [flags]`` under torchrun
(``megatron_patch.launch``).

    flags + YAML -> JobConfig (arguments) -> Trainer(job).fit() (trainer) -> summary

Exit status: 0 when training ended or stopped cleanly on SIGTERM/SIGUSR1 (after saving), 2 on
bad input (one ``error:`` line per node, from its local rank 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_patch.data.validation import DataError
from megatron_patch.distributed import shutdown
from megatron_patch.flags import ConfigError
from megatron_patch.launch import USER_ERROR_EXIT, tie_to_launcher
from megatron_patch.training.arguments import parse_args
from megatron_patch.training.checkpoint_files import CheckpointMismatchError, RunLockError
from megatron_patch.training.checkpointing import CheckpointWriteError
from megatron_patch.training.step import NonFiniteLossError
from megatron_patch.training.trainer import Trainer

# Bad input or a failure path with a fix: one clear message (exit status 2), not a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointMismatchError, CheckpointWriteError,
               RunLockError, NonFiniteLossError, FileNotFoundError)


def tensorboard_command(logdir: str) -> str:
    """How to open ``logdir``: the tensorboard beside this interpreter (the venv's) if any."""
    beside = Path(sys.executable).parent / "tensorboard"
    return f"{beside if beside.is_file() else 'tensorboard'} --logdir {logdir}"


def format_summary(summary: dict) -> str:
    lines = ["", "=== training summary ==="]
    if summary.get("nothing_to_train"):
        lines.append("nothing to train: the loaded checkpoint already reached --train-iters "
                     "(raise --train-iters to continue); the results of the run that reached it:")
    lines.append(f"iterations      : {summary['iterations']}")
    if summary["train_loss"] is not None:
        lines.append(f"final train loss: {summary['train_loss']:.4f}")
    if summary["valid_loss"] is not None:
        lines.append(f"final valid loss: {summary['valid_loss']:.4f}")
    if summary["checkpoint"]:
        lines.append(f"checkpoint      : {summary['checkpoint']}")
    if summary.get("hf_export"):
        lines.append(f"hugging face    : {summary['hf_export']}")
    if summary["tensorboard_dir"]:
        lines.append(f"tensorboard     : {tensorboard_command(summary['tensorboard_dir'])}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input, named in the message)."""
    tie_to_launcher()
    try:
        summary = Trainer(parse_args(argv)).fit()
        if dist.get_rank() == 0:
            print(format_summary(summary), flush=True)
    except USER_ERRORS as error:
        if int(os.environ.get("LOCAL_RANK", 0)) == 0:
            print(f"error: {error}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
