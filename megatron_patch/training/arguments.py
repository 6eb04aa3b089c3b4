"""Megatron-style command-line flags of the pretraining entry point, with an optional YAML file.

A YAML file given with ``--config`` sets defaults by flag name (``num_layers: 4`` or
``num-layers: 4``); flags on the command line override it. Unknown keys, unknown flags and
inconsistent values fail before any process group is created, with a message naming the fix.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional, Sequence

import yaml

from megatron_patch.moe.arguments import add_specialization_args
from megatron_patch.moe.gated_gram import triton_kernel_problem
from megatron_patch.optimizer.orthogonal import OrthogonalOptimizerConfig, OrthogonalOptimizerError


class ArgumentError(ValueError):
    """A flag value that cannot work; the message names the flag and the fix."""


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None,
                   help="dense MLP size (default 4 * hidden size)")
    g.add_argument("--num-attention-heads", type=int, default=4)
    g.add_argument("--num-query-groups", type=int, default=None)
    g.add_argument("--seq-length", type=int, default=128)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"),
                   default="rope")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="RMSNorm")
    g.add_argument("--swiglu", action="store_true", help="gated SiLU expert/dense MLPs")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--bf16", action="store_true", help="bf16 training (GPU)")


def _add_moe_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=8)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="expert MLP size (default: --ffn-hidden-size)")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None)
    g.add_argument("--moe-layer-freq", type=int, default=1,
                   help="every N-th layer is MoE (1: all layers)")
    g.add_argument("--moe-router-load-balancing-type", default="aux_loss",
                   choices=("aux_loss", "seq_aux_loss", "global_aux_loss", "sinkhorn", "none"))
    g.add_argument("--moe-aux-loss-coeff", type=float, default=1e-2)
    g.add_argument("--moe-z-loss-coeff", type=float, default=None)
    g.add_argument("--moe-router-score-function", choices=("softmax", "sigmoid"),
                   default="softmax")
    g.add_argument("--moe-router-pre-softmax", action="store_true")
    g.add_argument("--moe-router-enable-expert-bias", action="store_true")
    g.add_argument("--moe-token-dispatcher-type", choices=("alltoall", "allgather", "flex"),
                   default="alltoall")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None)
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true")
    g.add_argument("--moe-grouped-gemm", action="store_true", help="grouped GEMM experts (GPU)")
    g.add_argument("--moe-identical-expert-init", action="store_true",
                   help="start every routed expert of a layer as a copy of its expert 0 (the state "
                   "sparse upcycling starts from; a test of expert diversification)")
    g.add_argument("--moe-permute-fusion", action="store_true")
    add_specialization_args(parser)
    o = parser.add_argument_group("orthogonal expert optimizer (OMoE, arXiv 2310.09762)")
    o.add_argument("--moe-orthogonal-optimizer", action="store_true",
                   help="alternate plain steps with steps whose expert gradients are projected "
                   "orthogonally to the other experts' subspace")
    o.add_argument("--moe-orthogonal-accumulate-steps", type=int, default=4,
                   help="N: plain steps of each cycle")
    o.add_argument("--moe-orthogonal-steps", type=int, default=1,
                   help="M: projected steps of each cycle (0: the base optimizer only)")
    o.add_argument("--moe-orthogonal-alpha", type=float, default=1.0,
                   help="OWM regularizer a of P = a (S_others + a I)^-1")
    o.add_argument("--moe-orthogonal-subspace", choices=("weights", "representations"),
                   default="weights",
                   help="what spans another expert's subspace: its current weight rows/columns "
                   "(weights), or the hidden states it was routed and the outputs it produced "
                   "in the last --moe-orthogonal-window accumulating steps (representations)")
    o.add_argument("--moe-orthogonal-window", type=int, default=1,
                   help="representations: how many of the last accumulating steps of each cycle "
                   "are recorded")
    o.add_argument("--moe-orthogonal-params", choices=("fc1", "fc2", "both"), default="both",
                   help="which expert weight matrices are projected")


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="default: --tensor-model-parallel-size")
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="Megatron's distributed optimizer (GPU)")
    g.add_argument("--distributed-backend", choices=("auto", "nccl", "gloo"), default="auto")


def _add_training_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=16)
    g.add_argument("--train-iters", type=int, default=100)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-4)
    g.add_argument("--lr-warmup-iters", type=int, default=10)
    g.add_argument("--lr-decay-style", choices=("cosine", "linear", "constant"), default="cosine")
    g.add_argument("--weight-decay", type=float, default=0.1)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="dataset prefixes, optionally weighted: 'P' or 'W1 P1 W2 P2 ...'")
    g.add_argument("--split", default="98,2,0",
                   help="train,valid,test document proportions of --data-path")
    g.add_argument("--valid-data-path", nargs="+", default=None,
                   help="separate validation prefixes (then --data-path is all training data)")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece .model file")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--eval-interval", type=int, default=50)
    g.add_argument("--eval-iters", type=int, default=5)


def _add_checkpoint_logging_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from")
    g.add_argument("--finetune", action="store_true",
                   help="with --load: take the checkpoint's model weights only and start at "
                   "iteration 0 with a fresh optimizer, LR schedule and data position (post-"
                   "training); 'auto' loss coefficients are calibrated anew")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept on disk")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (with --save) and exit after this iteration")
    g.add_argument("--log-interval", type=int, default=1)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None)
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--log-per-layer-moe-metrics", action="store_true")
    g.add_argument("--no-progress-bar", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    """The full parser of ``megatron_patch.training.pretrain``."""
    parser = argparse.ArgumentParser(
        prog="pretrain_moe",
        description="Pretrain a GPT-MoE with megatron-core and the specialization losses.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", default=None, help="YAML file of flag defaults")
    _add_model_args(parser)
    _add_moe_args(parser)
    _add_parallel_args(parser)
    _add_training_args(parser)
    _add_data_args(parser)
    _add_checkpoint_logging_args(parser)
    return parser


def _yaml_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise ArgumentError(f"--config {path}: no such file")
    loaded = yaml.safe_load(file.read_text()) or {}
    if not isinstance(loaded, dict):
        raise ArgumentError(f"--config {path}: expected a mapping of flag names to values")
    known = {action.dest for action in parser._actions}
    defaults = {}
    for key, value in loaded.items():
        dest = str(key).lstrip("-").replace("-", "_")
        if dest not in known or dest == "config":
            raise ArgumentError(
                f"--config {path}: unknown key {key!r}; keys are flag names such as num_layers"
            )
        defaults[dest] = value
    return defaults


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse flags (and the YAML ``--config`` file); raises ArgumentError on bad input."""
    parser = build_parser()
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        parser.set_defaults(**_yaml_defaults(parser, pre.config))
    args = parser.parse_args(argv)
    if args.expert_tensor_parallel_size is None:
        args.expert_tensor_parallel_size = args.tensor_model_parallel_size
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = 4 * args.hidden_size
    if args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    return args


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Check sizes that must agree before any work starts.

    Raises:
        ArgumentError: with the offending flags and a fix.
    """
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    ep, etp = args.expert_model_parallel_size, args.expert_tensor_parallel_size
    for flag, value in (
        ("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
        ("--expert-model-parallel-size", ep), ("--expert-tensor-parallel-size", etp),
        ("--micro-batch-size", args.micro_batch_size), ("--train-iters", args.train_iters),
        ("--num-layers", args.num_layers), ("--seq-length", args.seq_length),
    ):
        if value < 1:
            raise ArgumentError(f"{flag} must be >= 1, got {value}")
    if world_size % (tp * pp) != 0:
        raise ArgumentError(
            f"world size {world_size} is not a multiple of --tensor-model-parallel-size {tp} x "
            f"--pipeline-model-parallel-size {pp}; launch tp*pp*dp processes"
        )
    dp = world_size // (tp * pp)
    if (tp * dp) % (etp * ep) != 0:
        raise ArgumentError(
            f"--expert-model-parallel-size {ep} x --expert-tensor-parallel-size {etp} must divide "
            f"tp x dp = {tp * dp} (world {world_size} / pp {pp}); lower them or add processes"
        )
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} must be <= --lr {args.lr}")
    if args.moe_identical_expert_init and args.moe_grouped_gemm:
        raise ArgumentError(
            "--moe-identical-expert-init supports SequentialMLP experts: drop --moe-grouped-gemm"
        )
    if args.moe_ortho_loss_kernel == "triton" and (problem := triton_kernel_problem()):
        raise ArgumentError(problem)
    if args.moe_loss_calibration_iters != 0:
        auto = "auto" in (args.moe_ortho_loss_coeff, args.moe_var_loss_coeff)
        if not auto or not 0 < args.moe_loss_calibration_iters < args.train_iters:
            raise ArgumentError(
                f"--moe-loss-calibration-iters {args.moe_loss_calibration_iters} needs an 'auto' "
                "--moe-ortho-loss-coeff or --moe-var-loss-coeff and a value in "
                f"[1, --train-iters {args.train_iters}); pass 0 to calibrate on the first batch"
            )
    if args.moe_orthogonal_optimizer:
        try:
            OrthogonalOptimizerConfig.from_args(args)
        except OrthogonalOptimizerError as error:
            raise ArgumentError(str(error)) from None
    if args.num_experts % ep != 0:
        raise ArgumentError(
            f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size "
            f"{ep}; each EP rank must hold the same number of experts"
        )
    if args.num_layers % pp != 0:
        raise ArgumentError(
            f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}"
        )
    if args.global_batch_size % (args.micro_batch_size * dp) != 0:
        raise ArgumentError(
            f"--global-batch-size {args.global_batch_size} must be a multiple of "
            f"--micro-batch-size {args.micro_batch_size} x data-parallel size {dp}"
        )
    if tp > 1 and not args.sequence_parallel:
        raise ArgumentError(
            "MoE training with --tensor-model-parallel-size > 1 needs --sequence-parallel"
        )
    if args.sequence_parallel and args.seq_length % tp != 0:
        raise ArgumentError(
            f"--seq-length {args.seq_length} must be divisible by --tensor-model-parallel-size "
            f"{tp} with --sequence-parallel"
        )
    if args.hidden_size % args.num_attention_heads != 0:
        raise ArgumentError("--hidden-size must be divisible by --num-attention-heads")
    if args.num_attention_heads % tp != 0:
        raise ArgumentError(
            "--num-attention-heads must be divisible by --tensor-model-parallel-size"
        )
    if not 0 <= args.lr_warmup_iters < args.train_iters:
        raise ArgumentError(
            f"--lr-warmup-iters {args.lr_warmup_iters} must be >= 0 and smaller than "
            f"--train-iters {args.train_iters}"
        )
    if args.moe_router_topk > args.num_experts:
        raise ArgumentError("--moe-router-topk cannot exceed --num-experts")
    if args.finetune and args.load is None:
        raise ArgumentError("--finetune needs --load: the checkpoint whose weights to start from")
    if args.load is None and args.save is None and args.save_interval:
        raise ArgumentError("--save-interval needs --save DIR")
    if args.data_path is None:
        raise ArgumentError(
            "--data-path is required (dataset prefix of a .bin/.idx pair); `make data` builds the "
            "built-in corpus into data/corpus_train, tools/preprocess_data.py converts your jsonl"
        )
    if args.tokenizer_model is None:
        raise ArgumentError("--tokenizer-model is required: the sentencepiece model the data was "
                            "tokenized with (data/tokenizer.model for the built-in corpus)")
