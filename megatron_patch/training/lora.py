"""LoRA adapters on megatron-core's parallel linear layers, for post-training: attention
projections and routed experts by default (the paper's q/k/v/o and gate/up/down), optionally
shared experts and dense MLPs; everything else frozen, the routers too unless
``--lora-train-router``.

An adapted layer computes ``base(x) + alpha/r * B(A(dropout(x)))`` with ``A`` [r, in] and
``B`` [out, r] split the way its base is split over the tensor-parallel group:

    column-parallel base (W [out/tp, in]):  A replicated, B split along out.  The adapter sees
        the whole sequence (gathered under sequence parallelism, as the base does); A's gradient
        is a partial sum on each rank, summed over the tensor-parallel group by megatron's
        ``finalize_model_grads`` (A is tagged ``sequence_parallel`` like a norm weight).
    row-parallel base (W [out, in/tp]):     A split along in, B replicated.  A's output is
        all-reduced over the group, B's output scattered along the sequence like the base's.

so the merged weight of each rank is ``W_local + alpha/r * B_local @ A_local`` with no
communication, and export needs none either. Routed experts are adapted with one
expert-tensor-parallel rank (ETP = 1; any EP): their adapters are expert parameters
(data-parallel reduction over the expert-data-parallel group). A and B start from generators
seeded by the run seed and the layer's global name (layer and expert index), so the adapters
are the same in every parallel layout; B starts at 0 (the adapted model equals the base).
Checkpoints hold the adapters with their tensor-parallel and expert sharding.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core.tensor_parallel import (
    ColumnParallelLinear,
    RowParallelLinear,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

from megatron_patch.flags import ConfigError, option

# Adapter target groups (``_target_of`` says which group a layer belongs to).
TARGETS = ("attention", "experts", "shared_experts", "dense_mlp")
ATTENTION_LINEARS = ("linear_qkv", "linear_proj", "linear_q_proj", "linear_q_up_proj",
                     "linear_kv_up_proj")
MLP_LINEARS = ("linear_fc1", "linear_fc2")
BASE = "base"
A, B = "lora_a", "lora_b"


@dataclass
class LoRAConfig:
    """LoRA post-training (0 rank: full fine-tuning)."""

    lora_rank: int = option(0, "adapter rank (0: full fine-tuning, the default)")
    lora_alpha: float = option(32.0, "adapter scale alpha (the update is alpha/rank * B A)")
    lora_dropout: float = option(0.1, "dropout on the adapters' input")
    lora_targets: Optional[list[str]] = option(
        None, f"adapted layers, of {', '.join(TARGETS)} (default: attention experts, the "
        "paper's q/k/v/o and experts' gate/up/down)")
    lora_train_router: bool = option(
        False, "train the routers in full (by default they are frozen with the rest)")
    lora_b_init_std: float = option(
        0.0, "standard deviation of B at the start (0: the adapted model starts equal to the "
        "base, as in LoRA; > 0 only to test the adapters' gradients)")

    def __post_init__(self) -> None:
        if self.lora_targets is None:
            self.lora_targets = ["attention", "experts"]
        unknown = sorted(set(self.lora_targets) - set(TARGETS))
        if unknown:
            raise ConfigError(f"--lora-targets {unknown}: choose from {', '.join(TARGETS)}")
        if self.lora_rank < 0 or not self.lora_alpha > 0 or not 0 <= self.lora_dropout < 1:
            raise ConfigError(
                f"LoRA settings out of range: --lora-rank {self.lora_rank} (>= 0), --lora-alpha "
                f"{self.lora_alpha} (> 0), --lora-dropout {self.lora_dropout} (in [0, 1))")

    @property
    def enabled(self) -> bool:
        return self.lora_rank > 0


def _generator(seed: int, name: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))


def _mark_split(param: torch.nn.Parameter, dim: int) -> None:
    param.tensor_model_parallel = True
    param.partition_dim = dim
    param.partition_stride = 1


class LoRALinear(torch.nn.Module):
    """A megatron ``ColumnParallelLinear`` or ``RowParallelLinear`` (``base``) with an adapter
    (module docstring). Returns what the base returns: ``(output, bias)``."""

    def __init__(self, base: torch.nn.Module, config: LoRAConfig, global_name: str, seed: int,
                 swiglu: bool) -> None:
        super().__init__()
        self.base = base
        self.column = isinstance(base, ColumnParallelLinear)
        self.scale = config.lora_alpha / config.lora_rank
        self.swiglu = swiglu  # a gated linear_fc1: its output is [gate; up] on every TP rank
        self.dropout = torch.nn.Dropout(config.lora_dropout)
        weight = base.weight
        group = base.tp_group
        size, rank = group.size(), group.rank()
        rank_r = config.lora_rank
        out_local, in_local = weight.shape
        in_full = in_local if self.column else in_local * size
        a = torch.empty(rank_r, in_full)
        bound = 1.0 / math.sqrt(in_full)  # kaiming_uniform(a=sqrt(5)), as torch.nn.Linear
        a.uniform_(-bound, bound, generator=_generator(seed, global_name + "." + A))
        b = torch.zeros(out_local * (size if self.column else 1), rank_r)
        if config.lora_b_init_std > 0:
            b.normal_(0.0, config.lora_b_init_std, generator=_generator(seed, global_name + "." + B))
        if self.column:  # A replicated; B: this rank's rows (the base's output rows)
            b = self._rows_of_rank(b, size, rank)
        else:  # A: this rank's input columns; B replicated
            a = a.chunk(size, dim=1)[rank]
        options = dict(device=weight.device, dtype=weight.dtype)
        self.lora_a = torch.nn.Parameter(a.to(**options).contiguous())
        self.lora_b = torch.nn.Parameter(b.to(**options).contiguous())
        if size > 1:
            if self.column:
                _mark_split(self.lora_b, 0)
                self.lora_a.sequence_parallel = True  # partial sums: finalize sums over TP
            else:
                _mark_split(self.lora_a, 1)
        if not getattr(weight, "allreduce", True):  # an expert weight
            for param in (self.lora_a, self.lora_b):
                param.allreduce = False
        # state_dict keys as the plain layer's (``weight``, not ``base.weight``), as in
        # sharded_state_dict: checkpoints of adapted and plain models name base weights alike.
        self.register_state_dict_post_hook(_without_base_prefix)
        self.register_load_state_dict_pre_hook(_with_base_prefix)

    def _rows_of_rank(self, full: torch.Tensor, size: int, rank: int) -> torch.Tensor:
        if not self.swiglu:
            return full.chunk(size, dim=0)[rank]
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(size, dim=0)[rank], up.chunk(size, dim=0)[rank]])

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's contribution to this rank's output."""
        x = self.dropout(x)
        group = self.base.tp_group
        if self.column:
            if self.base.sequence_parallel:
                x = gather_from_sequence_parallel_region(x, group=group)
            return torch.matmul(torch.matmul(x, self.lora_a.t()), self.lora_b.t()) * self.scale
        hidden = torch.matmul(x, self.lora_a.t())
        if group.size() > 1 and not self.base.explicit_expert_comm:
            hidden = reduce_from_tensor_model_parallel_region(hidden, group=group)
        output = torch.matmul(hidden, self.lora_b.t()) * self.scale
        if self.base.sequence_parallel:
            output = scatter_to_sequence_parallel_region(output, group=group)
        return output

    def forward(self, x: torch.Tensor, *args, **kwargs):
        output, bias = self.base(x, *args, **kwargs)
        return output + self.delta(x).to(output.dtype), bias

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """This rank's base weight with the adapter merged in (a new tensor with the base
        weight's tensor-parallel attributes)."""
        weight = self.base.weight
        merged = weight + self.scale * (self.lora_b.float() @ self.lora_a.float()).to(weight.dtype)
        for attr in ("tensor_model_parallel", "partition_dim", "partition_stride"):
            if hasattr(weight, attr):
                setattr(merged, attr, getattr(weight, attr))
        return merged

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None) -> dict:
        """The base's entries under this module's own prefix (checkpoints of adapted and plain
        models name the base weights alike), and the adapters, split as in the module
        docstring (a gated fc1's B as its base weight: gate and up halves per rank)."""
        state = self.base.sharded_state_dict(prefix, sharded_offsets, metadata)
        axis = {B: 0} if self.column else {A: 1}
        adapters = make_sharded_tensors_for_checkpoint(
            {A: self.lora_a, B: self.lora_b}, prefix, axis, sharded_offsets,
            tp_group=self.base.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))
        if self.swiglu and self.base.tp_group.size() > 1:
            from megatron.core.transformer.mlp import apply_swiglu_sharded_factory

            adapters[prefix + B] = apply_swiglu_sharded_factory(
                adapters[prefix + B], sharded_offsets)
        return {**state, **adapters}


def _without_base_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = f"{prefix}{BASE}."
    for key in [k for k in state_dict if k.startswith(inner)]:
        state_dict[prefix + key[len(inner):]] = state_dict.pop(key)


def _with_base_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    for key in [k for k in state_dict if k.startswith(prefix)]:
        local = key[len(prefix):]
        if "." not in local and local not in (A, B):
            state_dict[f"{prefix}{BASE}.{local}"] = state_dict.pop(key)


def is_adapter(name: str) -> bool:
    """Whether parameter ``name`` is a LoRA adapter's."""
    return name.endswith("." + A) or name.endswith("." + B)


def _target_of(name: str) -> Optional[str]:
    """The target group of module ``name`` (a local name in the GPT model), if any."""
    leaf = name.rsplit(".", 1)[-1]
    if ".self_attention." in name and leaf in ATTENTION_LINEARS:
        return "attention"
    if leaf not in MLP_LINEARS:
        return None
    if ".mlp.experts." in name:
        return "experts"
    if ".mlp.shared_experts." in name:
        return "shared_experts"
    if name.endswith(f".mlp.{leaf}"):
        return "dense_mlp"
    return None


def apply_lora(model: torch.nn.Module, config: LoRAConfig, seed: int,
               global_names: dict[str, str]) -> list[str]:
    """Adapt ``model``'s target layers in place and freeze the rest (the routers too unless
    ``lora_train_router``); returns the adapted layers' names.

    Args:
        global_names: local parameter name -> name in the one-process model (layer and expert
            indices made global), for layout-independent adapter initialization.

    Routed experts need one expert-tensor-parallel rank (``JobConfig`` checks it).

    Raises:
        ConfigError: a target group with no layer in the model, or a target layer of another
            kind (Transformer Engine's fused norm + linear, grouped-GEMM experts).
    """
    targets = set(config.lora_targets)
    for param in model.parameters():
        param.requires_grad_(False)
    modules = dict(model.named_modules())
    adapted = []
    for name, module in modules.items():
        if _target_of(name) not in targets:
            continue
        if type(module) not in (ColumnParallelLinear, RowParallelLinear):
            raise ConfigError(
                f"--lora-targets: {name} is a {type(module).__name__}; adapters fit megatron's "
                "ColumnParallelLinear / RowParallelLinear (the local spec), not fused norm + "
                "linear or grouped-GEMM layers: drop its group from --lora-targets")
        weight_name = global_names.get(f"{name}.weight", f"{name}.weight")
        swiglu = name.endswith("linear_fc1") and module.config.gated_linear_unit
        parent_name, _, leaf = name.rpartition(".")
        setattr(modules[parent_name], leaf,
                LoRALinear(module, config, weight_name[: -len(".weight")], seed, swiglu))
        adapted.append(name)
    if not adapted:
        raise ConfigError(f"--lora-targets {sorted(targets)}: no such layer in this model")
    if config.lora_train_router:
        for name, param in model.named_parameters():
            if ".mlp.router." in name:
                param.requires_grad_(True)
    return adapted


def adapter_parameters(model: torch.nn.Module) -> int:
    """Number of trainable parameters on this rank."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
