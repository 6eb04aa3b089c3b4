"""Gates and per-token Gram matrices fused in Triton: L_o adds no pass over the expert outputs.

Unfused, L_o reads the combined rows [N, H] twice more than megatron-core does (the regrouping
copy into [T, k, H] and the Gram product) and, in backward, writes the regrouped gradient,
scatters it back and adds it to the gates' gradient. Here the gate multiplication, which reads
every row anyway, also accumulates each token's k x k Gram matrix, and the gates' backward, which
reads every row and its output gradient and writes its gradient anyway, also adds
``(dG + dG^T) X``. One program per token; the token's rows are gathered by the slot map, so
no [T, k, H] copy is made and none is saved for backward. Products and sums run in float32.

Import only where Triton is installed (CUDA PyTorch wheels bundle it). On CPU the kernels run
under Triton's interpreter (``TRITON_INTERPRET=1``), which the tests use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_patch.moe.grouping import TokenSlots


@triton.jit
def _token_slots(gates_ptr, slot_rows_ptr, TOPK: tl.constexpr, SLOTS: tl.constexpr):
    """This program's token: its slots' row indices (-1 if empty), which are filled, their gates
    (float32), and the offsets of its [SLOTS, SLOTS] block in a [T, k, k] tensor (and mask)."""
    token = tl.program_id(0).to(tl.int64)
    slot = tl.arange(0, SLOTS)
    in_topk = slot < TOPK
    row = tl.load(slot_rows_ptr + token * TOPK + slot, mask=in_topk, other=-1)
    present = row >= 0
    gate = tl.load(gates_ptr + row, mask=present, other=0.0).to(tl.float32)
    pair = token * TOPK * TOPK + slot[:, None] * TOPK + slot[None, :]
    return row, present, gate, pair, in_topk[:, None] & in_topk[None, :]


@triton.jit
def _gated_gram_forward(
    rows_ptr, gates_ptr, slot_rows_ptr, gated_ptr, gram_ptr, hidden,
    TOPK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row, present, gate, pair, pair_mask = _token_slots(gates_ptr, slot_rows_ptr, TOPK, SLOTS)
    row_start = row * hidden
    gram = tl.zeros((SLOTS, SLOTS), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_H):
        col = start + tl.arange(0, BLOCK_H)
        mask = present[:, None] & (col[None, :] < hidden)
        offsets = row_start[:, None] + col[None, :]
        x = tl.load(rows_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        gram += tl.sum(x[:, None, :] * x[None, :, :], axis=2)
        gated = x * gate[:, None]
        tl.store(gated_ptr + offsets, gated.to(gated_ptr.dtype.element_ty), mask=mask)
    tl.store(gram_ptr + pair, gram, mask=pair_mask)


@triton.jit
def _gated_gram_backward(
    rows_ptr, gates_ptr, slot_rows_ptr, grad_gated_ptr, grad_gram_ptr, grad_rows_ptr,
    grad_gates_ptr, hidden,
    TOPK: tl.constexpr, SLOTS: tl.constexpr, BLOCK_H: tl.constexpr,
):
    row, present, gate, pair, pair_mask = _token_slots(gates_ptr, slot_rows_ptr, TOPK, SLOTS)
    grad_gram = tl.load(grad_gram_ptr + pair, mask=pair_mask, other=0.0).to(tl.float32)
    symmetric = grad_gram + tl.trans(grad_gram)
    row_start = row * hidden
    grad_gate = tl.zeros((SLOTS,), dtype=tl.float32)
    for start in range(0, hidden, BLOCK_H):
        col = start + tl.arange(0, BLOCK_H)
        mask = present[:, None] & (col[None, :] < hidden)
        offsets = row_start[:, None] + col[None, :]
        x = tl.load(rows_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_out = tl.load(grad_gated_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        grad_x = grad_out * gate[:, None] + tl.sum(symmetric[:, :, None] * x[None, :, :], axis=1)
        tl.store(grad_rows_ptr + offsets, grad_x.to(grad_rows_ptr.dtype.element_ty), mask=mask)
        grad_gate += tl.sum(grad_out * x, axis=1)
    tl.store(grad_gates_ptr + row, grad_gate, mask=present)


@dataclass(frozen=True)
class Launch:
    """How the kernels are launched: the H tile of one program's loop and its warps."""

    block_h: int
    num_warps: int = 4


def default_launch(topk: int, hidden: int) -> Launch:
    """An H tile that keeps one program's [SLOTS, SLOTS, BLOCK_H] float32 products at 4096
    values (SLOTS: k padded to a power of two)."""
    slots = triton.next_power_of_2(topk)
    return Launch(min(max(4096 // (slots * slots), 16), 512, triton.next_power_of_2(hidden)))


def _check_inputs(rows: torch.Tensor, gates: torch.Tensor, slots: TokenSlots) -> None:
    if rows.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(
            f"the Triton L_o kernel takes float32/bfloat16/float16 rows, got {rows.dtype}; "
            "use --moe-ortho-loss-kernel torch."
        )
    if not rows.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "--moe-ortho-loss-kernel triton runs on CUDA tensors (or under TRITON_INTERPRET=1 "
            "for testing); on CPU use --moe-ortho-loss-kernel torch."
        )
    if not slots.covers_all_rows:
        raise ValueError(
            "the Triton L_o kernel writes only rows that fill a token's slot; capacity padding "
            "rows (--moe-pad-expert-input-to-capacity) need --moe-ortho-loss-kernel torch."
        )
    if slots.dense and rows.shape[0] != slots.rows.numel():
        raise ValueError(
            f"{rows.shape[0]} rows for {slots.rows.numel()} dense slots: the slot map does not "
            "belong to these rows."
        )
    if gates.shape != rows.shape[:1]:
        raise ValueError(f"gates must be [{rows.shape[0]}], got {tuple(gates.shape)}")


class _GatedGram(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows: torch.Tensor, gates: torch.Tensor, slot_rows: torch.Tensor,
                launch: Launch):
        num_tokens, topk = slot_rows.shape
        hidden = rows.shape[1]
        gated = torch.empty_like(rows)
        gram = torch.empty(num_tokens, topk, topk, dtype=torch.float32, device=rows.device)
        if num_tokens > 0:
            _gated_gram_forward[(num_tokens,)](
                rows, gates, slot_rows, gated, gram, hidden,
                TOPK=topk, SLOTS=triton.next_power_of_2(topk), BLOCK_H=launch.block_h,
                num_warps=launch.num_warps,
            )
        ctx.save_for_backward(rows, gates, slot_rows)
        ctx.launch = launch
        return gated, gram

    @staticmethod
    def backward(ctx, grad_gated, grad_gram):
        rows, gates, slot_rows = ctx.saved_tensors
        num_tokens, topk = slot_rows.shape
        hidden = rows.shape[1]
        # Autograd materializes an unused output's gradient as zeros: neither is None.
        grad_rows = torch.empty_like(rows)
        grad_gates = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        if num_tokens > 0:
            _gated_gram_backward[(num_tokens,)](
                rows, gates, slot_rows, grad_gated.contiguous(), grad_gram.contiguous(), grad_rows,
                grad_gates, hidden,
                TOPK=topk, SLOTS=triton.next_power_of_2(topk), BLOCK_H=ctx.launch.block_h,
                num_warps=ctx.launch.num_warps,
            )
        return grad_rows, grad_gates.to(gates.dtype), None, None


def triton_gated_gram(
    rows: torch.Tensor, gates: torch.Tensor, slots: TokenSlots, launch: Optional[Launch] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``megatron_patch.moe.gated_gram.gated_gram`` in one Triton pass (forward and backward).

    Every row must fill exactly one slot (no capacity padding rows). Same arguments and results;
    the Gram matrices are float32. ``launch`` overrides ``default_launch`` (for tuning).
    """
    _check_inputs(rows, gates, slots)
    launch = launch or default_launch(slots.rows.shape[1], rows.shape[1])
    return _GatedGram.apply(
        rows.contiguous(), gates.contiguous(), slots.rows.contiguous(), launch
    )
