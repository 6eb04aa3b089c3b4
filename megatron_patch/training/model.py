"""The GPT-MoE of a job: megatron-core config from the job's sections, layer spec, megatron DDP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel

from megatron_patch.flags import ConfigError
from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.experts import sequential_experts
from megatron_patch.moe.specs import get_gpt_layer_spec
from megatron_patch.training.config import JobConfig
from megatron_patch.training.lora import apply_lora
from megatron_patch.training.param_names import global_parameter_names


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (the NGC images); the CPU path uses local modules."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def runtime_kwargs(job: JobConfig) -> dict:
    """TransformerConfig fields that are the job's runtime choices, whatever the architecture:
    dtype, parallel sizes, activation recompute."""
    parallel, training = job.parallel, job.training
    dtype = torch.bfloat16 if job.model.bf16 else torch.float32
    kwargs = dict(
        bf16=job.model.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        expert_model_parallel_size=parallel.expert_model_parallel_size,
        expert_tensor_parallel_size=parallel.expert_tensor_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
    )
    if training.recompute_granularity is not None:
        kwargs.update(
            recompute_granularity=training.recompute_granularity,
            recompute_method=training.recompute_method,
            recompute_num_layers=training.recompute_num_layers,
            recompute_modules=training.recompute_modules,
        )
    return kwargs


def transformer_config(job: JobConfig) -> SpecializationConfig:
    """SpecializationConfig (a TransformerConfig) of the job's model, MoE, losses and parallel
    sections; megatron-core's and the losses' checks run here."""
    model, moe = job.model, job.moe
    return SpecializationConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        normalization=model.normalization,
        gated_linear_unit=model.swiglu,
        activation_func=F.silu if model.swiglu else F.gelu,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        add_bias_linear=False,
        num_moe_experts=moe.num_experts,
        moe_router_topk=moe.moe_router_topk,
        moe_ffn_hidden_size=moe.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.moe_shared_expert_intermediate_size,
        moe_layer_freq=moe.moe_layer_freq,
        moe_router_load_balancing_type=moe.moe_router_load_balancing_type,
        moe_aux_loss_coeff=moe.moe_aux_loss_coeff,
        moe_z_loss_coeff=moe.moe_z_loss_coeff,
        moe_router_score_function=moe.moe_router_score_function,
        moe_router_pre_softmax=moe.moe_router_pre_softmax or moe.moe_router_topk == 1,
        moe_router_enable_expert_bias=moe.moe_router_enable_expert_bias,
        moe_token_dispatcher_type=moe.moe_token_dispatcher_type,
        moe_expert_capacity_factor=moe.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=moe.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=moe.moe_grouped_gemm,
        moe_permute_fusion=moe.moe_permute_fusion,
        **runtime_kwargs(job),
        **job.losses.transformer_config_kwargs(),
    )


def job_transformer_config(job: JobConfig) -> SpecializationConfig:
    """The job's model configuration: ``transformer_config``, or with ``--hf-load`` the
    imported checkpoint's (``megatron_patch.hf``)."""
    if job.checkpoint.hf_load is None:
        return transformer_config(job)
    from megatron_patch.hf import hf_transformer_config, read_checkpoint

    return hf_transformer_config(read_checkpoint(job.checkpoint.hf_load), job)


def build_gpt_model(job: JobConfig, vocab_size: int) -> GPTModel:
    """This rank's pipeline stage of the job's GPT-MoE (megatron's parallel state must be
    initialized for the job's layout), on this rank's device. With ``--hf-load``: the imported
    checkpoint's model with its weights (``megatron_patch.hf``).

    Args:
        job: the job's configuration.
        vocab_size: tokenizer vocabulary size (padded by nothing: the demo vocabularies are
            multiples of 128 and the embedding is vocab-parallel); with ``--hf-load`` the
            checkpoint's embedding size is used, which holds the tokenizer's.
    """
    if job.checkpoint.hf_load is not None:
        from megatron_patch.hf import build_hf_gpt_model, load_hf_weights, read_checkpoint

        checkpoint = read_checkpoint(job.checkpoint.hf_load)
        if vocab_size > checkpoint.vocab_size:
            raise ConfigError(
                f"the tokenizer has {vocab_size} tokens, the embedding of --hf-load "
                f"{checkpoint.path} holds {checkpoint.vocab_size}: use the checkpoint's own "
                "tokenizer (the default) or one that fits it")
        model = build_hf_gpt_model(checkpoint, job)
        load_hf_weights(model, checkpoint)
        return with_lora(model, job)
    config = transformer_config(job)
    spec = get_gpt_layer_spec(
        job.moe.num_experts,
        use_transformer_engine=transformer_engine_available(),
        moe_grouped_gemm=job.moe.moe_grouped_gemm,
        normalization=job.model.normalization,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=job.model.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not job.model.untie_embeddings_and_output_weights,
        position_embedding_type=job.model.position_embedding_type,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if job.moe.moe_identical_expert_init:
        init_identical_experts(model)
    return with_lora(model, job)


def with_lora(model: GPTModel, job: JobConfig) -> GPTModel:
    """``model`` with LoRA adapters (``training.lora``) when ``--lora-rank`` is set."""
    if job.lora.enabled:
        apply_lora(model, job.lora, job.training.seed, global_parameter_names(model))
    return model


def wrap_ddp(model: GPTModel, use_distributed_optimizer: bool) -> list[DistributedDataParallel]:
    """``model`` in megatron DDP (fp32 gradient buffers), as the one chunk the pipeline
    schedules take; registers DDP's ``no_sync`` and ``finalize_model_grads`` in its config."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer
    )
    ddp_model = DistributedDataParallel(model.config, ddp_config, model)
    model.config.no_sync_func = ddp_model.no_sync
    model.config.finalize_model_grads_func = finalize_model_grads
    return [ddp_model]


def build_model(job: JobConfig, vocab_size: int) -> list[DistributedDataParallel]:
    """``build_gpt_model`` wrapped in megatron DDP (one model chunk)."""
    return wrap_ddp(build_gpt_model(job, vocab_size), job.parallel.use_distributed_optimizer)


@torch.no_grad()
def init_identical_experts(model: torch.nn.Module) -> None:
    """Make every routed expert of each MoE layer a copy of the layer's global expert 0.

    The state sparse upcycling starts from (all experts copies of one FFN): a stress test for
    expert diversification (``--moe-identical-expert-init``). Expert 0 lives on rank 0 of the
    expert-model-parallel group; its parameters (this rank's expert-tensor-parallel shard) are
    broadcast over that group, then copied into the local experts. Expert-data-parallel replicas
    do the same from identical sources.
    """
    group = parallel_state.get_expert_model_parallel_group()
    source_rank = torch.distributed.get_global_rank(group, 0)
    for _, experts in sequential_experts([model], "--moe-identical-expert-init"):
        source = list(experts.local_experts[0].parameters())
        for param in source:
            torch.distributed.broadcast(param.data, src=source_rank, group=group)
        for expert in experts.local_experts[1:]:
            for param, value in zip(expert.parameters(), source):
                param.copy_(value)
