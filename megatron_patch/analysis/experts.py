"""Every expert of a MoE layer on the same tokens, and per-expert weight vectors.

Both work on this rank's local experts through megatron-core's experts module (SequentialMLP,
GroupedMLP or TEGroupedMLP) and gather over the expert-parallel group, so every rank ends with
all E experts in expert order. Outputs are *unweighted*: the experts are called with unit gates
(megatron-core 0.16.1 multiplies the gate into the activation before fc2).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from megatron.core.transformer.moe.moe_layer import MoELayer

from megatron_patch.training.lora import LoRALinear


def _gather_by_expert(local: torch.Tensor, indices: list[int], dim: int,
                      group: Optional[dist.ProcessGroup]) -> torch.Tensor:
    """Concatenate every EP rank's ``local`` tensor along ``dim`` in global expert order."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return local
    parts: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, (list(indices), local.cpu()), group=group)
    order = sorted(((idx, tensor) for idxs, tensor in parts for idx, tensor in
                    zip(idxs, tensor.unbind(dim))), key=lambda item: item[0])
    return torch.stack([tensor for _, tensor in order], dim)


def _ep_group(layer: MoELayer) -> Optional[dist.ProcessGroup]:
    return getattr(layer, "ep_group", None) or layer.token_dispatcher.ep_group


@torch.no_grad()
def all_expert_outputs(layer: MoELayer, hidden: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """[N, E, H] float32 unweighted outputs of every expert on the tokens ``hidden`` [N, H].

    Collective over the layer's expert-parallel group (every rank must pass the same tokens).
    """
    experts = layer.experts
    param = next(experts.parameters())
    num_local = layer.num_local_experts
    outs = []
    for start in range(0, hidden.shape[0], chunk):
        x = hidden[start:start + chunk].to(device=param.device, dtype=param.dtype)
        n = x.shape[0]
        tokens = x.repeat(num_local, 1)  # expert-major: expert i gets rows [i n, (i + 1) n)
        per_expert = torch.full((num_local,), n, dtype=torch.int64)
        gates = torch.ones(num_local * n, dtype=torch.float32, device=param.device)
        out, _ = experts(tokens, per_expert, gates)
        outs.append(out.float().view(num_local, n, -1).transpose(0, 1).cpu())
    local = torch.cat(outs)  # [N, E_local, H]
    return _gather_by_expert(local, list(layer.local_expert_indices), 1, _ep_group(layer))


def _weight(linear: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight; a LoRA-adapted one's with its adapter merged in."""
    return linear.merged_weight() if isinstance(linear, LoRALinear) else linear.weight


def _local_weight_vectors(experts: torch.nn.Module, num_local: int, hidden: int) -> torch.Tensor:
    if hasattr(experts, "local_experts"):  # SequentialMLP
        return torch.stack([
            torch.cat([_weight(expert.linear_fc1).flatten(), _weight(expert.linear_fc2).flatten()])
            for expert in experts.local_experts
        ])
    if hasattr(experts, "linear_fc1") and hasattr(experts.linear_fc1, "weight0"):  # TEGroupedMLP
        return torch.stack([
            torch.cat([getattr(experts.linear_fc1, f"weight{i}").flatten(),
                       getattr(experts.linear_fc2, f"weight{i}").flatten()])
            for i in range(num_local)
        ])
    if hasattr(experts, "weight1"):  # GroupedMLP (legacy grouped GEMM)
        w1 = experts.weight1.view(num_local, hidden, -1)
        w2 = experts.weight2.view(num_local, -1, hidden)
        return torch.cat([w1.flatten(1), w2.flatten(1)], 1)
    raise NotImplementedError(f"expert weights of {type(experts).__name__} are not supported")


@torch.no_grad()
def expert_weight_vectors(layer: MoELayer) -> torch.Tensor:
    """[E, P] float32 flattened fc1 and fc2 weights of every expert (collective over EP)."""
    local = _local_weight_vectors(layer.experts, layer.num_local_experts,
                                  layer.config.hidden_size).float().cpu()
    return _gather_by_expert(local, list(layer.local_expert_indices), 0, _ep_group(layer))
