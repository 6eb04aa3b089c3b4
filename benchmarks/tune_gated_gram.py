"""Launch settings of the fused gates + Gram kernel of L_o, timed side by side on one GPU.

For each size (bf16 combined rows [T*k, H] in permuted order, dropless) prints the forward+backward
time of: the gates alone (``apply_gates``, megatron-core's own work in the combine tail), the torch
L_o kernel (gates + regroup + batched Gram products), and the Triton kernel under each launch
setting (H tile x warps), with the achieved GB/s over the tail's least traffic (5 x T*k*H
elements: read the rows, write the gated rows; read rows and output gradient, write the rows'
gradient) and the marginal time over the gates alone. Writes Markdown to ``--output``.

    python benchmarks/tune_gated_gram.py                        # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune_gated_gram.py --smoke   # CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Callable, Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_moe_losses import LayerSize, median_times, tail_inputs  # noqa: E402

from megatron_patch.moe.gated_gram import apply_gates, gated_gram, triton_kernel_problem  # noqa: E402

# (H, k, T): DeepSeek-MoE-16B-like, Mixtral-like, DeepSeek-V3-like.
SIZES = ((2048, 6, 16384), (4096, 2, 8192), (7168, 8, 4096))
SMOKE_SIZES = ((40, 3, 16), (64, 2, 8))
BLOCK_H = (64, 128, 256, 512)
NUM_WARPS = (4, 8)
MAX_PRODUCTS = 16384  # largest [SLOTS, SLOTS, BLOCK_H] float32 block one program may hold


def step(rows, gates, slots, grad, kernel: Optional[Callable]) -> None:
    rows.grad = gates.grad = None
    if kernel is None:
        apply_gates(rows, gates).backward(grad)
        return
    gated, gram = kernel(rows, gates, slots)
    torch.autograd.backward([gated, gram.sum()], [grad, None])


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to write")
    args = parser.parse_args(argv)
    problem = triton_kernel_problem()
    if problem:
        raise SystemExit(problem)
    from megatron_patch.moe.triton_gated_gram import Launch, default_launch, triton_gated_gram

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sizes, reps, warmup = (SMOKE_SIZES, 1, 0) if args.smoke else (SIZES, 20, 3)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (Triton interpreter)"
    lines = [f"# Fused L_o kernel launch settings: {name}", "",
             f"torch {torch.__version__}; bf16; median of {reps} fwd+bwd after {warmup} warm-up. "
             "'default' marks `default_launch`.", "",
             "| H | k | T | variant | ms | GB/s | marginal over gates ms |",
             "|---|---|---|---|---|---|---|"]
    for hidden, topk, tokens in sizes:
        size = LayerSize(hidden=hidden, ffn=0, experts=0, topk=topk, tokens=tokens)
        rows, gates, slots, grad = tail_inputs(size, torch.bfloat16, device)
        traffic = 5 * rows.numel() * rows.element_size()
        variants: dict[str, Optional[Callable]] = {
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
                variants[f"triton {block_h} x {num_warps}w{tag}"] = functools.partial(
                    triton_gated_gram, launch=launch)
        if f"triton {default.block_h} x {default.num_warps}w (default)" not in variants:
            variants[f"triton {default.block_h} x {default.num_warps}w (default)"] = (
                functools.partial(triton_gated_gram, launch=default))
        seconds = median_times(
            {label: functools.partial(step, rows, gates, slots, grad, kernel)
             for label, kernel in variants.items()}, device, reps, warmup)
        times = {label: value * 1e3 for label, value in seconds.items()}
        print(f"{hidden} {topk} {tokens}: {times}", file=sys.stderr, flush=True)
        best = min((label for label in times if label.startswith("triton")), key=times.get)
        for label, ms in times.items():
            marginal = "" if label == "gates alone" else f"{ms - times['gates alone']:.3f}"
            mark = " **fastest triton**" if label == best else ""
            lines.append(f"| {hidden} | {topk} | {tokens} | {label}{mark} | {ms:.3f} | "
                         f"{traffic / ms / 1e6:,.0f} | {marginal} |")
        del rows, gates, slots, grad
    markdown = "\n".join(lines) + "\n"
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
