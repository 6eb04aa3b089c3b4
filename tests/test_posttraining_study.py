"""The post-training study (megatron_patch.analysis.posttraining) end to end with --quick,
and its claim verdicts on hand-made differences."""

from __future__ import annotations

import json
import subprocess

import pytest

from megatron_patch.analysis.posttraining import VARIANTS
from megatron_patch.analysis.posttraining_report import claim_verdict
from training_helpers import REPO, clean_env


def test_claim_verdicts():
    higher = {"n": 3, "mean": 0.02, "std": 0.01, "positive": 3}
    mixed = {"n": 3, "mean": 0.02, "std": 0.03, "positive": 2}
    assert claim_verdict("silhouette", 0.4, higher) == "holds (3/3 seeds)"
    assert claim_verdict("silhouette", 0.4, mixed) == "not seen (2/3 seeds higher)"
    assert claim_verdict("expert_overlap", 0.5, higher) == "not seen (0/3 seeds lower)"
    assert claim_verdict("max_vio", 2.48, {"n": 3, "mean": 0.1, "std": 0, "positive": 3}) == \
        "holds"
    assert claim_verdict("max_vio", 0.5, {"n": 3, "mean": 0.1, "std": 0, "positive": 3}) == \
        "not seen (higher)"
    assert claim_verdict("silhouette", 0.4, {"n": 0, "mean": 0, "std": 0, "positive": 0}) == \
        "no runs"


@pytest.mark.parametrize("variants, modes", [
    ("a,b", "lora"),
    pytest.param("a,b,c,d", "full,lora", marks=pytest.mark.slow),
])
def test_quick_study_runs_end_to_end(tmp_path, variants, modes):
    """Data, a base model exported to Hugging Face with its logits checked, post-training from
    that export, evaluation, analysis and the report (make test: the baseline and the paper's
    variant with LoRA; CI: every variant in both modes)."""
    runs, out = tmp_path / "runs", tmp_path / "report"
    study = ["bash", "examples/posttrain/posttraining_study.sh", "--quick", "--variants",
             variants, "--modes", modes, "--runs-dir", str(runs), "--output-dir", str(out)]
    result = subprocess.run(study, cwd=REPO, env=clean_env(), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "ok (tolerance" in (runs / "base" / "export.log").read_text()
    report = json.loads((out / "results.json").read_text())
    names = {f"{v}_{m}_seed1" for v in variants.split(",") for m in modes.split(",")}
    assert set(report["per_run"]) == names
    assert report["tasks"] == ["arithmetic", "compare", "python", "strings", "translation"]
    for name, run in report["per_run"].items():
        assert all(0 <= acc <= 1 for acc in run["accuracy"].values()), name
        assert run["valid_loss"] > 0 and run["expert_overlap"] is not None, name
        # Variants with "auto" coefficients record the values calibrated on the first batch.
        calibrated = "auto" in VARIANTS[name.split("_")[0]].flags
        assert (run["coefficients"] is not None) == calibrated, name
    assert (runs / "posttrain" / "a_lora_seed1" / "hf" / "config.json").is_file()  # merged
    markdown = (out / "results.md").read_text()
    assert "## The paper's claims, checked" in markdown and "accuracy.png" in markdown
    assert "Compute time: " in markdown and "data n/a" not in markdown
    assert (out / "accuracy.png").is_file() and (out / "specialization.png").is_file()
    rerun = subprocess.run([*study, "--report-only"], cwd=REPO, env=clean_env(),
                           capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0 and json.loads((out / "results.json").read_text())[
        "per_run"] == report["per_run"]
