"""Check that a Hugging Face MoE checkpoint imports correctly under each parallel layout.

Builds the megatron model of the checkpoint (this project's layer spec and losses' modules) in
each layout, runs the same token ids through it and through transformers, prints the max
absolute logit difference per layout and the difference of the exported checkpoint from the
source (an exact round trip is required). Exits 1 beyond tolerance, 2 on bad input.

    python tools/check_hf_import.py --hf /path/to/Qwen3-30B-A3B --layouts dp1,ep2,tp2sp,pp2
    python tools/check_hf_import.py --tiny qwen2_moe          # a tiny random model, no download

Layouts: megatron_patch/distributed/layout.py (tp<N> pp<N> ep<N> etp<N> dp<N> sp; dp1 is one
process). On CPU every layout runs as gloo processes on this machine, in float32.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.distributed.layout import parse_layout  # noqa: E402
from megatron_patch.distributed.world import BACKENDS  # noqa: E402
from megatron_patch.hf.architectures import HFImportError, read_checkpoint  # noqa: E402
from megatron_patch.hf.check import check_import  # noqa: E402
from megatron_patch.hf.tiny import TINY_CONFIGS, save_tiny_model  # noqa: E402

DEFAULT_LAYOUTS = "dp1,ep2,tp2sp,pp2"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", type=Path, help="Hugging Face checkpoint directory")
    source.add_argument("--tiny", choices=sorted(TINY_CONFIGS),
                        help="check a tiny random model of this architecture")
    parser.add_argument("--layouts", default=DEFAULT_LAYOUTS,
                        help=f"comma-separated layouts (default: {DEFAULT_LAYOUTS})")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max |logit difference| allowed (float32)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq-length", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="of the random token ids")
    parser.add_argument("--backend", default="auto", choices=BACKENDS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tiny_hf_") as scratch:
        path = args.hf or save_tiny_model(args.tiny, Path(scratch) / args.tiny)
        try:
            layouts = [parse_layout(spec) for spec in args.layouts.split(",") if spec.strip()]
            name = read_checkpoint(path).architecture.name
        except (ValueError, HFImportError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        results = check_import(path, layouts, batch=args.batch, seq_length=args.seq_length,
                               seed=args.seed, backend=args.backend)
    print(f"{name} from {args.hf or 'a tiny random model'}: {args.batch} x {args.seq_length} "
          f"tokens, max |transformers logit| {results[0].logit_scale:.4g}\n")
    print(f"{'layout':<12} {'max |logit diff|':>17} {'export diff':>12}  result")
    for result in results:
        verdict = "ok" if result.passed(args.tolerance) else "MISMATCH"
        notes = "".join(f"; {kind}: {names[:3]}" for kind, names in
                        (("missing", result.missing), ("extra", result.extra)) if names)
        print(f"{str(result.layout):<12} {result.logit_diff:>17.3e} {result.export_diff:>12.3e}"
              f"  {verdict}{notes}")
    passed = all(result.passed(args.tolerance) for result in results)
    print(f"\n{'all layouts match' if passed else 'MISMATCH'} (tolerance {args.tolerance:g}, "
          "exact export)")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
