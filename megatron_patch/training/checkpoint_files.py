"""The ``--save`` directory on disk: checkpoint paths, the ``latest`` pointer, integrity checks,
pruning, and the lock that keeps one run per directory. No collectives here: global rank 0
decides and ``checkpointing`` broadcasts.

    DIR/iter_0000100/                      one dist_checkpointing checkpoint (torch_dist)
    DIR/iter_0000200.tmp/                  a save in progress (or one a crash interrupted)
    DIR/latest_checkpointed_iteration.txt  the newest complete checkpoint
    DIR/.lock                              the run writing DIR (host, pid, start time)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch

from megatron_patch.compat import COMMON_STATE_IN_SHARDS

LATEST_FILE = "latest_checkpointed_iteration.txt"
LOCK_FILE = ".lock"
# Files every checkpoint has besides the shards its ``.metadata`` index names; up to
# megatron-core 0.18 also COMMON_FILE, the common state (0.19+ keeps it in the shards).
REQUIRED_FILES = ("metadata.json", ".metadata")
COMMON_FILE = "common.pt"


class CheckpointMismatchError(RuntimeError):
    """The checkpoint cannot be loaded into this model; the message lists what differs."""


class CheckpointDamagedError(CheckpointMismatchError):
    """No intact checkpoint to load (or a damaged newest one with fallback off); the message
    names the file and the damage."""


class RunLockError(RuntimeError):
    """Another run writes the same ``--save`` directory; the message names it."""


def checkpoint_path(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def latest_iteration(root: str) -> Optional[int]:
    """Iteration of the newest complete checkpoint under ``root`` (the ``latest`` pointer), or
    None when there is none."""
    pointer = Path(root) / LATEST_FILE
    if not pointer.is_file():
        return None
    text = pointer.read_text().strip()
    if not text.isdigit():
        raise CheckpointDamagedError(
            f"{pointer} holds {text!r}, not an iteration number; delete the file or fix it"
        )
    if not checkpoint_path(root, int(text)).is_dir():
        raise CheckpointDamagedError(
            f"{pointer} names iteration {text} but {checkpoint_path(root, int(text))} does not "
            "exist; point the file at an existing iter_* directory or delete it"
        )
    return int(text)


def complete_iterations(root: str) -> list[int]:
    """Iterations of the complete (renamed, not ``.tmp``) checkpoint directories, newest first."""
    found = []
    for path in Path(root).glob("iter_*"):
        number = path.name[len("iter_"):]
        if path.is_dir() and number.isdigit():
            found.append(int(number))
    return sorted(found, reverse=True)


def checkpoint_damage(where: Path) -> Optional[str]:
    """What makes checkpoint ``where`` unloadable, or None: every file a load reads exists and
    is complete (its ``.metadata`` index gives each shard file's extent), checked before any
    tensor is read."""
    from torch.distributed.checkpoint import FileSystemReader

    for name in REQUIRED_FILES:
        if not (where / name).is_file():
            return f"{where / name} is missing"
    common = where / COMMON_FILE
    if not common.is_file() and not COMMON_STATE_IN_SHARDS:
        return f"{common} is missing"
    try:
        json.loads((where / "metadata.json").read_text())
        if common.is_file():
            torch.load(common, map_location="cpu", weights_only=False)
    except Exception as error:  # noqa: BLE001 - any failure to read is damage to report
        return f"{where} has an unreadable metadata.json or {COMMON_FILE} ({error})"
    try:
        index = FileSystemReader(str(where)).read_metadata()
    except Exception as error:  # noqa: BLE001
        return f"{where / '.metadata'} cannot be read ({type(error).__name__}: {error})"
    extents: dict[str, int] = {}
    for info in index.storage_data.values():
        extents[info.relative_path] = max(extents.get(info.relative_path, 0),
                                          info.offset + info.length)
    for name, needed in sorted(extents.items()):
        shard = where / name
        if not shard.is_file():
            return f"{shard} is missing"
        if shard.stat().st_size < needed:
            return (f"{shard} is truncated: {shard.stat().st_size} bytes, the checkpoint's index "
                    f"needs {needed}")
    return None


def choose_checkpoint(root: str, fallback: bool) -> tuple[Optional[int], list[str]]:
    """The iteration to load from ``root`` and warnings for the user.

    The ``latest`` pointer's checkpoint when intact. Otherwise, with ``fallback``, the newest
    intact older one (each damaged checkpoint named with its damage); without, or when none is
    intact, CheckpointDamagedError. (None, []) when ``root`` holds no checkpoint.
    """
    warnings: list[str] = []
    try:
        latest = latest_iteration(root)
    except CheckpointDamagedError as error:
        if not fallback:
            raise
        warnings.append(f"{error}; looking for the newest intact checkpoint instead")
        latest = None
    candidates = complete_iterations(root)
    if latest is not None:
        candidates = [latest] + [it for it in candidates if it < latest]
    elif not candidates:
        return None, warnings
    damaged = []
    for iteration in candidates:
        damage = checkpoint_damage(checkpoint_path(root, iteration))
        if damage is None:
            if damaged:
                warnings.append(f"damaged checkpoint(s) skipped: {'; '.join(damaged)}. "
                                f"Loading {checkpoint_path(root, iteration)} instead")
            return iteration, warnings
        damaged.append(damage)
        if not fallback:
            raise CheckpointDamagedError(
                f"the newest checkpoint is damaged: {damage}. Delete it to resume from an older "
                "one, or drop --no-checkpoint-fallback to let the run fall back to the newest "
                "intact checkpoint")
    raise CheckpointDamagedError(
        f"no intact checkpoint in {root}: {'; '.join(damaged)}. Point --load at another "
        "directory, or remove these to start from scratch")


def prune_stale_saves(root: str) -> list[Path]:
    """Remove ``iter_*.tmp`` directories (saves a crash interrupted; only safe while holding the
    directory's lock); returns them."""
    stale = sorted(Path(root).glob("iter_*.tmp"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def prune_old(root: str, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints (all when ``keep_last`` <= 0)."""
    if keep_last <= 0:
        return
    for iteration in complete_iterations(root)[keep_last:]:
        shutil.rmtree(checkpoint_path(root, iteration), ignore_errors=True)


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


class RunLock:
    """One run per ``--save`` directory: ``DIR/.lock`` names its holder (host, pid, start time,
    command) and is refreshed every ``heartbeat_s`` seconds while held.

    A lock is stale, and replaced with a message, when its holder is gone: on this host its pid
    no longer runs; on another host it was not refreshed for ``stale_after_s`` seconds.
    """

    def __init__(self, directory: str, heartbeat_s: float = 60.0, stale_after_s: float = 600.0):
        self.path = Path(directory) / LOCK_FILE
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _holder_gone(self, holder: dict) -> Optional[str]:
        """Why the lock's holder is gone (None if it may still run)."""
        if holder.get("host") == socket.gethostname():
            try:
                os.kill(int(holder["pid"]), 0)
            except ProcessLookupError:
                return f"its process {holder['pid']} no longer runs"
            except (PermissionError, KeyError, ValueError):
                return None
            return None
        age = time.time() - self.path.stat().st_mtime
        if age > self.stale_after_s:
            return f"it was last refreshed {age:.0f} s ago"
        return None

    def acquire(self) -> Optional[str]:
        """Take the lock; returns a message when a stale lock was replaced.

        Raises:
            RunLockError: another run holds it.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        message = None
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(self.path.read_text())
                except (OSError, ValueError):
                    holder = {}
                gone = self._holder_gone(holder)
                if gone is None:
                    raise RunLockError(
                        f"{self.path.parent} is in use by another run: pid {holder.get('pid')} "
                        f"on {holder.get('host')}, started {holder.get('started')} "
                        f"({holder.get('command', '?')}). Wait for it or stop it, or give this run "
                        f"another --save. If that run is gone, delete {self.path}.") from None
                message = (f"replaced the stale lock of pid {holder.get('pid')} on "
                           f"{holder.get('host')} ({gone})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as stream:
                json.dump(record, stream)
            self._thread = threading.Thread(target=self._refresh, daemon=True,
                                            name="run-lock-heartbeat")
            self._thread.start()
            return message
        raise RunLockError(f"could not take {self.path}: another run keeps creating it")

    def _refresh(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        """Give the lock up (only if this process holds it)."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        try:
            if json.loads(self.path.read_text()).get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, ValueError):
            pass
