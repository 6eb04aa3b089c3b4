"""The routed-expert modules of a megatron-core GPT model, for features that act on each expert."""

from __future__ import annotations

from typing import Iterable, Iterator

import torch
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.transformer_layer import TransformerLayer


def sequential_experts(
    model_chunks: Iterable[torch.nn.Module], flag: str, error: type[Exception] = ValueError
) -> Iterator[tuple[int, SequentialMLP]]:
    """(global layer number, routed experts) of every MoE layer of this rank's model chunks.

    Args:
        model_chunks: the model chunks (possibly DDP-wrapped) of this rank.
        flag: the feature that needs per-expert modules, named in the error.
        error: raised for expert modules other than ``SequentialMLP`` (grouped GEMM keeps all
            experts' weights in one module).
    """
    for chunk in model_chunks:
        for name, module in chunk.named_modules():
            experts = getattr(getattr(module, "mlp", None), "experts", None)
            if not isinstance(module, TransformerLayer) or experts is None:
                continue
            if not isinstance(experts, SequentialMLP):
                raise error(
                    f"{flag} supports SequentialMLP experts; {name}.mlp.experts is "
                    f"{type(experts).__name__}. Drop --moe-grouped-gemm."
                )
            yield module.layer_number, experts
