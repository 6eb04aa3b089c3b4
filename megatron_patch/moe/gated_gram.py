"""The gates and the Gram matrices of L_o, read from the combined rows in one call.

``SpecializationMoELayer`` holds, after the combine all-to-all, each routed (token, expert) pair's
unweighted output as one row. It needs the rows multiplied by their gates (megatron-core's
output) and, per token, the Gram matrix of its k rows (L_o). ``kernel="torch"`` regroups the rows
into [T, k, H] and multiplies; ``kernel="triton"`` does both in one fused pass
(``megatron_patch.moe.triton_gated_gram``), on CUDA.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

from megatron_patch.moe.grouping import TokenSlots, gather_slots
from megatron_patch.moe.losses import gram_matrices

GRAM_KERNELS: tuple[str, ...] = ("torch", "triton")


def triton_kernel_problem() -> Optional[str]:
    """Why ``kernel="triton"`` cannot run in this process (None when it can)."""
    if importlib.util.find_spec("triton") is None:
        return (
            "--moe-ortho-loss-kernel triton needs the triton package (bundled with CUDA builds "
            "of PyTorch); install it or use --moe-ortho-loss-kernel torch."
        )
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return (
            "--moe-ortho-loss-kernel triton needs a CUDA GPU (or TRITON_INTERPRET=1 to test the "
            "kernel on CPU, slowly); use --moe-ortho-loss-kernel torch."
        )
    return None


def apply_gates(rows: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
    """[N, H] rows times their [N] gate probabilities, in the rows' dtype."""
    return (rows * gates.unsqueeze(-1)).to(rows.dtype)


def gated_gram(
    rows: torch.Tensor, gates: torch.Tensor, slots: TokenSlots, kernel: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gate-weighted rows and the per-token Gram matrices of the unweighted rows.

    Args:
        rows: [N, H] unweighted expert outputs, one per routed (token, expert) pair.
        gates: [N] gate probabilities of the rows.
        slots: which rows are each token's k slots (``megatron_patch.moe.grouping``).
        kernel: ``"torch"`` or ``"triton"`` (CUDA; float32/bf16/fp16 rows; every row in a slot).

    Returns:
        gated: [N, H] ``rows * gates`` in the rows' dtype.
        gram: [T, k, k] X_t X_t^T over token t's slots (zero rows in empty slots), float32
            (float64 for float64 rows with the torch kernel).
    """
    if kernel == "triton":
        from megatron_patch.moe.triton_gated_gram import triton_gated_gram

        return triton_gated_gram(rows, gates, slots)
    if kernel != "torch":
        raise ValueError(f"unknown L_o kernel {kernel!r}; choose one of {GRAM_KERNELS}")
    return apply_gates(rows, gates), gram_matrices(gather_slots(rows, slots))
