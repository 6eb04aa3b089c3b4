"""Export a checkpoint of a post-training run (``--hf-load``) as a Hugging Face checkpoint.

    python tools/export_hf.py --load runs/posttrain/checkpoints --hf-export runs/posttrain/hf

Runs in one process whatever layout wrote the checkpoint; the export has the architecture,
config and tokenizer files of the run's ``--hf-load`` checkpoint and the trained weights.
Exit status 2 on bad input (named in the message).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.analysis.loading import AnalysisError  # noqa: E402
from megatron_patch.distributed import shutdown  # noqa: E402
from megatron_patch.flags import ConfigError  # noqa: E402
from megatron_patch.hf.export import export_saved_checkpoint  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--load", required=True,
                        help="--save directory of the run (its newest checkpoint) or an iter_* "
                             "directory")
    parser.add_argument("--hf-export", required=True, help="new directory for the export")
    args = parser.parse_args(argv)
    try:
        path = export_saved_checkpoint(args.load, args.hf_export)
    except (ConfigError, AnalysisError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    finally:
        shutdown()
    print(f"exported to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
