"""Pretraining entry point: ``python -m megatron_patch.training.pretrain [flags]`` under torchrun.

    initialize -> tokenizer + datasets -> model + optimizer -> resume or calibrate -> train loop
    (forward/backward over the global batch, optimizer step, logging, validation, checkpoints,
    SIGTERM/SIGUSR1 save-and-exit) -> summary
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.data.datasets import build_train_valid_datasets
from megatron_patch.data.validation import DataError
from megatron_patch.data.tokenizer import load_tokenizer
from megatron_patch.moe.calibration import (
    calibrate_coefficients,
    needs_calibration,
    reconcile_coefficients,
)
from megatron_patch.moe.coefficients import recording_only
from megatron_patch.moe.config import SpecializationConfigError
from megatron_patch.moe.metrics import enable_routing_stats, reduce_routing_stats
from megatron_patch.optimizer.orthogonal import (
    OrthogonalExpertOptimizer,
    OrthogonalOptimizerConfig,
    OrthogonalOptimizerError,
)
from megatron_patch.training.arguments import ArgumentError, parse_args
from megatron_patch.training.checkpointing import (
    CheckpointMismatchError,
    latest_iteration,
    load_checkpoint,
    model_signature,
    save_checkpoint,
)
from megatron_patch.training.initialize import initialize, shutdown
from megatron_patch.training.logger import MetricsLogger
from megatron_patch.training.loop import (
    NonFiniteLossError,
    check_finite,
    micro_batches,
    moe_loss_values,
    run_schedule,
)
from megatron_patch.training.model import build_config, build_model
from megatron_patch.training.optimizer import build_optimizer

# Bad input: reported as one clear message (exit status 2) instead of a traceback.
USER_ERRORS = (
    ArgumentError, DataError, CheckpointMismatchError, SpecializationConfigError,
    NonFiniteLossError, FileNotFoundError, OrthogonalOptimizerError,
)


class _ExitSignal:
    """Remembers SIGTERM/SIGUSR1 (slurm preemption); all ranks agree on it once per step."""

    def __init__(self) -> None:
        self.received: Optional[int] = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def any_rank(self, device: torch.device) -> bool:
        return _any_rank(self.received is not None, device)


def _num_microbatches(args: argparse.Namespace) -> int:
    dp = parallel_state.get_data_parallel_world_size()
    return args.global_batch_size // (args.micro_batch_size * dp)


def _evaluate(model, valid_ds, args, device, num_microbatches: int) -> float:
    for chunk in model:
        chunk.eval()
    losses = []
    with torch.no_grad():
        for i in range(args.eval_iters):
            batches = micro_batches(valid_ds, i * args.global_batch_size, num_microbatches,
                                    args, device)
            losses.append(run_schedule(model, batches, num_microbatches, args, forward_only=True))
    for chunk in model:
        chunk.train()
    return sum(losses) / len(losses)


def _step_scalars(loss: float, moe: dict, routing: dict, grad_norm, lr: float,
                  tokens_per_s: float) -> dict[str, float]:
    scalars = {"lm_loss": loss, "lr": lr, "tokens_per_s": tokens_per_s}
    if grad_norm is not None:
        scalars["grad_norm"] = float(grad_norm)
    for name, per_layer in moe.items():
        moe_layers = per_layer[per_layer != 0]
        scalars[name] = float(moe_layers.mean()) if moe_layers.numel() else 0.0
    scalars["max_vio"] = float(routing["max_vio"].mean())
    scalars["routing_entropy"] = float(routing["entropy"].mean())
    return scalars


def _per_layer_scalars(moe: dict, routing: dict) -> dict[str, float]:
    scalars = {}
    for name, per_layer in moe.items():
        for i, value in enumerate(per_layer.tolist()):
            scalars[f"{name}_layer_{i}"] = value
    for i, (vio, ent, load) in enumerate(zip(routing["max_vio"].tolist(),
                                             routing["entropy"].tolist(), routing["load"])):
        scalars[f"max_vio_moe_layer_{i}"] = vio
        scalars[f"routing_entropy_moe_layer_{i}"] = ent
        for e, share in enumerate(load.tolist()):
            scalars[f"load_moe_layer_{i}_expert_{e}"] = share
    return scalars


def _any_rank(flag: bool, device: torch.device) -> bool:
    """``flag`` OR-reduced over all ranks (e.g. a pipeline stage without MoE layers)."""
    value = torch.tensor(float(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def train(args: argparse.Namespace) -> dict:
    """Run the whole job; returns the summary (also written to ``--save``/summary.json)."""
    exit_signal = _ExitSignal()  # before any slow set-up, so an early preemption is not lost
    device = initialize(args)
    tokenizer = load_tokenizer(args.tokenizer_model)
    config = build_config(args)
    model = build_model(args, config, tokenizer.vocab_size)
    optimizer, scheduler = build_optimizer(args, model)
    signature = model_signature(args, tokenizer.vocab_size)
    num_microbatches = _num_microbatches(args)

    if args.moe_orthogonal_optimizer:
        optimizer = OrthogonalExpertOptimizer(
            optimizer, model, OrthogonalOptimizerConfig.from_args(args)
        )
    iteration, consumed, load_messages = 0, 0, []
    load_dir, finetune = args.load, args.finetune
    if finetune and args.save and latest_iteration(args.save) is not None:
        # A fine-tuning job that was interrupted: continue it rather than start it again.
        load_dir, finetune = args.save, False
        load_messages.append(f"--finetune: --save {args.save} already holds this run's "
                             "checkpoints; resuming them instead of starting again from --load")
    if load_dir:
        restored = load_checkpoint(
            load_dir, model, optimizer, scheduler, signature=signature, finetune=finetune
        )
        iteration, consumed = restored.iteration, restored.consumed_samples
        if restored.path is not None:
            start = "fine-tuning from its weights, at iteration 0" if finetune else (
                f"resuming at iteration {iteration}")
            load_messages.append(f"loaded {restored.path}: {start}")
        load_messages += reconcile_coefficients(
            model, config, restored.saved_args, fresh=finetune
        )
    if args.moe_orthogonal_optimizer:
        optimizer.start_at(iteration)
    train_ds, valid_ds = build_train_valid_datasets(
        args.data_path, args.split, args.seq_length, args.seed,
        train_samples=args.train_iters * args.global_batch_size,
        valid_samples=max(args.eval_iters, 1) * args.global_batch_size,
        tokenizer=tokenizer, valid_data_path=args.valid_data_path,
        cache_path=args.data_cache_path, is_built_on_rank=lambda: True,
    )
    logger = MetricsLogger(args, iteration)
    for line in load_messages:
        logger.message(line)
    uncalibrated = _any_rank(needs_calibration(model), device)
    enable_routing_stats(config.num_layers, config.num_moe_experts, device)
    tokens_per_step = args.global_batch_size * args.seq_length
    last_save, valid_loss, loss = None, None, None
    while iteration < args.train_iters:
        if uncalibrated and iteration >= args.moe_loss_calibration_iters:
            coeffs = calibrate_coefficients(
                model, config,
                lambda: run_schedule(model, micro_batches(train_ds, consumed, num_microbatches,
                                                          args, device),
                                     num_microbatches, args, forward_only=True),
                num_microbatches,
            )
            uncalibrated = False
            logger.message(f"calibrated coefficients at iteration {iteration}: {coeffs}")
            logger.write("calibration", iteration, coeffs)
        start = time.perf_counter()
        for chunk in model:
            chunk.zero_grad_buffer()
        optimizer.zero_grad()
        # Before calibration ('auto' with --moe-loss-calibration-iters) the losses are only logged.
        with recording_only() if uncalibrated else contextlib.nullcontext():
            loss = run_schedule(
                model, micro_batches(train_ds, consumed, num_microbatches, args, device),
                num_microbatches, args, forward_only=False,
            )
        check_finite(loss, iteration + 1, model, next(micro_batches(
            train_ds, consumed, 1, args, device)) if args.pipeline_model_parallel_size == 1
            else None)
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        iteration += 1
        consumed += args.global_batch_size
        moe = moe_loss_values(num_microbatches)
        routing = reduce_routing_stats()
        elapsed = time.perf_counter() - start
        scalars = _step_scalars(loss, moe, routing, grad_norm,
                                optimizer.param_groups[0]["lr"], tokens_per_step / elapsed)
        if iteration % args.log_interval == 0:
            logger.write("train", iteration, scalars)
            if args.log_per_layer_moe_metrics:
                logger.write("moe", iteration, _per_layer_scalars(moe, routing))
        logger.step(iteration, scalars)
        if valid_ds is not None and args.eval_iters > 0 and (
            iteration % args.eval_interval == 0 or iteration == args.train_iters
        ):
            valid_loss = _evaluate(model, valid_ds, args, device, num_microbatches)
            logger.write("valid", iteration, {"lm_loss": valid_loss})
            logger.message(f"iteration {iteration}: valid loss {valid_loss:.4f}")
        stop = exit_signal.any_rank(device) or (
            args.exit_interval is not None and iteration >= args.exit_interval
        )
        periodic = args.save_interval and iteration % args.save_interval == 0
        if args.save and (periodic or stop or iteration == args.train_iters):
            last_save = save_checkpoint(
                args.save, iteration, model, optimizer, scheduler, consumed_samples=consumed,
                signature=signature, keep_last=args.keep_last, args=args,
            )
            logger.message(f"saved checkpoint {last_save}")
        if stop:
            logger.message(f"stopping after iteration {iteration} (exit signal or --exit-interval)")
            break
    logger.close()
    summary = {
        "iterations": iteration,
        "train_loss": loss,
        "valid_loss": valid_loss,
        "checkpoint": str(last_save) if last_save else None,
        "tensorboard_dir": args.tensorboard_dir,
    }
    if args.save and dist.get_rank() == 0:
        (Path(args.save) / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _print_summary(summary: dict) -> None:
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
    print("\n".join(lines), flush=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command-line entry; returns the exit status (2 for bad input, named in the message)."""
    try:
        args = parse_args(argv)
        summary = train(args)
        if dist.get_rank() == 0:
            _print_summary(summary)
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
