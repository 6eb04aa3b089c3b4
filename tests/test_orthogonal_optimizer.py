"""The orthogonal expert optimizer: projector math, projected gradients against an explicit
projection, the alternating schedule, EP=2 equal to one process, and exact mid-phase resume."""

import os
from types import SimpleNamespace

import pytest
import torch

from megatron_patch.distributed import Layout, init_model_parallel, spawn
from megatron_patch.optimizer.orthogonal import (
    OrthogonalExpertOptimizer,
    OrthogonalOptimizerConfig,
    OrthogonalOptimizerError,
    project_expert_gradients,
)
from megatron_patch.optimizer.projection import project, second_moment

H, F, E = 8, 3, 4


def owm_projector(vectors: torch.Tensor, alpha: float) -> torch.Tensor:
    """OWM's P = I - A (A^T A + alpha I)^{-1} A^T for the columns of A [d, n] (reference)."""
    a = vectors.to(torch.float64)
    gram = a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype)
    return torch.eye(a.shape[0], dtype=a.dtype) - a @ torch.linalg.solve(gram, a.T)


def owm_update(projector: torch.Tensor, vector: torch.Tensor, alpha: float) -> torch.Tensor:
    """OWM's recursive update with one new spanning vector: k = P r; P - k k^T / (a + r^T k)."""
    k = projector @ vector
    return projector - torch.outer(k, k) / (alpha + vector @ k)


def fake_experts(weights1, weights2, grads1, grads2):
    """Objects shaped like SequentialMLP.local_experts with .grad set."""
    experts = []
    for w1, w2, g1, g2 in zip(weights1, weights2, grads1, grads2):
        fc1 = SimpleNamespace(weight=w1.clone())
        fc2 = SimpleNamespace(weight=w2.clone())
        fc1.weight.grad, fc2.weight.grad = g1.clone(), g2.clone()
        experts.append(SimpleNamespace(linear_fc1=fc1, linear_fc2=fc2))
    return SimpleNamespace(local_experts=experts)


def random_layer(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(E, *shape, generator=g) for shape in ((F, H), (H, F), (F, H), (H, F))]


def test_woodbury_form_equals_owm_projector_and_its_recursion():
    torch.manual_seed(0)
    a = torch.randn(6, 3, dtype=torch.float64)  # 3 spanning vectors in R^6
    direct = owm_projector(a, alpha=0.5)
    eye = torch.eye(6, dtype=torch.float64)
    woodbury = project(eye, second_moment(a.T), 0.5, side="left")  # P applied to I is P
    torch.testing.assert_close(woodbury, direct, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(project(eye, second_moment(a.T), 0.5, side="right"), direct,
                               rtol=1e-10, atol=1e-12)
    recursive = torch.eye(6, dtype=torch.float64)
    for column in a.T:
        recursive = owm_update(recursive, column, alpha=0.5)
    torch.testing.assert_close(recursive, direct, rtol=1e-10, atol=1e-12)


def test_projected_gradients_match_explicit_projection_and_are_orthogonal(
    single_process_megatron,
):
    w1, w2, g1, g2 = random_layer()
    experts = fake_experts(w1, w2, g1, g2)
    project_expert_gradients(experts, OrthogonalOptimizerConfig(alpha=1e-6))
    for i, expert in enumerate(experts.local_experts):
        others = [j for j in range(E) if j != i]
        in_span = torch.cat([w1[j] for j in others]).T.double()  # [H, (E-1)*F] = [8, 9]
        out_span = torch.cat([w2[j].T for j in others]).T.double()
        # (E-1)*F = 9 > H = 8 vectors span R^H: the projection removes (almost) everything.
        expected1 = g1[i].double() @ owm_projector(in_span, 1e-6)
        expected2 = owm_projector(out_span, 1e-6) @ g2[i].double()
        torch.testing.assert_close(expert.linear_fc1.weight.grad.double(), expected1,
                                   rtol=1e-3, atol=1e-4)
        torch.testing.assert_close(expert.linear_fc2.weight.grad.double(), expected2,
                                   rtol=1e-3, atol=1e-4)


def test_projection_removes_exactly_the_others_directions(single_process_megatron):
    """With fewer spanning vectors than dimensions, the projected gradient is orthogonal to the
    other experts' rows and keeps the component outside their span."""
    big_h = 32
    g = torch.Generator().manual_seed(1)
    w1 = torch.randn(E, F, big_h, generator=g)
    grads = torch.randn(E, F, big_h, generator=g)
    experts = fake_experts(w1, torch.randn(E, big_h, F), grads, torch.zeros(E, big_h, F))
    project_expert_gradients(experts, OrthogonalOptimizerConfig(alpha=1e-6, params="fc1"))
    for i, expert in enumerate(experts.local_experts):
        others = torch.cat([w1[j] for j in range(E) if j != i])  # [(E-1)*F, H]
        projected = expert.linear_fc1.weight.grad
        assert (projected @ others.T).abs().max() < 1e-3 * grads[i].abs().max()
        q, _ = torch.linalg.qr(others.T)
        outside = grads[i] - (grads[i] @ q) @ q.T
        torch.testing.assert_close(projected, outside, rtol=1e-3, atol=1e-4)
        assert torch.all(expert.linear_fc2.weight.grad == 0)  # fc2 untouched


def test_schedule_and_accumulating_only_is_the_base_optimizer(single_process_megatron):
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    config = OrthogonalOptimizerConfig(accumulate_steps=2, orthogonal_steps=1)
    assert [config.is_orthogonal_step(s) for s in range(6)] == [False, False, True] * 2

    class Recorder:
        def __init__(self):
            self.seen = []

        def step(self):
            self.seen.append(experts.local_experts[0].linear_fc1.weight.grad.clone())
            return True, None, None

    w1, w2, g1, g2 = random_layer()
    experts = fake_experts(w1, w2, g1, g2)
    optimizer = OrthogonalExpertOptimizer.__new__(OrthogonalExpertOptimizer)
    optimizer.base, optimizer.config, optimizer.step_index = Recorder(), config, 0
    optimizer.experts, optimizer.representations = [(1, experts)], {}
    optimizer.pg_collection = get_default_pg_collection()
    for _ in range(3):
        optimizer.step()
    assert torch.equal(optimizer.base.seen[0], g1[0]) and torch.equal(optimizer.base.seen[1], g1[0])
    assert not torch.equal(optimizer.base.seen[2], g1[0])  # the third step was projected
    with pytest.raises(OrthogonalOptimizerError, match="--moe-orthogonal-alpha"):
        OrthogonalOptimizerConfig(alpha=0.0)
    with pytest.raises(OrthogonalOptimizerError, match="> 0"):
        OrthogonalOptimizerConfig(accumulate_steps=0, orthogonal_steps=0)


def test_recording_window_schedule_and_its_errors():
    config = OrthogonalOptimizerConfig(accumulate_steps=3, orthogonal_steps=1,
                                       subspace="representations", window=2)
    assert [config.is_recording_step(s) for s in range(8)] == [False, True, True, False] * 2
    assert not OrthogonalOptimizerConfig(accumulate_steps=3).is_recording_step(2)  # weights
    for bad in (dict(window=0), dict(window=4), dict(orthogonal_steps=0)):
        with pytest.raises(OrthogonalOptimizerError, match="--moe-orthogonal-window"):
            OrthogonalOptimizerConfig(**{"accumulate_steps": 3, "subspace": "representations",
                                         **bad})


class HookedExpert(torch.nn.Module):
    """An expert with SequentialMLP's fc1/fc2 attribute names (bias-free, gelu)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.linear_fc1 = torch.nn.Linear(H, F, bias=False)
        self.linear_fc2 = torch.nn.Linear(F, H, bias=False)

    def forward(self, x):
        return self.linear_fc2(torch.nn.functional.gelu(self.linear_fc1(x)))


def expert_inputs(e, n=5):
    """Tokens routed to global expert e: a different count and a low-rank spread per expert."""
    g = torch.Generator().manual_seed(50 + e)
    basis = torch.randn(2, H, generator=g)
    return torch.randn(n + e, 2, generator=g) @ basis + 0.1 * torch.randn(n + e, H, generator=g)


def record_and_project(expert_ids, token_share, alpha):
    """Record each local expert's share of its tokens, flush, project unit gradients."""
    from megatron_patch.optimizer.representations import ExpertRepresentationMoments

    experts = SimpleNamespace(local_experts=[HookedExpert(e) for e in expert_ids])
    moments = ExpertRepresentationMoments(experts, layer_number=1, kinds=("fc1", "fc2"))
    moments.recording = True
    outputs = []
    for e, expert in zip(expert_ids, experts.local_experts):
        outputs.append(expert(token_share(expert_inputs(e))))
        with torch.no_grad():
            expert(expert_inputs(e))  # no grad: not recorded
        expert.eval()
        expert(expert_inputs(e))  # evaluation: not recorded
        expert.train()
    moments.flush()
    for e, expert in zip(expert_ids, experts.local_experts):
        g = torch.Generator().manual_seed(90 + e)
        expert.linear_fc1.weight.grad = torch.randn(F, H, generator=g)
        expert.linear_fc2.weight.grad = torch.randn(H, F, generator=g)
    config = OrthogonalOptimizerConfig(alpha=alpha, subspace="representations")
    project_expert_gradients(experts, config, moments.averages)
    return experts, moments


def test_representation_projection_equals_owm_over_recorded_vectors(single_process_megatron):
    """P_i from the averaged moments == OWM's projector over every other expert's recorded
    vector scaled by 1/sqrt(n_j); only training-mode, grad-enabled forwards are recorded."""
    alpha = 0.2
    experts, moments = record_and_project(range(E), lambda x: x, alpha)
    assert moments.counts.tolist() == [float(len(expert_inputs(e))) for e in range(E)]
    with torch.no_grad():
        outs = [experts.local_experts[e](expert_inputs(e)) for e in range(E)]
    for i, expert in enumerate(experts.local_experts):
        others = [j for j in range(E) if j != i]
        span_in = torch.cat([expert_inputs(j) / len(expert_inputs(j)) ** 0.5 for j in others]).T
        span_out = torch.cat([outs[j] / len(outs[j]) ** 0.5 for j in others]).T
        g = torch.Generator().manual_seed(90 + i)
        g1, g2 = torch.randn(F, H, generator=g), torch.randn(H, F, generator=g)
        torch.testing.assert_close(expert.linear_fc1.weight.grad.double(),
                                   g1.double() @ owm_projector(span_in, alpha), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(expert.linear_fc2.weight.grad.double(),
                                   owm_projector(span_out, alpha) @ g2.double(), rtol=1e-5, atol=1e-6)


def _ep2_worker(rank, out_dir):
    init_model_parallel(Layout(ep=2, dp=2), seed=0)
    w1, w2, g1, g2 = random_layer()
    local = slice(rank * E // 2, (rank + 1) * E // 2)
    experts = fake_experts(w1[local], w2[local], g1[local], g2[local])
    project_expert_gradients(experts, OrthogonalOptimizerConfig(alpha=0.3))
    torch.save([(e.linear_fc1.weight.grad, e.linear_fc2.weight.grad)
                for e in experts.local_experts], os.path.join(out_dir, f"rank{rank}.pt"))


def _representation_worker(rank, out_dir):
    """EP=2 (each rank its experts, all their tokens), then DP=2 (all experts, half the tokens)."""
    results = {}
    init_model_parallel(Layout(ep=2, dp=2), seed=0)
    local = range(rank * E // 2, (rank + 1) * E // 2)
    experts, _ = record_and_project(local, lambda x: x, 0.2)
    results["ep2"] = {e: (x.linear_fc1.weight.grad, x.linear_fc2.weight.grad)
                      for e, x in zip(local, experts.local_experts)}
    init_model_parallel(Layout(dp=2), seed=0)
    experts, _ = record_and_project(range(E), lambda x: x[rank::2], 0.2)
    results["dp2"] = {e: (x.linear_fc1.weight.grad, x.linear_fc2.weight.grad)
                      for e, x in enumerate(experts.local_experts)}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def test_representation_projection_is_layout_independent(single_process_megatron, tmp_path):
    """Recorded moments reduced over EDP and summed over EP: EP=2 and DP=2 == one process."""
    experts, _ = record_and_project(range(E), lambda x: x, 0.2)
    spawn(_representation_worker, 2, str(tmp_path), backend="gloo")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    ep2 = {**ranks[0]["ep2"], **ranks[1]["ep2"]}
    for e, expert in enumerate(experts.local_experts):
        reference = (expert.linear_fc1.weight.grad, expert.linear_fc2.weight.grad)
        for got in (ep2[e], ranks[0]["dp2"][e], ranks[1]["dp2"][e]):
            torch.testing.assert_close(got[0], reference[0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(got[1], reference[1], rtol=1e-5, atol=1e-6)


def test_expert_parallel_projection_equals_one_process(single_process_megatron, tmp_path):
    w1, w2, g1, g2 = random_layer()
    experts = fake_experts(w1, w2, g1, g2)
    project_expert_gradients(experts, OrthogonalOptimizerConfig(alpha=0.3))
    spawn(_ep2_worker, 2, str(tmp_path), backend="gloo")
    ep2 = torch.load(tmp_path / "rank0.pt") + torch.load(tmp_path / "rank1.pt")
    for expert, (grad1, grad2) in zip(experts.local_experts, ep2):
        torch.testing.assert_close(grad1, expert.linear_fc1.weight.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad2, expert.linear_fc2.weight.grad, rtol=1e-6, atol=1e-7)
