"""The orthogonal expert optimizer: projector math, projected gradients against an explicit
projection, the alternating schedule, EP=2 equal to one process, and exact mid-phase resume."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp

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
    optimizer.experts = [experts]
    for _ in range(3):
        optimizer.step()
    assert torch.equal(optimizer.base.seen[0], g1[0]) and torch.equal(optimizer.base.seen[1], g1[0])
    assert not torch.equal(optimizer.base.seen[2], g1[0])  # the third step was projected
    with pytest.raises(OrthogonalOptimizerError, match="--moe-orthogonal-alpha"):
        OrthogonalOptimizerConfig(alpha=0.0)
    with pytest.raises(OrthogonalOptimizerError, match="> 0"):
        OrthogonalOptimizerConfig(accumulate_steps=0, orthogonal_steps=0)


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _ep2_worker(rank, port, out_dir):
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_patch.cpu_compat import apply_cpu_gloo_patches

    apply_cpu_gloo_patches()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    parallel_state.initialize_model_parallel(expert_model_parallel_size=2)
    w1, w2, g1, g2 = random_layer()
    local = slice(rank * E // 2, (rank + 1) * E // 2)
    experts = fake_experts(w1[local], w2[local], g1[local], g2[local])
    project_expert_gradients(experts, OrthogonalOptimizerConfig(alpha=0.3))
    torch.save([(e.linear_fc1.weight.grad, e.linear_fc2.weight.grad)
                for e in experts.local_experts], os.path.join(out_dir, f"rank{rank}.pt"))
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def test_expert_parallel_projection_equals_one_process(single_process_megatron, tmp_path):
    w1, w2, g1, g2 = random_layer()
    experts = fake_experts(w1, w2, g1, g2)
    project_expert_gradients(experts, OrthogonalOptimizerConfig(alpha=0.3))
    mp.spawn(_ep2_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ep2 = torch.load(tmp_path / "rank0.pt") + torch.load(tmp_path / "rank1.pt")
    for expert, (grad1, grad2) in zip(experts.local_experts, ep2):
        torch.testing.assert_close(grad1, expert.linear_fc1.weight.grad, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(grad2, expert.linear_fc2.weight.grad, rtol=1e-6, atol=1e-7)
