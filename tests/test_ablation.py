"""The specialization ablation: the report's statistics on hand-made runs, and the script end to end
in its smallest setting (--smoke: variants a and h, 2 steps of a toy model, one seed)."""

import json
import math
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

from megatron_patch.analysis.ablation import aggregate, find_seeds
from megatron_patch.analysis.ablation_report import AblationSetup, write_report
from megatron_patch.analysis.reporting import ReportError
from megatron_patch.analysis.variants import VARIANTS, VariantValues, variant_flags
from megatron_patch.analysis.variants import main as print_flags
from megatron_patch.distributed import free_port

REPO = Path(__file__).resolve().parents[1]


def _report(runs: Path, out: Path, variants: str, seeds: str = "", **setup) -> None:
    """What tools/ablation_report.py does, without plots."""
    seed_list = seeds.split() if seeds else find_seeds(runs)
    agg = aggregate(runs, variants.split(), seed_list)
    write_report(agg, AblationSetup(**setup), variants.split(), seed_list, out, plots=False)


def _fake_run(root: Path, name: str, valid_loss: float, overlap: float, steps: int = 20):
    run = root / name
    (run / "checkpoints").mkdir(parents=True)
    (run / "analysis").mkdir()
    with open(run / "checkpoints" / "metrics.jsonl", "w") as f:
        for it in range(1, steps + 1):
            f.write(json.dumps({"split": "train", "iteration": it, "lm_loss": 5.0 - it / steps,
                                "max_vio": 0.5, "tokens_per_s": 1000.0 + it,
                                "routing_entropy": 2.0, "load_balancing_loss": 1.0}) + "\n")
        f.write(json.dumps({"split": "valid", "iteration": steps, "lm_loss": valid_loss}) + "\n")
    mean = {key: 0.1 for key in ("routing_overlap", "routing_overlap_same_domain",
                                 "routing_overlap_cross_domain", "routing_variance",
                                 "routing_entropy", "max_vio", "silhouette",
                                 "output_similarity_mean", "weight_similarity_mean", "domain_mi",
                                 "domain_nmi", "domain_mi_over_domain_entropy")}
    mean["expert_overlap"] = overlap
    mean["silhouette"] = None  # NaN in the analysis JSON
    (run / "analysis" / "specialization.json").write_text(json.dumps({
        "mean": mean, "lm_loss": valid_loss, "num_tokens": 100, "domains": ["x", "y"],
        "model": {"num_layers": 2, "hidden_size": 8, "num_experts": 4, "topk": 2,
                  "score_function": "softmax", "moe_layers": [1, 2]},
        "layers": [{"load": [0.4, 0.3, 0.2, 0.1]}, {"load": [0.25] * 4}]}))
    (run / "timing.json").write_text('{"train_s": 10.0, "analysis_s": 2.0}')
    (run / "command.txt").write_text(
        "run_pretrain_moe.sh p --moe-ortho-loss-coeff 0.1 --moe-var-loss-coeff 0 --seed 1\n")
    (run / "done").touch()


def test_report_statistics_on_hand_made_runs(tmp_path):
    runs = tmp_path / "runs"
    _fake_run(runs, "a_seed1", 3.0, 0.5)
    _fake_run(runs, "a_seed2", 4.0, 0.7)
    _fake_run(runs, "b_seed1", 2.0, 0.2)
    _fake_run(runs, "b_seed2", 4.0, 0.3)  # b_seed3 and a_seed3 never finished
    (runs / "b_seed3").mkdir()
    out = tmp_path / "report"
    _report(runs, out, "a b", "1 2 3", command="my command")
    result = json.loads((out / "results.json").read_text())
    a = result["summary"]["a"]["stats"]
    assert a["valid_loss"]["mean"] == pytest.approx(3.5)
    assert a["valid_loss"]["std"] == pytest.approx(math.sqrt(0.5))  # sample std, n - 1
    assert a["valid_loss"]["n"] == 2
    assert a["valid_ppl"]["mean"] == pytest.approx((math.exp(3) + math.exp(4)) / 2)
    assert a["silhouette"]["n"] == 0  # all NaN -> no value
    assert a["tokens_per_s"]["mean"] == pytest.approx(1011.0)  # median after the first 5%
    paired = result["summary"]["b"]["paired_diff_vs_a"]
    assert paired["expert_overlap"]["mean"] == pytest.approx(-0.35)  # (-0.3 - 0.4) / 2
    assert paired["valid_loss"]["mean"] == pytest.approx(-0.5)
    assert sorted(result["missing_runs"]) == ["a_seed3", "b_seed3"]
    text = (out / "results.md").read_text()
    assert "my command" in text and "**Incomplete**" in text
    assert "| a: aux loss only | 2 | 3.5 ± 0.71 |" in text
    assert "`--moe-ortho-loss-coeff 0.1 --moe-var-loss-coeff 0`" in text


@pytest.mark.slow
def test_smoke_ablation_end_to_end(tiny_data, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port()),
           "DATA_PATH": tiny_data.train, "VALID_DATA_PATH": tiny_data.valid,
           "TOKENIZER_MODEL": tiny_data.tokenizer, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "examples/pretrain/specialization_ablation.sh", "--smoke",
         "--runs-dir", str(tmp_path / "runs"), "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result = json.loads((out / "results.json").read_text())
    assert set(result["summary"]) == {"a", "h"} and result["missing_runs"] == []
    assert result["iterations"] == {"a_seed1": 2, "h_seed1": 2}
    for v in ("a", "h"):
        stats = result["summary"][v]["stats"]
        assert stats["valid_loss"]["n"] == 1 and stats["valid_loss"]["mean"] > 0
        assert 0 <= stats["expert_overlap"]["mean"] <= 1
        assert stats["tokens_per_s"]["mean"] > 0
    assert result["machine"]["megatron_core"] == version("megatron-core")
    text = (out / "results.md").read_text()
    assert "| a: aux loss only | 1 |" in text and "| h: + OMoE (representations) | 1 |" in text
    assert "--smoke" in text and "One seed only" in text
    for name in ("metrics.png", "curves.png", "load_sorted.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text
    # Variant h trained with OMoE on representations (projecting at its second step).
    command = (tmp_path / "runs" / "h_seed1" / "command.txt").read_text()
    assert "--moe-orthogonal-optimizer --moe-orthogonal-subspace representations" in command
    assert "--moe-ortho-loss-coeff 0 --moe-var-loss-coeff 0" in command
    # Every run trained the flags of its variant in the library's table, with the values the
    # report records (calibration iters: the script's default; variants a and h do not use it).
    coefficients = dict(item.split("=") for item in result["coefficients"].split())
    values = VariantValues(beta=coefficients["beta"], beta_pairwise=coefficients["beta_pairwise"],
                           gamma=coefficients["gamma"], omoe=result["omoe_flags"]["f g"],
                           omoe_repr=result["omoe_flags"]["h"], calibration_iters="50")
    for v in ("a", "h"):
        command = (tmp_path / "runs" / f"{v}_seed1" / "command.txt").read_text()
        assert " ".join(variant_flags(v, values)) + " --seed 1 --no-progress-bar" in command


def test_flags_printer_prints_the_variant_table(capsys):
    """specialization_ablation.sh trains what `-m megatron_patch.analysis.variants` prints."""
    values = VariantValues(beta="3", beta_pairwise="4", gamma="0.2", omoe="--x 1",
                           omoe_repr="--y 2 --z", calibration_iters="7")
    cli = ["--beta", "3", "--beta-pairwise", "4", "--gamma", "0.2", "--omoe=--x 1",
           "--omoe-repr=--y 2 --z", "--calibration-iters", "7"]
    for letter in VARIANTS:
        assert print_flags([letter, *cli]) == 0
        assert capsys.readouterr().out.split("\n")[:-1] == variant_flags(letter, values)
    assert variant_flags("e", values) == ["--moe-ortho-loss-coeff", "4", "--moe-ortho-loss-form",
                                          "pairwise", "--moe-var-loss-coeff", "0.2"]
    assert variant_flags("h", values)[-4:] == ["--moe-orthogonal-optimizer", "--y", "2", "--z"]
    assert variant_flags("i", values)[-2:] == ["--moe-loss-calibration-iters", "7"]
    assert print_flags(["z", *cli]) == 2
    assert "unknown variant z" in capsys.readouterr().err


def test_metric_labels_cover_the_analysis_metrics():
    from megatron_patch.analysis.labels import AIMS, LABELS, METRIC_LABELS
    from megatron_patch.analysis.runner import SCALAR_METRICS
    from megatron_patch.analysis.ablation import METRICS

    assert list(METRIC_LABELS) == list(SCALAR_METRICS)
    assert set(METRICS) <= set(LABELS) and set(AIMS) <= set(METRICS)


def test_report_rejects_unknown_variants_and_empty_runs(tmp_path):
    _fake_run(tmp_path / "runs", "a_seed1", 3.0, 0.5)
    with pytest.raises(ReportError, match="unknown variant z"):
        _report(tmp_path / "runs", tmp_path / "out", "a z")
    with pytest.raises(ReportError, match="no finished run"):
        _report(tmp_path / "runs", tmp_path / "out", "b")


def test_script_rejects_bad_input():
    """(tests/test_packaging.py lints the script with shellcheck.)"""
    script = "examples/pretrain/specialization_ablation.sh"
    proc = subprocess.run(["bash", script, "--variants", "a z"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "unknown variant z" in proc.stderr
    proc = subprocess.run(["bash", script, "--help"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0 and "--quick" in proc.stdout


def test_sweep_report_pairs_points_by_seed(tmp_path):
    from megatron_patch.analysis.sweep import read_point, summarize
    from megatron_patch.analysis.sweep import write_report as write_sweep

    points = []
    for beta, variant, losses, overlaps in (("0", "a", (3.0, 4.0), (0.5, 0.7)),
                                            ("0.5", "b", (3.5, 4.1), (0.2, 0.3))):
        runs = tmp_path / f"runs_{beta}"
        for seed, loss, overlap in zip((1, 2), losses, overlaps):
            _fake_run(runs, f"{variant}_seed{seed}", loss, overlap)
        points.append(tmp_path / f"beta_{beta}")
        _report(runs, points[-1], variant, coefficients=f"beta={beta} gamma=0.1")
    out = tmp_path / "sweep"
    read = [read_point(point) for point in points]
    write_sweep(read, summarize(read), out, "sweep command", plots=False)
    rows = json.loads((out / "results.json").read_text())["summary"]
    assert [row["beta"] for row in rows] == [0.0, 0.5]
    assert rows[1]["deltas"]["valid_loss"][0] == pytest.approx(0.3)  # (0.5 + 0.1) / 2
    assert rows[1]["deltas"]["expert_overlap"][0] == pytest.approx(-0.35)
    assert "| 0.5 | 2 | 3.8 ± 0.42 |" in (out / "results.md").read_text()
    with pytest.raises(ReportError, match="results.json is missing"):
        read_point(tmp_path / "nowhere")
