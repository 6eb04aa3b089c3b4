"""LoRA adapters (megatron_patch.training.lora): the adapted layer equals its merged weight, only
adapters (and optionally routers) train, and gradients are identical under TP with SP, EP and PP
to one process (the layout checker's library, adapters' sharded checkpoints included)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from megatron_patch.distributed import Layout, init_model_parallel, spawn
from megatron_patch.flags import ConfigError
from megatron_patch.parallel_check.cases import parse_case
from megatron_patch.parallel_check.check import check_cases
from megatron_patch.parallel_check.compare import Tolerance
from megatron_patch.training.config import JobConfig
from megatron_patch.training.lora import LoRAConfig, LoRALinear

MODEL = {
    "num_layers": 2, "hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4,
    "num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32, "swiglu": True,
    "moe_ortho_loss_coeff": 30.0, "moe_var_loss_coeff": 30.0, "seq_length": 16,
    "micro_batch_size": 2,
}
# B starts non-zero so that both adapters' gradients are non-zero at the checked step.
ADAPTERS = {"lora_rank": 4, "lora_alpha": 8.0, "lora_dropout": 0.0, "lora_b_init_std": 0.05,
            "lora_targets": ["attention", "experts"]}
LORA = JobConfig.from_flat({**MODEL, **ADAPTERS})


def _layer_worker(rank: int, out: str, train_router: bool) -> None:
    from megatron_patch.training.model import build_gpt_model

    init_model_parallel(Layout(), seed=0)
    job = LORA.replace(lora={"lora_train_router": train_router})
    model = build_gpt_model(job, 128)
    worst = 0.0
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    for module in adapted:
        x = torch.randn(5, 2, module.base.weight.shape[1])
        output, _ = module(x)
        worst = max(worst, (output - x @ module.merged_weight().t()).abs().max().item())
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    Path(out).write_text(json.dumps({"worst": worst, "adapted": len(adapted),
                                     "trainable": trainable}))


@pytest.mark.parametrize("train_router", [False, True])
def test_adapted_layer_is_its_merged_weight_and_only_adapters_train(tmp_path, train_router):
    out = tmp_path / "result.json"
    spawn(_layer_worker, 1, str(out), train_router, backend="gloo")
    result = json.loads(out.read_text())
    # 2 layers x (linear_qkv, linear_proj, 4 experts x (fc1, fc2)).
    assert result["adapted"] == 2 * (2 + 4 * 2)
    assert result["worst"] < 1e-5
    adapters = [n for n in result["trainable"] if n.endswith(("lora_a", "lora_b"))]
    routers = [n for n in result["trainable"] if ".mlp.router." in n]
    assert len(adapters) == 2 * result["adapted"]
    assert sorted(adapters + routers) == result["trainable"]
    assert len(routers) == (2 if train_router else 0)


@pytest.mark.parametrize("spec", ["tp2ep2etp1sp", pytest.param("pp2", marks=pytest.mark.slow)])
def test_adapter_gradients_match_single_device(spec):
    """TP with SP (column- and row-parallel adapters), EP (expert adapters), PP; B non-zero."""
    case = parse_case(spec)
    diffs, baselines = check_cases([case], LORA, 8, 128, backend="gloo",
                                   tolerance=Tolerance(rtol=1e-5, atol=1e-8),
                                   report=lambda line: None)
    failed = [d for d in diffs[str(case)] if not d.passed]
    assert not failed, "\n".join(map(str, failed))
    grads = baselines[case.features].grads
    adapters = {name: g for name, g in grads.items() if name.endswith(("lora_a", "lora_b"))}
    assert len(adapters) == 2 * 2 * (2 + 4 * 2)
    assert all(g.abs().max() > 0 for g in adapters.values())  # every adapter is checked
    frozen = [g for name, g in grads.items() if name not in adapters]
    assert frozen and all(g.abs().max() == 0 for g in frozen)


def test_bad_lora_settings_are_refused():
    with pytest.raises(ConfigError, match="--lora-targets \\['mlp'\\]"):
        LoRAConfig(lora_rank=8, lora_targets=["mlp"])
    with pytest.raises(ConfigError, match="--lora-rank with --load"):
        JobConfig.from_flat({**MODEL, **ADAPTERS, "load": "/tmp/somewhere"})
    with pytest.raises(ConfigError, match="orthogonal expert optimizer"):
        JobConfig.from_flat({**MODEL, **ADAPTERS, "moe_orthogonal_optimizer": True})
    with pytest.raises(ConfigError, match="--lora-targets experts needs"):
        JobConfig.from_flat({**MODEL, **ADAPTERS, "tensor_model_parallel_size": 2,
                             "sequence_parallel": True})
