"""Benchmark the expert-specialization losses L_o (orthogonality) and L_v (variance).

Measures, side by side in one run on one device:

1. the loss functions of ``megatron_patch/moe/losses.py`` against the naive loop references of
   ``megatron_patch/moe/reference.py`` (time per token, forward and forward+backward);
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

The measurements live in ``megatron_patch.benchmarks`` (one module per part); this script parses
the flags, runs them and writes the files.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from megatron_patch.machine import device_name, device_tag  # noqa: E402
from megatron_patch.benchmarks.plot import write_plot  # noqa: E402
from megatron_patch.benchmarks.report import device_report, write_index  # noqa: E402
from megatron_patch.benchmarks.sizes import make_plan  # noqa: E402
from megatron_patch.benchmarks.suite import run  # noqa: E402
from megatron_patch.benchmarks.timing import log  # noqa: E402
from megatron_patch.moe.gated_gram import GRAM_KERNELS, triton_kernel_problem  # noqa: E402


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The flags (see the module docstring)."""
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
    """--device: cuda:0, or the CPU on a machine without a GPU."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    if choice == "cpu" and torch.cuda.is_available():
        raise SystemExit("--device cpu on a CUDA machine is not supported: megatron-core's CPU "
                         "shims (megatron_patch/cpu_compat.py) only apply without a GPU")
    return torch.device("cuda", 0) if choice == "cuda" else torch.device("cpu")


def resolve_kernels(choice: Optional[tuple[str, ...]], device: torch.device) -> tuple[str, ...]:
    """--kernels, checked; by default torch and, on GPU with triton installed, triton."""
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
    """Measure, write the device report, its plot and the index, print the report."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    device = resolve_device(args.device)
    plan = make_plan(device, args.quick, resolve_kernels(args.kernels, device))
    start, load_at_start = time.perf_counter(), os.getloadavg()[0]
    results = run(plan, device)

    out_dir = args.output.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{args.output.stem}_{device_tag(device)}"
    plot, plot_note = write_plot(out_dir / f"{stem}.png", results.scaling,
                                 results.layers + results.sweep_layers, device_name(device))
    elapsed = time.perf_counter() - start
    markdown = device_report(results, device, plan, argv, load_at_start, plot, plot_note, elapsed)
    (out_dir / f"{stem}.md").write_text(markdown)
    write_index(args.output)
    print(markdown)
    log(f"wrote {out_dir / f'{stem}.md'} and {args.output} in {elapsed:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
