#!/usr/bin/env python3
"""Tokenize instruction data (jsonl: chat ``messages`` or ``prompt``/``response``) for post-training.

Renders each record with the tokenizer's chat template (prompt + response + EOS without one),
keeps the loss on the response tokens, and writes <prefix>.bin/.idx, <prefix>_loss_mask.bin/.idx
and <prefix>.instruction.json. Records that cannot be used are counted by reason and reported.

Example:
    python tools/preprocess_instructions.py --input sft.jsonl --output-prefix data/sft \
        --tokenizer-model /path/to/Moonlight-16B-A3B --seq-length 384
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.data.instructions import preprocess_instructions  # noqa: E402
from megatron_patch.data.validation import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--input", type=Path, required=True, help="instruction jsonl")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-model", required=True,
                        help="Hugging Face tokenizer directory (the model's)")
    parser.add_argument("--seq-length", type=int, required=True,
                        help="the training run's --seq-length; longer conversations are left out")
    args = parser.parse_args(argv)
    try:
        summary = preprocess_instructions(args.input, args.output_prefix, args.tokenizer_model,
                                          args.seq_length)
    except (FileNotFoundError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"kept {summary.kept} conversations: {summary.tokens} tokens, {summary.loss_tokens} "
          "in the loss")
    for reason, count in sorted(summary.bad.items()):
        print(f"left out {count}: {reason}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
