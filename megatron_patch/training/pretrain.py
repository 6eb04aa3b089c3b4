"""Pretraining entry point: ``python -m megatron_patch.training.pretrain [flags]`` under torchrun.

    flags + YAML -> JobConfig (arguments) -> Trainer(job).fit() (trainer) -> summary
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_patch.data.validation import DataError
from megatron_patch.distributed import shutdown
from megatron_patch.flags import ConfigError
from megatron_patch.training.arguments import parse_args
from megatron_patch.training.checkpointing import CheckpointMismatchError
from megatron_patch.training.step import NonFiniteLossError
from megatron_patch.training.trainer import Trainer

# Bad input: reported as one clear message (exit status 2) instead of a traceback.
USER_ERRORS = (ConfigError, DataError, CheckpointMismatchError, NonFiniteLossError,
               FileNotFoundError)


def format_summary(summary: dict) -> str:
    lines = ["", "=== training summary ===", f"iterations      : {summary['iterations']}"]
    if summary["train_loss"] is None:
        lines.append("nothing to train: the loaded checkpoint already reached --train-iters")
    else:
        lines.append(f"final train loss: {summary['train_loss']:.4f}")
    if summary["valid_loss"] is not None:
        lines.append(f"final valid loss: {summary['valid_loss']:.4f}")
    if summary["checkpoint"]:
        lines.append(f"checkpoint      : {summary['checkpoint']}")
    if summary["tensorboard_dir"]:
        lines.append(f"tensorboard     : tensorboard --logdir {summary['tensorboard_dir']}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input, named in the message)."""
    try:
        summary = Trainer(parse_args(argv)).fit()
        if dist.get_rank() == 0:
            print(format_summary(summary), flush=True)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
