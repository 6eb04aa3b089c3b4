"""Hugging Face MoE checkpoints: import into this project's megatron model (any layout), export
back. Needs the ``[hf]`` extra (transformers, mbridge, safetensors)."""

from megatron_patch.hf.architectures import (
    ARCHITECTURES,
    HFCheckpoint,
    HFImportError,
    read_checkpoint,
)
from megatron_patch.hf.model import build_hf_gpt_model, hf_transformer_config
from megatron_patch.hf.weights import export_hf_weights, load_hf_weights

__all__ = ["ARCHITECTURES", "HFCheckpoint", "HFImportError", "build_hf_gpt_model",
           "export_hf_weights", "hf_transformer_config", "load_hf_weights", "read_checkpoint"]
