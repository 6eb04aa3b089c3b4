"""Tiny random Hugging Face MoE checkpoints of every supported architecture, written with
transformers' own ``save_pretrained``: what the tests and ``tools/check_hf_import.py --tiny``
import when no real checkpoint is at hand (no hub access is needed).

Every tensor is drawn at random (norm weights around 1, biases and the shared-expert gate
non-zero), so a tensor loaded into the wrong place, or left at its initial value, changes the
logits.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Small enough for a CPU test, big enough for every layout of the checks: 2 layers (pp2),
# 4 experts (ep2), 4 heads / 2 key-value groups and a vocabulary divisible by 2 (tp2). The
# routers are set to what each family's real models do (renormalized or not, groups, scaling).
_COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6,
               rope_theta=10000.0, tie_word_embeddings=False, num_experts_per_tok=2)

TINY_CONFIGS = {
    "qwen3_moe": dict(_COMMON, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
                      num_experts=4, norm_topk_prob=True),
    "qwen2_moe": dict(_COMMON, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
                      shared_expert_intermediate_size=48, norm_topk_prob=False, qkv_bias=True),
    "mixtral": dict(_COMMON, intermediate_size=32, num_local_experts=4),
    # Layer 0 dense, layer 1 MoE (first_k_dense_replace); multi-latent attention.
    "deepseek_v3": dict(_COMMON, num_key_value_heads=4, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        n_group=2, topk_group=1, routed_scaling_factor=2.5, norm_topk_prob=True),
    "deepseek_v2": dict(_COMMON, num_key_value_heads=4, intermediate_size=96,
                        moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1,
                        first_k_dense_replace=1, q_lora_rank=None, kv_lora_rank=16,
                        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        topk_method="greedy", n_group=1, topk_group=1, aux_loss_alpha=0.001,
                        seq_aux=True, routed_scaling_factor=1.5),
}


# ChatML, the template of the Qwen chat models (a tiny tokenizer's chat template).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def save_tiny_tokenizer(directory: str | Path, texts: list[str], vocab_size: int = 384) -> int:
    """Train a byte-level BPE tokenizer of ``vocab_size`` tokens on ``texts`` (with ChatML
    special tokens and chat template, end-of-text as EOS and padding) and ``save_pretrained``
    it to ``directory``; returns its number of tokens (the embedding size a model needs)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token=SPECIAL_TOKENS[0], pad_token=SPECIAL_TOKENS[0],
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        model_input_names=["input_ids", "attention_mask"])
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    return len(tokenizer)


def save_tiny_model(model_type: str, directory: str | Path, seed: int = 0,
                    **overrides) -> Path:
    """Write a tiny random ``model_type`` checkpoint (safetensors) to ``directory``.

    Args:
        model_type: a key of ``TINY_CONFIGS``.
        overrides: config fields replacing the tiny ones.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, **{**TINY_CONFIGS[model_type], **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0.0, 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3's expert bias
                buffer.normal_(0.0, 0.1)
    model.save_pretrained(directory, safe_serialization=True)
    return Path(directory)
