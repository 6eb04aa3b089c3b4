"""The specialization router and MoE layer in one process against explicit per-expert references."""

import dataclasses
import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import clear_aux_losses_tracker

from megatron_patch.compat import build_moe_layer, moe_metric_values

from megatron_patch.moe.config import SpecializationConfig
from megatron_patch.moe.losses import orthogonality_loss, variance_loss
from megatron_patch.moe.specs import get_gpt_layer_spec

HIDDEN, EXPERTS, TOPK, SEQ, BATCH = 16, 4, 2, 6, 2
# The layers here hold CPU tensors: the Triton kernel runs under the interpreter (conftest.py).
# On a CUDA machine tests/test_gated_gram.py checks the compiled kernel instead.
TRITON = pytest.param("triton", marks=pytest.mark.skipif(
    torch.cuda.is_available(), reason="CPU-tensor layer; see tests/test_gated_gram.py on CUDA"))


def make_config(**overrides) -> SpecializationConfig:
    kwargs = dict(
        num_layers=1,
        hidden_size=HIDDEN,
        num_attention_heads=2,
        num_moe_experts=EXPERTS,
        moe_router_topk=TOPK,
        moe_ffn_hidden_size=8,
        ffn_hidden_size=8,
        moe_token_dispatcher_type="alltoall",
        moe_aux_loss_coeff=0.0,
        moe_router_load_balancing_type="none",
        add_bias_linear=False,
        params_dtype=torch.float32,
        moe_ortho_loss_coeff=1.0,
        moe_var_loss_coeff=1.0,
    )
    kwargs.update(overrides)
    return SpecializationConfig(**kwargs)


def build_layer(config):
    torch.manual_seed(0)
    spec = get_gpt_layer_spec(EXPERTS).submodules.mlp
    layer = build_moe_layer(spec, config)
    layer.set_layer_number(1)
    layer.train()
    return layer


def tracked(name):
    return moe_metric_values(name)[0].item()


def expert_outputs(layer, tokens):
    """[T, E, H]: every expert's unweighted output on every token."""
    outs = []
    for expert in layer.experts.local_experts:
        out, _ = expert(tokens, torch.ones(tokens.shape[0]))
        outs.append(out)
    return torch.stack(outs, dim=1)


def reference(layer, x):
    tokens = x.reshape(-1, HIDDEN)
    logits = tokens @ layer.router.weight.t()
    scores = torch.softmax(logits, dim=-1)
    top_vals, top_idx = torch.topk(scores, TOPK, dim=-1)
    probs = top_vals / top_vals.sum(-1, keepdim=True)  # megatron: softmax over the top-k logits
    outs = expert_outputs(layer, tokens)
    sorted_idx, order = torch.sort(top_idx, dim=-1)
    chosen = torch.gather(outs, 1, sorted_idx.unsqueeze(-1).expand(-1, -1, HIDDEN))
    combined = (torch.gather(probs, 1, order).unsqueeze(-1) * chosen).sum(1)
    return combined.view_as(x), chosen, scores


@dataclasses.dataclass
class Step:
    layer: torch.nn.Module
    output: torch.Tensor
    losses: tuple[float, ...]  # L_o, L_v as tracked (nan when not computed)
    grads: list[torch.Tensor]  # input gradient, then every parameter's


def step_variants(x, *overrides) -> list[Step]:
    """Per config override: a layer with the same weights (the first variant's), forward and
    backward of sum(output^2) on ``x``."""
    steps, weights = [], None
    for override in overrides:
        layer = build_layer(make_config(**override))
        weights = weights or layer.state_dict()
        layer.load_state_dict(weights)
        clear_aux_losses_tracker()
        inp = x.clone().requires_grad_(True)
        out, _ = layer(inp)
        out.square().sum().backward()
        losses = tuple(tracked(name) if getattr(layer.config, f"{flag}_enabled") else math.nan
                       for name, flag in (("ortho_loss", "ortho_loss"), ("var_loss", "var_loss")))
        steps.append(Step(layer, out.detach(), losses,
                          [inp.grad] + [p.grad for p in layer.parameters()]))
    return steps


def assert_same_step(step: Step, reference: Step) -> None:
    torch.testing.assert_close(step.output, reference.output, rtol=1e-5, atol=1e-6)
    assert step.losses == pytest.approx(reference.losses, rel=1e-6, nan_ok=True)
    for a, b in zip(step.grads, reference.grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("kernel", ["torch", TRITON])
@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_layer_output_and_losses_match_explicit_reference(single_process_megatron, form, kernel,
                                                          normalize):
    layer = build_layer(make_config(moe_ortho_loss_form=form, moe_ortho_loss_kernel=kernel,
                                    moe_ortho_loss_normalize=normalize))
    x = torch.randn(SEQ, BATCH, HIDDEN)
    clear_aux_losses_tracker()
    out, _ = layer(x)
    ref_out, chosen, scores = reference(layer, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    assert tracked("ortho_loss") == pytest.approx(
        orthogonality_loss(chosen, form=form, normalize=normalize).item(), rel=1e-5
    )
    assert tracked("var_loss") == pytest.approx(variance_loss(scores).item(), rel=1e-5)


@pytest.mark.parametrize("kernel", ["torch", TRITON])
def test_ortho_loss_gradient_matches_reference_and_skips_router(single_process_megatron, kernel):
    layer = build_layer(make_config(moe_var_loss_coeff=0.0, moe_ortho_loss_coeff=0.5,
                                    moe_ortho_loss_kernel=kernel))
    x = torch.randn(SEQ, BATCH, HIDDEN)
    out, _ = layer(x)
    (out * 0).sum().backward()  # only the attached L_o produces gradients
    assert layer.router.weight.grad is None or torch.all(layer.router.weight.grad == 0)
    got = [p.grad.clone() for p in layer.experts.parameters()]
    assert any(g.abs().sum() > 0 for g in got)

    layer.zero_grad()
    _, chosen, _ = reference(layer, x)
    (0.5 * orthogonality_loss(chosen)).backward()
    for g, p in zip(got, layer.experts.parameters()):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-7)


def test_shared_experts_are_added_outside_the_ortho_loss(single_process_megatron):
    """DeepSeek-style shared experts (the GPU presets use them): the layer output is the routed
    combination plus the shared experts' output, L_o covers only the routed experts' outputs, and
    its gradient does not reach the shared experts."""
    layer = build_layer(make_config(moe_shared_expert_intermediate_size=12,
                                    moe_var_loss_coeff=0.0))
    assert layer.use_shared_expert
    x = torch.randn(SEQ, BATCH, HIDDEN)
    clear_aux_losses_tracker()
    out, _ = layer(x)
    ref_out, chosen, _ = reference(layer, x)
    shared = layer.shared_experts(x)
    torch.testing.assert_close(out, ref_out + shared, rtol=1e-5, atol=1e-6)
    assert tracked("ortho_loss") == pytest.approx(orthogonality_loss(chosen).item(), rel=1e-5)
    (out * 0).sum().backward()  # only the attached L_o produces gradients
    assert all(p.grad is None or torch.all(p.grad == 0) for p in layer.shared_experts.parameters())
    assert any(p.grad.abs().sum() > 0 for p in layer.experts.parameters())


def test_var_loss_reaches_only_the_router(single_process_megatron):
    layer = build_layer(make_config(moe_ortho_loss_coeff=0.0))
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    out, _ = layer(x)
    (out * 0).sum().backward()
    assert layer.router.weight.grad.abs().sum() > 0
    for p in layer.experts.parameters():
        assert p.grad is None or torch.all(p.grad == 0)

    router_grad = layer.router.weight.grad.clone()
    layer.zero_grad()
    _, _, scores = reference(layer, x)
    variance_loss(scores).backward()
    torch.testing.assert_close(router_grad, layer.router.weight.grad, rtol=1e-5, atol=1e-8)


def test_losses_not_attached_in_eval(single_process_megatron):
    layer = build_layer(make_config())
    layer.eval()
    x = torch.randn(SEQ, BATCH, HIDDEN)
    clear_aux_losses_tracker()
    out, _ = layer(x)
    ref_out, _, _ = reference(layer, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name in ("ortho_loss", "var_loss"):
        try:
            assert moe_metric_values(name).abs().sum() == 0
        except KeyError:  # never recorded
            pass


def test_auto_coefficients_calibrate_to_powers_of_ten_and_round_trip(single_process_megatron):
    from megatron_patch.moe.calibration import calibrate_coefficients, needs_calibration

    config = make_config(moe_ortho_loss_coeff="auto", moe_var_loss_coeff="auto")
    layer = build_layer(config)
    assert needs_calibration(layer)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    with pytest.raises(RuntimeError, match="not calibrated"):
        layer(x)
    batches = [torch.randn(SEQ, BATCH, HIDDEN) for _ in range(2)]
    coeffs = calibrate_coefficients(
        layer, config, lambda: [layer(b) for b in batches], num_microbatches=2
    )
    raw_o = sum(orthogonality_loss(reference(layer, b)[1]).item() for b in batches) / 2
    raw_v = sum(variance_loss(reference(layer, b)[2]).item() for b in batches) / 2
    expected_o = 10.0 ** round(math.log10(1e-4 / raw_o))
    expected_v = 10.0 ** round(math.log10(1e-3 / abs(raw_v)))
    assert coeffs == {"ortho_loss": expected_o, "var_loss": expected_v}
    assert layer.ortho_loss_coeff.item() == pytest.approx(expected_o)
    assert layer.router.var_loss_coeff.item() == pytest.approx(expected_v)
    assert not needs_calibration(layer)

    fresh = build_layer(config)
    assert needs_calibration(fresh)
    fresh.load_state_dict(layer.state_dict())
    assert not needs_calibration(fresh)
    assert fresh.ortho_loss_coeff.item() == layer.ortho_loss_coeff.item()
    fresh(x)  # trains without recalibrating


@pytest.mark.parametrize(
    "wanted, saved, fresh, expected",
    [
        (0.5, 0.0, False, 0.5),  # a fixed flag replaces the checkpoint's value
        ("auto", "auto", False, 0.01),  # a resumed 'auto' run keeps its calibrated value
        ("auto", 0.01, False, math.nan),  # the checkpoint's value was not calibrated: calibrate
        ("auto", "auto", True, math.nan),  # --finetune calibrates on the new data
        ("auto", None, False, math.nan),  # unknown origin: calibrate
    ],
)
def test_coefficients_after_a_checkpoint_load_follow_this_runs_flags(
    single_process_megatron, wanted, saved, fresh, expected
):
    from megatron_patch.moe.calibration import reconcile_coefficients

    layer = build_layer(make_config(moe_ortho_loss_coeff=wanted, moe_var_loss_coeff=0.0))
    layer.ortho_loss_coeff.fill_(0.01)  # the loaded value
    from megatron_patch.moe.loss_config import LossConfig

    saved_losses = None if saved is None else LossConfig(moe_ortho_loss_coeff=saved)
    messages = reconcile_coefficients(layer, layer.config, saved_losses, fresh)
    value = layer.ortho_loss_coeff.item()
    assert math.isnan(value) if math.isnan(expected) else value == pytest.approx(expected)
    changed = [m for m in messages if m.startswith("--moe-ortho-loss-coeff")]
    assert len(changed) == (0 if value == pytest.approx(0.01) else 1)


@pytest.mark.parametrize("pad,kernel", [(False, "torch"), (True, "torch"),
                                        pytest.param(False, "triton", marks=TRITON.marks)])
def test_capacity_dropping_counts_only_kept_slots(single_process_megatron, pad, kernel):
    """With a capacity factor, dropped (token, expert) pairs and capacity padding rows are not
    slots of L_o; each token's penalty uses only its kept experts' outputs."""
    from megatron_patch.moe.losses import orthogonality_loss_per_slot

    config = make_config(moe_expert_capacity_factor=0.5, moe_pad_expert_input_to_capacity=pad,
                         moe_var_loss_coeff=0.0, moe_ortho_loss_kernel=kernel)
    layer = build_layer(config)
    x = torch.randn(SEQ, BATCH, HIDDEN)
    clear_aux_losses_tracker()
    out, _ = layer(x)
    probs, routing_map = layer.router(x)
    kept = routing_map & (probs > 0)
    assert 0 < kept.sum() < SEQ * BATCH * TOPK  # some pairs were dropped
    outs = expert_outputs(layer, x.reshape(-1, HIDDEN))
    total, slots = 0.0, 0
    for t in range(outs.shape[0]):
        experts = kept[t].nonzero().flatten()
        slots += len(experts)
        if len(experts) > 0:
            total += orthogonality_loss_per_slot(outs[t, experts].unsqueeze(0)).sum().item()
    assert tracked("ortho_loss") == pytest.approx(total / slots, rel=1e-5)
    weighted = (probs * kept).unsqueeze(-1) * outs
    torch.testing.assert_close(out.reshape(-1, HIDDEN), weighted.sum(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["torch", TRITON])
def test_moe_recompute_gives_the_same_losses_and_gradients(single_process_megatron, kernel):
    """Under selective MoE recompute the first forward runs without grad (no loss attached) and
    the recomputation attaches L_o / L_v, as megatron does with its aux loss."""
    plain, recomputed = step_variants(
        torch.randn(SEQ, BATCH, HIDDEN), {"moe_ortho_loss_kernel": kernel},
        {"moe_ortho_loss_kernel": kernel, "recompute_granularity": "selective",
         "recompute_modules": ["moe"]})
    assert not plain.layer.moe_layer_recompute and recomputed.layer.moe_layer_recompute
    assert_same_step(recomputed, plain)


def test_var_loss_on_sigmoid_scores(single_process_megatron):
    """With sigmoid routing L_v uses the raw sigmoid gates of all experts (before top-k)."""
    layer = build_layer(make_config(moe_router_score_function="sigmoid", moe_ortho_loss_coeff=0.0))
    x = torch.randn(SEQ, BATCH, HIDDEN)
    clear_aux_losses_tracker()
    layer(x)
    gates = torch.sigmoid(x.reshape(-1, HIDDEN) @ layer.router.weight.t())
    assert tracked("var_loss") == pytest.approx(variance_loss(gates).item(), rel=1e-5)


def test_per_token_loss_mode_scales_like_megatron_aux_losses(single_process_megatron):
    """With calculate_per_token_loss megatron later divides gradients by the token count, so the
    attached losses are multiplied by this rank's tokens (as megatron-core does for aux losses)."""
    x = torch.randn(SEQ, BATCH, HIDDEN)
    grads, weights = [], None
    for per_token in (False, True):
        layer = build_layer(make_config(calculate_per_token_loss=per_token))
        weights = weights or layer.state_dict()
        layer.load_state_dict(weights)
        out, _ = layer(x)
        (out * 0).sum().backward()
        grads.append([p.grad.clone() for p in layer.parameters() if p.grad is not None])
    for plain, scaled in zip(*grads):
        torch.testing.assert_close(scaled, plain * SEQ * BATCH, rtol=1e-5, atol=1e-9)


def test_padding_tokens_are_left_out_of_both_losses_and_routing_statistics(single_process_megatron):
    layer = build_layer(make_config())
    x = torch.randn(SEQ, BATCH, HIDDEN)
    padding = torch.zeros(BATCH, SEQ, dtype=torch.bool)  # [B, S], True = padding
    padding[0, -2:] = True
    padding[1, -3:] = True
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_patch.moe.routing_stats import RoutingStatistics

    stats = RoutingStatistics(1, EXPERTS, torch.device("cpu")).attach([layer])
    clear_aux_losses_tracker()
    layer(x, padding_mask=padding)
    reduced = stats.reduce(ProcessGroupCollection.use_mpu_process_groups(["tp_dp_cp", "pp"]))
    _, chosen, scores = reference(layer, x)
    valid = ~padding.transpose(0, 1).reshape(-1)  # token order of x.reshape(-1, H): [S, B]
    assert tracked("ortho_loss") == pytest.approx(
        orthogonality_loss(chosen[valid]).item(), rel=1e-5)
    assert tracked("var_loss") == pytest.approx(variance_loss(scores[valid]).item(), rel=1e-5)
    entropy = -(scores[valid] * scores[valid].log()).sum(-1).mean()
    assert reduced["entropy"][0].item() == pytest.approx(entropy.item(), rel=1e-5)


def test_recompute_with_two_micro_batches_in_flight_uses_each_ones_padding_mask(
    single_process_megatron,
):
    """A pipeline schedule (1F1B) runs micro-batch 2's forward before micro-batch 1's backward;
    under selective MoE recompute that backward re-runs micro-batch 1's MoE forward. L_o must
    leave out micro-batch 1's padding there, not the mask of the last forward."""
    xs = [torch.randn(SEQ, BATCH, HIDDEN) for _ in range(2)]
    pads = [torch.zeros(BATCH, SEQ, dtype=torch.bool) for _ in range(2)]
    pads[0][0, -2:] = True
    pads[1][1, -4:] = True
    grads, weights = [], None
    for recompute in ({}, {"recompute_granularity": "selective", "recompute_modules": ["moe"]}):
        layer = build_layer(make_config(moe_var_loss_coeff=0.0, **recompute))
        weights = weights or layer.state_dict()
        layer.load_state_dict(weights)
        outs = [layer(x.clone().requires_grad_(True), padding_mask=pad)[0]
                for x, pad in zip(xs, pads)]  # both forwards
        for out in outs:  # then both backwards
            (out * 0).sum().backward()  # only the attached L_o produces gradients
        grads.append([p.grad.clone() for p in layer.experts.parameters()])
    assert any(g.abs().sum() > 0 for g in grads[0])
    for plain, recomputed in zip(*grads):
        torch.testing.assert_close(recomputed, plain, rtol=1e-5, atol=1e-8)


def test_routing_statistics_count_training_forwards_only(single_process_megatron):
    """Evaluation, coefficient calibration and the no-grad first pass of MoE recompute route
    tokens too; the step's load / MaxVio / entropy statistics must hold each training token
    once, and nothing else."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    from megatron_patch.moe.calibration import calibrate_coefficients
    from megatron_patch.moe.routing_stats import RoutingStatistics

    config = make_config(moe_ortho_loss_coeff="auto", recompute_granularity="selective",
                         recompute_modules=["moe"])
    layer = build_layer(config)
    stats = RoutingStatistics(config.num_layers, EXPERTS, torch.device("cpu")).attach([layer])
    x, x_eval = torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)
    calibrate_coefficients(layer, config, lambda: layer(x_eval), num_microbatches=1)
    layer.eval()
    with torch.no_grad():
        layer(x_eval)
    layer.train()
    layer(x.clone().requires_grad_(True))[0].sum().backward()  # recompute: no-grad, then again
    reduced = stats.reduce(ProcessGroupCollection.use_mpu_process_groups(["tp_dp_cp", "pp"]))

    with torch.no_grad():
        _, routing_map = layer.router(x)
    scores = torch.softmax(x.reshape(-1, HIDDEN) @ layer.router.weight.t(), dim=-1)
    load = routing_map.sum(0).double()
    torch.testing.assert_close(reduced["load"][0], (load / load.sum()).float())
    entropy = -(scores * scores.log()).sum(-1).mean()
    assert reduced["entropy"][0].item() == pytest.approx(entropy.item(), rel=1e-5)
    assert stats.counts.abs().sum() == 0  # reset by reduce


def test_overlapped_shared_expert_with_ortho_loss_equals_the_plain_layer(single_process_megatron):
    """--moe-shared-expert-overlap runs the shared expert inside the dispatcher (from megatron-core
    0.18 its fc1 in token_dispatch, which the L_o dispatcher overrides): the same output, L_o and
    gradients as without the overlap."""
    shared = {"moe_shared_expert_intermediate_size": 12, "moe_var_loss_coeff": 0.0}
    plain, overlapped = step_variants(torch.randn(SEQ, BATCH, HIDDEN), shared,
                                      {**shared, "moe_shared_expert_overlap": True})
    assert not plain.layer.shared_expert_overlap and overlapped.layer.shared_expert_overlap
    assert_same_step(overlapped, plain)
