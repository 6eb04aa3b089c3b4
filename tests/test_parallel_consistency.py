"""The trainer's training step of a tiny GPT-MoE under several parallel layouts equals the
single-device step: LM loss, MoE losses, routing statistics, every (reassembled) parameter
gradient and the calibrated coefficients."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_patch.distributed import BASELINE, Layout, parse_layout
from megatron_patch.parallel_check.cases import Case, parse_case
from megatron_patch.parallel_check.check import check_cases
from megatron_patch.parallel_check.compare import Tolerance, compare, summarize
from megatron_patch.parallel_check.runner import Result, make_global_batch, run_layout
from megatron_patch.training.config import JobConfig

MODEL = {
    "num_layers": 2,
    "hidden_size": 32,
    "ffn_hidden_size": 64,
    "num_attention_heads": 4,
    "num_experts": 4,
    "moe_router_topk": 2,
    "moe_ffn_hidden_size": 32,
    "moe_aux_loss_coeff": 1e-2,
    "moe_router_load_balancing_type": "aux_loss",
    "moe_ortho_loss_coeff": "auto",
    "moe_var_loss_coeff": "auto",
    "seq_length": 16,
    "micro_batch_size": 2,
}
JOB = JobConfig.from_flat(MODEL)
# Large fixed coefficients make the L_o / L_v gradients a visible share of every gradient, so a
# layout-dependent error in them cannot hide under the LM-loss gradient.
STRONG_LOSSES = JobConfig.from_flat({**MODEL, "moe_ortho_loss_coeff": 30.0,
                                     "moe_var_loss_coeff": 30.0, "moe_ortho_loss_form": "pairwise"})
TRACKERS = ("load_balancing_loss", "ortho_loss", "var_loss")
ROUTING = ("entropy", "load", "max_vio")
VOCAB = 128
GLOBAL_BATCH = make_global_batch(8, MODEL["seq_length"], VOCAB, seed=0)

# fp32 on CPU is deterministic; layouts differ only in the order of floating-point sums (TP
# partial products, all-reduces, gradient accumulation across micro-batches), so diffs are a few
# fp32 ulps of each quantity's scale (seen: <= 6e-7 of max|ref|). rtol = 1e-5 (~80 ulps) leaves
# headroom for that while any real error (a wrong shard, a missing 1/dp or 1/num_microbatches
# scale, a dropped aux-loss term) moves some quantity by far more. atol only matters for
# quantities that are ~0 in the baseline.
TOLERANCE = Tolerance(rtol=1e-5, atol=1e-8)


def _run(layout: Layout, job: JobConfig = JOB, samples=GLOBAL_BATCH) -> Result:
    return run_layout(layout, job, samples, VOCAB, backend="gloo")


@pytest.fixture(scope="module")
def baseline() -> Result:
    return _run(BASELINE)


@pytest.fixture(scope="module")
def strong_baseline() -> Result:
    return _run(BASELINE, STRONG_LOSSES)


def _assert_consistent(result: Result, baseline: Result) -> None:
    _assert_no_diffs(compare(result, baseline, TOLERANCE), baseline)


def _assert_no_diffs(diffs: list, baseline: Result) -> None:
    """``diffs`` (of ``compare``) cover the loss, 3 MoE losses, 3 routing statistics, every
    gradient and 2 coefficients, and all pass (a key on one side only is a failing diff)."""
    assert set(baseline.trackers) == set(TRACKERS) and set(baseline.routing) == set(ROUTING)
    assert len(diffs) == 1 + len(TRACKERS) + len(ROUTING) + len(baseline.grads) + 2
    failed = [d for d in diffs if not d.passed]
    assert not failed, "\n".join(map(str, failed))


@pytest.mark.parametrize("spec", ["tp2sp", "ep2", "pp2", "dp2", "tp2ep2sp"])
def test_layout_matches_single_device(spec: str, baseline: Result) -> None:
    """L_aux, L_o, L_v, LM loss, all gradients and the auto-calibrated coefficients (equal on
    every rank) match the one-process run."""
    _assert_consistent(_run(parse_layout(spec)), baseline)


def test_calibrated_coefficients_are_powers_of_ten(baseline: Result) -> None:
    for rank in baseline.coefficients:
        for values in rank.values():
            assert values and all(math.log10(v) == round(math.log10(v)) for v in values)


def test_strong_specialization_losses_match_single_device(strong_baseline: Result) -> None:
    """Strong pairwise-form losses with expert tensor parallelism 1 under TP 2 x EP 2 (the
    feature cases below run them under EP and PP)."""
    _assert_consistent(_run(parse_layout("tp2ep2etp1sp"), STRONG_LOSSES), strong_baseline)


@pytest.mark.parametrize("spec", [pytest.param("tp2sp+padding", marks=pytest.mark.slow),
                                  pytest.param("ep2+capacity", marks=pytest.mark.slow),
                                  "pp2+padding+recompute"])
def test_padding_capacity_and_recompute_with_pipeline_match_single_device(spec: str) -> None:
    """Padding masks (out of L_aux, L_o, L_v and the routing statistics; sequence-parallel
    scattered), capacity dropping, and MoE recompute under 1F1B (a micro-batch recomputed after
    later micro-batches' forwards, each with its own padding) give the single-device step's
    values and gradients, checked by the library behind tools/check_parallel_consistency.py (its
    default set runs the 4-process versions)."""
    case = parse_case(spec)
    diffs, baselines = check_cases([case], STRONG_LOSSES, 8, VOCAB, backend="gloo",
                                   tolerance=TOLERANCE, report=lambda line: None)
    baseline = baselines[case.features]
    _assert_no_diffs(diffs[str(case)], baseline)
    if "capacity" in case.features:
        assert baseline.routing["load"].numel() and \
            case.job(STRONG_LOSSES).moe.moe_expert_capacity_factor == 1.0


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="gloo CPU run; tests/test_gated_gram.py on CUDA")
def test_fused_kernel_and_normalized_lo_under_tp_ep_sp_match_single_device() -> None:
    """The fused gates + Gram kernel (Triton's interpreter on CPU) computing the scale-free L_o
    under TP2 x EP2 with SP: the same losses and gradients as the torch kernel in one process."""
    normalized = STRONG_LOSSES.replace(losses={"moe_ortho_loss_normalize": True})
    fused = normalized.replace(losses={"moe_ortho_loss_kernel": "triton"})
    _assert_consistent(_run(parse_layout("tp2ep2etp1sp"), fused), _run(BASELINE, normalized))


def test_compare_flags_perturbed_gradient(baseline: Result) -> None:
    name = next(iter(baseline.grads))
    grads = dict(baseline.grads)
    grads[name] = grads[name] * (1 + 1e-3)
    perturbed = dataclasses.replace(baseline, grads=grads)
    failed = [d for d in compare(perturbed, baseline, TOLERANCE) if not d.passed]
    assert [d.name for d in failed] == [f"grad/{name}"]
    assert not summarize(compare(perturbed, baseline, TOLERANCE))[-1].passed


def test_compare_flags_missing_gradient(baseline: Result) -> None:
    grads = dict(baseline.grads)
    name, _ = grads.popitem()
    failed = [d for d in compare(dataclasses.replace(baseline, grads=grads), baseline, TOLERANCE)
              if not d.passed]
    assert len(failed) == 1 and name in failed[0].name


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("tp2sp", Layout(tp=2, etp=2, sp=True)),
        ("ep2", Layout(ep=2, dp=2)),
        ("pp2", Layout(pp=2)),
        ("tp2ep2sp", Layout(tp=2, ep=2, etp=2, dp=2, sp=True)),
        ("tp2ep2etp1sp", Layout(tp=2, ep=2, etp=1, sp=True)),
        ("ep2etp2", Layout(ep=2, etp=2, dp=4)),
        ("dp4ep2", Layout(ep=2, dp=4)),
    ],
)
def test_parse_layout(spec: str, expected: Layout) -> None:
    layout = parse_layout(spec)
    assert layout == expected
    assert layout.world_size == layout.tp * layout.pp * layout.dp
    assert parse_layout(str(layout)) == layout


@pytest.mark.parametrize(
    "spec, message",
    [
        ("tp2", "add sp"),
        ("sp", "needs tp > 1"),
        ("ep2etp2dp1", "must divide"),
        ("ep4dp2", "must divide"),
        ("tp2tp2sp", "given twice"),
        ("tp0sp", ">= 1"),
        ("cp2", "cannot parse"),
        ("", "cannot parse"),
        # Expert weights without EP are dense parameters in megatron-core: their gradients are
        # reduced over the attention data-parallel group, wrong when etp != tp (measured with
        # the checker before the rule: 92% relative error in expert gradients for tp2etp1sp).
        ("tp2etp1sp", "without expert parallelism"),
        ("etp2dp2", "without expert parallelism"),
    ],
)
def test_parse_layout_errors(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_layout(spec)


def test_cases_name_layout_and_features() -> None:
    case = parse_case("pp2ep2+recompute+padding")
    assert case == Case(Layout(pp=2, ep=2, dp=2), ("padding", "recompute"))
    assert str(case) == "pp2ep2dp2+padding+recompute" and parse_case(str(case)) == case
    job = case.job(JOB)
    assert job.training.recompute_modules == ["moe"] and job.moe.moe_expert_capacity_factor is None
    with pytest.raises(ValueError, match="unknown feature"):
        parse_case("ep2+dropout")
    with pytest.raises(ValueError, match="per sequence-parallel slice"):
        parse_case("tp2sp+capacity")


def test_cpu_patches_leave_gpu_path_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    from megatron_patch import cpu_compat

    current_device = torch.cuda.current_device
    monkeypatch.setattr(cpu_compat, "_APPLIED", False)  # other tests may have applied them
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cpu_compat.apply_cpu_gloo_patches()
    assert torch.cuda.current_device is current_device
    assert not cpu_compat._APPLIED
