"""This project's own GPT-MoE as a Hugging Face checkpoint: the Mixtral architecture.

A model pretrained here (``megatron_patch.training.pretrain`` without ``--hf-load``) is a Mixtral
when it has what Mixtral has: every layer MoE, RMSNorm, SwiGLU experts, RoPE, no biases, no
shared experts, and Mixtral's routing (softmax over the top-k logits, i.e. the top-k softmax
scores renormalized: ``--moe-router-score-function softmax`` without ``--moe-router-pre-softmax``
or expert bias, top-k >= 2). ``mixtral_checkpoint`` writes such a model's Hugging Face config and
its tokenizer into a directory; ``megatron_patch.hf.weights.export_hf_weights`` then writes the
weights next to them, and ``--hf-load`` reads the result back as any Mixtral. Anything else is
refused, naming the flag.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from megatron_patch.data.provenance import HF_TOKENIZER_FILES
from megatron_patch.hf.architectures import (
    ARCHITECTURES,
    HFCheckpoint,
    HFImportError,
)
from megatron_patch.training.config import JobConfig

NATIVE_MODEL_TYPE = "mixtral"
# GPTModel's default RoPE base, which the trainer's models use.
ROTARY_BASE = 10000.0


def mixtral_refusals(job: JobConfig) -> list[str]:
    """Why ``job``'s model has no Hugging Face Mixtral form: the flags Mixtral cannot express,
    and a tokenizer that is no Hugging Face tokenizer directory (empty: it exports)."""
    model, moe = job.model, job.moe
    found = []
    tokenizer = job.data.tokenizer_model
    if tokenizer is None or not Path(tokenizer).is_dir():
        found.append(f"--tokenizer-model {tokenizer} is not a Hugging Face tokenizer directory "
                     "(pretrain with one saved by save_pretrained, e.g. "
                     "megatron_patch.hf.tiny.save_tiny_tokenizer)")
    if model.normalization != "RMSNorm":
        found.append(f"--normalization {model.normalization} (Mixtral: RMSNorm)")
    if not model.swiglu:
        found.append("no --swiglu (Mixtral's experts are SwiGLU)")
    if model.position_embedding_type != "rope":
        found.append(f"--position-embedding-type {model.position_embedding_type} (Mixtral: rope)")
    if moe.moe_layer_freq != 1:
        found.append(f"--moe-layer-freq {moe.moe_layer_freq} (Mixtral: every layer MoE)")
    if moe.moe_shared_expert_intermediate_size:
        found.append("--moe-shared-expert-intermediate-size (Mixtral has no shared experts)")
    if moe.moe_router_score_function != "softmax" or moe.moe_router_enable_expert_bias:
        found.append("sigmoid scores or expert bias (Mixtral: softmax, no bias)")
    if moe.moe_router_pre_softmax or moe.moe_router_topk < 2:
        found.append("--moe-router-pre-softmax or top-1 routing (Mixtral renormalizes the "
                     "top-k >= 2 softmax scores)")
    return found


def refuse_non_mixtral(job: JobConfig) -> None:
    """Raises HFImportError naming every ``mixtral_refusals`` of ``job``'s model, if any."""
    refused = mixtral_refusals(job)
    if refused:
        raise HFImportError("this model has no Hugging Face (Mixtral) form: "
                            + "; ".join(refused))


def mixtral_config(job: JobConfig, vocab_size: int, norm_epsilon: float, tokenizer: Any) -> Any:
    """The ``MixtralConfig`` of ``job``'s model with ``vocab_size`` embeddings, its norms'
    ``norm_epsilon`` and the special token ids of ``tokenizer`` (a transformers tokenizer).

    Raises:
        HFImportError: the model is no Mixtral (``mixtral_refusals``, all of them named).
    """
    from transformers import MixtralConfig

    refuse_non_mixtral(job)
    model, moe = job.model, job.moe
    heads = model.num_attention_heads
    return MixtralConfig(
        vocab_size=vocab_size,
        hidden_size=model.hidden_size,
        intermediate_size=moe.moe_ffn_hidden_size or model.ffn_hidden_size,
        num_hidden_layers=model.num_layers,
        num_attention_heads=heads,
        num_key_value_heads=model.num_query_groups or heads,
        head_dim=model.hidden_size // heads,
        max_position_embeddings=model.max_position_embeddings,
        rms_norm_eps=norm_epsilon,
        rope_theta=ROTARY_BASE,
        tie_word_embeddings=not model.untie_embeddings_and_output_weights,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.moe_router_topk,
        router_aux_loss_coef=moe.moe_aux_loss_coeff,
        initializer_range=model.init_method_std,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="bfloat16" if model.bf16 else "float32",
    )


def mixtral_checkpoint(job: JobConfig, model: Any, directory: str | Path) -> HFCheckpoint:
    """Write the Mixtral config of ``model`` (a GPTModel built from ``job``) and the job's
    tokenizer files into ``directory`` (no weights); returns it as the ``HFCheckpoint`` an
    export of the model follows.

    Raises:
        HFImportError: the model is no Mixtral or has no Hugging Face tokenizer directory.
    """
    from transformers import AutoTokenizer

    refuse_non_mixtral(job)
    source = Path(job.data.tokenizer_model)
    config = mixtral_config(job, model.vocab_size, model.config.layernorm_epsilon,
                            AutoTokenizer.from_pretrained(source))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(directory)
    for name in HF_TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, directory / name)
    return HFCheckpoint(directory, config, ARCHITECTURES[NATIVE_MODEL_TYPE], weight_files={})
