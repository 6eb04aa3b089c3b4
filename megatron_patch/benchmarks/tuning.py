"""Launch settings of the fused gates + Gram kernel of L_o, timed side by side on one device.

For each size (bf16 combined rows [T*k, H] in permuted order, dropless) it times the forward+
backward of: the gates alone (``apply_gates``, megatron-core's own work in the combine tail), the
torch L_o kernel (gates + regroup + batched Gram products), and the Triton kernel under each
launch setting (H tile x warps), with the achieved GB/s over the tail's least traffic
(``tail_traffic``) and the marginal time over the gates alone.
"""

from __future__ import annotations

import functools
from typing import Callable, Optional

import torch

from megatron_patch.benchmarks.sizes import LayerSize
from megatron_patch.benchmarks.tail import tail_inputs, tail_traffic
from megatron_patch.benchmarks.timing import log, median_times
from megatron_patch.moe.gated_gram import apply_gates, gated_gram
from megatron_patch.moe.grouping import TokenSlots

# (H, k, T): DeepSeek-MoE-16B-like, Mixtral-like, DeepSeek-V3-like.
SIZES = ((2048, 6, 16384), (4096, 2, 8192), (7168, 8, 4096))
SMOKE_SIZES = ((40, 3, 16), (64, 2, 8))
BLOCK_H = (64, 128, 256, 512)
NUM_WARPS = (4, 8)
MAX_PRODUCTS = 16384  # largest [SLOTS, SLOTS, BLOCK_H] float32 block one program may hold

GramKernel = Callable[[torch.Tensor, torch.Tensor, TokenSlots], tuple[torch.Tensor, torch.Tensor]]


def step(rows: torch.Tensor, gates: torch.Tensor, slots: TokenSlots, grad: torch.Tensor,
         kernel: Optional[GramKernel]) -> None:
    """Forward+backward of the gates alone (kernel None) or of gates + Gram [T, k, k] (the Gram
    matrices' sum as their loss)."""
    rows.grad = gates.grad = None
    if kernel is None:
        apply_gates(rows, gates).backward(grad)
        return
    gated, gram = kernel(rows, gates, slots)
    torch.autograd.backward([gated, gram.sum()], [grad, None])


def variants(hidden: int, topk: int) -> dict[str, Optional[GramKernel]]:
    """label -> kernel: the gates alone, the torch kernel, and the Triton kernel at every launch
    setting that fits (and always at ``default_launch``, marked '(default)')."""
    from megatron_patch.moe.triton_gated_gram import Launch, default_launch, triton_gated_gram

    kernels: dict[str, Optional[GramKernel]] = {
        "gates alone": None,
        "torch": functools.partial(gated_gram, kernel="torch"),
    }
    slots_pow2 = 1 << (topk - 1).bit_length()
    default = default_launch(topk, hidden)
    for block_h in BLOCK_H:
        if slots_pow2 * slots_pow2 * block_h > MAX_PRODUCTS or block_h > 2 * hidden:
            continue
        for num_warps in NUM_WARPS:
            launch = Launch(block_h, num_warps)
            tag = " (default)" if launch == default else ""
            kernels[f"triton {block_h} x {num_warps}w{tag}"] = functools.partial(
                triton_gated_gram, launch=launch)
    if f"triton {default.block_h} x {default.num_warps}w (default)" not in kernels:
        kernels[f"triton {default.block_h} x {default.num_warps}w (default)"] = (
            functools.partial(triton_gated_gram, launch=default))
    return kernels


def size_rows(hidden: int, topk: int, tokens: int, device: torch.device, reps: int,
              warmup: int) -> list[str]:
    """The table rows of one size: ms, GB/s and marginal ms of every variant."""
    size = LayerSize(hidden=hidden, ffn=0, experts=0, topk=topk, tokens=tokens)
    rows, gates, slots, grad = tail_inputs(size, torch.bfloat16, device)
    traffic = tail_traffic(rows)
    seconds = median_times(
        {label: functools.partial(step, rows, gates, slots, grad, kernel)
         for label, kernel in variants(hidden, topk).items()}, device, reps, warmup)
    times = {label: value * 1e3 for label, value in seconds.items()}
    log(f"{hidden} {topk} {tokens}: {times}")
    best = min((label for label in times if label.startswith("triton")), key=times.get)
    lines = []
    for label, ms in times.items():
        marginal = "" if label == "gates alone" else f"{ms - times['gates alone']:.3f}"
        mark = " **fastest triton**" if label == best else ""
        lines.append(f"| {hidden} | {topk} | {tokens} | {label}{mark} | {ms:.3f} | "
                     f"{traffic / ms / 1e6:,.0f} | {marginal} |")
    return lines


def tune(device: torch.device, smoke: bool) -> str:
    """The Markdown table over all sizes (tiny ones, 1 repetition, with ``smoke``)."""
    sizes, reps, warmup = (SMOKE_SIZES, 1, 0) if smoke else (SIZES, 20, 3)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"# Fused L_o kernel launch settings: {name}", "",
             f"torch {torch.__version__}; bf16; median of {reps} fwd+bwd after {warmup} warm-up. "
             "'default' marks `default_launch`.", "",
             "| H | k | T | variant | ms | GB/s | marginal over gates ms |",
             "|---|---|---|---|---|---|---|"]
    for hidden, topk, tokens in sizes:
        lines += size_rows(hidden, topk, tokens, device, reps, warmup)
    return "\n".join(lines) + "\n"
