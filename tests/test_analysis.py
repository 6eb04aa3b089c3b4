"""The specialization analysis: every metric against hand-computed values on tiny synthetic
routings, the report files, and the tool end to end on a checkpoint trained here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from megatron_patch.distributed import free_port

from megatron_patch.analysis import metrics
from megatron_patch.analysis.accumulate import LayerAccumulator

REPO = Path(__file__).resolve().parents[1]


def _map(sets, num_experts):
    routing_map = torch.zeros(len(sets), num_experts, dtype=torch.bool)
    for t, chosen in enumerate(sets):
        routing_map[t, list(chosen)] = True
    return routing_map


# --- routing: 2 domains, 4 experts, top-2 -------------------------------------------------------

def test_specialized_routing_overlap_and_mutual_information():
    # Domain 0 always uses experts {0, 1}, domain 1 always {2, 3}; 4 tokens each.
    table = torch.tensor([[4.0, 4, 0, 0], [0, 0, 4, 4]])
    tokens = torch.tensor([4.0, 4.0])
    overlap = metrics.routing_overlap(table, tokens, topk=2)
    assert overlap["same_domain"] == pytest.approx(1.0)
    assert overlap["cross_domain"] == pytest.approx(0.0)
    # All 28 pairs: the 12 same-domain pairs share both experts -> 48 / (2 * 56).
    assert overlap["all"] == pytest.approx(3 / 7)
    mi = metrics.mutual_information(table)
    assert mi["mi"] == pytest.approx(math.log(2))
    assert mi["mi_over_domain_entropy"] == pytest.approx(1.0)
    assert mi["nmi"] == pytest.approx(2 * math.log(2) / (math.log(2) + math.log(4)))
    # Top-1 with one expert per domain: NMI reaches 1.
    assert metrics.mutual_information(torch.tensor([[5.0, 0], [0, 5.0]]))["nmi"] == \
        pytest.approx(1.0)


def test_domain_blind_routing_gives_chance_overlap_and_zero_mi():
    # Each domain's 6 tokens take each of the 6 pairs of 4 experts once.
    pairs = [(a, b) for a in range(4) for b in range(a + 1, 4)]
    routing_map = _map(pairs + pairs, 4)
    domains = torch.tensor([0] * 6 + [1] * 6)
    table = torch.zeros(2, 4, dtype=torch.float64).index_add_(0, domains, routing_map.double())
    overlap = metrics.routing_overlap(table, torch.tensor([6.0, 6.0]), topk=2)
    assert overlap["cross_domain"] == pytest.approx(2 / 4)  # k / E
    # Same-domain pairs: n_de = 3 -> 2 * 4 * 3 * 2 / (2 * 2 * 6 * 5).
    assert overlap["same_domain"] == pytest.approx(0.4)
    mi = metrics.mutual_information(table)
    assert mi["mi"] == pytest.approx(0.0, abs=1e-12)
    assert mi["nmi"] == pytest.approx(0.0, abs=1e-12)
    counts = metrics.load_counts(routing_map)
    assert metrics.max_violation(counts) == 0.0
    assert metrics.load_fractions(counts).tolist() == [0.25] * 4


def test_max_violation_entropy_and_variance_by_hand():
    assert metrics.max_violation(torch.tensor([6.0, 2, 2, 2])) == pytest.approx(1.0)  # |6-3|/3
    uniform = torch.full((3, 8), 1 / 8)
    assert metrics.routing_entropy_per_token(uniform).tolist() == pytest.approx([math.log(8)] * 3)
    assert metrics.routing_variance_per_token(uniform).tolist() == pytest.approx([0.0] * 3)
    one_hot = torch.tensor([[1.0, 0, 0, 0]])
    assert metrics.routing_entropy_per_token(one_hot).item() == pytest.approx(0.0)
    # mean 1/4, squared deviations 9/16 + 3/16 = 3/4, unbiased / (E - 1) = 1/4: as torch.var.
    assert metrics.routing_variance_per_token(one_hot).item() == pytest.approx(0.25)


# --- expert outputs ------------------------------------------------------------------------------

def test_identical_experts_have_cosine_one_and_overlap_one():
    torch.manual_seed(0)
    x = torch.randn(16, 1, 8)
    outputs = x.expand(16, 4, 8) * torch.tensor([1.0, 2.0, 0.5, 3.0])[None, :, None]
    routing_map = _map([(t % 4, (t + 1) % 4) for t in range(16)], 4)
    sim, overlap = metrics.expert_output_cosines(outputs, routing_map, chunk=5)
    assert torch.allclose(sim, torch.ones(4, 4, dtype=torch.float64))
    assert overlap == pytest.approx(1.0)
    assert metrics.mean_off_diagonal(sim) == pytest.approx(1.0)
    weights = torch.randn(1, 10).expand(4, 10)
    assert metrics.mean_off_diagonal(metrics.cosine_similarity_matrix(weights)) == \
        pytest.approx(1.0)


def test_orthogonal_experts_have_overlap_zero():
    outputs = torch.eye(4)[None].expand(6, 4, 4) * torch.arange(1.0, 7.0)[:, None, None]
    routing_map = _map([(0, 1), (1, 2), (2, 3), (3, 0), (0, 2), (1, 3)], 4)
    sim, overlap = metrics.expert_output_cosines(outputs, routing_map)
    assert overlap == pytest.approx(0.0)
    assert metrics.mean_off_diagonal(sim) == pytest.approx(0.0)
    # Partial alignment: x_2 at 60 degrees to x_1 -> cos^2 = 1/4.
    pair = torch.tensor([[[1.0, 0.0], [0.5, math.sqrt(3) / 2]]])
    assert metrics.expert_output_cosines(pair, _map([(0, 1)], 2))[1] == pytest.approx(0.25)
    # Token t's outputs are (t+1) e_j: routed squared norms (t+1)^2, H = 4 -> RMS^2 = 91/6/4.
    assert metrics.routed_output_rms(outputs, routing_map) == pytest.approx(math.sqrt(91 / 24))
    assert math.isnan(metrics.routed_output_rms(outputs, torch.zeros(6, 4, dtype=torch.bool)))


def test_silhouette_by_hand_and_extremes():
    points = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    labels = torch.tensor([0, 0, 1, 1])
    expected = (9.5 / 10.5 + 8.5 / 9.5) / 2
    assert metrics.silhouette_score(points, labels, "euclidean") == pytest.approx(expected)
    # Well separated directions: cosine silhouette near 1.
    torch.manual_seed(0)
    centers = torch.eye(3) * 10
    labels = torch.arange(3).repeat_interleave(50)
    cloud = centers[labels] + 0.1 * torch.randn(150, 3)
    assert metrics.silhouette_score(cloud, labels, "cosine") > 0.95
    # Labels unrelated to the points: near 0.
    noise = torch.randn(300, 5)
    assert abs(metrics.silhouette_score(noise, torch.arange(300) % 3, "cosine")) < 0.05
    # A point alone in its cluster scores 0; a single cluster is undefined.
    single = metrics.silhouette_score(torch.tensor([[0.0], [1.0], [5.0]]), torch.tensor([0, 0, 1]),
                                      "euclidean")
    assert single == pytest.approx((4 / 5 + 3 / 4 + 0) / 3)
    assert math.isnan(metrics.silhouette_score(points, torch.zeros(4, dtype=torch.long)))


def test_accumulator_keeps_the_token_sample_and_skips_padding():
    acc = LayerAccumulator(4, 2, 2, "softmax", sample_positions=torch.tensor([1, 3]))
    logits = torch.zeros(4, 4)
    routing_map = _map([(0, 1), (0, 1), (2, 3), (2, 3)], 4)
    acc.update(torch.arange(8.0).view(4, 2), logits, routing_map,
               domains=torch.tensor([0, 0, 1, -1]), positions=torch.tensor([3, 2, 1, 0]))
    acc.reduce()
    out = acc.routing_metrics()
    assert out["num_tokens"] == 3
    assert out["domain_expert_counts"] == [[2, 2, 0, 0], [0, 0, 1, 1]]
    assert out["routing_entropy"] == pytest.approx(math.log(4))
    assert out["routing_variance"] == pytest.approx(0.0)
    assert acc.sample["positions"].tolist() == [1, 3]
    assert acc.sample["hidden"].tolist() == [[4.0, 5.0], [0.0, 1.0]]


# --- report --------------------------------------------------------------------------------------

def _synthetic_result():
    layer = {
        "layer_number": 1, "num_tokens": 8, "load": [0.5, 0.5], "max_vio": 0.0,
        "routing_entropy": 0.5, "routing_variance": 0.1, "routing_overlap": 0.4,
        "routing_overlap_same_domain": 1.0, "routing_overlap_cross_domain": 0.0,
        "routing_overlap_chance": 0.5, "domain_mi": 0.69, "domain_nmi": 1.0,
        "domain_mi_over_domain_entropy": 1.0, "domain_entropy": 0.69,
        "expert_choice_entropy": 0.69, "domain_expert_counts": [[4, 0], [0, 4]],
        "tokens_per_domain": [4, 4], "expert_overlap": float("nan"), "silhouette": 0.9,
        "token_sample": 8, "silhouette_points": 8, "output_similarity": [[1, 0.1], [0.1, 1]],
        "output_similarity_mean": 0.1, "weight_similarity": [[1, 0], [0, 1]],
        "weight_similarity_mean": 0.0, "routed_output_rms": 0.3,
    }
    from megatron_patch.analysis.runner import SCALAR_METRICS

    return {
        "checkpoint": "ckpt/iter_0000001", "iteration": 1, "data_path": "valid",
        "domains": ["code", "prose"], "has_domains": True, "num_samples": 2, "seq_length": 4,
        "num_tokens": 8, "token_sample": 8, "seed": 1, "silhouette_metric": "cosine",
        "lm_loss": 3.0, "world_size": 1,
        "model": {"num_layers": 1, "hidden_size": 4, "num_experts": 2, "topk": 1,
                  "score_function": "softmax", "moe_layers": [1]},
        "mean": {key: layer[key] for key in SCALAR_METRICS}, "layers": [layer],
    }


def test_report_renders_json_markdown_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    from megatron_patch.analysis.report import write_report

    paths = write_report(_synthetic_result(), tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["mean"]["expert_overlap"] is None  # NaN -> null: strict JSON
    text = paths["markdown"].read_text()
    assert "| NMI(domain; expert) | 1 | 1 |" in text
    assert "| code | 4 | 1.000 | 0.000 |" in text
    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    assert pngs == ["domain_expert_layer1.png", "load_per_expert.png", "similarity_layer1.png"]
    for name in pngs:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


# --- end to end ----------------------------------------------------------------------------------

def _run(cmd, timeout=240):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_tool_end_to_end_on_a_trained_checkpoint(tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    save = tmp_path / "ckpt"
    _run([sys.executable, "-m", "megatron_patch.training.pretrain",
          "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
          "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
          "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "3e-3", "--lr-warmup-iters", "1", "--train-iters", "2", "--eval-iters", "0",
          "--moe-ortho-loss-coeff", "0.1", "--moe-var-loss-coeff", "0.1", "--no-progress-bar",
          "--data-path", tiny_data.train, "--valid-data-path", tiny_data.valid,
          "--tokenizer-model", tiny_data.tokenizer, "--save", str(save)])
    tool = [sys.executable, "tools/analyze_specialization.py", "--load", str(save),
            "--num-samples", "12", "--sample-tokens", "200", "--silhouette-points", "300",
            "--no-progress-bar"]
    proc = _run(tool + ["--output-dir", str(tmp_path / "a"), "--micro-batch-size", "4"])
    assert "report:" in proc.stdout
    result = json.loads((tmp_path / "a" / "specialization.json").read_text())
    assert result["data_path"] == tiny_data.valid  # the run's validation prefix by default
    assert result["has_domains"] and set(result["domains"]) == {"python_code", "python_docs"}
    assert result["model"]["moe_layers"] == [1, 2]
    assert result["num_samples"] == 12
    for layer in result["layers"]:
        assert sum(layer["load"]) == pytest.approx(1.0)
        assert 0 <= layer["expert_overlap"] <= 1 and -1 <= layer["silhouette"] <= 1
        assert 0 <= layer["domain_nmi"] <= 1
        assert 0 < layer["routing_entropy"] <= math.log(4) + 1e-9
        assert layer["routing_variance"] >= 0
        assert len(layer["output_similarity"]) == 4 and len(layer["weight_similarity"]) == 4
        assert sum(layer["tokens_per_domain"]) == layer["num_tokens"]
        assert layer["token_sample"] == 200
    assert all(v is not None for k, v in result["mean"].items())
    assert len(list((tmp_path / "a").glob("*.png"))) == 5

    # Deterministic, and independent of the micro-batch size (up to float summation order).
    _run(tool + ["--output-dir", str(tmp_path / "b"), "--micro-batch-size", "3", "--no-plots"])
    again = json.loads((tmp_path / "b" / "specialization.json").read_text())
    for key, value in result["mean"].items():
        assert again["mean"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    assert again["layers"][0]["domain_expert_counts"] == result["layers"][0]["domain_expert_counts"]


@pytest.mark.slow
def test_identical_expert_init_under_expert_parallelism(tiny_data, tmp_path):
    """--moe-identical-expert-init with EP=2: all four experts (two per rank) equal expert 0."""
    save = tmp_path / "ckpt"
    _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
          str(free_port()), "-m", "megatron_patch.training.pretrain",
          "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "4",
          "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
          "--expert-model-parallel-size", "2", "--moe-identical-expert-init",
          "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
          "--lr", "0", "--min-lr", "0", "--lr-warmup-iters", "0", "--train-iters", "1",
          "--eval-iters", "0",
          "--no-progress-bar",
          "--data-path", tiny_data.train, "--valid-data-path", tiny_data.valid,
          "--tokenizer-model", tiny_data.tokenizer, "--save", str(save)])
    _run([sys.executable, "tools/analyze_specialization.py", "--load", str(save), "--num-samples",
          "4", "--sample-tokens", "64", "--silhouette-points", "50", "--no-plots",
          "--no-progress-bar", "--output-dir", str(tmp_path / "a")])
    (layer,) = json.loads((tmp_path / "a" / "specialization.json").read_text())["layers"]
    assert layer["weight_similarity_mean"] == pytest.approx(1.0, abs=1e-6)
    assert layer["output_similarity_mean"] == pytest.approx(1.0, abs=1e-5)
