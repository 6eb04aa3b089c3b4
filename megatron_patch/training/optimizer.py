"""Megatron-core's optimizer (dense/expert chained, distributed on GPU) and LR/WD schedule."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel
from megatron.core.optimizer import MegatronOptimizer, get_megatron_optimizer
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from megatron_patch.training.config import JobConfig


def build_optimizer(
    job: JobConfig, model: list[DistributedDataParallel]
) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    """AdamW over ``main_grad`` with grad clipping, and warmup + cosine (or linear) decay.

    The same megatron-core code runs on GPU (Megatron's distributed optimizer with
    ``--use-distributed-optimizer``, bf16 master weights kept in fp32) and on CPU, where it
    falls back to torch's AdamW inside megatron's FP32Optimizer. Gradient norms are reduced over
    the model-parallel groups (dense and expert parameters separately), so clipping is identical
    under every layout.
    """
    opt, train_iters = job.optimizer, job.training.train_iters
    config = MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt.lr,
        min_lr=opt.min_lr,
        weight_decay=opt.weight_decay,
        adam_beta1=opt.adam_beta1,
        adam_beta2=opt.adam_beta2,
        adam_eps=opt.adam_eps,
        clip_grad=opt.clip_grad,
        bf16=job.model.bf16,
        params_dtype=model[0].config.params_dtype,
        use_distributed_optimizer=job.parallel.use_distributed_optimizer,
    )
    optimizer = get_megatron_optimizer(config, model)
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=opt.lr,
        min_lr=opt.min_lr,
        lr_warmup_steps=opt.lr_warmup_iters,
        lr_decay_steps=train_iters,
        lr_decay_style=opt.lr_decay_style,
        start_wd=opt.weight_decay,
        end_wd=opt.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
