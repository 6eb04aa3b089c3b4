"""Names of this rank's parameters in the one-process model: the layer index of a pipeline
stage's layer made global (``layer_number - 1``), a local expert's index made global (this
rank's expert-parallel offset added; local experts are contiguous, ``E / ep`` per rank)."""

from __future__ import annotations

import re

import torch
from megatron.core import parallel_state

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"(\.mlp\.experts\.local_experts\.)(\d+)(\.)")
_GROUPED_EXPERT = re.compile(r"(\.mlp\.experts\.linear_fc[12]\.(?:weight|bias))(\d+)$")


def global_parameter_names(model: torch.nn.Module,
                           names: list[str] | None = None) -> dict[str, str]:
    """Local name -> global name, for ``names`` (default: the model's parameters)."""
    layer_numbers = {index: layer.layer_number - 1
                     for index, layer in enumerate(model.decoder.layers)}
    num_experts = model.config.num_moe_experts or 0
    ep_size = parallel_state.get_expert_model_parallel_world_size()
    offset = parallel_state.get_expert_model_parallel_rank() * (num_experts // ep_size)
    result = {}
    for local in names if names is not None else [n for n, _ in model.named_parameters()]:
        name = local
        layer = _LAYER.match(name)
        if layer:
            name = f"decoder.layers.{layer_numbers[int(layer.group(1))]}." + name[layer.end():]
        name = _LOCAL_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}{m.group(3)}",
                                 name)
        name = _GROUPED_EXPERT.sub(lambda m: f"{m.group(1)}{int(m.group(2)) + offset}", name)
        result[local] = name
    return result
