"""torchrun for jobs that must stop cleanly: ``python -m megatron_patch.launch [torchrun flags]
-m megatron_patch.training.pretrain [flags]`` (what ``examples/pretrain/run_pretrain_moe.sh``
runs).

Everything is torchrun's (``torch.distributed.run``) except four failure paths of cluster jobs:

- Preemption. SIGTERM (slurm, ``scancel``, ``kill``) and SIGUSR1 (the sbatch script's
  ``--signal=USR1@120``) sent to the launcher (alone or with its process group) are relayed to
  every worker (torchrun starts each in its own session, so a group signal does not reach them),
  which saves a checkpoint after its current step and exits 0; the launcher then exits 0 too.
  torchrun itself would die on SIGUSR1 (leaving the workers orphaned), and on SIGTERM send it on,
  kill the workers 30 s later in the middle of that save and exit 1 with a traceback. A signal
  that arrives before the workers start ends the launcher (nothing to save yet).
- The launcher's death. Its workers get SIGTERM when it dies, even by SIGKILL
  (``tie_to_launcher``, called by the worker): they save and exit instead of training on.
- Exit status. A worker that stopped on bad input prints one ``error:`` line (local rank 0) and
  exits 2; the launcher then exits 2 as well, without torchrun's traceback.
- The rendezvous port. One node without ``--master-port`` gets a free port; a port in use is
  reported naming ``MASTER_PORT``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import sys
from typing import Optional, Sequence

USER_ERROR_EXIT = 2
# Signals torchrun turns into "kill the workers": not SIGTERM (the workers handle it themselves).
TORCHRUN_SIGNALS = "SIGINT,SIGHUP,SIGQUIT"
_PR_SET_PDEATHSIG = 1


class _DropUserErrorFailureLog(logging.Filter):
    """torchrun logs every failed worker; a worker that stopped on bad input already printed
    the one line that matters."""

    def filter(self, record: logging.LogRecord) -> bool:
        return f"(exitcode: {USER_ERROR_EXIT})" not in record.getMessage()


def _single_node(nnodes: str) -> bool:
    return nnodes.split(":")[-1] == "1"


def _port_in_use(error: BaseException) -> bool:
    text = str(error).lower()
    return "address already in use" in text or "eaddrinuse" in text


def _relay_to_workers(signum: int, frame: object) -> None:
    """Send ``signum`` on to the workers (this process's children); exit if there are none."""
    import psutil

    workers = psutil.Process().children()
    if not workers:
        raise SystemExit(128 + signum)
    for worker in workers:
        try:
            worker.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run torchrun with the argument list ``argv``; returns the exit status."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    from megatron_patch.distributed.world import free_port

    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _relay_to_workers)
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = TORCHRUN_SIGNALS
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default, without its notice
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        _DropUserErrorFailureLog())
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    if hasattr(args, "signals_to_handle"):  # torchrun's --signals-to-handle (torch >= 2.8)
        args.signals_to_handle = TORCHRUN_SIGNALS
    if args.master_port is None and _single_node(args.nnodes) and not args.rdzv_endpoint:
        args.master_port = free_port()
    try:
        run(args)
    except ChildFailedError as error:
        rank, first = error.get_first_failure()
        if first.exitcode == USER_ERROR_EXIT:  # the others were stopped by torchrun after it
            return USER_ERROR_EXIT
        print(f"error: training worker {rank} failed first, with exit status {first.exitcode} "
              "(its output is above)", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as error:
        if not _port_in_use(error):
            raise
        print(f"error: the rendezvous port {args.master_port} is in use (MASTER_PORT); pick a "
              "free one with MASTER_PORT=<port>, or on one node leave MASTER_PORT unset for a "
              "free port", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT
    return 0


def tie_to_launcher(sig: int = signal.SIGTERM) -> None:
    """In a worker started by torchrun (Linux): receive ``sig`` when the launcher dies, even by
    SIGKILL, instead of running on as an orphan. Outside torchrun nothing changes (a training
    run started from a shell outlives it, as with nohup)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        return
    if os.getppid() == 1:  # the launcher died before the tie was made
        os.kill(os.getpid(), sig)


if __name__ == "__main__":
    sys.exit(main())
