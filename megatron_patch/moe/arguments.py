"""Megatron-style command-line flags of the specialization losses."""

from __future__ import annotations

import argparse
from typing import Any

from megatron_patch.moe.config import AUTO, Coefficient
from megatron_patch.moe.gated_gram import GRAM_KERNELS
from megatron_patch.moe.losses import ORTHO_FORMS


def _coefficient(text: str) -> Coefficient:
    if text == AUTO:
        return AUTO
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative number or '{AUTO}', got {text!r}"
        ) from None


def add_specialization_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--moe-ortho-loss-*`` and ``--moe-var-loss-*`` flags to ``parser``."""
    group = parser.add_argument_group("expert specialization losses (arXiv 2505.22323)")
    group.add_argument(
        "--moe-ortho-loss-coeff", type=_coefficient, default=0.0,
        help="beta, coefficient of the orthogonality loss L_o on each token's unweighted expert "
        "outputs; 0 disables it, 'auto' calibrates it on the first global batch.",
    )
    group.add_argument(
        "--moe-ortho-loss-form", choices=ORTHO_FORMS, default="span",
        help="'span': projection onto the span of the token's other experts' outputs (authors' "
        "code); 'pairwise': the paper's Eq. 6 sum of pairwise projections.",
    )
    group.add_argument(
        "--moe-ortho-loss-eps", type=float, default=1e-6,
        help="regularizer of the Gram-matrix solves of L_o.",
    )
    group.add_argument(
        "--moe-ortho-loss-normalize", action="store_true",
        help="L_o of the unit-normalized expert outputs (cosines): scale-free, so it turns the "
        "outputs apart instead of shrinking them; not in the paper.",
    )
    group.add_argument(
        "--moe-ortho-loss-target", type=float, default=1e-4,
        help="with --moe-ortho-loss-coeff auto: beta = 10^round(log10(target / L_o)).",
    )
    group.add_argument(
        "--moe-ortho-loss-kernel", choices=GRAM_KERNELS, default="torch",
        help="how the gates and the per-token Gram matrices of L_o are computed: 'torch' "
        "(regroup the rows by token, batched products) or 'triton' (one fused pass over the "
        "combined rows in forward and in backward; CUDA, Triton installed, no capacity padding).",
    )
    group.add_argument(
        "--moe-var-loss-coeff", type=_coefficient, default=0.0,
        help="gamma, coefficient of the variance loss L_v = -mean Var(routing scores); 0 "
        "disables it, 'auto' calibrates it on the first global batch.",
    )
    group.add_argument(
        "--moe-var-loss-target", type=float, default=1e-3,
        help="with --moe-var-loss-coeff auto: gamma = 10^round(log10(target / |L_v|)).",
    )
    group.add_argument(
        "--moe-loss-calibration-iters", type=int, default=0,
        help="with an 'auto' coefficient: train this many steps with the losses logged but not "
        "applied, then calibrate on the next global batch (0: on the first one). From scratch, "
        "routing starts near-uniform and outputs near-orthogonal, so first-batch values "
        "understate the trained ones by orders of magnitude.",
    )
    return parser


def specialization_config_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The SpecializationConfig fields set by ``add_specialization_args``' flags."""
    return {
        "moe_ortho_loss_coeff": args.moe_ortho_loss_coeff,
        "moe_ortho_loss_form": args.moe_ortho_loss_form,
        "moe_ortho_loss_eps": args.moe_ortho_loss_eps,
        "moe_ortho_loss_normalize": args.moe_ortho_loss_normalize,
        "moe_ortho_loss_target": args.moe_ortho_loss_target,
        "moe_ortho_loss_kernel": args.moe_ortho_loss_kernel,
        "moe_var_loss_coeff": args.moe_var_loss_coeff,
        "moe_var_loss_target": args.moe_var_loss_target,
    }
