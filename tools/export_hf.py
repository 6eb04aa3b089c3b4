"""Export a saved checkpoint as a Hugging Face checkpoint.

    python tools/export_hf.py --load runs/posttrain/checkpoints --hf-export runs/posttrain/hf
    python tools/export_hf.py --load runs/base/checkpoints --hf-export runs/base/hf --check

Runs in one process whatever layout wrote the checkpoint. A post-training run (``--hf-load``)
exports with the architecture, config and tokenizer files of its source checkpoint; a model
pretrained here exports as a Mixtral with the run's Hugging Face tokenizer (refused, naming the
flag, when it has no Mixtral form). ``--check`` then compares the checkpoint's logits with
transformers' logits of the export (exit 1 beyond --tolerance). Exit status 2 on bad input
(named in the message).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.analysis.loading import AnalysisError  # noqa: E402
from megatron_patch.distributed import shutdown  # noqa: E402
from megatron_patch.flags import ConfigError  # noqa: E402
from megatron_patch.hf.check import check_export  # noqa: E402
from megatron_patch.hf.export import export_saved_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True,
                        help="--save directory of the run (its newest checkpoint) or an iter_* "
                             "directory")
    parser.add_argument("--hf-export", required=True, help="new directory for the export")
    parser.add_argument("--check", action="store_true",
                        help="compare the checkpoint's logits with transformers' of the export")
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="max |logit difference| of --check (float32)")
    args = parser.parse_args(argv)
    try:
        path = export_saved_checkpoint(args.load, args.hf_export)
    except (ConfigError, AnalysisError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(f"exported to {path}")
    if not args.check:
        return 0
    difference, scale = check_export(args.load, path)
    passed = difference <= args.tolerance
    print(f"max |logit difference| checkpoint vs transformers: {difference:.3e} (logits up to "
          f"{scale:.3g}): {'ok' if passed else 'MISMATCH'} (tolerance {args.tolerance:g})")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
