"""TopKRouter with the variance loss L_v on the routing scores of all experts."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.transformer.moe import moe_utils
from megatron.core.transformer.moe.router import TopKRouter

from megatron_patch.compat import ROUTER_PARAMETERS, accepted
from megatron_patch.moe.attach import attach_mean_loss, global_count
from megatron_patch.moe.coefficients import (
    RECORDING_ONLY_ATTR,
    attaches_loss,
    initial_coefficient,
    loss_active,
)
from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.losses import routing_variance_per_token
from megatron_patch.moe.names import COEFFICIENT_FLAGS, VAR_LOSS
from megatron_patch.moe.routing_stats import RoutingStatistics, is_training_forward


# megatron-core 0.16.1 defines moe_utils.te_general_gemm only when Transformer Engine imports, but
# its router gating reads it unguarded (NameError without TE, on CPU and GPU alike). None selects
# the plain torch matmul path it already has (0.17+ sets None itself).
if not hasattr(moe_utils, "te_general_gemm"):
    moe_utils.te_general_gemm = None


def routing_scores(logits: torch.Tensor, score_function: str) -> torch.Tensor:
    """Scores of all experts before top-k, in float32.

    Args:
        logits: [T, E] router logits.
        score_function: ``"softmax"`` (probabilities over experts) or ``"sigmoid"`` (the
            per-expert gates, before top-k normalization and without the expert bias).

    Returns:
        [T, E] float32 scores.
    """
    if score_function == "softmax":
        return torch.softmax(logits, dim=-1, dtype=torch.float32)
    if score_function == "sigmoid":
        return torch.sigmoid(logits.float())
    raise ValueError(f"unsupported score function {score_function!r}")


class SpecializationRouter(TopKRouter):
    """megatron-core's TopKRouter plus ``gamma * L_v``, L_v = -mean_t Var_e(scores_t).

    Everything megatron-core's router does (aux / seq-aux / global-aux loss, z-loss, expert bias,
    token dropping) runs unchanged in ``super().routing``; L_v is computed from the same logits
    and attached to the returned probabilities with ``MoEAuxLossAutoScaler``, like the aux loss.
    Its gradient reaches only the router (and upstream layers), never expert weights.

    Reduction: the mean over a micro-batch's tokens; this rank's partial sum is divided by the
    token count summed over TP x CP (see ``megatron_patch.moe.attach``).

    With ``routing_statistics`` set (``RoutingStatistics.attach``), training forwards also record
    the routing decisions for the load / MaxVio / entropy logs.
    """

    def __init__(
        self,
        config: SpecializationConfig,
        pg_collection: Optional[ProcessGroupCollection] = None,
        is_mtp_layer: bool = False,
    ) -> None:
        super().__init__(config=config, pg_collection=pg_collection,
                         **accepted(ROUTER_PARAMETERS, is_mtp_layer=is_mtp_layer))
        self.register_buffer(
            "var_loss_coeff", initial_coefficient(config.moe_var_loss_coeff, self.weight.device)
        )
        self.coefficient_calibrated = False
        setattr(self, RECORDING_ONLY_ATTR, False)
        self.routing_statistics: Optional[RoutingStatistics] = None

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        """Top-k routing (megatron-core) with L_v attached to the returned probs.

        Args:
            logits: [S, B, E] router logits.
            padding_mask: optional [S, B] bool mask, True for padding tokens (megatron-core's
                convention inside ``routing``); padding tokens do not count.

        Returns:
            (probs [S*B, E], routing_map [S*B, E]) as megatron-core's TopKRouter.
        """
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        var_loss_active = self.config.var_loss_enabled and loss_active(self)
        record = self.routing_statistics is not None and is_training_forward(self)
        if not (var_loss_active or record):
            return probs, routing_map
        scores = routing_scores(
            logits.reshape(-1, self.config.num_moe_experts), self.score_function
        )
        if record:
            self.routing_statistics.record(self.layer_number, routing_map, scores, padding_mask)
        if var_loss_active:
            probs = self._attach_var_loss(probs, scores, padding_mask)
        return probs, routing_map

    def _attach_var_loss(
        self, probs: torch.Tensor, scores: torch.Tensor, padding_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        attach = attaches_loss(self, self.var_loss_coeff, COEFFICIENT_FLAGS[VAR_LOSS])
        variances = routing_variance_per_token(scores)
        if padding_mask is None:
            local_tokens = variances.numel()
            local_sum = -variances.sum()
        else:
            valid = ~padding_mask.reshape(-1)
            local_tokens = valid.sum()
            local_sum = -(variances * valid).sum()
        count = global_count(
            local_tokens, self.tp_cp_group, variances.device, uniform=padding_mask is None
        )
        return attach_mean_loss(
            probs,
            local_sum=local_sum,
            count=count,
            local_tokens=local_tokens,
            coeff=self.var_loss_coeff,
            name=VAR_LOSS,
            config=self.config,
            layer_number=self.layer_number,
            reduce_group=self.tp_cp_group,
            attach=attach,
        )
