"""Gates + per-token Gram matrices (torch and the fused Triton kernel) against explicit loops.

Without a GPU the Triton kernel runs under Triton's interpreter (tests/conftest.py); with one, on
CUDA tensors, compiled.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from megatron_patch.benchmarks.timing import saved_for_backward_bytes
from megatron_patch.moe.config import SpecializationConfig, SpecializationConfigError
from megatron_patch.moe.gated_gram import gated_gram
from megatron_patch.moe.grouping import token_slot_rows
from megatron_patch.moe.reference import explicit_gated_gram

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def routed_rows(num_tokens, topk, hidden, dtype, drop_fraction=0.0, seed=0):
    """Rows of T*k (token, expert) pairs in shuffled order, some dropped; [N] row -> token."""
    gen = torch.Generator().manual_seed(seed)
    row_to_token = torch.arange(num_tokens).repeat_interleave(topk)
    row_to_token = row_to_token[torch.randperm(row_to_token.numel(), generator=gen)]
    if drop_fraction:
        row_to_token = row_to_token[torch.rand(row_to_token.numel(), generator=gen) > drop_fraction]
    rows = torch.randn(row_to_token.numel(), hidden, generator=gen).to(dtype)
    gates = torch.rand(row_to_token.numel(), generator=gen)
    return rows.to(DEVICE), gates.to(DEVICE), row_to_token.to(DEVICE)


def test_slot_map_indexes_the_full_rows_with_padding_left_out():
    row_to_token = torch.tensor([0, 1, 2, 0, 2, 0])
    valid = torch.tensor([True, True, True, True, True, False])
    slots = token_slot_rows(row_to_token, num_tokens=3, topk=2, valid=valid)
    assert slots.rows.tolist() == [[0, 3], [1, -1], [2, 4]]
    assert slots.filled.tolist() == [[True, True], [True, False], [True, True]]
    assert not slots.dense and not slots.covers_all_rows
    dense = token_slot_rows(torch.tensor([1, 0, 0, 1]), num_tokens=2, topk=2)
    assert dense.dense and dense.covers_all_rows
    assert dense.rows.tolist() == [[1, 2], [0, 3]]


@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("topk,hidden,drop", [(2, 40, 0.0), (3, 33, 0.3), (6, 70, 0.0)])
def test_values_and_gradients_match_explicit_float64(kernel, dtype, topk, hidden, drop):
    num_tokens = 9
    rows, gates, row_to_token = routed_rows(num_tokens, topk, hidden, dtype, drop)
    slots = token_slot_rows(row_to_token, num_tokens, topk)
    # Representable in `dtype`: the gradient reaching a bf16 output is bf16.
    weight_out = torch.randn(rows.shape, device=DEVICE).to(dtype).double()
    weight_gram = torch.randn(num_tokens, topk, topk, device=DEVICE, dtype=torch.float64)

    rows_ref = rows.double().requires_grad_()
    gates_ref = gates.double().requires_grad_()
    gated_ref, gram_ref = explicit_gated_gram(rows_ref, gates_ref, row_to_token, num_tokens, topk)
    ((gated_ref * weight_out).sum() + (gram_ref * weight_gram).sum()).backward()

    rows_in = rows.clone().requires_grad_()
    gates_in = gates.clone().requires_grad_()
    gated, gram = gated_gram(rows_in, gates_in, slots, kernel=kernel)
    assert gated.dtype == dtype and gram.dtype == torch.float32
    ((gated.double() * weight_out).sum() + (gram.double() * weight_gram).sum()).backward()

    # float32: accumulation order only; bf16: one rounding of the result (the torch kernel
    # rounds the gates' and the Gram's gradient separately before adding them: two).
    rtol = 1e-5 if dtype == torch.float32 else 2 ** -6
    torch.testing.assert_close(gated.double(), gated_ref.detach(), rtol=rtol, atol=1e-6)
    torch.testing.assert_close(gram.double(), gram_ref.detach(), rtol=1e-5, atol=1e-4)
    scale = rows_ref.grad.abs().max().item()
    torch.testing.assert_close(rows_in.grad.double(), rows_ref.grad, rtol=rtol, atol=rtol * scale)
    torch.testing.assert_close(gates_in.grad.double(), gates_ref.grad, rtol=1e-5, atol=1e-4)


def test_triton_kernel_refuses_what_it_cannot_compute(monkeypatch):
    rows, gates, row_to_token = routed_rows(4, 2, 8, torch.float32)
    padded = token_slot_rows(row_to_token, 4, 2, valid=torch.ones_like(row_to_token, dtype=torch.bool))
    with pytest.raises(ValueError, match="pad-expert-input-to-capacity"):
        gated_gram(rows, gates, padded, kernel="triton")
    slots = token_slot_rows(row_to_token, 4, 2)
    with pytest.raises(TypeError, match="--moe-ortho-loss-kernel torch"):
        gated_gram(rows.double(), gates, slots, kernel="triton")
    if DEVICE == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET")
        with pytest.raises(RuntimeError, match="CUDA"):
            gated_gram(rows, gates, slots, kernel="triton")
    with pytest.raises(ValueError, match="unknown L_o kernel"):
        gated_gram(rows, gates, slots, kernel="cuda")


def test_config_refuses_triton_with_capacity_padding():
    with pytest.raises(SpecializationConfigError, match="--moe-ortho-loss-kernel torch"):
        SpecializationConfig(
            num_layers=1, hidden_size=8, num_attention_heads=2, num_moe_experts=4,
            moe_router_topk=2, moe_token_dispatcher_type="alltoall",
            moe_expert_capacity_factor=1.0, moe_pad_expert_input_to_capacity=True,
            moe_ortho_loss_coeff=0.01, moe_ortho_loss_kernel="triton",
        )


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only with CUDA")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_lo_path_never_waits_for_the_gpu(kernel, form):
    """Slot map, gates + Gram, per-slot penalties and their backward issue no device-to-host
    sync (dropless routing): CUDA's sync debug mode turns any into an error."""
    from megatron_patch.moe.losses import projection_norms

    rows, gates, row_to_token = routed_rows(64, 4, 256, torch.bfloat16)
    rows.requires_grad_(True)
    gates.requires_grad_(True)
    gated_gram(rows, gates, token_slot_rows(row_to_token, 64, 4), kernel=kernel)  # compile
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        slots = token_slot_rows(row_to_token, 64, 4)
        gated, gram = gated_gram(rows, gates, slots, kernel=kernel)
        loss = projection_norms(gram, form=form).sum() + gated.float().square().sum()
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_activation_memory_lo_saves_for_backward(kernel):
    """The torch kernel saves the regrouped [T, k, H] copy for backward; the fused kernel saves
    only the slot map and k x k quantities, nothing that grows with H."""
    from megatron_patch.moe.losses import projection_norms

    extra = {}
    for hidden in (64, 256):
        rows, gates, row_to_token = routed_rows(16, 3, hidden, torch.float32)
        rows.requires_grad_(True)
        gates.requires_grad_(True)
        slots = token_slot_rows(row_to_token, 16, 3)

        def forward():
            gated, gram = gated_gram(rows, gates, slots, kernel=kernel)
            return gated, projection_norms(gram).sum()

        extra[hidden] = saved_for_backward_bytes(forward, [rows, gates])
    copy_growth = 48 * (256 - 64) * 4  # one more [T*k, H] float32 copy
    if kernel == "torch":
        assert extra[256] - extra[64] == copy_growth
    else:
        assert extra[256] == extra[64]


COMPILE_FOR_H100 = textwrap.dedent("""
    import re, subprocess, tempfile
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import get_ptxas
    from triton.compiler import ASTSource
    from megatron_patch.moe import triton_gated_gram as kernels

    for dtype in ("bf16", "fp32"):
        forward = {"rows_ptr": f"*{dtype}", "gates_ptr": "*fp32", "slot_rows_ptr": "*i64",
                   "gated_ptr": f"*{dtype}", "gram_ptr": "*fp32", "hidden": "i32"}
        backward = {"rows_ptr": f"*{dtype}", "gates_ptr": "*fp32", "slot_rows_ptr": "*i64",
                    "grad_gated_ptr": f"*{dtype}", "grad_gram_ptr": "*fp32",
                    "grad_rows_ptr": f"*{dtype}", "grad_gates_ptr": "*fp32", "hidden": "i32"}
        for topk, hidden in ((2, 4096), (6, 2048), (8, 7168)):
            launch = kernels.default_launch(topk, hidden)
            constants = {"TOPK": topk, "SLOTS": triton.next_power_of_2(topk),
                         "BLOCK_H": launch.block_h}
            for fn, signature in ((kernels._gated_gram_forward, forward),
                                  (kernels._gated_gram_backward, backward)):
                signature = dict(signature, **{name: "constexpr" for name in constants})
                compiled = triton.compile(
                    ASTSource(fn=fn, signature=signature, constexprs=constants),
                    target=GPUTarget("cuda", 90, 32), options={"num_warps": launch.num_warps})
                with tempfile.NamedTemporaryFile("w", suffix=".ptx") as ptx:
                    ptx.write(compiled.asm["ptx"])
                    ptx.flush()
                    report = subprocess.run(
                        [get_ptxas(90).path, "-arch=sm_90a", "-v", ptx.name, "-o", "/dev/null"],
                        check=True, capture_output=True, text=True).stderr
                spills = re.search(r"(\\d+) bytes spill stores", report).group(1)
                print(fn.__name__, dtype, topk, "spill-stores", spills)
""")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the other tests compile it for this GPU")
def test_kernels_compile_for_h100_without_register_spills():
    """Compile forward and backward to sm_90 machine code with Triton's compiler and ptxas (no
    GPU needed): catches what the interpreter accepts but the compiler does not, and register
    spills at the default launch settings (an H tile too large spills: 9 KB at k=6, H tile
    4096)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", COMPILE_FOR_H100], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert len(lines) == 12
    assert all(line.endswith("spill-stores 0") for line in lines), "\n".join(lines)
