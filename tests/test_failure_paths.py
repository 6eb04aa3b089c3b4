"""The failure paths a cluster user hits, end to end: preemption signals to the real launcher,
the launcher's death, bad input under torchrun, a busy port, damaged checkpoints, two runs on
one directory, a foreign tokenizer of the same size, a rerun of a finished run, a full disk."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from megatron_patch.compat import COMMON_STATE_IN_SHARDS
from megatron_patch.data.tokenizer import train_sentencepiece
from megatron_patch.training.checkpoint_files import (
    LOCK_FILE,
    RunLock,
    RunLockError,
    checkpoint_damage,
)
from training_helpers import (
    REPO,
    TINY,
    TINY_PRESET,
    data_flags,
    launcher,
    latest,
    pretrain,
    train_losses,
    wait_for,
)


def logged_steps(save_dir: Path) -> int:
    """Training steps in metrics.jsonl so far (complete lines only)."""
    path = save_dir / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text().split("\n")[:-1] if '"split": "train"' in line)


@pytest.fixture
def preset(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text(TINY_PRESET)
    return path


@pytest.fixture(scope="module")
def two_checkpoints(tiny_data, tmp_path_factory) -> Path:
    """One process, 4 steps, checkpoints at 2 and 4."""
    save = tmp_path_factory.mktemp("two_checkpoints") / "ckpt"
    pretrain(TINY + data_flags(tiny_data) + ["--train-iters", "4", "--save-interval", "2",
                                             "--save", str(save)])
    return save


def test_preemption_signal_to_the_launchers_group_saves_once_and_exits_0(tiny_data, tmp_path,
                                                                       preset):
    """SIGUSR1 (the sbatch script's --signal=USR1@120) to the launcher's process group after a
    checkpoint exists: the workers save once after their step, no .tmp stays, everything exits
    0; the EP=2 checkpoint then reshards into one process and training continues."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    proc = launcher(preset, tiny_data, run, "--train-iters", "500", "--save-interval", "2")
    wait_for(lambda: latest(ckpt) >= 2 and logged_steps(ckpt) >= 3, what="a checkpoint")
    os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    stopped = latest(ckpt)
    assert 2 < stopped < 500 and "stopping after iteration" in out
    assert out.count(f"saved checkpoint {ckpt / f'iter_{stopped:07d}'}\n") == 1
    assert not list(ckpt.glob("*.tmp")) and not (ckpt / LOCK_FILE).exists()

    out = pretrain(TINY + data_flags(tiny_data) + [
        "--train-iters", str(stopped + 2), "--moe-ortho-loss-coeff", "0.1", "--load", str(ckpt),
        "--save", str(tmp_path / "one")]).stdout
    assert [it for it, _ in train_losses(tmp_path / "one")] == [stopped + 1, stopped + 2]
    assert f"iterations      : {stopped + 2}" in out


@pytest.mark.slow
def test_workers_save_and_exit_when_their_launcher_is_killed(tiny_data, tmp_path, preset):
    """kill -9 of the launcher: its workers get SIGTERM (parent-death signal), save after their
    step and exit instead of training on as orphans."""
    run = tmp_path / "run"
    ckpt = run / "checkpoints"
    proc = launcher(preset, tiny_data, run, "--train-iters", "500")
    wait_for(lambda: logged_steps(ckpt) >= 2, what="training steps")
    workers = psutil.Process(proc.pid).children()
    assert len(workers) == 2
    proc.kill()
    proc.communicate(timeout=60)
    _, alive = psutil.wait_procs(workers, timeout=120)
    assert not alive
    assert 2 <= latest(ckpt) < 500 and not list(ckpt.glob("*.tmp"))  # saved on the way out


def test_bad_input_and_a_busy_port_under_the_launcher_exit_2_with_one_line(tiny_data, tmp_path,
                                                                          preset):
    proc = launcher(preset, tiny_data, tmp_path / "run", "--global-batch-size", "5")
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--global-batch-size 5 must be a multiple" in errors[0]

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = launcher(preset, tiny_data, tmp_path / "run", MASTER_PORT=str(port))
        out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 2, out[-3000:]
    assert f"the rendezvous port {port} is in use (MASTER_PORT)" in out


def test_damaged_newest_checkpoint_is_named_and_the_run_falls_back(two_checkpoints, tiny_data,
                                                                   tmp_path):
    """A truncated shard of the newest checkpoint is reported (file and sizes) before any tensor
    is read; the run loads the newest intact one with a warning, or stops with
    --no-checkpoint-fallback. A save a crash interrupted (iter_*.tmp) is removed on start."""
    save = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, save)
    shard = sorted((save / "iter_0000004").glob("*.distcp"))[0]
    size = shard.stat().st_size
    with open(shard, "r+b") as stream:
        stream.truncate(size // 2)
    resume = TINY + data_flags(tiny_data) + ["--train-iters", "5", "--save", str(save),
                                             "--load", str(save)]

    proc = pretrain(resume + ["--no-checkpoint-fallback"], check=False)
    assert proc.returncode == 2
    assert f"{shard} is truncated: {size // 2} bytes" in proc.stderr
    assert "drop --no-checkpoint-fallback" in proc.stderr

    (save / "iter_0000006.tmp").mkdir()
    out = pretrain(resume).stdout
    assert "removed iter_0000006.tmp, a save that was interrupted" in out
    assert f"damaged checkpoint(s) skipped: {shard} is truncated" in out
    assert "resuming at iteration 2" in out
    assert [it for it, _ in train_losses(save)][-3:] == [3, 4, 5]
    assert not (save / "iter_0000006.tmp").exists()


def _last_shard(ckpt: Path) -> Path:
    return sorted(ckpt.glob("*.distcp"))[-1]


DAMAGE = [
    (lambda ckpt: (ckpt / "metadata.json").write_text("{"), lambda ckpt: "unreadable metadata.json"),
    (lambda ckpt: (ckpt / ".metadata").write_bytes(b"\x80"), lambda ckpt: ".metadata cannot be read"),
    (lambda ckpt: _last_shard(ckpt).unlink(), lambda ckpt: f"{_last_shard(ckpt)} is missing"),
]
if not COMMON_STATE_IN_SHARDS:  # up to megatron-core 0.18 the common state is a file of its own
    DAMAGE.append((lambda ckpt: (ckpt / "common.pt").unlink(), lambda ckpt: "common.pt is missing"))


@pytest.mark.parametrize("damage, message", DAMAGE)
def test_checkpoint_damage_names_the_file(two_checkpoints, tmp_path, damage, message):
    ckpt = tmp_path / "iter"
    shutil.copytree(two_checkpoints / "iter_0000002", ckpt)
    assert checkpoint_damage(ckpt) is None
    expected = message(ckpt)
    damage(ckpt)
    assert expected in checkpoint_damage(ckpt)


def test_one_run_per_save_directory(two_checkpoints, tiny_data, tmp_path):
    """A second run on a directory another live run holds is refused, naming the holder; a lock
    whose holder is gone is replaced."""
    save = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, save)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from megatron_patch.training.checkpoint_files import RunLock\n"
         f"RunLock({str(save)!r}).acquire()\nprint('locked', flush=True)\ntime.sleep(300)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = pretrain(TINY + data_flags(tiny_data) + [
            "--train-iters", "6", "--save", str(save), "--load", str(save)], check=False)
        assert proc.returncode == 2
        assert f"is in use by another run: pid {holder.pid} on {socket.gethostname()}" in proc.stderr
        with pytest.raises(RunLockError, match=f"pid {holder.pid}"):
            RunLock(str(save)).acquire()
    finally:
        holder.kill()
        holder.wait()
    lock = RunLock(str(save))
    assert f"replaced the stale lock of pid {holder.pid}" in lock.acquire()
    assert json.loads((save / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (save / LOCK_FILE).exists()
    assert latest(save) == 4  # the refused run wrote nothing


def test_data_made_with_another_tokenizer_of_the_same_size_is_refused(tiny_data, tmp_path):
    corpus = Path(tiny_data.root) / "corpus.jsonl"
    other = train_sentencepiece(corpus, tmp_path / "other", vocab_size=512, sample_size=3000)
    proc = pretrain(TINY + data_flags(tiny_data)[:-1] + [str(other), "--train-iters", "2"],
                    check=False)
    assert proc.returncode == 2
    assert f"was tokenized with {Path(tiny_data.tokenizer).resolve()}" in proc.stderr
    assert f"but --tokenizer-model is {other}" in proc.stderr


def test_rerunning_a_finished_run_keeps_its_results(two_checkpoints, tiny_data, tmp_path):
    save = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, save)
    summary = (save / "summary.json").read_text()
    out = pretrain(TINY + data_flags(tiny_data) + ["--train-iters", "4", "--save", str(save),
                                                   "--load", str(save)]).stdout
    assert "nothing to train" in out and "final train loss" in out
    assert (save / "summary.json").read_text() == summary


def test_full_disk_names_the_path_and_the_size_and_keeps_the_last_checkpoint(two_checkpoints,
                                                                             tmp_path):
    from megatron_patch.training.checkpointing import _disk_full, _no_space

    save = tmp_path / "ckpt"
    shutil.copytree(two_checkpoints, save)
    tmp = save / "iter_0000006.tmp"
    tmp.mkdir()
    (tmp / "__0_0.distcp").write_bytes(b"partial")
    try:
        raise RuntimeError("writer process failed") from OSError(errno.ENOSPC, "No space")
    except RuntimeError as error:
        assert _no_space(error)
    assert not _no_space(RuntimeError("other"))
    message = str(_disk_full(str(save), tmp, 6))
    assert f"no space left on the device of {save} while saving iteration 6" in message
    assert "GiB (the size of" in message and "GiB are free" in message
    assert f"the newest complete checkpoint {save / 'iter_0000004'} is intact" in message
    assert not tmp.exists() and checkpoint_damage(save / "iter_0000004") is None
