"""One training step, evaluation and the micro-batch stream, on megatron-core's pipeline schedules.

Data order (megatron's pretraining sampler): global batch i holds samples
``[i * G, (i + 1) * G)``; micro-batch m of data-parallel rank r is the block of ``mbs`` samples
starting at ``i * G + (m * dp + r) * mbs``. Resuming at iteration i therefore continues the exact
sample sequence, and every layout sees the same global batch.
"""

from __future__ import annotations

import argparse
from functools import partial
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    get_moe_layer_wise_logging_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

MOE_LOSS_NAMES = (
    "load_balancing_loss", "seq_load_balancing_loss", "global_load_balancing_loss", "z_loss",
    "ortho_loss", "var_loss",
)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the first non-finite layer."""


def micro_batches(
    dataset, first_sample: int, num_microbatches: int, args: argparse.Namespace,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample ``first_sample``."""
    dp = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    mbs = args.micro_batch_size
    for m in range(num_microbatches):
        start = first_sample + (m * dp + dp_rank) * mbs
        samples = [dataset[(start + j) % len(dataset)] for j in range(mbs)]
        batch = {
            key: torch.stack([torch.as_tensor(s[key]) for s in samples]).to(device)
            for key in ("tokens", "labels", "loss_mask", "position_ids")
        }
        seq = batch["tokens"].shape[1]
        # True = masked out; the local (non-TE) attention needs the explicit causal mask.
        batch["attention_mask"] = torch.triu(
            torch.ones(seq, seq, dtype=torch.bool, device=device), 1
        ).view(1, 1, seq, seq)
        yield batch


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Mean token cross-entropy of a micro-batch over unmasked positions."""
    mask = loss_mask.float().view(-1)
    loss = (output.float().view(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    # The schedule divides the returned loss in place: report a copy.
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(
        batch["tokens"], batch["position_ids"], batch["attention_mask"], labels=batch["labels"]
    )
    return output, partial(_loss_func, batch["loss_mask"])


def run_schedule(
    model: list[torch.nn.Module], batches: Iterator[dict], num_microbatches: int,
    args: argparse.Namespace, forward_only: bool,
) -> float:
    """Forward (and backward) over one global batch; returns the mean LM loss on every rank.

    The loss is computed on the last pipeline stage, averaged over micro-batches and over the
    data-parallel group, then summed over the pipeline group (other stages hold 0).
    """
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=batches, model=model,
        num_microbatches=num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, forward_only=forward_only,
    )
    device = next(model[0].parameters()).device
    loss = torch.zeros((), device=device)
    if parallel_state.is_pipeline_last_stage():
        loss += torch.stack([item["lm_loss"] for item in losses]).mean()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=parallel_state.get_data_parallel_group())
    dist.all_reduce(loss, group=parallel_state.get_pipeline_model_parallel_group())
    return loss.item()


def moe_loss_values(num_microbatches: int) -> dict[str, torch.Tensor]:
    """Per-layer MoE losses of the step (reduced like megatron's logging), then cleared."""
    tracker = get_moe_layer_wise_logging_tracker()
    names = [name for name in MOE_LOSS_NAMES if name in tracker]
    reduce_aux_losses_tracker_across_ranks(names)
    values = {name: tracker[name]["values"].float().cpu() / num_microbatches for name in names}
    clear_aux_losses_tracker()
    return values


def first_non_finite_module(model: torch.nn.Module, batch: dict) -> Optional[str]:
    """Re-run ``batch`` forward with hooks; the name of the first layer with a NaN/Inf output."""
    found: list[str] = []
    handles = []
    for name, module in model.named_modules():
        if name.count(".") > 4:
            continue

        def hook(mod, inputs, output, name=name):
            out = output[0] if isinstance(output, tuple) else output
            if not found and torch.is_tensor(out) and not torch.isfinite(out).all():
                found.append(name)

        handles.append(module.register_forward_hook(hook))
    try:
        with torch.no_grad():
            model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                  labels=batch["labels"])
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def check_finite(
    loss: float, iteration: int, model: list[torch.nn.Module], batch: Optional[dict]
) -> None:
    """Raise NonFiniteLossError (on every rank) if the step's loss is NaN/Inf."""
    if torch.isfinite(torch.tensor(loss)):
        return
    where = first_non_finite_module(model[0], batch) if batch is not None else None
    detail = f"; first non-finite output in {where} (this rank)" if where else ""
    raise NonFiniteLossError(
        f"loss is {loss} at iteration {iteration}{detail}. Lower --lr, raise --lr-warmup-iters, "
        "check the data, or resume from the last good checkpoint with --load."
    )
