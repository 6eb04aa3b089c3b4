"""Names of the MoE losses in megatron-core's tracker and in every log, defined once.

megatron-core's router logs its load-balancing losses under fixed tracker names; this package
adds ``ortho_loss`` (L_o) and ``var_loss`` (L_v) under the same tracker. The training logs, the
layout checker, the calibration and the reports all use these constants.
"""

from __future__ import annotations

ORTHO_LOSS = "ortho_loss"
VAR_LOSS = "var_loss"
Z_LOSS = "z_loss"

# megatron-core's tracker name of each --moe-router-load-balancing-type.
BALANCING_LOSS = {
    "aux_loss": "load_balancing_loss",
    "seq_aux_loss": "seq_load_balancing_loss",
    "global_aux_loss": "global_load_balancing_loss",
}

# Short labels of the losses for consoles, plots and tables.
LOSS_LABELS = {
    **{name: "L_aux" for name in BALANCING_LOSS.values()},
    Z_LOSS: "L_z",
    ORTHO_LOSS: "L_o",
    VAR_LOSS: "L_v",
}

# The coefficient flag of each specialization loss.
COEFFICIENT_FLAGS = {ORTHO_LOSS: "--moe-ortho-loss-coeff", VAR_LOSS: "--moe-var-loss-coeff"}
