"""Configuration errors are raised at construction and name the flag and the fix."""

import pytest
import torch

from megatron_patch.moe.config import SpecializationConfig, SpecializationConfigError

BASE = dict(
    num_layers=1,
    hidden_size=16,
    num_attention_heads=2,
    num_moe_experts=4,
    moe_router_topk=2,
    moe_ffn_hidden_size=8,
    moe_token_dispatcher_type="alltoall",
    add_bias_linear=False,
    params_dtype=torch.float32,
)


def make(**overrides):
    return SpecializationConfig(**{**BASE, **overrides})


def test_valid_configs():
    make(moe_ortho_loss_coeff=0.1, moe_var_loss_coeff="auto")
    make(moe_ortho_loss_coeff="auto", moe_ortho_loss_form="pairwise")
    make(moe_var_loss_coeff=0.1, moe_router_topk=1, moe_router_pre_softmax=True)  # L_v alone: top-1 ok


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (dict(moe_ortho_loss_coeff=-0.1), "--moe-ortho-loss-coeff must be a finite number >= 0"),
        (dict(moe_var_loss_coeff=-1.0), "--moe-var-loss-coeff must be a finite number >= 0"),
        (dict(moe_var_loss_coeff=float("nan")), "--moe-var-loss-coeff"),
        (dict(moe_ortho_loss_coeff="automatic"), "--moe-ortho-loss-coeff must be a non-negative"),
        (dict(moe_ortho_loss_form="cosine"), "--moe-ortho-loss-form must be one of span, pairwise"),
        (dict(moe_ortho_loss_eps=0.0), "--moe-ortho-loss-eps must be > 0"),
        (dict(moe_var_loss_target=0.0), "--moe-var-loss-target"),
        (dict(moe_ortho_loss_coeff=0.1, moe_router_topk=1, moe_router_pre_softmax=True), "topk >= 2"),
        (
            dict(moe_ortho_loss_coeff=0.1, moe_token_dispatcher_type="allgather"),
            "--moe-token-dispatcher-type alltoall",
        ),
        (
            dict(moe_ortho_loss_coeff=0.1, moe_token_dispatcher_type="flex"),
            "--moe-token-dispatcher-type alltoall",
        ),
        (
            dict(moe_var_loss_coeff=0.1, moe_router_load_balancing_type="sinkhorn",
                 moe_aux_loss_coeff=0.0),
            "sinkhorn",
        ),
        (dict(moe_ortho_loss_coeff=0.1, num_moe_experts=None, moe_ffn_hidden_size=None), "--num-experts"),
    ],
)
def test_bad_settings_fail_with_flag_and_fix(overrides, pattern):
    with pytest.raises((SpecializationConfigError, ValueError), match=pattern):
        make(**overrides)


def test_error_is_a_specialization_error():
    with pytest.raises(SpecializationConfigError):
        make(moe_ortho_loss_coeff=0.1, moe_router_topk=1, moe_router_pre_softmax=True)
