"""The pretraining entry point end to end on CPU: learning, exact resume, signals, resharding,
the torchrun launcher, and every bad-input error (each run is a real subprocess)."""

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from megatron_patch.distributed import free_port
from megatron_patch.flags import ConfigError
from megatron_patch.training.arguments import parse_args

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--moe-ortho-loss-coeff", "auto", "--moe-var-loss-coeff", "0.1", "--no-progress-bar",
]


def data_flags(tiny_data):
    return ["--data-path", tiny_data.train, "--valid-data-path", tiny_data.valid,
            "--tokenizer-model", tiny_data.tokenizer]


def clean_env(**extra):
    """The test process's environment without rendezvous variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def pretrain(args, *, torchrun_procs=None, timeout=300, check=True):
    env = clean_env()
    if torchrun_procs:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node",
               str(torchrun_procs), "--master-port", str(free_port()),
               "-m", "megatron_patch.training.pretrain", *args]
    else:
        cmd = [sys.executable, "-m", "megatron_patch.training.pretrain", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def train_losses(save_dir):
    rows = [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["lm_loss"]) for r in rows if r["split"] == "train"]


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


def test_sigterm_saves_a_checkpoint_and_exits(tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    cmd = [sys.executable, "-m", "megatron_patch.training.pretrain", *TINY,
           *data_flags(tiny_data), "--train-iters", "500", "--save", str(save)]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=clean_env())
    deadline = time.time() + 240
    metrics = save / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().strip()):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    done = int((save / "latest_checkpointed_iteration.txt").read_text())
    assert 1 <= done < 500
    assert (save / f"iter_{done:07d}").is_dir()
    assert "exit signal" in out


def test_torchrun_launcher_ep2_and_reshard_to_one_process(tiny_data, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text("\n".join([
        "num_layers: 2", "hidden_size: 32", "num_attention_heads: 4", "ffn_hidden_size: 64",
        "num_experts: 4", "moe_router_topk: 2", "seq_length: 32", "micro_batch_size: 2",
        "global_batch_size: 4", "lr: 0.003", "lr_warmup_iters: 1", "train_iters: 3",
        "eval_interval: 3", "eval_iters: 1", "expert_model_parallel_size: 2",
        "moe_ortho_loss_coeff: 0.1", "moe_var_loss_coeff: 0.1", "no_progress_bar: true",
    ]))
    env = clean_env(GPUS_PER_NODE="2", MASTER_PORT=str(free_port()), OUTPUT_DIR=str(tmp_path / "run"),
                    DATA_PATH=tiny_data.train, VALID_DATA_PATH=tiny_data.valid,
                    TOKENIZER_MODEL=tiny_data.tokenizer, PYTHON=sys.executable)
    proc = subprocess.run(["bash", "examples/pretrain/run_pretrain_moe.sh", str(config)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ckpt = tmp_path / "run" / "checkpoints"
    assert (ckpt / "iter_0000003").is_dir()
    assert "final valid loss" in proc.stdout

    # The EP=2 checkpoint loads into one process (experts regathered) and training continues.
    out = pretrain(TINY + data_flags(tiny_data) + [
        "--train-iters", "5", "--moe-ortho-loss-coeff", "0.1", "--load", str(ckpt),
        "--save", str(tmp_path / "one")])
    assert [it for it, _ in train_losses(tmp_path / "one")] == [4, 5]
    assert "iterations      : 5" in out.stdout


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
    # A checkpoint whose common state lacks an entry loading relies on (an older layout).
    common_file = pretrained / "iter_0000002" / "common.pt"
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


def test_tokenizer_smaller_than_data_vocab_is_refused(tiny_data, tmp_path):
    from megatron_patch.data.tokenizer import train_sentencepiece

    small = train_sentencepiece(Path(tiny_data.root) / "corpus.jsonl", tmp_path / "small",
                                vocab_size=400, sample_size=5000)
    proc = pretrain(TINY + data_flags(tiny_data)[:-1] + [str(small), "--train-iters", "2"],
                    check=False)
    assert proc.returncode == 2
    assert "vocab" in proc.stderr.lower()


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
