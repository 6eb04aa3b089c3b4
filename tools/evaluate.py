"""Downstream evaluation of a model on task files (and HumanEval).

    python tools/evaluate.py --hf runs/posttrain/hf --tasks data/tasks/test.jsonl --output-dir runs/eval
    python tools/evaluate.py --load runs/posttrain/checkpoints --tasks data/tasks/test.jsonl --output-dir runs/eval
    python -m torch.distributed.run --nproc-per-node 2 tools/evaluate.py --hf DIR --tasks F --output-dir D

Task files: jsonl with "prompt", "answer", optional "task", "choices", "metric"
(megatron_patch/evaluation/items.py). Greedy generation with transformers' KV cache, scored by
exact or numeric match; "choices" are scored by log-likelihood; HumanEval by running its tests.
Writes evaluation.json (every item) and evaluation.md (per-task accuracy and answer loss). The
numbers are the same in one process and under data parallelism. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from megatron_patch.analysis.loading import AnalysisError  # noqa: E402
from megatron_patch.evaluation.items import TaskFileError  # noqa: E402
from megatron_patch.evaluation.job import EvaluationOptions, run_evaluation  # noqa: E402
from megatron_patch.evaluation.report import markdown  # noqa: E402
from megatron_patch.flags import ConfigError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--hf", help="Hugging Face checkpoint directory")
    model.add_argument("--load", help="checkpoint saved by the trainer (exported first)")
    parser.add_argument("--tasks", nargs="*", default=[], help="task files (jsonl)")
    parser.add_argument("--humaneval", type=int, nargs="?", const=-1, default=0,
                        help="also HumanEval: its first N problems, all 164 without N")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch-size", type=int, default=16,
                        help="requests per forward pass (the numbers depend on it, not on the "
                             "number of processes)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--no-progress-bar", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    options = EvaluationOptions(
        output_dir=args.output_dir, hf=args.hf, load=args.load, tasks=args.tasks,
        humaneval=None if args.humaneval == -1 else args.humaneval, batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens, progress=not args.no_progress_bar)
    try:
        report = run_evaluation(options)
    except (TaskFileError, ConfigError, AnalysisError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
