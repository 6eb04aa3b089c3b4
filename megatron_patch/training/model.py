"""GPT-MoE model of the pretraining entry point: config from flags, layer spec, megatron DDP."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.models.gpt import GPTModel

from megatron_patch.moe.arguments import specialization_config_kwargs
from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.experts import sequential_experts
from megatron_patch.moe.specs import get_gpt_layer_spec


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports (the NGC images); the CPU path uses local modules."""
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def build_config(args: argparse.Namespace) -> SpecializationConfig:
    """SpecializationConfig (a TransformerConfig) from the parsed flags."""
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    recompute = {}
    if args.recompute_granularity is not None:
        recompute = dict(
            recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method,
            recompute_num_layers=args.recompute_num_layers,
        )
    return SpecializationConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        normalization=args.normalization,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        init_method_std=args.init_method_std,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        add_bias_linear=False,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        moe_layer_freq=args.moe_layer_freq,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_z_loss_coeff=args.moe_z_loss_coeff,
        moe_router_score_function=args.moe_router_score_function,
        moe_router_pre_softmax=args.moe_router_pre_softmax or args.moe_router_topk == 1,
        moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_expert_capacity_factor=args.moe_expert_capacity_factor,
        moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
        moe_grouped_gemm=args.moe_grouped_gemm,
        moe_permute_fusion=args.moe_permute_fusion,
        **recompute,
        **specialization_config_kwargs(args),
    )


def build_model(
    args: argparse.Namespace, config: SpecializationConfig, vocab_size: int
) -> list[DistributedDataParallel]:
    """This rank's pipeline stage of the GPT-MoE, wrapped in megatron DDP (one model chunk).

    Args:
        args: parsed flags.
        config: from ``build_config``.
        vocab_size: tokenizer vocabulary size (padded by nothing: the demo vocabularies are
            multiples of 128 and the embedding is vocab-parallel).
    """
    use_te = transformer_engine_available()
    spec = get_gpt_layer_spec(
        args.num_experts,
        use_transformer_engine=use_te,
        moe_grouped_gemm=args.moe_grouped_gemm,
        normalization=args.normalization,
    )
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    if args.moe_identical_expert_init:
        init_identical_experts(model)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    ddp_model = DistributedDataParallel(config, ddp_config, model)
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    return [ddp_model]


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
