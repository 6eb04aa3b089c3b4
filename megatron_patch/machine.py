"""The machine a benchmark or report was made on: device and CPU names, cores, versions."""

from __future__ import annotations

import os
import platform
import re
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def megatron_version() -> str:
    """megatron-core's version (imported here, not when this module is)."""
    from megatron.core.package_info import __version__

    return __version__


def device_name(device: torch.device) -> str:
    """The GPU's name, or 'CPU (<model>)'."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"


def device_tag(device: torch.device) -> str:
    """File-name tag: 'cpu', or the GPU name in lower case, e.g. 'nvidia_h100_80gb_hbm3'."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "_", device_name(device).lower()).strip("_")


def machine_info() -> dict:
    """OS, Python, CPU model and cores (os.cpu_count and those this process may use), torch
    (version, threads, GPUs), megatron-core and OMP_NUM_THREADS."""
    info = {"hostname_os": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "cpu": cpu_model(),
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        info["megatron_core"] = version("megatron-core")
    except PackageNotFoundError:
        info["megatron_core"] = "unknown"
    info["OMP_NUM_THREADS"] = os.environ.get("OMP_NUM_THREADS")
    return info
