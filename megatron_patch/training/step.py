"""One training step's forward and backward on megatron-core's pipeline schedules: the code that
trains, and the code the layout checker runs under every parallel layout.

    micro_batches      the data-parallel rank's micro-batches of one global batch
    run_schedule       forward (and backward) over them: the LM loss, reduced
    forward_backward   a training step up to the optimizer: gradients in ``main_grad``, the LM
                       loss, the per-layer MoE losses and the routing statistics, all reduced
    calibrate          the "auto" loss coefficients from a forward-only pass of a global batch

Data order (megatron's pretraining sampler): global batch i holds samples
``[i * G, (i + 1) * G)``; micro-batch m of data-parallel rank r is the block of ``mbs`` samples
starting at ``i * G + (m * dp + r) * mbs``. Resuming at iteration i therefore continues the exact
sample sequence, and every layout sees the same global batch.

A sample is a mapping with ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` ([s] each) and
optionally ``padding_mask`` ([s] bool, True = padding: left out of the MoE losses and routing
statistics by megatron-core's router and by this package's losses).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.moe_utils import (
    clear_aux_losses_tracker,
    reduce_aux_losses_tracker_across_ranks,
)

from megatron_patch.compat import moe_metric_values
from megatron_patch.moe.attach import ensure_tracked, reported_losses
from megatron_patch.moe.calibration import calibrate_coefficients
from megatron_patch.moe.routing_stats import RoutingStatistics

SAMPLE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN/Inf; the message names the step and the first non-finite layer."""


@dataclass(frozen=True)
class BatchShape:
    """How one global batch is cut: micro-batches per data-parallel rank, their size, length."""

    num_microbatches: int
    micro_batch_size: int
    seq_length: int


@dataclass
class StepOutput:
    """What one step reports, identical on every rank.

    lm_loss: mean token cross-entropy of the global batch (mean over micro-batches of the
        micro-batch mean, averaged over DP ranks).
    moe_losses: tracker name -> per-layer values [num_layers] (megatron's MoE loss logging:
        summed over TP x CP, averaged over DP, gathered over PP, divided by the micro-batches).
    routing: ``RoutingStatistics.reduce``'s load / MaxVio / entropy, when statistics are kept.
    """

    lm_loss: float
    moe_losses: dict[str, torch.Tensor]
    routing: Optional[dict[str, torch.Tensor]] = None


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The model inside megatron's DDP wrapper."""
    return getattr(chunk, "module", chunk)


def micro_batches(
    samples: Sequence, first_sample: int, shape: BatchShape, pg_collection: ProcessGroupCollection,
    device: torch.device,
) -> Iterator[dict[str, torch.Tensor]]:
    """This DP rank's micro-batches of the global batch starting at sample ``first_sample``.

    Args:
        samples: indexable samples (wrapping around at the end).
        pg_collection: ``dp`` is the data-parallel group.
    """
    dp, dp_rank = pg_collection.dp.size(), pg_collection.dp.rank()
    mbs = shape.micro_batch_size
    for m in range(shape.num_microbatches):
        start = first_sample + (m * dp + dp_rank) * mbs
        yield collate([samples[(start + j) % len(samples)] for j in range(mbs)], device)


def collate(rows: Sequence, device: torch.device) -> dict[str, torch.Tensor]:
    """Samples -> one micro-batch ([mbs, s] tensors on ``device``) with the causal attention mask
    ([1, 1, s, s], True = masked out: the local, non-TE attention needs it explicitly)."""
    keys = SAMPLE_KEYS + (("padding_mask",) if "padding_mask" in rows[0] else ())
    batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]).to(device)
             for key in keys}
    seq = batch["tokens"].shape[1]
    batch["attention_mask"] = torch.triu(
        torch.ones(seq, seq, dtype=torch.bool, device=device), 1
    ).view(1, 1, seq, seq)
    return batch


def model_forward(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-token LM losses [mbs, s] of one micro-batch."""
    return model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                 labels=batch["labels"], padding_mask=batch.get("padding_mask"))


def _loss_func(loss_mask: torch.Tensor, output: torch.Tensor):
    """Mean token cross-entropy of a micro-batch over unmasked positions."""
    mask = loss_mask.float().view(-1)
    loss = (output.float().view(-1) * mask).sum() / mask.sum().clamp(min=1.0)
    # The schedule divides the returned loss in place: report a copy.
    return loss, {"lm_loss": loss.detach().clone()}


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    return model_forward(model, batch), partial(_loss_func, batch["loss_mask"])


def run_schedule(
    model: list[torch.nn.Module], batches: Iterator[dict], shape: BatchShape,
    pg_collection: ProcessGroupCollection, forward_only: bool,
) -> float:
    """Forward (and backward) over one global batch; returns the mean LM loss on every rank.

    The loss is computed on the last pipeline stage, averaged over micro-batches and over the
    data-parallel group ``dp``, then summed over the pipeline group ``pp`` (other stages hold 0).
    """
    losses = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=batches, model=model,
        num_microbatches=shape.num_microbatches, seq_length=shape.seq_length,
        micro_batch_size=shape.micro_batch_size, forward_only=forward_only,
    )
    device = next(model[0].parameters()).device
    loss = torch.zeros((), device=device)
    if losses:  # the last pipeline stage
        loss += torch.stack([item["lm_loss"] for item in losses]).mean()
        dist.all_reduce(loss, op=dist.ReduceOp.AVG, group=pg_collection.dp)
    dist.all_reduce(loss, group=pg_collection.pp)
    return loss.item()


def moe_loss_values(
    model: list[torch.nn.Module], num_microbatches: int, pg_collection: ProcessGroupCollection
) -> dict[str, torch.Tensor]:
    """Per-layer MoE losses of the step (reduced like megatron's logging), then cleared.

    Collective: every rank reduces the same names (those the model's config computes), also a
    pipeline stage without MoE layers.
    """
    config = unwrap(model[0]).config
    names = reported_losses(config)
    device = next(model[0].parameters()).device
    ensure_tracked(names, config, pg_collection.tp_cp, device)
    reduce_aux_losses_tracker_across_ranks(names, pg_collection=pg_collection)
    values = {name: moe_metric_values(name).float().cpu() / num_microbatches for name in names}
    clear_aux_losses_tracker()
    return values


def forward_backward(
    model: list[torch.nn.Module], batches: Iterator[dict], shape: BatchShape,
    pg_collection: ProcessGroupCollection,
    routing_statistics: Optional[RoutingStatistics] = None,
) -> StepOutput:
    """One training step up to the optimizer: zeroed gradient buffers, forward and backward over
    the global batch (megatron DDP reduces the gradients into ``main_grad`` and
    ``finalize_model_grads`` finishes them), and what the step reports (``StepOutput``)."""
    for chunk in model:
        chunk.zero_grad_buffer()
    lm_loss = run_schedule(model, batches, shape, pg_collection, forward_only=False)
    moe_losses = moe_loss_values(model, shape.num_microbatches, pg_collection)
    routing = routing_statistics.reduce(pg_collection) if routing_statistics else None
    return StepOutput(lm_loss, moe_losses, routing)


def calibrate(
    model: list[torch.nn.Module], batches: Iterator[dict], shape: BatchShape,
    pg_collection: ProcessGroupCollection,
) -> dict[str, float]:
    """Calibrate the "auto" loss coefficients on one global batch (forward only); collective.

    Returns:
        ``{loss name: coefficient}`` of the calibrated losses (see ``calibrate_coefficients``).
    """
    return calibrate_coefficients(
        model, unwrap(model[0]).config,
        lambda: run_schedule(model, batches, shape, pg_collection, forward_only=True),
        shape.num_microbatches, pg_collection,
    )


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
            model_forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return found[0] if found else None


def check_finite(
    loss: float, iteration: int, model: list[torch.nn.Module],
    first_batch: Optional[Callable[[], dict]],
) -> None:
    """Raise NonFiniteLossError (on every rank) if the step's loss is NaN/Inf; ``first_batch``
    (None: not available, e.g. under pipeline parallelism) gives the step's first micro-batch,
    only then, to name the first module whose output is not finite."""
    if torch.isfinite(torch.tensor(loss)):
        return
    where = first_non_finite_module(model[0], first_batch()) if first_batch is not None else None
    detail = f"; first non-finite output in {where} (this rank)" if where else ""
    raise NonFiniteLossError(
        f"loss is {loss} at iteration {iteration}{detail}. Lower --lr, raise --lr-warmup-iters, "
        "check the data, or resume from the last good checkpoint with --load."
    )
