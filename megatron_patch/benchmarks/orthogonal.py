"""Cost of the orthogonal expert optimizer, side by side with the work of a training step.

For one MoE layer (E experts, SwiGLU fc1 [2F, H] and fc2 [H, F]) and a batch of T tokens routed
top-k (T k / E tokens per expert) it times, in one run: the experts' forward+backward over the
batch, the base optimizer step (torch AdamW over the expert weights), the projection of every
expert's fc1 and fc2 gradient with the ``weights`` subspace (second moments of the weights in
float64, one Cholesky per expert and matrix) and with the ``representations`` subspace (from
recorded moments), and the recording of the representation moments over the batch. It reports
their ratios to the plain step (forward+backward + AdamW) and the overhead averaged over a cycle
of N = 4 plain and M = 1 orthogonal steps (the defaults; representations record 1 step per cycle).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Callable

import torch

from megatron_patch.benchmarks.timing import median_time
from megatron_patch.machine import device_name
from megatron_patch.optimizer.orthogonal import OrthogonalOptimizerConfig, project_expert_gradients
from megatron_patch.optimizer.representations import ExpertRepresentationMoments

# (E, H, F, T, k) per run kind: a toy size (--quick), CPU, GPU.
SIZES = {
    "quick": [(4, 64, 48, 256, 2)],
    "cpu": [(8, 256, 176, 4096, 2), (16, 256, 176, 4096, 4), (8, 512, 352, 4096, 2)],
    "cuda": [(8, 2048, 1408, 16384, 6), (8, 4096, 14336, 8192, 2)],
}
WEIGHTS = OrthogonalOptimizerConfig(alpha=1e-2)
REPRESENTATIONS = OrthogonalOptimizerConfig(alpha=1e-2, subspace="representations")

Row = tuple[int, int, int, int, int, float, float, float, float, float, float, float]


class SwiGLUExpert(torch.nn.Module):
    """SwiGLU expert with SequentialMLP's attribute names: [N, H] -> [N, H]."""

    def __init__(self, hidden: int, ffn: int, device: torch.device) -> None:
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(hidden, 2 * ffn, bias=False, device=device)
        self.linear_fc2 = torch.nn.Linear(ffn, hidden, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(torch.nn.functional.silu(gate) * up)


def expert_layer(experts: int, hidden: int, ffn: int,
                 device: torch.device) -> tuple[SimpleNamespace, list[torch.nn.Parameter]]:
    """A stand-in MoE layer (``local_experts`` only) whose weights hold small random gradients,
    and the list of those weights."""
    local = [SwiGLUExpert(hidden, ffn, device) for _ in range(experts)]
    for expert in local:
        for p in expert.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    params = [p for e in local for p in e.parameters()]
    return SimpleNamespace(local_experts=local), params


def measure(experts: int, hidden: int, ffn: int, tokens: int, topk: int,
            device: torch.device) -> Row:
    """Median ms of each piece of work at one size, and the overhead per step (percent) of the
    weights and the representations subspace over a cycle."""
    layer, params = expert_layer(experts, hidden, ffn, device)
    x = torch.randn(tokens * topk // experts, hidden, device=device)
    moments = ExpertRepresentationMoments(layer, layer_number=1, kinds=("fc1", "fc2"))

    def forward_backward() -> None:
        for expert in layer.local_experts:
            expert(x).sum().backward()

    def record() -> None:
        moments.recording = True
        forward_backward()
        moments.recording = False
        moments.flush()

    def ms(fn: Callable[[], object], reps: int = 3) -> float:
        return 1e3 * median_time(fn, device, reps)

    adam = torch.optim.AdamW(params, lr=1e-4)
    fwd_bwd = ms(forward_backward)
    base = ms(adam.step, reps=5)
    recording = ms(record) - fwd_bwd
    proj_w = ms(lambda: project_expert_gradients(layer, WEIGHTS))
    proj_r = ms(lambda: project_expert_gradients(layer, REPRESENTATIONS, moments.averages))
    plain = fwd_bwd + base
    cycle = WEIGHTS.accumulate_steps + WEIGHTS.orthogonal_steps
    print(f"E={experts} H={hidden} F={ffn} T={tokens} k={topk}: experts fwd+bwd "
          f"{fwd_bwd:.1f} ms, AdamW {base:.1f} ms, projection weights {proj_w:.1f} ms / "
          f"representations {proj_r:.1f} ms, recording {recording:.1f} ms", flush=True)
    return (experts, hidden, ffn, tokens, topk, fwd_bwd, base, proj_w, proj_r, recording,
            100 * proj_w / cycle / plain, 100 * (proj_r + recording) / cycle / plain)


def device_label(device: torch.device) -> str:
    """The GPU's name, or 'CPU (<model>), <n> threads'."""
    if device.type == "cuda":
        return device_name(device)
    return f"{device_name(device)}, {torch.get_num_threads()} threads"


def report(rows: list[Row], device: torch.device) -> str:
    """The Markdown table of the measured rows, with what they mean."""
    lines = [
        f"# Orthogonal expert optimizer: cost ({device_label(device)})", "",
        "Generated by `python benchmarks/bench_orthogonal_optimizer.py`; one MoE layer's E local "
        "experts (SwiGLU fc1 [2F, H], fc2 [H, F], fp32), T tokens routed top-k, median times in "
        "ms. Plain step = experts' forward+backward + AdamW. Overhead per step = the extra work "
        f"of one cycle of {WEIGHTS.accumulate_steps} plain + {WEIGHTS.orthogonal_steps} "
        "orthogonal steps, divided by the cycle's plain work (representations: projection plus "
        "recording one step).", "",
        "| E | H | F | T | k | experts fwd+bwd | AdamW | projection (weights) | projection "
        "(representations) | recording (one step) | overhead/step, weights | overhead/step, "
        "representations |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {e} | {h} | {f} | {t} | {k} | {fb:.1f} | {b:.1f} | {pw:.1f} | {pr:.1f} | "
          f"{rec:.1f} | {ow:.1f}% | {orr:.1f}% |"
          for e, h, f, t, k, fb, b, pw, pr, rec, ow, orr in rows],
        "",
        "The projection does not grow with the batch (O(E (F H^2 + H^3)) per layer); the "
        "recording grows with it (O(T k H^2) per layer, in the recorded steps only).",
    ]
    return "\n".join(lines) + "\n"


def bench_orthogonal(device: torch.device, quick: bool) -> str:
    """Measure every size of the run kind (a model-parallel state must exist) -> Markdown."""
    sizes = SIZES["quick" if quick else device.type]
    return report([measure(*size, device) for size in sizes], device)
