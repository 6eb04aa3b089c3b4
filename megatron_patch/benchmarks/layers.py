"""Part 2 of the loss benchmark: one MoE layer forward+backward without vs with L_o + L_v (the
pair of layers, their input, one step), and the expert GEMM estimate the other parts compare to.

megatron-core is imported inside the functions: importing the benchmark library (parts 1, 3 and 5,
the tests, the tuning script) does not import it.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Callable

import torch

from megatron_patch.benchmarks.sizes import LOSS_COEFF, SEED, LayerSize, Plan
from megatron_patch.benchmarks.timing import log, median_time, median_times, peak_memory_delta

if TYPE_CHECKING:
    from megatron_patch.moe.config import SpecializationConfig

EXPERT_GEMMS = 9  # [T*k, H] x [H, F] GEMMs in the experts' fwd+bwd (see ``expert_gemm``)


def make_config(size: LayerSize, dtype: torch.dtype, coeff: float, expert_parallel: int = 1,
                kernel: str = "torch") -> SpecializationConfig:
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
    with identical weights. Importing the specs imports ``megatron_patch.moe.router``, which
    gives megatron-core's router the ``te_general_gemm`` it reads without Transformer Engine."""
    from megatron_patch.compat import build_moe_layer
    from megatron_patch.moe.specs import get_gpt_layer_spec

    layers = {}
    variants = [("without", 0.0, "torch")]
    variants += [(variant_name(kernel), LOSS_COEFF, kernel) for kernel in kernels]
    for name, coeff, kernel in variants:
        spec = get_gpt_layer_spec(size.experts).submodules.mlp
        config = make_config(size, dtype, coeff, expert_parallel, kernel)
        layer = build_moe_layer(spec, config)
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


def output_and_input_grad(layer: torch.nn.Module, x: torch.Tensor,
                          grad: torch.Tensor) -> torch.Tensor:
    """One forward+backward: the output [S, B, H] and input gradient [S, B, H], flattened and
    concatenated in float32."""
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


def expert_gemm(size: LayerSize, dtype: torch.dtype, device: torch.device) -> Callable:
    """One [T*k, H] x [H, F] GEMM; the experts' fwd+bwd GEMMs take EXPERT_GEMMS = 9 times as long.

    SwiGLU fc1 is two such GEMMs and fc2 one; backward costs twice the forward. Activation,
    permutation, router and communication are not included, so this under-estimates the layer.
    """
    a = torch.randn(size.tokens * size.topk, size.hidden, device=device, dtype=dtype)
    b = torch.randn(size.hidden, size.ffn, device=device, dtype=dtype)
    return functools.partial(torch.matmul, a, b)


def expert_gemm_estimate(size: LayerSize, dtype: torch.dtype, device: torch.device,
                         reps: int) -> float:
    """Seconds of the experts' GEMMs in one fwd+bwd (see ``expert_gemm``)."""
    return EXPERT_GEMMS * median_time(expert_gemm(size, dtype, device), device, reps)
