"""Means over the expert-parallel group from per-rank sums and counts (one scalar all-reduce).

Convention: DeepSpeed's ``l_aux`` is a per-rank mean over the rank's tokens, and the engine
divides every gradient, expert gradients included, by the data-parallel world size W
(``engine._reduce_expert_gradients``, ZeRO stage 1/2's ``average_tensor``), so the objective it
optimizes is ``(1/W) sum_r loss_r``. For L_o and L_v each rank r of an EP group g of size P
returns a loss whose

* value is the group's mean ``sum_g / count_g`` (sums and counts all-reduced over the group),
  identical on every rank of the group, for logging; and whose
* gradient is that of ``P * local_sum_r / count_g``.

Hence ``(1/W) sum_r loss_r`` has the gradient of the mean over EP groups of each group's global
mean: with equal counts on all ranks this is exactly DeepSpeed's convention for ``l_aux`` (each
rank's local mean), and within an EP group tokens with more or fewer kept slots weigh exactly as
in a single-process run over the group's whole batch.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from deepspeed import comm as dist


def group_size(group: Optional[dist.ProcessGroup]) -> int:
    """World size of ``group``; 1 when torch.distributed is not initialized or group is None."""
    if group is None or not dist.is_initialized():
        return 1
    return dist.get_world_size(group=group)


def group_means(
    sums: Sequence[torch.Tensor],
    counts: Sequence[torch.Tensor],
    group: Optional[dist.ProcessGroup],
) -> list[torch.Tensor]:
    """Group means of several losses with one all-reduce over ``group``.

    Args:
        sums: scalar tensors (graph-attached), this rank's sum of each loss.
        counts: scalar tensors, this rank's number of terms of each loss.
        group: the expert-parallel process group (None or size 1: no communication).

    Returns:
        One scalar per loss, in its sum's dtype: value ``sum_group / count_group`` (0 if the
        group has no terms), gradient that of ``P * local_sum / count_group``.
    """
    if not sums:
        return []
    totals = torch.stack([torch.stack([s.detach().double(), c.double()]) for s, c in zip(sums, counts)])
    size = group_size(group)
    if size > 1:
        dist.all_reduce(totals, group=group)
    means = []
    for local_sum, (group_sum, group_count) in zip(sums, totals):
        denominator = group_count.clamp(min=1)
        scaled = local_sum * (size / denominator).to(local_sum.dtype)
        value = (group_sum / denominator).to(local_sum.dtype)
        means.append(scaled + (value - scaled).detach())
    return means
