"""L_o and L_v on DeepSpeed-MoE (megatron_patch.deepspeed) and the DeepSpeed pretraining example.

`make install` installs deepspeed (requirements-deepspeed.txt). Runs on DeepSpeed's CPU accelerator
with gloo.
"""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402

from megatron_patch.cpu_compat import use_gloo_for_deepspeed_comm  # noqa: E402
from megatron_patch.deepspeed import SpecializationMoE  # noqa: E402
from megatron_patch.distributed import free_port  # noqa: E402
from megatron_patch.flags import ConfigError  # noqa: E402
from megatron_patch.moe.loss_config import LossConfig  # noqa: E402
from megatron_patch.moe.losses import orthogonality_loss_per_slot, variance_loss  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "examples" / "pretrain" / "deepspeed"
HIDDEN, NUM_EXPERTS, BETA, GAMMA = 16, 4, 0.5, 2.0


def _build_moe(k: int, form: str = "span", ep_size: int = 1, ep_rank: int = 0, normalize: bool = False,
               **moe_kwargs) -> SpecializationMoE:
    """The same layer under any EP layout: gate from seed 0, global expert e from seed 100 + e."""
    torch.manual_seed(0)
    expert = torch.nn.Sequential(torch.nn.Linear(HIDDEN, 24), torch.nn.GELU(), torch.nn.Linear(24, HIDDEN))
    losses = LossConfig(moe_ortho_loss_coeff=BETA, moe_var_loss_coeff=GAMMA, moe_ortho_loss_form=form,
                        moe_ortho_loss_normalize=normalize)
    moe = SpecializationMoE(HIDDEN, expert, num_experts=NUM_EXPERTS, ep_size=ep_size, k=k,
                            top2_2nd_expert_sampling=False, losses=losses, **moe_kwargs)
    local_experts = moe.deepspeed_moe.experts.deepspeed_experts
    for j, local_expert in enumerate(local_experts):
        generator = torch.Generator().manual_seed(100 + ep_rank * len(local_experts) + j)
        for param in local_expert.parameters():
            param.data = 0.5 * torch.randn(param.shape, generator=generator)
    return moe


def _inputs(ranks: int, tokens_per_rank: int = 12) -> torch.Tensor:
    """[ranks, 2, tokens_per_rank / 2, HIDDEN]: each rank's micro-batch."""
    return torch.randn(ranks, 2, tokens_per_rank // 2, HIDDEN, generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("k,form,normalize",
                         [(2, "span", False), (2, "pairwise", False), (3, "span", False), (3, "span", True)])
def test_losses_equal_explicit_per_token_reference(k: int, form: str, normalize: bool) -> None:
    """Run every kept (token, expert) pair by hand; dropped routes and capacity padding don't count."""
    moe = _build_moe(k, form, capacity_factor=1.0, min_capacity=1, normalize=normalize)
    layer = moe.deepspeed_moe
    captured = {}
    layer.gate.register_forward_hook(lambda module, args, output: captured.update(gate=output))
    x = _inputs(1, 16)[0]
    output, total, _ = moe(x)
    (l_aux, capacity, _, indices, _, gates, _), _ = captured["gate"]
    assert (indices < 0).any(), "the test needs dropped routes"
    assert int(capacity) * NUM_EXPERTS > int((indices >= 0).sum()), "the test needs empty capacity slots"

    tokens = x.reshape(-1, HIDDEN)
    experts = layer.experts.deepspeed_experts
    ortho_sum, slots, expected_output = 0.0, 0, torch.zeros_like(tokens)
    with torch.no_grad():
        for t, token in enumerate(tokens):
            kept = [(route, int(indices[route, t])) for route in range(k) if indices[route, t] >= 0]
            for route, e in kept:
                expected_output[t] += gates[route, t] * experts[e](token)
            if kept:
                outputs = torch.stack([experts[e](token) for _, e in kept])  # [n_t, H] unweighted
                ortho_sum += orthogonality_loss_per_slot(outputs[None], form=form,
                                                         normalize=normalize).sum().item()
                slots += len(kept)
        expected_var = variance_loss(F.softmax(tokens @ layer.gate.wg.weight.T, dim=-1))

    losses = moe.specialization_losses
    torch.testing.assert_close(output.reshape(-1, HIDDEN), expected_output, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses.ortho.item(), ortho_sum / slots, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(losses.var, expected_var, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(total, l_aux + BETA * losses.ortho + GAMMA * losses.var)
    assert losses.l_aux is l_aux

    # L_o trains the experts only, L_v the gate only.
    gate_weight = layer.gate.wg.weight
    expert_params = list(layer.experts.parameters())
    ortho_grads = torch.autograd.grad(losses.ortho, [gate_weight, *expert_params], allow_unused=True,
                                      retain_graph=True)
    var_grads = torch.autograd.grad(losses.var, [gate_weight, *expert_params], allow_unused=True)
    assert ortho_grads[0] is None and any(g is not None and g.abs().sum() > 0 for g in ortho_grads[1:])
    assert var_grads[0].abs().sum() > 0 and all(g is None for g in var_grads[1:])


@pytest.mark.parametrize("kwargs,match", [
    ({"moe_ortho_loss_coeff": -1.0}, "--moe-ortho-loss-coeff must be a finite number >= 0"),
    ({"moe_var_loss_coeff": float("nan")}, "--moe-var-loss-coeff"),
    ({"moe_var_loss_coeff": "auto"}, "fixed coefficients"),
    ({"moe_ortho_loss_form": "cosine"}, "--moe-ortho-loss-form must be one of"),
    ({"moe_ortho_loss_eps": 0.0}, "--moe-ortho-loss-eps"),
    ({"moe_ortho_loss_kernel": "triton"}, "torch kernel"),
])
def test_invalid_settings_are_refused(kwargs: dict, match: str) -> None:
    expert = torch.nn.Linear(HIDDEN, HIDDEN)
    with pytest.raises(ConfigError, match=match):
        SpecializationMoE(HIDDEN, expert, num_experts=NUM_EXPERTS, k=2, losses=LossConfig(**kwargs))


def test_ortho_loss_with_top1_is_refused() -> None:
    expert = torch.nn.Linear(HIDDEN, HIDDEN)
    with pytest.raises(ConfigError, match="k >= 2"):
        SpecializationMoE(HIDDEN, expert, num_experts=NUM_EXPERTS, k=1,
                          losses=LossConfig(moe_ortho_loss_coeff=0.1))
    moe = SpecializationMoE(HIDDEN, expert, num_experts=NUM_EXPERTS, k=1,
                            losses=LossConfig(moe_var_loss_coeff=0.1))
    moe(torch.randn(2, 4, HIDDEN))
    assert moe.specialization_losses.ortho is None and moe.specialization_losses.var < 0


def _ep_worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    """One rank of an EP=world_size run: forward, backward of beta*L_o + gamma*L_v, save results."""
    os.environ.update(DS_ACCELERATOR="cpu", RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    use_gloo_for_deepspeed_comm()
    deepspeed.init_distributed(dist_backend="gloo")
    moe = _build_moe(2, ep_size=world_size, ep_rank=rank, capacity_factor=NUM_EXPERTS)
    moe.set_deepspeed_parallelism()
    x = _inputs(world_size)[rank].requires_grad_()
    output, _, _ = moe(x)
    losses = moe.specialization_losses
    (BETA * losses.ortho + GAMMA * losses.var).backward()
    layer = moe.deepspeed_moe
    torch.save({"output": output.detach(), "ortho": losses.ortho.detach(), "var": losses.var.detach(),
                "gate_grad": layer.gate.wg.weight.grad, "input_grad": x.grad,
                "expert_grads": [p.grad for p in layer.experts.parameters()]}, f"{out_dir}/rank{rank}.pt")
    deepspeed.comm.destroy_process_group()


def test_deepspeed_comm_on_cpu_builds_no_cxx_op() -> None:
    """DeepSpeed would JIT-compile its shared-memory all-reduce at init_distributed; gloo instead."""
    use_gloo_for_deepspeed_comm()
    assert importlib.import_module("deepspeed.comm.torch").build_shm_op() is None


def test_expert_parallel_matches_single_process(tmp_path: Path) -> None:
    """EP=2 over 2 gloo processes == one process over both micro-batches (values and gradients).

    Gradients are compared as DeepSpeed's engine reduces them: averaged over the W=2 data-parallel
    ranks (gate, layers below) and divided by W for the experts (expert-data-parallel size 1).
    """
    world_size = 2
    torch.multiprocessing.spawn(_ep_worker, args=(world_size, free_port(), str(tmp_path)), nprocs=world_size)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world_size)]

    reference = _build_moe(2, capacity_factor=NUM_EXPERTS)
    x = _inputs(world_size).flatten(0, 1).requires_grad_()  # rank 0's sequences, then rank 1's
    output, _, _ = reference(x)
    losses = reference.specialization_losses
    (BETA * losses.ortho + GAMMA * losses.var).backward()
    layer = reference.deepspeed_moe

    torch.testing.assert_close(torch.cat([r["output"] for r in ranks]), output.detach())
    for r in ranks:
        torch.testing.assert_close(r["ortho"], losses.ortho.detach())
        torch.testing.assert_close(r["var"], losses.var.detach())
    torch.testing.assert_close(sum(r["gate_grad"] for r in ranks) / world_size, layer.gate.wg.weight.grad)
    torch.testing.assert_close(torch.cat([r["input_grad"] for r in ranks]) / world_size, x.grad)
    per_expert = len(list(layer.experts.deepspeed_experts[0].parameters()))
    reference_grads = [p.grad for p in layer.experts.parameters()]
    for rank, r in enumerate(ranks):
        local = reference_grads[rank * len(r["expert_grads"]):(rank + 1) * len(r["expert_grads"])]
        assert len(local) == 2 * per_expert
        for got, expected in zip(r["expert_grads"], local):
            torch.testing.assert_close(got / world_size, expected)


def test_example_reports_missing_dataset(tmp_path: Path) -> None:
    sys.path.insert(0, str(EXAMPLE_DIR))
    try:
        from token_windows import load_token_stream
    finally:
        sys.path.remove(str(EXAMPLE_DIR))
    with pytest.raises(FileNotFoundError, match="make data"):
        load_token_stream(str(tmp_path / "nothing"))


@pytest.mark.slow
def test_example_trains_with_expert_parallelism(tiny_data, tmp_path: Path) -> None:
    """2 processes, EP=2, ZeRO stage 2, through the deepspeed launcher: the LM loss goes down."""
    metrics = tmp_path / "metrics.jsonl"
    env = {**os.environ, "PYTHON": sys.executable, "MASTER_PORT": str(free_port()), "NUM_PROCS": "2"}
    command = [str(EXAMPLE_DIR / "run_deepspeed.sh"), "--data-prefix", tiny_data.train, "--steps", "12",
               "--log-interval", "1", "--ep-size", "2", "--num-experts", "4", "--seq-length", "32",
               "--hidden-size", "64", "--ffn-hidden-size", "128", "--micro-batch-size", "8", "--lr", "3e-3",
               "--metrics-file", str(metrics)]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    lm = [r["lm_loss"] for r in records]
    assert sum(lm[-3:]) / 3 < sum(lm[:3]) / 3 - 0.3, lm
    assert all(r["ortho_loss"] >= 0 and r["var_loss"] <= 0 for r in records)
