"""Megatron-core's optimizer (dense/expert chained, distributed on GPU) and LR/WD schedule."""

from __future__ import annotations

import argparse

from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer, OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler


def build_optimizer(
    args: argparse.Namespace, model: list[DistributedDataParallel]
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """AdamW over ``main_grad`` with grad clipping, and warmup + cosine (or linear) decay.

    The same megatron-core code runs on GPU (Megatron's distributed optimizer with
    ``--use-distributed-optimizer``, bf16 master weights kept in fp32) and on CPU, where it
    falls back to torch's AdamW inside megatron's FP32Optimizer. Gradient norms are reduced over
    the model-parallel groups (dense and expert parameters separately), so clipping is identical
    under every layout.
    """
    config = OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        params_dtype=model[0].config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters,
        lr_decay_steps=args.train_iters,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
