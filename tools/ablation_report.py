"""Aggregate a specialization ablation (examples/pretrain/specialization_ablation.sh) into one report.

    python tools/ablation_report.py --runs-dir runs/ablation_cpu --output-dir docs/results/ablation_cpu

reads, for every ``<runs-dir>/<variant>_seed<seed>/`` that finished (has a ``done`` marker):
``checkpoints/metrics.jsonl`` (validation loss, training MaxVio, tokens/s, loss curves),
``analysis/specialization.json`` (tools/analyze_specialization.py) and ``timing.json``, and
writes ``results.json`` (every number, per seed and mean/std over seeds), ``results.md`` (tables:
mean +- sample std over seeds, and differences to variant a paired by seed; the exact command and
the machine) and PNGs (``metrics.png``: one bar chart per metric, ``curves.png``: training
curves). Runs that have not finished are listed as missing; the report says how many seeds each
mean is over. The work is done by megatron_patch.analysis.ablation and .ablation_report.
Exit status 2 on bad input (the message names the fix).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.analysis.ablation import aggregate, find_seeds  # noqa: E402
from megatron_patch.analysis.ablation_report import AblationSetup, write_report  # noqa: E402
from megatron_patch.analysis.reporting import ReportError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line (the flags specialization_ablation.sh passes)."""
    p = argparse.ArgumentParser(prog="ablation_report", description=__doc__.split("\n")[0])
    p.add_argument("--runs-dir", required=True)
    p.add_argument("--output-dir", required=True)
    p.add_argument("--setting", default="custom")
    p.add_argument("--variants", default="a b c d e")
    p.add_argument("--seeds", default=None, help="default: every seed found in --runs-dir")
    p.add_argument("--coefficients", default="")
    p.add_argument("--omoe", default="", help="OMoE flags of variants f and g")
    p.add_argument("--omoe-repr", default="", help="OMoE flags of variant h")
    p.add_argument("--command", default=" ".join(sys.argv))
    p.add_argument("--preset", default="")
    p.add_argument("--no-plots", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    runs_dir = Path(args.runs_dir)
    variants = args.variants.split()
    seeds = args.seeds.split() if args.seeds else find_seeds(runs_dir)
    setup = AblationSetup(setting=args.setting, preset=args.preset, command=args.command,
                          coefficients=args.coefficients, omoe=args.omoe, omoe_repr=args.omoe_repr)
    try:
        agg = aggregate(runs_dir, variants, seeds)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write_report(agg, setup, variants, seeds, Path(args.output_dir),
                         plots=not args.no_plots)
    print(f"report: {paths['markdown']}\njson  : {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
