"""The expert-specialization losses (L_o, L_v of arXiv 2505.22323) for DeepSpeed-MoE.

Replace ``deepspeed.moe.layer.MoE`` with ``SpecializationMoE`` and pass the coefficients::

    from megatron_patch.deepspeed import SpecializationMoE
    from megatron_patch.moe.loss_config import LossConfig
    moe = SpecializationMoE(hidden_size, expert, num_experts=8, ep_size=2, k=2,
                            losses=LossConfig(moe_ortho_loss_coeff=1e-2,     # beta
                                              moe_var_loss_coeff=1e-2))      # gamma
    output, l_aux, exp_counts = moe(hidden_states)                 # l_aux = l_aux + b*L_o + g*L_v
    moe.specialization_losses                                      # (l_aux, ortho, var, total)

* L_v = -mean_t Var_e(s_t) (unbiased) over the softmax scores of all experts before top-k;
  gradient into the gate (and the layers below), none into the experts.
* L_o (``"span"`` or ``"pairwise"`` form of ``megatron_patch.moe.losses``) on each token's k
  *unweighted* expert outputs, taken after DeepSpeed's second all-to-all on the token's own rank;
  routes dropped over capacity and empty capacity slots do not count. Gradient into the experts
  (and the layers below), none into the gate.
* Expert parallelism: both are means over the expert-parallel group's whole batch (sums and
  counts all-reduced over the layer's EP group, the same value on every rank); each rank's
  gradient is scaled so that DeepSpeed's averaging over data-parallel ranks gives the gradient of
  that mean, which is DeepSpeed's own convention for ``l_aux`` when ranks hold equal token counts
  (see ``reduction``).

Requires deepspeed 0.19.x (``requirements-deepspeed.txt``); not supported: Tutel, tensor-parallel
experts/non-experts (``mpu`` with TP > 1).
"""

try:
    from megatron_patch.deepspeed.layer import (
        DeepSpeedSpecializationLayer,
        SpecializationLosses,
        SpecializationMoE,
    )
except ImportError as error:
    raise ImportError("megatron_patch.deepspeed needs deepspeed 0.19.x (its sparse-route MOELayer); install "
                      "it as requirements-deepspeed.txt says") from error
from megatron_patch.deepspeed.loss_values import specialization_loss_values

__all__ = [
    "DeepSpeedSpecializationLayer",
    "SpecializationLosses",
    "SpecializationMoE",
    "specialization_loss_values",
]
