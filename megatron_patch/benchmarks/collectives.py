"""Part 4 of the loss benchmark: the torch.distributed collectives one MoE layer fwd+bwd issues
without vs with the losses, counted in a 2-process gloo run with expert parallelism 2."""

from __future__ import annotations

import functools
import inspect
import json
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from megatron_patch.benchmarks.layers import build_layer_pair, layer_inputs, layer_step
from megatron_patch.benchmarks.sizes import SEED, LayerSize
from megatron_patch.benchmarks.timing import log
from megatron_patch.distributed import Layout, init_model_parallel, spawn

# torch.distributed function -> the parameter holding what this rank sends (receives, for recv).
COLLECTIVES = {
    "all_reduce": "tensor", "all_reduce_coalesced": "tensors", "all_gather": "tensor",
    "all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
    "all_gather_coalesced": "input_tensor_list", "reduce_scatter": "input_list",
    "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input",
    "all_to_all": "input_tensor_list", "all_to_all_single": "input", "broadcast": "tensor",
    "reduce": "tensor", "send": "tensor", "recv": "tensor", "isend": "tensor",
    "irecv": "tensor", "batch_isend_irecv": "p2p_op_list",
}


def payload_bytes(payload: Any) -> int:
    """Bytes of a tensor, a list of tensors or a list of P2POps."""
    if torch.is_tensor(payload):
        return payload.numel() * payload.element_size()
    if isinstance(payload, (list, tuple)):
        return sum(payload_bytes(item) for item in payload)
    return payload_bytes(payload.tensor)  # dist.P2POp


class CollectiveCounter:
    """Counts calls and payload bytes of torch.distributed collectives while ``active``.

    Only outermost calls count, so a collective implemented with another (batch_isend_irecv
    running isend/irecv) is counted once.
    """

    def __init__(self) -> None:
        self.active = False
        self.calls: Counter = Counter()
        self.bytes: Counter = Counter()
        self._depth = 0

    def install(self) -> None:
        """Wrap the torch.distributed collectives, and every module-level alias of them outside
        torch: megatron-core binds some at import (``dist_all_gather_func =
        torch.distributed.all_gather_into_tensor``), and ``spawn`` has imported megatron-core
        (the CPU shims of ``init_world``) before the worker installs the counter."""
        aliases = [(module, attr, value) for name, module in list(sys.modules.items())
                   if name.split(".")[0] != "torch"
                   for attr, value in list(getattr(module, "__dict__", {}).items())
                   if callable(value)]
        for name, param in COLLECTIVES.items():
            if not hasattr(dist, name):
                continue
            original = getattr(dist, name)
            counted = self._wrap(name, original, param)
            setattr(dist, name, counted)
            for module, attr, value in aliases:
                if value is original:
                    setattr(module, attr, counted)

    def _wrap(self, name: str, fn: Callable, param: str) -> Callable:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def counted(*args: Any, **kwargs: Any) -> Any:
            if self.active and self._depth == 0:
                self.calls[name] += 1
                self.bytes[name] += payload_bytes(signature.bind(*args, **kwargs).arguments[param])
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        return counted

    def measure(self, step: Callable[[], None]) -> dict[str, list[int]]:
        """op -> [calls, bytes] issued by ``step``."""
        self.calls.clear()
        self.bytes.clear()
        self.active = True
        try:
            step()
        finally:
            self.active = False
        return {name: [self.calls[name], self.bytes[name]] for name in self.calls}


COLLECTIVE_SIZE = LayerSize(hidden=32, ffn=16, experts=4, topk=2, tokens=64)


def collectives_worker(rank: int, out_dir: str) -> None:
    """One rank of the EP = world size gloo run (started by ``spawn``): counts of one fwd+bwd
    (after a warm-up) per variant, written to ``out_dir/rank<rank>.json``."""
    counter = CollectiveCounter()
    counter.install()  # before any megatron model exists
    world_size = dist.get_world_size()
    init_model_parallel(Layout.for_world(world_size, ep=world_size), SEED)
    device = torch.device("cpu")
    layers = build_layer_pair(COLLECTIVE_SIZE, torch.float32, device, world_size)
    x, grad = layer_inputs(COLLECTIVE_SIZE, torch.float32, device, seed=SEED + rank)
    result = {}
    for name, layer in layers.items():
        layer_step(layer, x, grad)
        result[name] = counter.measure(functools.partial(layer_step, layer, x, grad))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def bench_collectives(world_size: int = 2) -> dict[str, dict[str, list[int]]]:
    """Part 4: variant -> op -> [calls, bytes], summed over the ranks of a spawned gloo run."""
    with tempfile.TemporaryDirectory() as out_dir:
        spawn(collectives_worker, world_size, out_dir, backend="gloo")
        per_rank = [json.loads(Path(out_dir, f"rank{r}.json").read_text())
                    for r in range(world_size)]
    total: dict[str, dict[str, list[int]]] = {"without": {}, "with": {}}
    for result in per_rank:
        for variant, ops in result.items():
            for op, (calls, nbytes) in ops.items():
                acc = total[variant].setdefault(op, [0, 0])
                acc[0] += calls
                acc[1] += nbytes
    log(f"[4] {total}")
    return total
