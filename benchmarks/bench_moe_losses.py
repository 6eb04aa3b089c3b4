"""Benchmark the expert-specialization losses L_o (orthogonality) and L_v (variance).

Measures, side by side in one run on one device:

1. the loss functions of ``megatron_patch/moe/losses.py`` against the naive loop references of
   ``tests/test_losses.py`` (time per token, forward and forward+backward);
2. one MoE layer forward+backward without vs with L_o + L_v (same weights, same input): median
   time, overhead, and on GPU the peak-memory increase;
3. how the cost grows with tokens T, top-k and hidden size H: the losses alone against an
   estimate of the expert compute, and the layer overhead at a few more points (plus a plot);
4. on CPU, the collectives one fwd+bwd issues without vs with the losses in a 2-process gloo
   run with expert parallelism 2 (skipped on GPU);
5. the marginal cost of L_o where the layer computes it, the combine tail (gates alone vs gates
   + Gram matrices + L_o, fwd+bwd on the combined rows), per L_o kernel (``torch``; ``triton``,
   the fused kernel, on GPU), against the expert GEMM estimate: the number that stays when the
   experts are grouped GEMMs instead of the launch-bound SequentialMLP of part 2.

Writes ``docs/benchmarks_<device>.md`` (one file per device, overwritten), a PNG plot beside it
when matplotlib is installed, and ``docs/benchmarks.md``, an index of all device files. The
Markdown is also printed to stdout; progress goes to stderr.

    python benchmarks/bench_moe_losses.py                 # CPU: fp32, small sizes, < 5 min
    python benchmarks/bench_moe_losses.py --device cuda   # GPU: bf16, realistic sizes
    python benchmarks/bench_moe_losses.py --quick         # fewer sizes and repetitions
    python benchmarks/bench_moe_losses.py --kernels torch # only the torch L_o kernel

On GPU both L_o kernels are measured when triton is installed. ``--kernels torch,triton`` on CPU
needs TRITON_INTERPRET=1 and times Triton's interpreter: a check that the script runs, not a
measurement.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import inspect
import json
import os
import platform
import re
import socket
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from megatron_patch.moe.gated_gram import GRAM_KERNELS, apply_gates, gated_gram  # noqa: E402
from megatron_patch.moe.grouping import token_slot_rows  # noqa: E402
from megatron_patch.moe.losses import (  # noqa: E402
    orthogonality_loss,
    projection_norms,
    variance_loss,
)

# megatron-core is imported inside functions: the collective counters of part 4 must be
# installed before megatron binds torch.distributed functions to module-level names.

LOSS_COEFF = 1e-2  # beta and gamma of the "with" layer; megatron's aux loss uses the same
SEED = 1234


@dataclass(frozen=True)
class LayerSize:
    """One MoE layer: hidden H, expert FFN F (SwiGLU), E experts, top-k, T = S * B tokens."""

    hidden: int
    ffn: int
    experts: int
    topk: int
    tokens: int
    batch: int = 2

    @property
    def seq(self) -> int:
        return self.tokens // self.batch

    def label(self) -> str:
        return f"H={self.hidden} F={self.ffn} E={self.experts} k={self.topk} T={self.tokens}"


@dataclass(frozen=True)
class Plan:
    """What one run measures on its device."""

    dtype: torch.dtype
    layer_sizes: tuple[LayerSize, ...]  # part 2
    layer_sweep: tuple[LayerSize, ...]  # part 3, layer overhead at other k
    loss_base: LayerSize  # parts 1 and 3: sizes of the losses-alone measurements
    naive_tokens: int  # part 1: T for the naive loops
    reps: int
    warmup: int
    kernels: tuple[str, ...]  # L_o kernels measured in parts 2 and 5


def make_plan(device: torch.device, quick: bool, kernels: tuple[str, ...]) -> Plan:
    """Sizes and repetitions: realistic bf16 on GPU, proportionally smaller fp32 on CPU."""
    if device.type == "cuda":
        small = LayerSize(hidden=2048, ffn=1408, experts=64, topk=6, tokens=8192)
        sizes = (small,) if quick else (
            small, replace(small, tokens=16384),
            LayerSize(hidden=4096, ffn=14336, experts=8, topk=2, tokens=8192),
        )
        # Launch-bound SequentialMLP steps with host syncs vary more on GPU: more repetitions.
        dtype, naive_tokens, reps, warmup = torch.bfloat16, 4, 25, 5
    else:
        small = LayerSize(hidden=256, ffn=176, experts=16, topk=4, tokens=1024)
        sizes = (small,) if quick else (small, replace(small, tokens=2048),
                                        replace(small, tokens=4096))
        dtype, naive_tokens, reps, warmup = torch.float32, 8 if quick else 16, 11, 3
    sweep_k = (2,) if quick else (2, 2 * small.topk)
    return Plan(
        dtype=dtype,
        layer_sizes=sizes,
        layer_sweep=tuple(replace(small, topk=k) for k in sweep_k),
        loss_base=replace(small, tokens=2 * small.tokens),
        naive_tokens=naive_tokens,
        reps=3 if quick else reps,
        warmup=1 if quick else warmup,
        kernels=kernels,
    )


# --- timing ------------------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def median_times(fns: dict[str, Callable[[], object]], device: torch.device, reps: int,
                 warmup: int) -> dict[str, float]:
    """Median seconds per call of each function; calls are interleaved to share any drift."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- part 1: loss functions vs naive loops -----------------------------------------------------


def load_naive_references():
    """``naive_span`` and ``naive_pairwise`` from tests/test_losses.py (loaded by path)."""
    spec = importlib.util.spec_from_file_location("_loss_refs", ROOT / "tests" / "test_losses.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.naive_span, module.naive_pairwise


def naive_variance(scores: torch.Tensor) -> torch.Tensor:
    """L_v with an explicit loop over tokens (the loop of tests/test_losses.py)."""
    total = scores.new_zeros((), dtype=torch.float64)
    for row in scores.double():
        mean = row.sum() / len(row)
        total = total + ((row - mean) ** 2).sum() / (len(row) - 1)
    return -total / len(scores)


def loss_pairs(eps: float = 1e-6) -> dict[str, tuple[Callable, Callable, str]]:
    """name -> (naive, vectorized, input kind) for each loss."""
    naive_span, naive_pairwise = load_naive_references()
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


def run_loss(fn: Callable, x: torch.Tensor, backward: bool) -> torch.Tensor:
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


# --- part 2: one MoE layer without vs with the losses ------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_megatron(device: torch.device, rank: int = 0, world_size: int = 1, port: int = 0,
                  expert_parallel: int = 1) -> None:
    """Process group (nccl on GPU, gloo on CPU) and megatron's parallel state and RNG."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe import moe_utils

    from megatron_patch.cpu_compat import apply_cpu_gloo_patches

    apply_cpu_gloo_patches()  # no-op on GPU
    if not hasattr(moe_utils, "te_general_gemm"):
        # megatron-core 0.16.1 defines it only with Transformer Engine but the router reads it;
        # None selects the torch.mm path (cpu_compat does the same on CPU).
        moe_utils.te_general_gemm = None
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port or free_port()}",
                            rank=rank, world_size=world_size)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=expert_parallel)
    model_parallel_cuda_manual_seed(SEED)


def shutdown_megatron() -> None:
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def make_config(size: LayerSize, dtype: torch.dtype, coeff: float, expert_parallel: int = 1,
                kernel: str = "torch"):
    """SpecializationConfig of one SwiGLU MoE layer; coeff 0 is exactly megatron's MoELayer."""
    from megatron_patch.moe.config import SpecializationConfig

    return SpecializationConfig(
        num_layers=1,
        hidden_size=size.hidden,
        num_attention_heads=1,
        ffn_hidden_size=size.ffn,
        num_moe_experts=size.experts,
        moe_router_topk=size.topk,
        moe_ffn_hidden_size=size.ffn,
        moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=LOSS_COEFF,
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        params_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        expert_model_parallel_size=expert_parallel,
        moe_ortho_loss_coeff=coeff,
        moe_var_loss_coeff=coeff,
        moe_ortho_loss_kernel=kernel,
    )


def variant_name(kernel: str) -> str:
    """Layer variant with L_o + L_v computed by ``kernel``: 'with' (torch), 'with triton'."""
    return "with" if kernel == "torch" else f"with {kernel}"


def build_layer_pair(size: LayerSize, dtype: torch.dtype, device: torch.device,
                     expert_parallel: int = 1,
                     kernels: tuple[str, ...] = ("torch",)) -> dict[str, torch.nn.Module]:
    """'without' and, per L_o kernel, 'with' L_o + L_v layers (local spec: SequentialMLP), all
    with identical weights."""
    from megatron.core.transformer.spec_utils import build_module

    from megatron_patch.moe.specs import get_gpt_layer_spec

    layers = {}
    variants = [("without", 0.0, "torch")]
    variants += [(variant_name(kernel), LOSS_COEFF, kernel) for kernel in kernels]
    for name, coeff, kernel in variants:
        spec = get_gpt_layer_spec(size.experts).submodules.mlp
        config = make_config(size, dtype, coeff, expert_parallel, kernel)
        layer = build_module(spec, config=config)
        layer.set_layer_number(1)
        layers[name] = layer.to(device).train()
    with torch.no_grad():
        for name, layer in layers.items():
            for dst, src in zip(layer.parameters(), layers["without"].parameters()):
                dst.copy_(src)
    return layers


def layer_inputs(size: LayerSize, dtype: torch.dtype, device: torch.device,
                 seed: int = SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Input [S, B, H] (requires grad) and the output gradient to back-propagate."""
    gen = torch.Generator(device).manual_seed(seed)
    shape = (size.seq, size.batch, size.hidden)
    x = torch.randn(shape, generator=gen, device=device).to(dtype).requires_grad_(True)
    grad = torch.randn(shape, generator=gen, device=device).to(dtype)
    return x, grad


def layer_step(layer: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor) -> None:
    """One forward+backward; parameter and input gradients are freshly allocated each time."""
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = layer(x)
    out.backward(grad)


def peak_memory_delta(step: Callable[[], None], device: torch.device) -> Optional[int]:
    """Bytes allocated at the peak of ``step`` above what was allocated before it (GPU only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def output_and_input_grad(layer: torch.nn.Module, x: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    layer.zero_grad(set_to_none=True)
    x.grad = None
    out, _ = layer(x)
    out.backward(grad)
    return torch.cat([out.detach().flatten(), x.grad.flatten()]).float()


def kernel_differences(layers: dict[str, torch.nn.Module], x: torch.Tensor, grad: torch.Tensor,
                       kernels: tuple[str, ...]) -> dict[str, float]:
    """Per kernel: max |difference| of the layer output and input gradient from the torch
    kernel's, over max |torch value| (a check that the timed kernels compute the same thing)."""
    ref = output_and_input_grad(layers[variant_name("torch")], x, grad)
    scale = ref.abs().max().clamp(min=1e-30)
    return {kernel: ((output_and_input_grad(layers[variant_name(kernel)], x, grad) - ref)
                     .abs().max() / scale).item() for kernel in kernels}


def bench_layer(size: LayerSize, plan: Plan, device: torch.device) -> dict:
    """Median fwd+bwd seconds and peak memory of the layer without and with the losses."""
    layers = build_layer_pair(size, plan.dtype, device, kernels=plan.kernels)
    x, grad = layer_inputs(size, plan.dtype, device)
    steps = {name: functools.partial(layer_step, layer, x, grad) for name, layer in layers.items()}
    times = median_times(steps, device, plan.reps, plan.warmup)
    for layer in layers.values():
        layer.zero_grad(set_to_none=True)
    memory = {name: peak_memory_delta(step, device) for name, step in steps.items()}
    overhead = {kernel: times[variant_name(kernel)] / times["without"] - 1
                for kernel in plan.kernels}
    row = {"size": size, "time": times, "memory": memory, "overhead": overhead,
           "expert_s": expert_gemm_estimate(size, plan.dtype, device, plan.reps),
           "differences": kernel_differences(layers, x, grad, plan.kernels)}
    log(f"[2] {size.label()}: {times} overhead {overhead}")
    del layers, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


# --- part 3: scaling of the losses alone against the expert compute ----------------------------


def loss_step(outputs: torch.Tensor, scores: torch.Tensor) -> None:
    """L_o (span, the default) + L_v forward+backward, as the layer adds them."""
    outputs.grad = scores.grad = None
    (orthogonality_loss(outputs) + variance_loss(scores)).backward()


def expert_gemm(size: LayerSize, dtype: torch.dtype, device: torch.device) -> Callable:
    """One [T*k, H] x [H, F] GEMM; the experts' fwd+bwd GEMMs take 9 times as long.

    SwiGLU fc1 is two such GEMMs and fc2 one; backward costs twice the forward. Activation,
    permutation, router and communication are not included, so this under-estimates the layer.
    """
    a = torch.randn(size.tokens * size.topk, size.hidden, device=device, dtype=dtype)
    b = torch.randn(size.hidden, size.ffn, device=device, dtype=dtype)
    return functools.partial(torch.matmul, a, b)


def expert_gemm_estimate(size: LayerSize, dtype: torch.dtype, device: torch.device,
                         reps: int) -> float:
    """Seconds of the experts' GEMMs in one fwd+bwd (see ``expert_gemm``)."""
    gemm = expert_gemm(size, dtype, device)
    return 9 * median_times({"gemm": gemm}, device, reps, warmup=1)["gemm"]


def sweep_points(base: LayerSize) -> list[LayerSize]:
    """The base size, and T, k and H each scaled down and up with the others fixed."""
    points = [base]
    points += [replace(base, tokens=t) for t in (base.tokens // 4, base.tokens * 4)]
    points += [replace(base, topk=k) for k in (2, base.topk * 2)]
    points += [replace(base, hidden=h) for h in (base.hidden // 2, base.hidden * 2)]
    return points


def bench_loss_scaling(plan: Plan, device: torch.device) -> list[dict]:
    """Part 3: L_o + L_v fwd+bwd time vs the expert GEMM estimate at each sweep point."""
    rows = []
    for size in sweep_points(plan.loss_base):
        outputs, scores = (loss_input(kind, size, size.tokens, plan.dtype, device, True)
                           for kind in ("outputs", "scores"))
        times = median_times({"loss": functools.partial(loss_step, outputs, scores),
                              "gemm": expert_gemm(size, plan.dtype, device)},
                             device, plan.reps, plan.warmup)
        loss_s, expert_s = times["loss"], 9 * times["gemm"]
        rows.append({"size": size, "loss_s": loss_s, "expert_s": expert_s})
        log(f"[3] {size.label()}: losses {loss_s * 1e3:.2f} ms, experts ~{expert_s * 1e3:.2f} ms")
    return rows


# --- part 5: L_o in the combine tail, per kernel ------------------------------------------------


def tail_inputs(size: LayerSize, dtype: torch.dtype, device: torch.device):
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


def tail_forward(rows: torch.Tensor, gates: torch.Tensor, slots,
                 kernel: Optional[str]) -> list[torch.Tensor]:
    """Gates (kernel None), or gates + Gram + span L_o (beta = LOSS_COEFF): [gated, loss]."""
    if kernel is None:
        return [apply_gates(rows, gates)]
    gated, gram = gated_gram(rows, gates, slots, kernel=kernel)
    return [gated, LOSS_COEFF * projection_norms(gram).mean()]


def tail_step(rows: torch.Tensor, gates: torch.Tensor, slots, grad: torch.Tensor,
              kernel: Optional[str]) -> None:
    """``tail_forward`` and its backward."""
    rows.grad = gates.grad = None
    outputs = tail_forward(rows, gates, slots, kernel)
    torch.autograd.backward(outputs, [grad, None][:len(outputs)])


def saved_for_backward_bytes(forward: Callable[[], object], inputs: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward while ``forward`` runs,
    leaving out the inputs' own storages: the activation memory it adds, on any device."""
    own = {t.untyped_storage().data_ptr() for t in inputs}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(saved.values())


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
    # Least traffic of the tail: forward reads the rows and writes the gated rows, backward
    # reads the rows and the output gradient and writes the rows' gradient.
    traffic = 5 * rows.numel() * rows.element_size()
    row = {"size": size, "time": times, "memory": memory, "expert_s": expert_s,
           "traffic": traffic, "saved": saved}
    log(f"[5] {size.label()}: {times}")
    return row


# --- part 4: collectives -----------------------------------------------------------------------

# torch.distributed function -> the parameter holding what this rank sends (receives, for recv).
COLLECTIVES = {
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
    "all_gather_coalesced": "input_tensor_list", "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
    "all_to_all": "input_tensor_list", "all_to_all_single": "input", "broadcast": "tensor",
    "reduce": "tensor", "send": "tensor", "recv": "tensor", "isend": "tensor",
    "irecv": "tensor", "batch_isend_irecv": "p2p_op_list",
}


def payload_bytes(payload) -> int:
    """Bytes of a tensor, a list of tensors or a list of P2POps."""
    if torch.is_tensor(payload):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (list, tuple)):
        return sum(payload_bytes(item) for item in payload)
    return payload_bytes(payload.tensor)  # dist.P2POp


class CollectiveCounter:
    """Counts calls and payload bytes of torch.distributed collectives while ``active``.

    Only outermost calls count, so a collective implemented with another (batch_isend_irecv
    running isend/irecv) is counted once.
    """

    def __init__(self) -> None:
        self.active = False
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self._depth = 0

    def install(self) -> None:
        for name, param in COLLECTIVES.items():
            if hasattr(dist, name):
                setattr(dist, name, self._wrap(name, getattr(dist, name), param))

    def _wrap(self, name: str, fn: Callable, param: str) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args, **kwargs):
            if self.active and self._depth == 0:
                self.calls[name] += 1
                self.bytes[name] += payload_bytes(signature.bind(*args, **kwargs).arguments[param])
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def measure(self, step: Callable[[], None]) -> dict[str, list[int]]:
        """op -> [calls, bytes] issued by ``step``."""
        self.calls.clear()
        self.bytes.clear()
        self.active = True
        try:
            step()
        finally:
            self.active = False
        return {name: [self.calls[name], self.bytes[name]] for name in self.calls}


COLLECTIVE_SIZE = LayerSize(hidden=32, ffn=16, experts=4, topk=2, tokens=64)


def collectives_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of the EP=2 gloo run: counts of one fwd+bwd (after a warm-up) per variant."""
    counter = CollectiveCounter()
    counter.install()  # before megatron binds any torch.distributed function
    device = torch.device("cpu")
    init_megatron(device, rank, world_size, port, expert_parallel=world_size)
    layers = build_layer_pair(COLLECTIVE_SIZE, torch.float32, device, world_size)
    x, grad = layer_inputs(COLLECTIVE_SIZE, torch.float32, device, seed=SEED + rank)
    result = {}
    for name, layer in layers.items():
        layer_step(layer, x, grad)
        result[name] = counter.measure(functools.partial(layer_step, layer, x, grad))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    shutdown_megatron()


def bench_collectives(world_size: int = 2) -> dict[str, dict[str, list[int]]]:
    """Part 4: variant -> op -> [calls, bytes], summed over the ranks of a spawned gloo run."""
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(collectives_worker, args=(world_size, free_port(), out_dir), nprocs=world_size)
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text())
                    for r in range(world_size)]
    total: dict[str, dict[str, list[int]]] = {"without": {}, "with": {}}
    for result in per_rank:
        for variant, ops in result.items():
            for op, (calls, nbytes) in ops.items():
                acc = total[variant].setdefault(op, [0, 0])
                acc[0] += calls
                acc[1] += nbytes
    log(f"[4] {total}")
    return total


# --- report ------------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def megatron_version() -> str:
    from megatron.core.package_info import __version__

    return __version__


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"


def device_tag(device: torch.device) -> str:
    """File-name tag: 'cpu', or the GPU name in lower case, e.g. 'nvidia_h100_80gb_hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")


def fmt_mib(nbytes: Optional[int]) -> str:
    return "n/a" if nbytes is None else f"{nbytes / 2**20:,.0f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def machine_section(device: torch.device, plan: Plan, argv: list[str],
                    load_at_start: float) -> list[str]:
    """Header: device, software, dtype, repetitions, and the machine load (other work on the
    machine skews the timings)."""
    rows = [["device", device_name(device)],
            ["CPU", f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch "
                    "threads"],
            ["torch", torch.__version__], ["megatron-core", megatron_version()],
            ["load average (1 min) at start / end", f"{load_at_start:.2f} / "
                                                     f"{os.getloadavg()[0]:.2f}"],
            ["python", platform.python_version()], ["dtype", str(plan.dtype).replace("torch.", "")],
            ["repetitions", f"median of {plan.reps} after {plan.warmup} warm-up"]]
    command = " ".join(["python", "benchmarks/bench_moe_losses.py", *argv])
    return [f"# Specialization-loss benchmark: {device_name(device)}", "",
            f"Generated by `{command}` on {datetime.date.today()}.", "",
            *table(["", "value"], rows), ""]


def losses_section(rows: list[dict]) -> list[str]:
    body = []
    for r in rows:
        body.append([r["loss"], f"{r['naive_fwd_us']:,.1f}", f"{r['fast_fwd_us']:.3f}",
                     f"{r['naive_fwd_us'] / r['fast_fwd_us']:,.0f}x",
                     f"{r['naive_fwd_bwd_us']:,.1f}", f"{r['fast_fwd_bwd_us']:.3f}",
                     f"{r['naive_fwd_bwd_us'] / r['fast_fwd_bwd_us']:,.0f}x",
                     f"{r['rel_diff']:.1e}"])
    r0 = rows[0]
    return ["## 1. Loss functions vs naive loops", "",
            f"Microseconds per token. Naive: the explicit loops of `tests/test_losses.py` "
            f"(float64, T={r0['T_naive']}); vectorized: `megatron_patch/moe/losses.py` "
            f"(T={r0['T_fast']}). The last column compares their values on the same input.", "",
            *table(["loss", "naive fwd", "vectorized fwd", "speedup", "naive fwd+bwd",
                    "vectorized fwd+bwd", "speedup", "rel. diff"], body), ""]


def size_cells(s: LayerSize) -> list[str]:
    return [str(s.hidden), str(s.ffn), str(s.experts), str(s.topk), str(s.tokens)]


def mib_delta(memory: dict, name: str, base: str) -> str:
    return fmt_mib(None if memory[base] is None else memory[name] - memory[base])


def layer_table(rows: list[dict], kernels: tuple[str, ...]) -> list[str]:
    """Part 2 table: time, overhead and peak-memory increase per L_o kernel."""
    header = ["H", "F", "E", "k", "T", "expert GEMMs ms", "without ms"]
    for kernel in kernels:
        tag = "" if kernels == ("torch",) else f" ({kernel})"
        header += [f"with{tag} ms", f"overhead{tag}"]
    header += ["peak MiB without"] + [
        "delta MiB" if kernels == ("torch",) else f"delta MiB ({kernel})" for kernel in kernels]
    others = [kernel for kernel in kernels if kernel != "torch"]
    header += [f"{kernel} vs torch, rel. diff" for kernel in others]
    body = []
    for r in rows:
        t, m = r["time"], r["memory"]
        cells = size_cells(r["size"]) + [f"{r['expert_s'] * 1e3:.2f}",
                                         f"{t['without'] * 1e3:.2f}"]
        for kernel in kernels:
            cells += [f"{t[variant_name(kernel)] * 1e3:.2f}", f"{r['overhead'][kernel]:+.1%}"]
        cells += [fmt_mib(m["without"])]
        cells += [mib_delta(m, variant_name(kernel), "without") for kernel in kernels]
        cells += [f"{r['differences'][kernel]:.1e}" for kernel in others]
        body.append(cells)
    return table(header, body)


def layer_section(rows: list[dict], device: torch.device, kernels: tuple[str, ...]) -> list[str]:
    memory_note = ("Peak memory: `torch.cuda.max_memory_allocated` during one fwd+bwd, above "
                   "what was allocated before it." if device.type == "cuda" else
                   "Peak memory: n/a on CPU (torch's CPU allocator has no peak statistics).")
    return ["## 2. One MoE layer, forward+backward, without vs with L_o + L_v", "",
            "`SpecializationMoELayer` from `get_gpt_layer_spec` (local spec: SequentialMLP "
            "SwiGLU experts, no Transformer Engine), alltoall dispatcher, dropless, "
            f"aux_loss {LOSS_COEFF:g} in both; 'with': beta = gamma = {LOSS_COEFF:g}, L_o form "
            f"span, L_o kernel {' / '.join(kernels)}. Same weights, input [S, B=2, H] and output gradient; 'without' is exactly "
            "megatron-core's MoELayer path. 'expert GEMMs' is the estimate of part 3: where the "
            "layer takes much longer, it is bound by per-expert kernel launches (SequentialMLP "
            f"loops over the experts) and hides part of the losses' device time. {memory_note}",
            "",
            *layer_table(rows, kernels), ""]


def scaling_section(loss_rows: list[dict], sweep_rows: list[dict], plot: Optional[str],
                    plot_note: str, kernels: tuple[str, ...]) -> list[str]:
    body = [[str(r["size"].tokens), str(r["size"].topk), str(r["size"].hidden),
             f"{r['loss_s'] * 1e3:.3f}", f"{r['expert_s'] * 1e3:.3f}",
             f"{r['loss_s'] / r['expert_s']:.1%}"] for r in loss_rows]
    base = loss_rows[0]["size"]
    lines = ["## 3. Scaling with T, k and H", "",
             f"Losses alone (L_o span + L_v, fwd+bwd on random [T, k, H] / [T, E={base.experts}] "
             f"inputs) against the expert compute estimate: 9 x the time of one [T*k, H] x "
             f"[H, F={base.ffn}] GEMM (SwiGLU fc1 = 2 GEMMs, fc2 = 1; backward = 2 x forward). "
             "The Gram matrices take 2Tk^2H flops against 18TkHF for the experts (a ratio of "
             "k / 9F, under 1% here), so the losses' time is set by memory traffic (reading the "
             "[T, k, H] outputs in float32, writing their gradient) and by the per-token k x k "
             "work (the float64 solves of the span form), not by flops.", "",
             *table(["T", "k", "H", "losses ms", "expert GEMMs ms", "losses / experts"], body),
             "", "Layer overhead at other k (same layer as part 2):", "",
             *layer_table(sweep_rows, kernels), ""]
    lines += [f"![scaling]({plot})" if plot else plot_note, ""]
    return lines


def tail_section(rows: list[dict], device: torch.device, kernels: tuple[str, ...]) -> list[str]:
    header = ["H", "F", "E", "k", "T", "expert GEMMs ms", "gates ms", "gates GB/s"]
    for kernel in kernels:
        header += [f"+ L_o {kernel} ms", f"marginal {kernel} ms", f"{kernel} / expert GEMMs",
                   f"{kernel} GB/s", f"{kernel} saved MiB"]
    if device.type == "cuda":
        header += [f"peak MiB delta ({kernel})" for kernel in kernels]
    body = []
    for r in rows:
        t = r["time"]
        cells = size_cells(r["size"]) + [f"{r['expert_s'] * 1e3:.2f}", f"{t['gates'] * 1e3:.3f}",
                                         f"{r['traffic'] / t['gates'] / 1e9:,.0f}"]
        for kernel in kernels:
            marginal = t[kernel] - t["gates"]
            cells += [f"{t[kernel] * 1e3:.3f}", f"{marginal * 1e3:.3f}",
                      f"{marginal / r['expert_s']:.1%}",
                      f"{r['traffic'] / t[kernel] / 1e9:,.0f}",
                      f"{(r['saved'][kernel] - r['saved']['gates']) / 2**20:,.2f}"]
        if device.type == "cuda":
            cells += [mib_delta(r["memory"], kernel, "gates") for kernel in kernels]
        body.append(cells)
    return ["## 5. Marginal cost of L_o in the combine tail, per kernel", "",
            "What L_o adds where the layer computes it, independent of how the experts run: the "
            "combined rows [T*k, H] in permuted order (dropless), fwd+bwd of the gates alone "
            "(megatron-core's work there) against gates + Gram matrices + span L_o (beta = "
            f"{LOSS_COEFF:g}). 'torch': regroup to [T, k, H] and batched products; 'triton': the "
            "fused kernel of `megatron_patch/moe/triton_gated_gram.py`, one pass over the rows "
            "in forward and one in backward. The marginal time is set against the expert GEMM "
            "estimate of part 3 (what grouped-GEMM experts cost at least). GB/s: the least "
            "traffic of the tail (read the rows, write the gated rows; read the rows and the "
            "output gradient, write the rows' gradient: 5 x T*k*H elements) over the time, to "
            "set against the device's memory bandwidth. Saved MiB: the activation memory L_o "
            "adds, the distinct storages autograd saves for backward (beyond the rows and gates "
            "themselves, which the gates save anyway) with L_o minus without; measured the same "
            "way on every device.", "",
            *table(header, body), ""]


def collectives_section(counts: Optional[dict]) -> list[str]:
    head = ["## 4. Collectives added by the losses", ""]
    if counts is None:
        return head + ["Skipped on GPU (single device): run the script on a CPU machine for the "
                       "2-process gloo count.", ""]
    ops = sorted(set(counts["without"]) | set(counts["with"]))
    body, diffs = [], []
    for op in ops:
        a, b = counts["without"].get(op, [0, 0]), counts["with"].get(op, [0, 0])
        body.append([op, str(a[0]), str(b[0]), f"{a[1]:,}", f"{b[1]:,}"])
        if a != b:
            diffs.append(f"{op} {b[0] - a[0]:+d} calls, {b[1] - a[1]:+,} bytes")
    verdict = ("Same calls and bytes without and with the losses." if not diffs
               else "With minus without: " + "; ".join(diffs) + ".")
    s = COLLECTIVE_SIZE
    return head + [
        "Two gloo processes on CPU, expert parallel 2 (TP = CP = 1), world 2, "
        f"{s.label()} per rank, alltoall dispatcher, dropless. torch.distributed collectives "
        "counted during one fwd+bwd (after a warm-up), summed over both ranks; bytes are what "
        "each rank sends.", "",
        *table(["op", "calls without", "calls with", "bytes without", "bytes with"], body), "",
        f"**Measured: {verdict}**", "",
        "Expected from the code: no collective is added. L_o regroups the rows the combine "
        "all-to-all already returns; its slot count and L_v's token count are uniform under "
        "dropless routing without padding masks, so neither is all-reduced (with capacity "
        "dropping or padding masks each adds one scalar all-reduce over TP x CP, a no-op at "
        "TP = CP = 1). Two all-to-alls per rank go away: with L_o the dispatcher hands the "
        "experts unit gates and applies the real gates on the owner rank after the combine, so "
        "the gate probabilities (k * T_local float32 values) are neither sent in forward nor "
        "their gradient returned in backward.", ""]


def along(rows: list[dict], base: LayerSize, attr: str,
          value: Callable[[dict], float]) -> list[tuple[int, float]]:
    """(size.<attr>, value(row)) for the rows whose size differs from ``base`` only in attr."""
    return sorted((getattr(r["size"], attr), value(r)) for r in rows
                  if replace(r["size"], **{attr: getattr(base, attr)}) == base)


def write_plot(path: Path, loss_rows: list[dict], layer_results: list[dict],
               title: str) -> tuple[Optional[str], str]:
    """Overhead vs T, k and H as PNG; returns (file name, note)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        note = "Plot skipped: matplotlib is not installed."
        log(note)
        return None, note
    loss_base, layer_base = loss_rows[0]["size"], layer_results[0]["size"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, attr, xlabel in zip(axes, ("tokens", "topk", "hidden"), ("T", "k", "H")):
        ratio = along(loss_rows, loss_base, attr, lambda r: 100 * r["loss_s"] / r["expert_s"])
        ax.plot(*zip(*ratio), "o-", label="losses / expert GEMMs")
        overhead = along(layer_results, layer_base, attr, lambda r: 100 * r["overhead"]["torch"])
        if len(overhead) > 1:
            ax.plot(*zip(*overhead), "s--", label="layer overhead")
        ax.set_xscale("log", base=2)
        ticks = sorted({x for x, _ in ratio + overhead})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_ylabel("%")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name, ""


def write_index(index: Path) -> None:
    """docs/benchmarks.md: one line per device file found beside it."""
    lines = ["# Benchmarks", "",
             "Cost of the specialization losses L_o and L_v, one file per device, written by "
             "`benchmarks/bench_moe_losses.py` (see its docstring for how to run it).", ""]
    for path in sorted(index.parent.glob(f"{index.stem}_*.md")):
        title = path.read_text().splitlines()[0].removeprefix("# ")
        lines.append(f"- [{path.stem.removeprefix(index.stem + '_')}]({path.name}): {title}")
    index.write_text("\n".join(lines) + "\n")


# --- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--kernels", type=lambda text: tuple(text.split(",")), default=None,
                        help="comma-separated L_o kernels to measure, from "
                        f"{', '.join(GRAM_KERNELS)} (default: torch,triton on GPU when triton is "
                        "installed, torch on CPU)")
    parser.add_argument("--output", type=Path, default=ROOT / "docs" / "benchmarks.md",
                        help="index file; the device report and plot are written beside it as "
                        "<stem>_<device>.md / .png")
    return parser.parse_args(argv)


def resolve_device(choice: str) -> torch.device:
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a CUDA machine is not supported: megatron-core's CPU "
                         "shims (megatron_patch/cpu_compat.py) only apply without a GPU")
    return torch.device("cuda", 0) if choice == "cuda" else torch.device("cpu")


def resolve_kernels(choice: Optional[tuple[str, ...]], device: torch.device) -> tuple[str, ...]:
    from megatron_patch.moe.gated_gram import triton_kernel_problem

    if choice is None:
        with_triton = device.type == "cuda" and triton_kernel_problem() is None
        return ("torch", "triton") if with_triton else ("torch",)
    unknown = [kernel for kernel in choice if kernel not in GRAM_KERNELS]
    if unknown or not choice:
        raise SystemExit(f"--kernels: choose from {', '.join(GRAM_KERNELS)}, got {choice}")
    if "triton" in choice:
        problem = triton_kernel_problem()
        if problem:
            raise SystemExit(f"--kernels triton: {problem}")
        if device.type == "cpu":
            log("--kernels triton on CPU times Triton's interpreter: not a measurement")
    return choice


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    plan = make_plan(device, args.quick, resolve_kernels(args.kernels, device))
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    init_megatron(device)
    loss_rows = bench_losses(plan, device)
    layer_results = [bench_layer(size, plan, device) for size in plan.layer_sizes]
    sweep_layers = [bench_layer(size, plan, device) for size in plan.layer_sweep]
    scaling = bench_loss_scaling(plan, device)
    tails = [bench_tail(r["size"], plan, device, r["expert_s"])
             for r in layer_results + sweep_layers]
    shutdown_megatron()
    counts = bench_collectives() if device.type == "cpu" else None

    out_dir = args.output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.output.stem}_{device_tag(device)}"
    plot, plot_note = write_plot(out_dir / f"{stem}.png", scaling,
                                 layer_results + sweep_layers, device_name(device))
    elapsed = time.perf_counter() - start
    lines = [*machine_section(device, plan, argv, load_at_start), *losses_section(loss_rows),
             *layer_section(layer_results, device, plan.kernels),
             *scaling_section(scaling, sweep_layers, plot, plot_note, plan.kernels),
             *collectives_section(counts), *tail_section(tails, device, plan.kernels),
             f"Total run time: {elapsed:.0f} s.", ""]
    markdown = "\n".join(lines)
    (out_dir / f"{stem}.md").write_text(markdown)
    write_index(args.output)
    print(markdown)
    log(f"wrote {out_dir / f'{stem}.md'} and {args.output} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
