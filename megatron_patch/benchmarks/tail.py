"""Part 5 of the loss benchmark: the marginal cost of L_o where the layer computes it, the combine
tail (gates alone vs gates + Gram matrices + span L_o), per L_o kernel."""

from __future__ import annotations

import functools
from typing import Optional

import torch

from megatron_patch.benchmarks.sizes import LOSS_COEFF, SEED, LayerSize, Plan
from megatron_patch.benchmarks.timing import (
    log,
    median_times,
    peak_memory_delta,
    saved_for_backward_bytes,
)
from megatron_patch.moe.gated_gram import apply_gates, gated_gram
from megatron_patch.moe.grouping import TokenSlots, token_slot_rows
from megatron_patch.moe.losses import projection_norms

TailInputs = tuple[torch.Tensor, torch.Tensor, TokenSlots, torch.Tensor]


def tail_inputs(size: LayerSize, dtype: torch.dtype, device: torch.device) -> TailInputs:
    """What the combine tail holds: [T*k, H] unweighted rows in a shuffled (permuted) order,
    their [T*k] gates, the token slot map, and the output gradient."""
    gen = torch.Generator(device).manual_seed(SEED)
    num_rows = size.tokens * size.topk
    row_to_token = torch.arange(size.tokens, device=device).repeat_interleave(size.topk)
    row_to_token = row_to_token[torch.randperm(num_rows, generator=gen, device=device)]
    slots = token_slot_rows(row_to_token, size.tokens, size.topk)
    rows = torch.randn(num_rows, size.hidden, generator=gen, device=device).to(dtype)
    gates = torch.rand(num_rows, generator=gen, device=device)
    grad = torch.randn(num_rows, size.hidden, generator=gen, device=device).to(dtype)
    return rows.requires_grad_(True), gates.requires_grad_(True), slots, grad


def tail_forward(rows: torch.Tensor, gates: torch.Tensor, slots: TokenSlots,
                 kernel: Optional[str]) -> list[torch.Tensor]:
    """Gates (kernel None), or gates + Gram + span L_o (beta = LOSS_COEFF): [gated, loss]."""
    if kernel is None:
        return [apply_gates(rows, gates)]
    gated, gram = gated_gram(rows, gates, slots, kernel=kernel)
    return [gated, LOSS_COEFF * projection_norms(gram).mean()]


def tail_step(rows: torch.Tensor, gates: torch.Tensor, slots: TokenSlots, grad: torch.Tensor,
              kernel: Optional[str]) -> None:
    """``tail_forward`` and its backward."""
    rows.grad = gates.grad = None
    outputs = tail_forward(rows, gates, slots, kernel)
    torch.autograd.backward(outputs, [grad, None][:len(outputs)])


def tail_traffic(rows: torch.Tensor) -> int:
    """Least bytes the tail moves: forward reads the [T*k, H] rows and writes the gated rows,
    backward reads the rows and the output gradient and writes the rows' gradient."""
    return 5 * rows.numel() * rows.element_size()


def bench_tail(size: LayerSize, plan: Plan, device: torch.device, expert_s: float) -> dict:
    """Part 5: median fwd+bwd of the combine tail without and with L_o, per kernel."""
    rows, gates, slots, grad = tail_inputs(size, plan.dtype, device)
    steps = {"gates": functools.partial(tail_step, rows, gates, slots, grad, None)}
    for kernel in plan.kernels:
        steps[kernel] = functools.partial(tail_step, rows, gates, slots, grad, kernel)
    times = median_times(steps, device, plan.reps, plan.warmup)
    memory, saved = {}, {}
    for name, step in steps.items():
        rows.grad = gates.grad = None
        memory[name] = peak_memory_delta(step, device)
        kernel = None if name == "gates" else name
        saved[name] = saved_for_backward_bytes(
            functools.partial(tail_forward, rows, gates, slots, kernel), [rows, gates])
    row = {"size": size, "time": times, "memory": memory, "expert_s": expert_s,
           "traffic": tail_traffic(rows), "saved": saved}
    log(f"[5] {size.label()}: {times}")
    return row
