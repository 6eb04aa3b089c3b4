"""The loss benchmark's five parts, measured in one run on one device."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_patch.benchmarks.collectives import bench_collectives
from megatron_patch.benchmarks.layers import bench_layer
from megatron_patch.benchmarks.losses import bench_loss_scaling, bench_losses
from megatron_patch.benchmarks.sizes import SEED, Plan
from megatron_patch.benchmarks.tail import bench_tail
from megatron_patch.distributed import Layout, init_model_parallel, init_world, shutdown


@dataclass
class Results:
    """Rows of each part, as the report sections read them."""

    losses: list[dict]  # part 1
    layers: list[dict]  # part 2
    sweep_layers: list[dict]  # part 3, layer overhead at other k
    scaling: list[dict]  # part 3, losses alone at the sweep points
    collectives: Optional[dict]  # part 4; None on GPU
    tails: list[dict]  # part 5, at the sizes of parts 2 and 3


def run(plan: Plan, device: torch.device) -> Results:
    """Parts 1, 2, 3 and 5 in this process (a one-process world: nccl on GPU, gloo on CPU), then
    on CPU part 4 in a spawned 2-process gloo world."""
    init_world("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    init_model_parallel(Layout(), SEED)
    losses = bench_losses(plan, device)
    layers = [bench_layer(size, plan, device) for size in plan.layer_sizes]
    sweep_layers = [bench_layer(size, plan, device) for size in plan.layer_sweep]
    scaling = bench_loss_scaling(plan, device)
    tails = [bench_tail(r["size"], plan, device, r["expert_s"]) for r in layers + sweep_layers]
    shutdown()
    collectives = bench_collectives() if device.type == "cpu" else None
    return Results(losses=losses, layers=layers, sweep_layers=sweep_layers, scaling=scaling,
                   collectives=collectives, tails=tails)
