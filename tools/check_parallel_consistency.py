"""Check that the trainer's training step gives the same results under several parallel layouts.

Runs one training step (``megatron_patch.training.step``) over the same global batch in the
single-device layout (the baseline) and in each requested case, and compares the LM loss, the
MoE losses, the routing statistics, every parameter gradient (reassembled to full tensors) and
the calibrated L_o / L_v coefficients of every rank. Exits 1 on any mismatch, 2 on a bad case or
setting.

    python tools/check_parallel_consistency.py --layouts tp2sp,ep2,pp2ep2+recompute+padding

Cases: ``<layout>[+feature...]``; layout grammar in megatron_patch/distributed/layout.py (tokens
tp<N> pp<N> ep<N> etp<N> dp<N> sp), features in megatron_patch/parallel_check/cases.py
(padding, capacity, recompute). Model flags are the trainer's (--help). On CPU every layout runs
as gloo processes on this machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.flags import add_flags  # noqa: E402
from megatron_patch.distributed.world import BACKENDS  # noqa: E402
from megatron_patch.moe.loss_config import LossConfig  # noqa: E402
from megatron_patch.parallel_check.cases import parse_case  # noqa: E402
from megatron_patch.parallel_check.check import CHECK_MODEL, DEFAULT_CASES, check_cases  # noqa: E402
from megatron_patch.parallel_check.compare import Tolerance, format_table, summarize  # noqa: E402
from megatron_patch.training.config import JobConfig, ModelConfig, MoEConfig  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    add_flags(parser, ModelConfig, "model (defaults: a small model, see CHECK_MODEL)")
    add_flags(parser, MoEConfig, "mixture of experts")
    add_flags(parser, LossConfig, "expert specialization losses (default: both 'auto')")
    run = parser.add_argument_group("run")
    run.add_argument("--layouts", default=DEFAULT_CASES,
                     help=f"comma-separated cases (default: {DEFAULT_CASES})")
    run.add_argument("--micro-batch-size", type=int, default=None, help="default 2")
    run.add_argument("--global-batch-size", type=int, default=8)
    run.add_argument("--vocab-size", type=int, default=128)
    run.add_argument("--backend", default="auto", choices=BACKENDS)
    run.add_argument("--seed", type=int, default=0, help="of the random global batch")
    run.add_argument("--rtol", type=float, default=1e-5,
                     help="relative tolerance, against max|ref| of each quantity")
    run.add_argument("--atol", type=float, default=1e-8)
    run.add_argument("--verbose", action="store_true", help="one row per gradient tensor")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = {k: v for k, v in vars(args).items() if v is not None}
    try:
        cases = [parse_case(spec) for spec in args.layouts.split(",") if spec.strip()]
        job = JobConfig.from_flat({**CHECK_MODEL, **given})
        job.check_model()  # bad model settings fail here, with their message, not per process
    except (ValueError, AssertionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tolerance = Tolerance(rtol=args.rtol, atol=args.atol)
    diffs, baselines = check_cases(cases, job, args.global_batch_size, args.vocab_size,
                                   seed=args.seed, backend=args.backend, tolerance=tolerance)
    rows = {case: found if args.verbose else summarize(found) for case, found in diffs.items()}
    ok = all(d.passed for found in diffs.values() for d in found)
    for features, baseline in baselines.items():
        name = "+".join(("dp1", *features))
        print(f"\nbaseline {name}: lm loss {baseline.lm_loss:.6f}")
    print(f"pass if max abs diff <= {args.atol:g} + {args.rtol:g} * max|ref|\n")
    print(format_table(rows))
    print("\nall layouts consistent" if ok else "\nMISMATCH: see rows marked MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
