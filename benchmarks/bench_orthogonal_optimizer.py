"""Cost of the orthogonal expert optimizer, side by side with the work of a training step.

    python benchmarks/bench_orthogonal_optimizer.py [--device cpu|cuda] [--quick] [--output docs/FILE.md]

What it times and reports: ``megatron_patch.benchmarks.orthogonal``. Per-size lines and the
Markdown table go to stdout.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from megatron_patch.benchmarks.orthogonal import bench_orthogonal  # noqa: E402
from megatron_patch.benchmarks.sizes import SEED  # noqa: E402
from megatron_patch.distributed import (  # noqa: E402
    Layout,
    init_model_parallel,
    init_world,
    shutdown,
)


def main() -> None:
    """Measure in a one-process world, print the table and write it to --output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=None, help="Markdown file for the table")
    parser.add_argument("--quick", action="store_true", help="one toy size (a smoke check)")
    args = parser.parse_args()
    device = torch.device(args.device)
    init_world("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    init_model_parallel(Layout(), SEED)
    text = bench_orthogonal(device, args.quick)
    print(text)
    if args.output:
        Path(args.output).write_text(text)
    shutdown()


if __name__ == "__main__":
    main()
