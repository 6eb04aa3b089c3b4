"""Measure the expert specialization of a GPT-MoE checkpoint on a validation set with domains.

    python tools/analyze_specialization.py --load runs/demo/checkpoints --output-dir runs/demo/analysis

writes ``specialization.json``, ``specialization.md`` and PNG plots (domain x expert load per
layer, load per expert, expert output / weight similarity matrices). One process on CPU or one
GPU (the checkpoint is resharded to it); or under torchrun with the checkpoint's own
data + expert parallel layout (TP = PP = 1). Metric definitions: docs/analysis.md.
Exit status 2 on bad input (the message names the fix).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="analyze_specialization", allow_abbrev=False,
        description="Expert overlap, routing variance/entropy, MaxVio, silhouette, expert "
                    "similarity and domain-expert mutual information of a GPT-MoE checkpoint.")
    p.add_argument("--load", required=True,
                   help="checkpoint: a pretrain --save directory (newest iter_*) or an iter_* dir")
    p.add_argument("--data-path", default=None,
                   help="validation dataset prefix (.bin/.idx, with .domains.npy/.json for the "
                        "domain metrics); default: the run's --valid-data-path")
    p.add_argument("--tokenizer-model", default=None, help="default: the run's tokenizer")
    p.add_argument("--config", default=None,
                   help="pretrain YAML describing the model, only for checkpoints that do not "
                        "record their flags")
    p.add_argument("--output-dir", default=None,
                   help="where the report goes (default: <checkpoint>/analysis)")
    p.add_argument("--num-samples", type=int, default=64,
                   help="validation sequences to analyze (0: the whole epoch); default 64")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="cap on analyzed tokens, rounded down to whole sequences")
    p.add_argument("--sample-tokens", type=int, default=2048,
                   help="tokens on which every expert is run (expert overlap, output similarity, "
                        "silhouette)")
    p.add_argument("--silhouette-points", type=int, default=2000,
                   help="routed (token, expert) outputs in the silhouette (O(N^2) memory)")
    p.add_argument("--silhouette-metric", choices=("cosine", "euclidean"), default="cosine")
    p.add_argument("--micro-batch-size", type=int, default=None,
                   help="sequences per forward pass (default: the run's)")
    p.add_argument("--seed", type=int, default=1234,
                   help="shuffle of the validation epoch and the token samples")
    p.add_argument("--no-plots", action="store_true", help="JSON and Markdown only")
    p.add_argument("--no-progress-bar", action="store_true")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("num_samples", "sample_tokens", "silhouette_points"):
        if getattr(args, flag) < 0:
            print(f"error: --{flag.replace('_', '-')} must be >= 0", file=sys.stderr)
            return 2
    if not args.no_plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("error: the PNG plots need matplotlib (pip install matplotlib==3.11.2); or pass "
                  "--no-plots", file=sys.stderr)
            return 2
    from megatron_patch.analysis.loading import AnalysisError
    from megatron_patch.analysis.report import write_report
    from megatron_patch.analysis.runner import AnalysisOptions, run_analysis
    from megatron_patch.training.checkpointing import CheckpointMismatchError
    from megatron_patch.distributed import shutdown
    from megatron_patch.flags import ConfigError

    opts = AnalysisOptions(
        load=args.load, data_path=args.data_path, tokenizer_model=args.tokenizer_model,
        config=args.config, num_samples=args.num_samples or None, max_tokens=args.max_tokens,
        sample_tokens=args.sample_tokens, silhouette_points=args.silhouette_points,
        silhouette_metric=args.silhouette_metric, micro_batch_size=args.micro_batch_size,
        seed=args.seed, progress=not args.no_progress_bar)
    start = time.perf_counter()
    try:
        result = run_analysis(opts)
        import torch.distributed as dist

        if dist.get_rank() == 0:
            out = Path(args.output_dir) if args.output_dir else Path(result["checkpoint"]) / "analysis"
            paths = write_report(result, out, plots=not args.no_plots)
            mean = result["mean"]
            print(f"analyzed {result['num_tokens']} tokens of {result['data_path']} in "
                  f"{time.perf_counter() - start:.1f}s")
            for key in ("expert_overlap", "routing_overlap", "routing_variance",
                        "routing_entropy", "max_vio", "silhouette", "output_similarity_mean",
                        "weight_similarity_mean", "domain_nmi"):
                print(f"  {key:24s} {mean[key]:.4g}")
            print(f"report: {paths['markdown']}\njson  : {paths['json']}")
    except (AnalysisError, CheckpointMismatchError, ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 2
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
