#!/usr/bin/env python3
"""Train a byte-fallback sentencepiece tokenizer (BPE or unigram) on a corpus jsonl.

Example:
    python tools/train_tokenizer.py --input data/corpus.jsonl --model-prefix data/tokenizer \
        --vocab-size 8192 --model-type bpe
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.data.tokenizer import MODEL_TYPES, train_sentencepiece  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, required=True, help="corpus jsonl")
    parser.add_argument("--model-prefix", type=Path, required=True,
                        help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--sample-size", type=int, default=1_000_000,
                        help="text lines sampled for training; 0 for all (default 1000000)")
    parser.add_argument("--text-key", default="text", help="jsonl field with the text")
    parser.add_argument("--seed", type=int, default=1234)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Train the tokenizer; return the exit status."""
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        model = train_sentencepiece(args.input, args.model_prefix, args.vocab_size,
                                    args.model_type, args.sample_size, args.seed, args.text_key)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {model} and {model.with_suffix('.vocab')} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
