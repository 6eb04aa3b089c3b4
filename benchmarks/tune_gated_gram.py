"""Launch settings of the fused gates + Gram kernel of L_o, timed side by side on one GPU.

What it times: ``megatron_patch.benchmarks.tuning``. Prints the Markdown table and writes it to
``--output``.

    python benchmarks/tune_gated_gram.py                        # on a GPU
    TRITON_INTERPRET=1 python benchmarks/tune_gated_gram.py --smoke   # CPU: checks the script runs
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout

from megatron_patch.benchmarks.tuning import tune  # noqa: E402
from megatron_patch.moe.gated_gram import triton_kernel_problem  # noqa: E402


def main(argv: Optional[list[str]] = None) -> int:
    """Time every variant, print the table and write it to --output."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repetition")
    parser.add_argument("--output", type=Path, default=None, help="Markdown file to write")
    args = parser.parse_args(argv)
    problem = triton_kernel_problem()
    if problem:
        raise SystemExit(problem)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    markdown = tune(device, args.smoke)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(markdown)
    print(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
