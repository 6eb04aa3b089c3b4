"""What the loss benchmark measures: layer sizes, repetitions and dtype per device, the sweep of
part 3, the seed of every input and the loss coefficient of the 'with' layers."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

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
        """S, the sequence length of the [S, B, H] layer input."""
        return self.tokens // self.batch

    def label(self) -> str:
        """'H=.. F=.. E=.. k=.. T=..' for progress lines."""
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


def sweep_points(base: LayerSize) -> list[LayerSize]:
    """The base size, and T, k and H each scaled down and up with the others fixed."""
    points = [base]
    points += [replace(base, tokens=t) for t in (base.tokens // 4, base.tokens * 4)]
    points += [replace(base, topk=k) for k in (2, base.topk * 2)]
    points += [replace(base, hidden=h) for h in (base.hidden // 2, base.hidden * 2)]
    return points
