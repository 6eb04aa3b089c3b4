"""Helpers of the end-to-end tests that run the trainer and its launcher as real subprocesses."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

TINY = [
    "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
    "--ffn-hidden-size", "64", "--num-experts", "4", "--moe-router-topk", "2",
    "--seq-length", "32", "--micro-batch-size", "2", "--global-batch-size", "4",
    "--lr", "3e-3", "--lr-warmup-iters", "1", "--eval-interval", "1000", "--eval-iters", "1",
    "--moe-ortho-loss-coeff", "auto", "--moe-var-loss-coeff", "0.1", "--no-progress-bar",
]

# The same model as a YAML preset for the launcher (EP=2 over 2 processes).
TINY_PRESET = "\n".join([
    "num_layers: 2", "hidden_size: 32", "num_attention_heads: 4", "ffn_hidden_size: 64",
    "num_experts: 4", "moe_router_topk: 2", "seq_length: 32", "micro_batch_size: 2",
    "global_batch_size: 4", "lr: 0.003", "lr_warmup_iters: 1", "eval_interval: 1000",
    "eval_iters: 1", "expert_model_parallel_size: 2", "moe_ortho_loss_coeff: 0.1",
    "moe_var_loss_coeff: 0.1", "no_progress_bar: true",
])


def data_flags(tiny_data):
    return ["--data-path", tiny_data.train, "--valid-data-path", tiny_data.valid,
            "--tokenizer-model", tiny_data.tokenizer]


def clean_env(**extra):
    """The test process's environment without rendezvous variables, plus ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def pretrain(args, *, timeout=300, check=True):
    """One training process (no launcher); raises on a non-zero exit unless ``check`` is off."""
    proc = subprocess.run([sys.executable, "-m", "megatron_patch.training.pretrain", *args],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def launcher(preset: Path, tiny_data, output_dir: Path, *flags: str, **env) -> subprocess.Popen:
    """examples/pretrain/run_pretrain_moe.sh with 2 processes, in a new session (its own process
    group, as under slurm or a terminal); stdout and stderr merged."""
    env = clean_env(GPUS_PER_NODE="2", OUTPUT_DIR=str(output_dir), DATA_PATH=tiny_data.train,
                    VALID_DATA_PATH=tiny_data.valid, TOKENIZER_MODEL=tiny_data.tokenizer,
                    PYTHON=sys.executable, **env)
    return subprocess.Popen(["bash", "examples/pretrain/run_pretrain_moe.sh", str(preset), *flags],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)


def wait_for(condition, timeout: float = 240.0, what: str = "condition") -> None:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def train_losses(save_dir):
    rows = [json.loads(line) for line in (Path(save_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["iteration"], r["lm_loss"]) for r in rows if r["split"] == "train"]


def latest(save_dir) -> int:
    """The iteration of ``latest_checkpointed_iteration.txt`` (0 while there is none)."""
    pointer = Path(save_dir) / "latest_checkpointed_iteration.txt"
    return int(pointer.read_text()) if pointer.is_file() else 0
