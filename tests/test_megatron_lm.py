"""The specialization losses inside Megatron-LM's own ``pretrain()`` (megatron_patch.megatron_lm).

Runs examples/pretrain/pretrain_gpt_megatron_lm.py under megatron_patch.launch on mock data and
checks, from Megatron-LM's own log lines: "auto" coefficients equal the hand-computed power of ten
of the first reported raw losses, a resumed run keeps them, expert parallelism over 2 processes
reports the same losses and gradient norm as 1 process from the same checkpoint, a fixed
coefficient flag overrides a checkpoint's value, and bad flags stop the job before training.
Needs Megatron-LM's training API (megatron-core 0.19); on older releases the adapter must refuse.
"""

import importlib.util
import math
import re
import subprocess
import sys
from argparse import Namespace

import pytest

from training_helpers import REPO, clean_env

HAS_TRAINING_API = importlib.util.find_spec("megatron.training") is not None and \
    importlib.util.find_spec("megatron.training.models") is not None
needs_training_api = pytest.mark.skipif(
    not HAS_TRAINING_API, reason="Megatron-LM's training API ships with megatron-core 0.19")

SCRIPT = "examples/pretrain/pretrain_gpt_megatron_lm.py"
FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--seq-length", "16", "--max-position-embeddings", "16",
    "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-3",
    "--num-experts", "4", "--moe-router-topk", "2", "--moe-token-dispatcher-type", "alltoall",
    "--moe-aux-loss-coeff", "1e-2", "--transformer-impl", "local", "--distributed-backend", "gloo",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "128",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion", "--no-bias-gelu-fusion",
    "--no-bias-dropout-fusion", "--no-rope-fusion", "--no-persist-layer-norm",
    "--use-cpu-initialization", "--disable-bias-linear", "--normalization", "RMSNorm",
    "--position-embedding-type", "rope", "--attention-dropout", "0", "--hidden-dropout", "0",
    "--log-interval", "1", "--eval-iters", "1", "--eval-interval", "1000", "--train-iters", "3",
    "--moe-ortho-loss-coeff", "auto", "--moe-var-loss-coeff", "auto",
]
TARGETS = {"ortho_loss": 1e-4, "var_loss": 1e-3}  # the LossConfig defaults
LINE = re.compile(r"iteration\s+(\d+)/\s*\d+ \|(.*)")
FIELD = re.compile(r" ([a-z_ ]+): (-?[\d.]+(?:E[-+]\d+)?) \|")
COMPARED = ("lm loss", "load_balancing_loss", "ortho_loss", "var_loss", "grad norm")


def megatron_lm(*flags: str, nproc: int = 1, check: bool = True) -> str:
    """Run the example under megatron_patch.launch; its merged output."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_patch.launch", "--nproc-per-node", str(nproc), SCRIPT,
         *FLAGS, *flags], cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{output[-4000:]}")
    return output


def iterations(output: str) -> dict[int, dict[str, float]]:
    """Megatron-LM's per-iteration log lines, as {iteration: {field: value}}."""
    return {int(match.group(1)): {name: float(value) for name, value in FIELD.findall(
        match.group(2) + " |")} for match in LINE.finditer(output)}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """One iteration from scratch, saved: (checkpoint dir, output)."""
    directory = tmp_path_factory.mktemp("megatron_lm") / "checkpoint"
    output = megatron_lm("--exit-interval", "1", "--save", str(directory),
                         "--save-interval", "1")
    return directory, output


@needs_training_api
def test_auto_coefficients_are_the_power_of_ten_of_the_first_reported_losses(checkpoint):
    _, output = checkpoint
    first = iterations(output)[1]
    expected = {name: 10.0 ** round(math.log10(target / abs(first[name])))
                for name, target in TARGETS.items()}
    match = re.search(r"calibrated coefficients on the global batch of iteration 1: (\{.*\})",
                      output)
    assert match, output[-3000:]
    assert eval(match.group(1)) == expected  # a dict of floats printed by the adapter


@needs_training_api
def test_expert_parallel_reports_what_one_process_reports(checkpoint):
    directory, _ = checkpoint
    resumed = ["--load", str(directory), "--no-load-optim"]
    single = megatron_lm(*resumed)
    parallel = megatron_lm(*resumed, "--expert-model-parallel-size", "2", nproc=2)
    assert "calibrated coefficients" not in single + parallel  # kept from the checkpoint
    single_lines, parallel_lines = iterations(single), iterations(parallel)
    assert sorted(single_lines) == sorted(parallel_lines) == [2, 3]
    for iteration in (2, 3):
        for name in COMPARED:
            assert parallel_lines[iteration][name] == pytest.approx(
                single_lines[iteration][name], rel=2e-6, abs=0.0011 if name == "grad norm"
                else 0.0), (iteration, name)


@needs_training_api
def test_a_fixed_coefficient_flag_replaces_the_checkpoints_value(checkpoint):
    directory, first_output = checkpoint
    calibrated = eval(re.search(r"calibrated coefficients .*: (\{.*\})", first_output).group(1))
    output = megatron_lm("--load", str(directory), "--no-load-optim", "--train-iters", "2",
                         "--moe-ortho-loss-coeff", "0.5")
    replaced = re.search(r"--moe-ortho-loss-coeff 0\.5: replaces the checkpoint's (\S+)", output)
    assert replaced, output[-3000:]
    assert float(replaced.group(1)) == calibrated["ortho_loss"]


@needs_training_api
def test_an_unsupported_combination_stops_before_training():
    output = megatron_lm("--moe-router-topk", "1", "--moe-router-pre-softmax", check=False)
    assert "--moe-ortho-loss-coeff needs --moe-router-topk >= 2" in output
    assert not iterations(output)


@needs_training_api
def test_missing_loss_flags_are_named():
    from megatron_patch import megatron_lm as adapter
    from megatron_patch.moe.config import SpecializationConfigError

    with pytest.raises(SpecializationConfigError, match="extra_args_provider=megatron_patch"):
        adapter.transformer_config(Namespace(multi_latent_attention=False))


@pytest.mark.skipif(HAS_TRAINING_API, reason="the training API is installed")
def test_older_megatron_is_refused_with_the_fix():
    from megatron_patch.compat import UnsupportedMegatronError

    with pytest.raises(UnsupportedMegatronError, match="megatron-core 0.19"):
        import megatron_patch.megatron_lm  # noqa: F401
