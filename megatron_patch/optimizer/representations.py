"""Second moments of the representations each routed expert handles, for OMoE's projectors.

With ``--moe-orthogonal-subspace representations`` the subspace an expert's update must avoid is
spanned by the *other* experts' recent representations, as in OWM, where a layer's update is kept
orthogonal to the inputs of earlier tasks: for ``linear_fc1`` the hidden states routed to them
(inputs, R^H), for ``linear_fc2`` the outputs they produced (R^H). Per local expert j this keeps

    M_j = sum over recorded (token, j) of r r^T      (float64, [H, H])
    n_j = number of recorded (token, j)

over the last ``window`` steps of each accumulating phase, and the projectors use the averages
S_j = M_j / n_j: OWM's recursive projector built from every recorded vector scaled by 1/sqrt(n_j)
(Woodbury; ``projection``), so each expert's subspace weighs the same whatever its load.

Process groups: a step's sums are all-reduced over the expert-data-parallel group (every rank
holding the same expert shard; their tokens together are the expert's share of the global batch)
when the optimizer steps, so ``moments`` and ``counts`` are identical on those ranks and resume
from a checkpoint sharded over the expert-parallel group. fc1 inputs are the same on the ranks of
an expert-tensor-parallel group; fc2 outputs are partial sums there, hence refused with ETP > 1.
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import torch
import torch.distributed as dist
from megatron.core.dist_checkpointing import ShardedTensor
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe.experts import SequentialMLP
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection


class ExpertRepresentationMoments:
    """Recorded representation moments of the local experts of one MoE layer.

    Args:
        experts: the layer's ``SequentialMLP`` (hooks go on each local expert's fc1/fc2).
        layer_number: the layer's global number (checkpoint keys).
        kinds: ``("fc1",)``, ``("fc2",)`` or both.
        pg_collection: ``ep``, ``expt_tp`` and ``expt_dp`` (default: megatron's global groups).
    """

    def __init__(self, experts: SequentialMLP, layer_number: int, kinds: tuple[str, ...],
                 pg_collection: Optional[ProcessGroupCollection] = None) -> None:
        self.pg_collection = pg_collection or get_default_pg_collection()
        self.layer_number = layer_number
        self.kinds = kinds
        self.recording = False
        local = experts.local_experts
        hidden = local[0].linear_fc1.weight.shape[1]
        device = local[0].linear_fc1.weight.device
        zeros = functools.partial(torch.zeros, dtype=torch.float64, device=device)
        self.moments = {kind: zeros(len(local), hidden, hidden) for kind in kinds}
        self.counts = zeros(len(local))
        self._pending = {kind: zeros(len(local), hidden, hidden) for kind in kinds}
        self._pending_counts = zeros(len(local))
        for j, expert in enumerate(local):
            if "fc1" in kinds:
                expert.linear_fc1.register_forward_pre_hook(
                    lambda module, args, j=j: self._record("fc1", j, module, args[0], count=True))
            if "fc2" in kinds:
                expert.linear_fc2.register_forward_hook(
                    lambda module, args, out, j=j: self._record(
                        "fc2", j, module, out[0] if isinstance(out, tuple) else out,
                        count="fc1" not in kinds))

    def _record(self, kind: str, j: int, module: torch.nn.Module, rows: torch.Tensor,
                count: bool) -> None:
        # Grad mode skips evaluation, calibration and the no-grad first pass of a recomputed
        # forward, so each micro-batch counts once with or without activation recomputation.
        if not (self.recording and module.training and torch.is_grad_enabled()):
            return
        with torch.no_grad():
            r = rows.detach().reshape(-1, rows.shape[-1]).double()
            self._pending[kind][j].addmm_(r.T, r)
            if count:
                self._pending_counts[j] += r.shape[0]

    def flush(self) -> None:
        """Collective over the expert-data-parallel group: add this step's sums, all ranks alike."""
        group = self.pg_collection.expt_dp
        flat = torch.cat([self._pending[k].flatten() for k in self.kinds] + [self._pending_counts])
        dist.all_reduce(flat, group=group)
        offset = 0
        for kind in self.kinds:
            size = self.moments[kind].numel()
            self.moments[kind] += flat[offset:offset + size].view_as(self.moments[kind])
            self._pending[kind].zero_()
            offset += size
        self.counts += flat[offset:]
        self._pending_counts.zero_()

    def reset(self) -> None:
        for kind in self.kinds:
            self.moments[kind].zero_()
        self.counts.zero_()

    def averages(self, kind: str) -> torch.Tensor:
        """S_j = M_j / n_j per local expert, [E_local, H, H] float64 (0 for an unused expert)."""
        return self.moments[kind] / self.counts.clamp(min=1).view(-1, 1, 1)

    def sharded_state_dict(self, prefix: str) -> dict[str, Any]:
        """ShardedTensors over the expert-parallel group; EDP and ETP ranks hold replicas."""
        groups = self.pg_collection
        ep_rank, ep_size = groups.ep.rank(), groups.ep.size()
        replica = (0, groups.expt_tp.rank(), groups.expt_dp.rank())
        tensors = {**{f"{kind}_moments": self.moments[kind] for kind in self.kinds},
                   "counts": self.counts}
        return {name: ShardedTensor.from_rank_offsets(prefix + name, tensor, (0, ep_rank, ep_size),
                                                      replica_id=replica)
                for name, tensor in tensors.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for kind in self.kinds:
            self.moments[kind].copy_(state[f"{kind}_moments"])
        self.counts.copy_(state["counts"])
