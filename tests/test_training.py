"""The pretraining entry point end to end on CPU: learning, exact resume, fine-tuning, the typed
configuration and every bad-input error (each run is a real subprocess). Signals, the launcher,
damaged checkpoints and concurrent runs: tests/test_failure_paths.py."""

import json
import math
import re
import subprocess
import sys

import pytest
import torch

from megatron_patch.flags import ConfigError
from megatron_patch.training.arguments import parse_args
from training_helpers import REPO, TINY, clean_env, data_flags, pretrain, train_losses

def test_loss_goes_down_and_kill_resume_repeats_the_curve(tiny_data, tmp_path):
    flags = TINY + data_flags(tiny_data) + ["--train-iters", "8"]
    pretrain(flags + ["--save", str(tmp_path / "full")])
    full = train_losses(tmp_path / "full")
    assert [it for it, _ in full] == list(range(1, 9))
    assert full[-1][1] < full[0][1] - 0.05

    pretrain(flags + ["--save", str(tmp_path / "resumed"), "--exit-interval", "3"])
    assert len(train_losses(tmp_path / "resumed")) == 3
    out = pretrain(flags + ["--save", str(tmp_path / "resumed"), "--load", str(tmp_path / "resumed")])
    assert "calibrated" not in out.stdout  # the auto coefficient came back from the checkpoint
    # Bit-exact on CPU: the resumed run continues the same loss curve.
    assert train_losses(tmp_path / "resumed") == full


def test_finetune_and_checkpoints_of_another_shape_or_layout(tiny_data, tmp_path):
    """Post-training from a pretrained checkpoint: its weights only, iteration 0, this run's
    coefficients (a checkpoint's value must not silently override a new fixed one); relaunched,
    the job resumes its own checkpoint. A checkpoint of another shape or metadata layout fails
    before loading, naming the fix."""
    pretrained, tuned = tmp_path / "pretrained", tmp_path / "tuned"
    pretrain(TINY + data_flags(tiny_data) + ["--train-iters", "2", "--moe-ortho-loss-coeff", "0",
                                             "--save", str(pretrained)])
    finetune = TINY + data_flags(tiny_data) + [
        "--load", str(pretrained), "--finetune", "--save", str(tuned),
        "--moe-ortho-loss-coeff", "0.1", "--moe-var-loss-coeff", "auto"]
    out = pretrain(finetune + ["--train-iters", "2"]).stdout
    assert "iter_0000002: fine-tuning from its weights, at iteration 0" in out
    assert "--moe-ortho-loss-coeff 0.1: replaces the checkpoint's 0" in out
    assert "--moe-var-loss-coeff auto: replaces the checkpoint's 0.1 (calibrated" in out
    assert "calibrated coefficients at iteration 0: {'var_loss':" in out
    assert [it for it, _ in train_losses(tuned)] == [1, 2]
    out = pretrain(finetune + ["--train-iters", "3"]).stdout
    assert "already holds this run's checkpoints" in out
    assert "resuming at iteration 2" in out
    assert "calibrated coefficients" not in out and "replaces" not in out
    assert [it for it, _ in train_losses(tuned)] == [1, 2, 3]

    proc = pretrain(TINY + data_flags(tiny_data) + ["--train-iters", "4", "--load",
                                                    str(pretrained), "--num-experts", "8"],
                    check=False)
    assert proc.returncode == 2
    assert "--num-experts: checkpoint 4, this run 8" in proc.stderr
    # A checkpoint whose common state lacks an entry loading relies on (an older layout of this
    # package; those were all written with megatron-core 0.16, whose common state is a file).
    common_file = pretrained / "iter_0000002" / "common.pt"
    if common_file.is_file():
        common = torch.load(common_file, weights_only=False)
        del common["num_optimizers"]
        torch.save(common, common_file)
        proc = pretrain(TINY + data_flags(tiny_data) + ["--train-iters", "4", "--load",
                                                        str(pretrained)], check=False)
        assert proc.returncode == 2
        assert "lacks num_optimizers in its common state" in proc.stderr
        assert "new --save/--load directory" in proc.stderr


def test_nan_loss_is_reported_with_step_and_layer(tiny_data, tmp_path):
    proc = pretrain(TINY + data_flags(tiny_data) + [
        "--train-iters", "6", "--lr", "1e30", "--clip-grad", "0", "--lr-warmup-iters", "0"],
        check=False)
    assert proc.returncode == 2
    assert re.search(r"loss is (nan|inf) at iteration \d+", proc.stderr)
    assert "first non-finite output in" in proc.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--data-path", "/nonexistent/corpus"], "preprocess_data.py"),
        (["--tokenizer-model", "/nonexistent/tok.model"], "/nonexistent/tok.model"),
        (["--global-batch-size", "5"], "--global-batch-size 5 must be a multiple"),
        (["--moe-ortho-loss-coeff", "-1"], "--moe-ortho-loss-coeff must be"),
    ],
)
def test_bad_input_fails_fast_with_the_fix(tiny_data, extra, message):
    proc = pretrain(TINY + data_flags(tiny_data) + ["--train-iters", "2"] + extra, check=False)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_flag_validation_without_processes(tmp_path, monkeypatch):
    job = parse_args(["--data-path", "x", "--tokenizer-model", "t",
                      "--tensor-model-parallel-size", "2", "--sequence-parallel"])
    with pytest.raises(ConfigError, match="not a multiple of --tensor-model-parallel-size"):
        job.validate(world_size=3)
    minimal = ["--data-path", "x", "--tokenizer-model", "t", "--num-experts", "4"]
    for extra, message in (
        (["--num-experts", "6", "--expert-model-parallel-size", "4"],
         "not divisible by --expert-model-parallel-size"),
        (["--moe-loss-calibration-iters", "5"], "needs an 'auto'"),
        (["--lr", "1e-4", "--min-lr", "1e-3"], "--min-lr 0.001 must be <= --lr 0.0001"),
        (["--moe-identical-expert-init", "--moe-grouped-gemm"], "drop --moe-grouped-gemm"),
        (["--finetune"], "--finetune needs --load"),
        (["--moe-ortho-loss-coeff", "auto", "--moe-loss-calibration-iters", "5",
          "--train-iters", "5"], r"in \[1, --train-iters 5\)"),
        (["--moe-orthogonal-optimizer", "--moe-orthogonal-subspace", "representations",
          "--moe-orthogonal-window", "5"], r"1 <= window \(5\) <= --moe-orthogonal-accumulate"),
        (["--moe-aux-loss-coeff", "-0.5"], "--moe-aux-loss-coeff must be >= 0"),
    ):
        with pytest.raises(ConfigError, match=message):
            parse_args(minimal + extra).validate(world_size=1)
    with pytest.raises(ConfigError, match="tp > 1 requires sequence parallel"):
        parse_args(minimal + ["--tensor-model-parallel-size", "2"]).validate(world_size=2)
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ConfigError, match="needs a CUDA GPU"):
            parse_args(minimal + ["--moe-ortho-loss-kernel", "triton"]).validate(world_size=1)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("num_layerz: 3\n")
    with pytest.raises(ConfigError, match="unknown key 'num_layerz'; did you mean num_layers"):
        parse_args(["--config", str(bad_yaml)])
    good_yaml = tmp_path / "good.yaml"
    good_yaml.write_text("num-layers: 6\nhidden_size: 96\n")
    job = parse_args(["--config", str(good_yaml), "--hidden-size", "64"])
    assert (job.model.num_layers, job.model.hidden_size) == (6, 64)


@pytest.mark.parametrize("line, message", [
    ('swiglu: "false"', r"swiglu: 'false' is not a boolean"),
    ("moe_router_topk: [2]", r"moe_router_topk: \[2\] is not an integer"),
    ("num_layers: four", r"num_layers: 'four' is not an integer"),
    ("lr: true", r"lr: True is not a number"),
    ("moe_ortho_loss_coeff: fast", r"is not a non-negative number or 'auto'"),
    ("normalization: rmsnorm", r"is not one of LayerNorm, RMSNorm"),
])
def test_yaml_values_are_checked_against_each_flag(tmp_path, line, message):
    """A YAML value of the wrong type names the key, the file and the expected type (instead of
    silently meaning something else, e.g. the string "false" switching SwiGLU on)."""
    config = tmp_path / "preset.yaml"
    config.write_text(line + "\n")
    with pytest.raises(ConfigError, match=message) as error:
        parse_args(["--config", str(config)])
    assert str(config) in str(error.value)


def test_job_config_round_trips_through_its_stored_forms():
    job = parse_args(["--config", str(REPO / "examples/pretrain/configs/tiny_cpu.yaml"),
                      "--save", "runs/x", "--moe-ortho-loss-coeff", "auto"])
    from megatron_patch.training.config import JobConfig

    assert JobConfig.from_dict(json.loads(json.dumps(job.to_dict()))) == job
    assert JobConfig.from_flat(job.flat()) == job
    assert job.replace(training={"micro_batch_size": 2}).training.micro_batch_size == 2


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_logs(tiny_data, tmp_path):
    pretrain(TINY + data_flags(tiny_data) + [
        "--train-iters", "2", "--tensorboard-dir", str(tmp_path / "tb"),
        "--wandb-project", "test", "--wandb-save-dir", str(tmp_path / "wandb"),
        "--log-per-layer-moe-metrics"])
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
    runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*"))
    assert runs and list(runs[0].glob("*.wandb"))


def test_orthogonal_optimizer_trains_and_resumes_mid_phase(tiny_data, tmp_path):
    """One flag enables OMoE; a run stopped inside an orthogonal phase resumes identically."""
    flags = TINY + data_flags(tiny_data) + [
        "--train-iters", "6", "--moe-orthogonal-optimizer", "--moe-orthogonal-accumulate-steps",
        "1", "--moe-orthogonal-steps", "2", "--moe-orthogonal-alpha", "0.1"]
    pretrain(flags + ["--save", str(tmp_path / "full")])
    full = train_losses(tmp_path / "full")
    plain = TINY + data_flags(tiny_data) + ["--train-iters", "6"]
    pretrain(plain + ["--save", str(tmp_path / "plain")])
    assert full != train_losses(tmp_path / "plain")  # the projection changes training
    assert full[-1][1] < full[0][1]

    pretrain(flags + ["--save", str(tmp_path / "resumed"), "--exit-interval", "2"])
    pretrain(flags + ["--save", str(tmp_path / "resumed"), "--load", str(tmp_path / "resumed")])
    assert train_losses(tmp_path / "resumed") == full


@pytest.mark.slow
def test_orthogonal_optimizer_on_representations_resumes_mid_window(tiny_data, tmp_path):
    """The recorded representation moments are checkpointed: a run stopped inside a recording
    window (after its first of two steps) resumes identically."""
    flags = TINY + data_flags(tiny_data) + [
        "--train-iters", "4", "--moe-orthogonal-optimizer", "--moe-orthogonal-subspace",
        "representations", "--moe-orthogonal-accumulate-steps", "2", "--moe-orthogonal-window",
        "2", "--moe-orthogonal-steps", "1", "--moe-orthogonal-alpha", "0.1"]
    pretrain(flags + ["--save", str(tmp_path / "full")])
    full = train_losses(tmp_path / "full")
    pretrain(flags + ["--save", str(tmp_path / "resumed"), "--exit-interval", "1"])
    pretrain(flags + ["--save", str(tmp_path / "resumed"), "--load", str(tmp_path / "resumed")])
    assert train_losses(tmp_path / "resumed") == full


def test_calibration_after_warmup_steps(tiny_data, tmp_path):
    """With --moe-loss-calibration-iters 2 the first two steps train without L_o/L_v (as a run
    with both coefficients 0), then 'auto' is calibrated on the third batch."""
    base = [f for f in TINY if f not in ("auto", "0.1", "--moe-ortho-loss-coeff",
                                         "--moe-var-loss-coeff")]
    flags = base + data_flags(tiny_data) + ["--train-iters", "4", "--moe-ortho-loss-coeff", "auto",
                                            "--moe-var-loss-coeff", "auto",
                                            "--moe-loss-calibration-iters", "2"]
    pretrain(flags + ["--save", str(tmp_path / "warm")])
    warm = train_losses(tmp_path / "warm")
    pretrain(base + data_flags(tiny_data) + ["--train-iters", "4", "--save", str(tmp_path / "off")])
    off = train_losses(tmp_path / "off")
    assert warm[:3] == off[:3] and warm[3] != off[3]
    rows = [json.loads(line) for line in (tmp_path / "warm" / "metrics.jsonl").read_text().splitlines()]
    (calibration,) = [r for r in rows if r["split"] == "calibration"]
    assert calibration["iteration"] == 2
    for name in ("ortho_loss", "var_loss"):
        assert math.log10(calibration[name]) == round(math.log10(calibration[name]))
        assert all(r[name] != 0 for r in rows if r["split"] == "train")  # logged during warm-up



def test_trainer_and_layout_checker_run_the_same_step(tiny_data):
    """A deliberate change to the training step (its loss function returns twice the loss) is
    seen by the trainer and by the layout checker's ranks alike: both run
    megatron_patch.training.step, the checker has no copy of it."""
    losses = {}
    for perturb in ("0", "1"):
        proc = subprocess.run(
            [sys.executable, str(REPO / "tests" / "step_probe.py"), tiny_data.tokenizer,
             tiny_data.train, tiny_data.valid],
            cwd=REPO, env=clean_env(PERTURB_STEP=perturb), capture_output=True, text=True,
            timeout=300)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        losses[perturb] = json.loads(proc.stdout.strip().splitlines()[-1])
    for side in ("trainer", "checker"):
        assert losses["1"][side] == pytest.approx(2 * losses["0"][side], rel=1e-6), side


@pytest.mark.parametrize("preset", sorted((REPO / "examples/pretrain/configs").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_presets_are_valid_jobs_on_this_megatron_core(preset):
    """Every preset parses, and validates (megatron-core's own checks included) for the world
    size its name gives (h100x8: 8 processes; the CPU presets: 2)."""
    world = int(preset.stem.rsplit("x", 1)[1]) if ".h100x" in preset.stem else 2
    job = parse_args(["--config", str(preset), "--data-path", "data/corpus_train",
                      "--tokenizer-model", "data/tokenizer.model", "--save", "runs/x"])
    layout = job.validate(world)
    assert layout.world_size == world
