"""Multi-latent attention's core attention with megatron-core's local (non-Transformer-Engine)
modules: the CPU path of the DeepSeek-V2/V3 and Moonlight models.

megatron-core's MLA hands its core attention different head sizes for queries/keys
(``k_channels`` = nope + rope head dims) and values (``v_channels``); its local
``DotProductAttention`` takes neither (only Transformer Engine's attention does). The
computation itself is independent of the head size; only the output width differs.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Optional

from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.multi_latent_attention import MLASelfAttention
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec


class LocalMLACoreAttention(DotProductAttention):
    """``DotProductAttention`` for ``MLASelfAttention``: scaled dot products of [s, b, n, k]
    queries and keys, weighted sum of [s, b, n, v] values -> context [s, b, n/tp * v]."""

    def __init__(self, *args: Any, k_channels: Optional[int] = None,
                 v_channels: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if v_channels is not None:
            heads = self.num_attention_heads_per_partition
            self.hidden_size_per_partition = heads * v_channels


def with_local_mla_attention(block_spec: Any, config: Any) -> Any:
    """``block_spec`` (a TransformerBlock spec) with ``LocalMLACoreAttention`` as the core
    attention of every local-spec ``MLASelfAttention`` layer, and no query norm where queries
    are not compressed (``q_lora_rank`` None: DeepSeek-V2-Lite; megatron-core 0.19 refuses an
    unused norm, the local spec builds one)."""
    spec = copy.copy(block_spec)
    layers = []
    for layer in spec.layer_specs:
        attention = layer.submodules.self_attention
        if (isinstance(attention, ModuleSpec) and attention.module is MLASelfAttention
                and attention.submodules.core_attention is DotProductAttention):
            layer = copy.deepcopy(layer)
            changes: dict[str, Any] = {"core_attention": LocalMLACoreAttention}
            if config.q_lora_rank is None:
                changes["q_layernorm"] = IdentityOp
            layer.submodules.self_attention.submodules = dataclasses.replace(
                attention.submodules, **changes)
        layers.append(layer)
    spec.layer_specs = layers
    return spec
