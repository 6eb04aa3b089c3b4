#!/usr/bin/env python3
"""Tokenize a corpus jsonl into a megatron-core indexed dataset with a per-document domain sidecar.

Writes <prefix>.bin/.idx (one document per record, EOD appended) and <prefix>.domains.npy/.json;
with --split-by-domain also <prefix>.<domain>.bin/.idx for blending domains by weight.

Example:
    python tools/preprocess_data.py --input data/corpus.jsonl --output-prefix data/corpus_train \
        --tokenizer-model data/tokenizer.model --only-split train --workers 2 --split-by-domain
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from tqdm import tqdm  # noqa: E402

from megatron_patch.data.preprocess import preprocess_jsonl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="corpus jsonl")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.bin/.idx")
    parser.add_argument("--tokenizer-model", required=True,
                        help="sentencepiece .model file or Hugging Face tokenizer directory")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="tokenizer processes (default: all cores)")
    parser.add_argument("--split-by-domain", action="store_true",
                        help="also write one dataset per domain, <prefix>.<domain>")
    parser.add_argument("--only-split", choices=("train", "valid"), default=None,
                        help="keep only records whose 'split' field matches (default: all)")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--domain-key", default="domain")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Preprocess the corpus and print per-domain counts; return the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        summary = preprocess_jsonl(
            args.input, args.output_prefix, args.tokenizer_model, args.workers,
            args.split_by_domain, args.only_split, args.text_key, args.domain_key,
            progress=lambda items, total: tqdm(items, total=total, desc="tokenizing",
                                               unit=" docs"))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"{'domain':<15}{'docs':>7}{'tokens':>10}")
    for name in summary.domain_names:
        print(f"{name:<15}{summary.documents.get(name, 0):>7}{summary.tokens.get(name, 0):>10}")
    print(f"skipped: {summary.skipped_empty} empty, {summary.skipped_other_split} other split")
    print(f"wrote {', '.join(summary.prefixes)} (.bin/.idx/.domains.*) "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
