"""Cost of the orthogonal expert optimizer, side by side with the work of a training step.

    python benchmarks/bench_orthogonal_optimizer.py [--device cpu|cuda] [--quick] [--output docs/FILE.md]

For one MoE layer (E experts, SwiGLU fc1 [2F, H] and fc2 [H, F]) and a batch of T tokens routed
top-k (T k / E tokens per expert) it times, in one run: the experts' forward+backward over the
batch, the base optimizer step (torch AdamW over the expert weights), the projection of every
expert's fc1 and fc2 gradient with the ``weights`` subspace (second moments of the weights in
float64, one Cholesky per expert and matrix) and with the ``representations`` subspace (from
recorded moments), and the recording of the representation moments over the batch. It prints
their ratios to the plain step (forward+backward + AdamW) and the overhead averaged over a cycle
of N = 4 plain and M = 1 orthogonal steps (the defaults; representations record 1 step per cycle).
"""

from __future__ import annotations

import argparse
import platform
import socket
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_patch.optimizer.orthogonal import OrthogonalOptimizerConfig, project_expert_gradients
from megatron_patch.optimizer.representations import ExpertRepresentationMoments


def _init(device: str) -> None:
    if device == "cpu":
        from megatron_patch.cpu_compat import apply_cpu_gloo_patches

        apply_cpu_gloo_patches()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    parallel_state.initialize_model_parallel()


class _Expert(torch.nn.Module):
    """SwiGLU expert with SequentialMLP's attribute names."""

    def __init__(self, hidden: int, ffn: int, device: str) -> None:
        super().__init__()
        self.linear_fc1 = torch.nn.Linear(hidden, 2 * ffn, bias=False, device=device)
        self.linear_fc2 = torch.nn.Linear(ffn, hidden, bias=False, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.linear_fc1(x).chunk(2, dim=-1)
        return self.linear_fc2(torch.nn.functional.silu(gate) * up)


def _layer(experts: int, hidden: int, ffn: int, device: str):
    local = [_Expert(hidden, ffn, device) for _ in range(experts)]
    for expert in local:
        for p in expert.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    params = [p for e in local for p in e.parameters()]
    return SimpleNamespace(local_experts=local), params


def _median_ms(fn, device: str, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Markdown file for the table")
    parser.add_argument("--quick", action="store_true", help="one toy size (a smoke check)")
    args = parser.parse_args()
    _init(args.device)
    # (E, H, F, T, k)
    if args.quick:
        sizes = [(4, 64, 48, 256, 2)]
    elif args.device == "cpu":
        sizes = [(8, 256, 176, 4096, 2), (16, 256, 176, 4096, 4), (8, 512, 352, 4096, 2)]
    else:
        sizes = [(8, 2048, 1408, 16384, 6), (8, 4096, 14336, 8192, 2)]
    weights = OrthogonalOptimizerConfig(alpha=1e-2)
    representations = OrthogonalOptimizerConfig(alpha=1e-2, subspace="representations")
    cycle = weights.accumulate_steps + weights.orthogonal_steps
    rows = []
    for experts, hidden, ffn, tokens, topk in sizes:
        layer, params = _layer(experts, hidden, ffn, args.device)
        per_expert = tokens * topk // experts
        x = torch.randn(per_expert, hidden, device=args.device)
        moments = ExpertRepresentationMoments(layer, layer_number=1, kinds=("fc1", "fc2"))

        def forward_backward():
            for expert in layer.local_experts:
                expert(x).sum().backward()

        def record():
            moments.recording = True
            forward_backward()
            moments.recording = False
            moments.flush()

        adam = torch.optim.AdamW(params, lr=1e-4)
        fwd_bwd = _median_ms(forward_backward, args.device, reps=3)
        base = _median_ms(adam.step, args.device, reps=5)
        recording = _median_ms(record, args.device, reps=3) - fwd_bwd
        proj_w = _median_ms(lambda: project_expert_gradients(layer, weights), args.device, reps=3)
        proj_r = _median_ms(lambda: project_expert_gradients(layer, representations,
                                                             moments.averages),
                            args.device, reps=3)
        plain = fwd_bwd + base
        rows.append((experts, hidden, ffn, tokens, topk, fwd_bwd, base, proj_w, proj_r,
                     recording, 100 * proj_w / cycle / plain,
                     100 * (proj_r + recording) / cycle / plain))
        print(f"E={experts} H={hidden} F={ffn} T={tokens} k={topk}: experts fwd+bwd "
              f"{fwd_bwd:.1f} ms, AdamW {base:.1f} ms, projection weights {proj_w:.1f} ms / "
              f"representations {proj_r:.1f} ms, recording {recording:.1f} ms", flush=True)
    device_name = (torch.cuda.get_device_name() if args.device == "cuda"
                   else f"{platform.processor() or platform.machine()} CPU, "
                   f"{torch.get_num_threads()} threads")
    lines = [
        f"# Orthogonal expert optimizer: cost ({device_name})", "",
        "Generated by `python benchmarks/bench_orthogonal_optimizer.py`; one MoE layer's E local "
        "experts (SwiGLU fc1 [2F, H], fc2 [H, F], fp32), T tokens routed top-k, median times in "
        "ms. Plain step = experts' forward+backward + AdamW. Overhead per step = the extra work "
        f"of one cycle of {weights.accumulate_steps} plain + {weights.orthogonal_steps} "
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
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
