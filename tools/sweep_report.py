"""One table and plot across points of a coefficient sweep (examples/pretrain/ortho_coeff_sweep.sh).

    python tools/sweep_report.py --output-dir docs/results/ortho_coeff_sweep \
        docs/results/ortho_coeff_sweep/beta_0 docs/results/ortho_coeff_sweep/beta_0.1 ...

Each point is the ``results.json`` of one tools/ablation_report.py call with a single variant;
its coefficient is read from that report's ``coefficients`` ("beta=0.1 ..."; the aux-only
variant a is the beta = 0 point). Writes ``results.md`` (mean +- sample std over seeds per point,
and per-seed differences to the beta = 0 point, paired by seed), ``results.json`` and
``sweep.png`` (each metric against beta, log axis, the beta = 0 point as a band). The work is
done by megatron_patch.analysis.sweep. Exit status 2 on bad input (the message names the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.analysis.reporting import ReportError  # noqa: E402
from megatron_patch.analysis.sweep import read_point, summarize, write_report  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (what examples/pretrain/ortho_coeff_sweep.sh passes)."""
    p = argparse.ArgumentParser(prog="sweep_report", description=__doc__.split("\n")[0])
    p.add_argument("points", nargs="+", help="directories holding one ablation results.json each")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--command", default=" ".join(sys.argv))
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        points = [read_point(Path(d)) for d in args.points]
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    rows = summarize(points)
    path = write_report(points, rows, Path(args.output_dir), args.command, plots=not args.no_plots)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
