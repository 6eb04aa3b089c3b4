"""Console progress bar, metrics.jsonl, TensorBoard and wandb logging (global rank 0 only)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import torch.distributed as dist
from tqdm import tqdm

from megatron_patch.moe.names import LOSS_LABELS
from megatron_patch.training.config import JobConfig

# Console names of the headline metrics, in display order.
CONSOLE_KEYS = {
    "lm_loss": "loss",
    **LOSS_LABELS,
    "max_vio": "MaxVio",
    "tokens_per_s": "tok/s",
}


class MetricsLogger:
    """Writes scalars to the console, TensorBoard (``--tensorboard-dir``) and wandb
    (``--wandb-project``; offline unless ``WANDB_API_KEY`` is set or ``WANDB_MODE`` says otherwise).
    Only global rank 0 writes; other ranks hold a no-op logger."""

    def __init__(self, job: JobConfig, start_iteration: int) -> None:
        self.active = not dist.is_initialized() or dist.get_rank() == 0
        self.bar: Optional[tqdm] = None
        self.tensorboard = None
        self.wandb_run = None
        self.jsonl = None
        if not self.active:
            return
        logging, save = job.logging, job.checkpoint.save
        if save:
            # Full-precision record of every logged step, appended across resumes.
            Path(save).mkdir(parents=True, exist_ok=True)
            self.jsonl = open(Path(save) / "metrics.jsonl", "a")
        if not logging.no_progress_bar:
            self.bar = tqdm(
                total=job.training.train_iters, initial=start_iteration, desc="train", unit="it",
                dynamic_ncols=True, file=sys.stdout, mininterval=0.5,
            )
        if logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=logging.tensorboard_dir)
        if logging.wandb_project:
            import wandb

            mode = os.environ.get("WANDB_MODE") or (
                "online" if os.environ.get("WANDB_API_KEY") else "offline"
            )
            self.wandb_run = wandb.init(
                project=logging.wandb_project, name=logging.wandb_exp_name, config=job.to_dict(),
                dir=logging.wandb_save_dir or logging.tensorboard_dir or ".", mode=mode,
            )

    def write(self, prefix: str, iteration: int, scalars: dict[str, float]) -> None:
        """Send ``scalars`` under ``prefix/`` to TensorBoard and wandb."""
        if not self.active:
            return
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"split": prefix, "iteration": iteration, **scalars}) + "\n")
            self.jsonl.flush()
        for name, value in scalars.items():
            if self.tensorboard is not None:
                self.tensorboard.add_scalar(f"{prefix}/{name}", value, iteration)
        if self.wandb_run is not None:
            self.wandb_run.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=iteration)

    def step(self, iteration: int, scalars: dict[str, float]) -> None:
        """Advance the progress bar to ``iteration`` showing the headline metrics."""
        if not self.active:
            return
        shown = {}
        for key, label in CONSOLE_KEYS.items():
            if key in scalars:
                value = scalars[key]
                shown[label] = f"{value:.0f}" if key == "tokens_per_s" else f"{value:.4g}"
        if self.bar is not None:
            self.bar.update(iteration - self.bar.n)
            self.bar.set_postfix(shown, refresh=False)
        else:
            print(f"iter {iteration}: " + " ".join(f"{k}={v}" for k, v in shown.items()),
                  flush=True)

    def message(self, text: str) -> None:
        """A line on the console that does not break the progress bar."""
        if not self.active:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stdout)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
