"""Parts 1 and 3 of the loss benchmark: the loss functions against the naive loops of
``megatron_patch.moe.reference``, and the cost of the losses alone against the expert compute as
T, k and H grow."""

from __future__ import annotations

import functools
from typing import Callable

import torch

from megatron_patch.benchmarks.layers import EXPERT_GEMMS, expert_gemm
from megatron_patch.benchmarks.sizes import SEED, LayerSize, Plan, sweep_points
from megatron_patch.benchmarks.timing import log, median_times
from megatron_patch.moe.losses import orthogonality_loss, variance_loss
from megatron_patch.moe.reference import naive_pairwise, naive_span, naive_variance


def loss_pairs(eps: float = 1e-6) -> dict[str, tuple[Callable, Callable, str]]:
    """name -> (naive, vectorized, input kind) for each loss."""
    return {
        "L_o span": (naive_span, functools.partial(orthogonality_loss, form="span", eps=eps),
                     "outputs"),
        "L_o pairwise": (functools.partial(naive_pairwise, eps=eps),
                         functools.partial(orthogonality_loss, form="pairwise", eps=eps),
                         "outputs"),
        "L_v": (naive_variance, variance_loss, "scores"),
    }


def loss_input(kind: str, size: LayerSize, tokens: int, dtype: torch.dtype,
               device: torch.device, requires_grad: bool) -> torch.Tensor:
    """Random expert outputs [T, k, H] (kind "outputs") or softmax routing scores [T, E]."""
    gen = torch.Generator(device).manual_seed(SEED)
    if kind == "outputs":
        x = torch.randn(tokens, size.topk, size.hidden, generator=gen, device=device)
    else:
        x = torch.softmax(torch.randn(tokens, size.experts, generator=gen, device=device), -1)
    return x.to(dtype).requires_grad_(requires_grad)


def run_loss(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
             backward: bool) -> torch.Tensor:
    """The scalar loss ``fn(x)``: forward only without autograd, or forward and backward."""
    if not backward:
        with torch.no_grad():
            return fn(x)
    x.grad = None
    loss = fn(x)
    loss.backward()
    return loss


def bench_losses(plan: Plan, device: torch.device) -> list[dict]:
    """Part 1: microseconds per token of each loss, naive (small T) vs vectorized (large T)."""
    rows = []
    size, small_t = plan.loss_base, plan.naive_tokens
    for name, (naive, fast, kind) in loss_pairs().items():
        row = {"loss": name, "T_naive": small_t, "T_fast": size.tokens}
        for backward in (False, True):
            small = loss_input(kind, size, small_t, plan.dtype, device, backward)
            large = loss_input(kind, size, size.tokens, plan.dtype, device, backward)
            times = median_times(
                {"naive": functools.partial(run_loss, naive, small, backward),
                 "fast": functools.partial(run_loss, fast, large, backward)},
                device, reps=max(1, plan.reps // 3), warmup=1)
            key = "fwd_bwd" if backward else "fwd"
            row[f"naive_{key}_us"] = times["naive"] / small_t * 1e6
            row[f"fast_{key}_us"] = times["fast"] / size.tokens * 1e6
        small = loss_input(kind, size, small_t, plan.dtype, device, False)
        with torch.no_grad():
            ref, got = naive(small).double(), fast(small).double()
        row["rel_diff"] = ((got - ref).abs() / ref.abs().clamp(min=1e-30)).item()
        rows.append(row)
        log(f"[1] {name}: {row}")
    return rows


def loss_step(outputs: torch.Tensor, scores: torch.Tensor) -> None:
    """L_o (span, the default) + L_v forward+backward, as the layer adds them."""
    outputs.grad = scores.grad = None
    (orthogonality_loss(outputs) + variance_loss(scores)).backward()


def bench_loss_scaling(plan: Plan, device: torch.device) -> list[dict]:
    """Part 3: L_o + L_v fwd+bwd time vs the expert GEMM estimate at each sweep point."""
    rows = []
    for size in sweep_points(plan.loss_base):
        outputs, scores = (loss_input(kind, size, size.tokens, plan.dtype, device, True)
                           for kind in ("outputs", "scores"))
        times = median_times({"loss": functools.partial(loss_step, outputs, scores),
                              "gemm": expert_gemm(size, plan.dtype, device)},
                             device, plan.reps, plan.warmup)
        loss_s, expert_s = times["loss"], EXPERT_GEMMS * times["gemm"]
        rows.append({"size": size, "loss_s": loss_s, "expert_s": expert_s})
        log(f"[3] {size.label()}: losses {loss_s * 1e3:.2f} ms, experts ~{expert_s * 1e3:.2f} ms")
    return rows
