"""The megatron GPT-MoE of a Hugging Face checkpoint, built with this project's layer spec.

The architecture (sizes, attention, dense and MoE layers, router settings, load-balancing loss)
comes from the checkpoint (``HFCheckpoint.transformer_config_kwargs``); the runtime settings
(parallel layout, dtype, dispatcher, grouped GEMM, recompute) and the specialization losses from
the job.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel

from megatron_patch.hf.architectures import HFCheckpoint, HFImportError
from megatron_patch.hf.mla_attention import with_local_mla_attention
from megatron_patch.moe.config import MLASpecializationConfig, SpecializationConfig
from megatron_patch.moe.specs import get_gpt_block_spec
from megatron_patch.training.config import JobConfig
from megatron_patch.training.model import runtime_kwargs, transformer_engine_available


def hf_transformer_config(checkpoint: HFCheckpoint, job: JobConfig) -> SpecializationConfig:
    """SpecializationConfig of ``checkpoint``'s model under ``job``'s runtime and loss settings
    (fused kernels at megatron-core's defaults, as in this project's own models)."""
    config_class = (MLASpecializationConfig if checkpoint.architecture.multi_latent_attention
                    else SpecializationConfig)
    return config_class(
        **checkpoint.transformer_config_kwargs(),
        **runtime_kwargs(job),
        moe_token_dispatcher_type=job.moe.moe_token_dispatcher_type,
        moe_grouped_gemm=job.moe.moe_grouped_gemm,
        moe_permute_fusion=job.moe.moe_permute_fusion,
        **job.losses.transformer_config_kwargs(),
    )


def build_hf_gpt_model(checkpoint: HFCheckpoint, job: JobConfig) -> GPTModel:
    """This rank's pipeline stage of ``checkpoint``'s model (weights not loaded: see
    ``megatron_patch.hf.weights.load_hf_weights``); megatron's parallel state must be
    initialized for ``job``'s layout.

    Raises:
        HFImportError: a vocabulary the tensor-parallel size does not divide (padding it would
            change the softmax of the LM loss).
    """
    tp = job.parallel.tensor_model_parallel_size
    if checkpoint.vocab_size % tp != 0:
        raise HFImportError(
            f"{checkpoint.path}: vocab_size {checkpoint.vocab_size} is not divisible by "
            f"--tensor-model-parallel-size {tp}; choose a tensor-parallel size that divides it")
    config = hf_transformer_config(checkpoint, job)
    use_te = transformer_engine_available()
    spec = get_gpt_block_spec(config, use_transformer_engine=use_te)
    if config.multi_latent_attention and not use_te:
        spec = with_local_mla_attention(spec, config)
    hf_config = checkpoint.hf_config
    model = GPTModel(
        config=config,
        transformer_layer_spec=spec,
        vocab_size=checkpoint.vocab_size,
        max_sequence_length=hf_config.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=checkpoint.tied_embeddings,
        position_embedding_type="rope",
        rotary_base=float(hf_config.rope_theta),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
