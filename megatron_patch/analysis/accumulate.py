"""Per-layer running statistics of a pass over the data, and the token sample kept for later.

Counts and sums (load, domain x expert table, entropy and variance sums) are exact over every
analyzed token; they are summed over data-parallel ranks by ``reduce``. Hidden states and
routing decisions are kept only for a fixed set of token positions (the *token sample*, chosen
before the pass from the seed), gathered to every rank by ``reduce`` and sorted by position, so
the result does not depend on how the samples were split over ranks.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.analysis import metrics
from megatron_patch.moe.router import routing_scores


class LayerAccumulator:
    """Statistics of one MoE layer.

    Args:
        num_experts: E.
        num_domains: D (1 when the data has no domain labels).
        topk: k.
        score_function: the router's ``softmax`` / ``sigmoid`` (see ``routing_scores``).
        sample_positions: sorted int64 global token positions to keep for the expert analyses.
    """

    def __init__(self, num_experts: int, num_domains: int, topk: int, score_function: str,
                 sample_positions: torch.Tensor) -> None:
        self.num_experts, self.num_domains, self.topk = num_experts, num_domains, topk
        self.score_function = score_function
        self.sample_positions = sample_positions.cpu()
        f64 = dict(dtype=torch.float64)
        self.table = torch.zeros(num_domains, num_experts, **f64)
        self.tokens_per_domain = torch.zeros(num_domains, **f64)
        self.entropy_sum = torch.zeros((), **f64)
        self.variance_sum = torch.zeros((), **f64)
        self.num_tokens = torch.zeros((), **f64)
        self._kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.sample: Optional[dict[str, torch.Tensor]] = None

    @torch.no_grad()
    def update(self, hidden: torch.Tensor, logits: torch.Tensor, routing_map: torch.Tensor,
               domains: torch.Tensor, positions: torch.Tensor) -> None:
        """Add one micro-batch of this layer.

        Args:
            hidden: [T, H] router input; logits: [T, E]; routing_map: [T, E] bool.
            domains: [T] int64 domain id per token, -1 for tokens to leave out (padding).
            positions: [T] int64 global token position (sample index * seq_length + offset).
        """
        domains, positions = domains.cpu(), positions.cpu()
        valid = domains >= 0
        routing_map = routing_map.cpu()[valid]
        scores = routing_scores(logits, self.score_function).cpu()[valid]
        dom = domains[valid]
        self.table.index_add_(0, dom, routing_map.double())
        self.tokens_per_domain += torch.bincount(dom, minlength=self.num_domains).double()
        self.entropy_sum += metrics.routing_entropy_per_token(scores).sum()
        self.variance_sum += metrics.routing_variance_per_token(scores).sum()
        self.num_tokens += dom.numel()
        keep = torch.isin(positions[valid], self.sample_positions)
        if keep.any():
            self._kept.append((positions[valid][keep], hidden.cpu()[valid][keep].float(),
                               routing_map[keep], dom[keep]))

    def reduce(self, group: Optional[dist.ProcessGroup] = None) -> None:
        """Sum the statistics over the ranks of ``group`` (the data-parallel ranks, which hold
        different tokens of the same layer) and gather the token sample to every rank. A no-op
        reduction without torch.distributed or with one rank."""
        distributed = dist.is_available() and dist.is_initialized() \
            and dist.get_world_size(group) > 1
        kept = self._kept
        if distributed:
            packed = torch.cat([self.table.flatten(), self.tokens_per_domain,
                                torch.stack([self.entropy_sum, self.variance_sum,
                                             self.num_tokens])])
            device = torch.device("cuda", torch.cuda.current_device()) \
                if dist.get_backend(group) == "nccl" else torch.device("cpu")
            packed = packed.to(device)
            dist.all_reduce(packed, group=group)
            packed = packed.cpu()
            d, e = self.num_domains, self.num_experts
            self.table = packed[: d * e].view(d, e).clone()
            self.tokens_per_domain = packed[d * e: d * e + d].clone()
            self.entropy_sum, self.variance_sum, self.num_tokens = packed[d * e + d:].unbind()
            gathered: list = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, kept, group=group)
            kept = [item for part in gathered for item in part]
        self._kept = []
        if not kept:
            self.sample = None
            return
        positions, hidden, routing_map, domains = (torch.cat(parts) for parts in zip(*kept))
        order = torch.argsort(positions)
        self.sample = dict(positions=positions[order], hidden=hidden[order],
                           routing_map=routing_map[order], domains=domains[order])

    def routing_metrics(self) -> dict:
        """Load, MaxVio, entropy, variance, overlaps and MI of the (reduced) statistics."""
        counts = self.table.sum(0)
        n = float(self.num_tokens)
        out = {
            "num_tokens": int(n),
            "load": metrics.load_fractions(counts).tolist(),
            "max_vio": metrics.max_violation(counts),
            "routing_entropy": float(self.entropy_sum / n) if n else float("nan"),
            "routing_entropy_max": float(torch.log(torch.tensor(float(self.num_experts)))),
            "routing_variance": float(self.variance_sum / n) if n else float("nan"),
        }
        overlap = metrics.routing_overlap(self.table, self.tokens_per_domain, self.topk)
        out["routing_overlap"] = overlap["all"]
        out["routing_overlap_same_domain"] = overlap["same_domain"]
        out["routing_overlap_cross_domain"] = overlap["cross_domain"]
        out["routing_overlap_chance"] = self.topk / self.num_experts
        mi = metrics.mutual_information(self.table)
        out.update(domain_mi=mi["mi"], domain_nmi=mi["nmi"],
                   domain_mi_over_domain_entropy=mi["mi_over_domain_entropy"],
                   domain_entropy=mi["domain_entropy"], expert_choice_entropy=mi["expert_entropy"])
        out["domain_expert_counts"] = self.table.tolist()
        out["tokens_per_domain"] = self.tokens_per_domain.tolist()
        return out
