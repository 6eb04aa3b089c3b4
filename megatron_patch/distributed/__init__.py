"""One home for distributed set-up: parallel layouts and process start-up (see ``world``)."""

from megatron_patch.distributed.layout import BASELINE, Layout, parse_layout
from megatron_patch.distributed.world import (
    decided_on_rank0,
    free_port,
    init_model_parallel,
    init_world,
    resolve_backend,
    shutdown,
    spawn,
    world_from_environment,
)

__all__ = [
    "BASELINE", "Layout", "parse_layout", "decided_on_rank0", "free_port", "init_model_parallel", "init_world",
    "resolve_backend", "shutdown", "spawn", "world_from_environment",
]
