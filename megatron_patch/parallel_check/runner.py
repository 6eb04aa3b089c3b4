"""Run one training step of the GPT-MoE model under a parallel layout and collect what it reports.

`run_layout` spawns `layout.world_size` processes on localhost (gloo on CPU, nccl on GPU). Each
process goes through three phases over the same world:

1. Reference weights. parallel_state in the single-device layout (tp=pp=ep=1, dp=world): every
   rank builds the full model from `seed` exactly as a one-process run would, so the weights do
   not depend on the layout under test; they are saved with dist_checkpointing.
2. The step, in `layout`: the model is built and the reference checkpoint loaded into it
   (dist_checkpointing reshards: TP partitions, expert indices across EP, layer offsets across
   PP). Wrapped in megatron DDP, it runs forward+backward over the global batch with the
   schedule of `get_forward_backward_func` (1F1B when pp > 1) and `finalize_model_grads`.
3. Full gradients. Each `param.main_grad` is copied into its parameter and the model's sharded
   state dict saved, then loaded back in the single-device layout: this undoes every partitioning
   with megatron's own sharding metadata and yields full gradients keyed by the one-process
   model's parameter names.

Data: the global batch [G, s] is cut into G / mbs micro-batches of `mbs` consecutive samples;
micro-batch m of DP rank r is block m * dp + r (megatron's pretraining sampler), so every layout
sees the same set of micro-batches, and the single-device layout runs all of them with gradient
accumulation.
"""

from __future__ import annotations

import dataclasses
import queue
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from megatron_patch.moe.calibration import calibrate_coefficients, needs_calibration
from megatron_patch.parallel_check.layouts import Layout

if TYPE_CHECKING:  # megatron is imported in the workers only: keeps the parent light
    from megatron_patch.parallel_check.model import LayerSpecFn

DEFAULT_TRACKER_NAMES = ("load_balancing_loss",)


@dataclasses.dataclass
class Result:
    """What one training step reports under one layout.

    lm_loss: mean token cross-entropy of the global batch (mean over micro-batches of the
        micro-batch mean, averaged over DP ranks), as megatron reports "lm loss".
    trackers: MoE tracker name -> per-layer values [num_layers], summed over micro-batches
        by the tracker, reduced with `reduce_aux_losses_tracker_across_ranks` (sum over PP and
        the loss's reduce group, average over DP) and divided by the number of micro-batches,
        i.e. the per-layer values megatron logs.
    grads: parameter name in the single-device model -> full gradient (`main_grad` after DDP
        and `finalize_model_grads`: mean over the global batch's micro-batches).
    coefficients: per rank, the L_o / L_v coefficient buffers of its MoE layers after
        calibration ("auto" coefficients are calibrated on the global batch before the step).
    """

    layout: Layout
    lm_loss: float
    trackers: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    coefficients: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)


def make_global_batch(
    global_batch_size: int, seq_length: int, vocab_size: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Random token ids: {"tokens": [G, s], "labels": [G, s]} (labels = tokens shifted by one)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (global_batch_size, seq_length + 1), generator=generator)
    return {"tokens": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}


def run_layout(
    layout: Layout,
    model_args: Mapping[str, Any],
    global_batch: Mapping[str, torch.Tensor],
    micro_batch_size: int,
    backend: str = "auto",
    tracker_names: Sequence[str] = DEFAULT_TRACKER_NAMES,
    seed: int = 1234,
    config_class: Optional[type] = None,
    layer_spec_fn: Optional[LayerSpecFn] = None,
) -> Result:
    """One training step of the model of `model_args` under `layout`; see the module docstring.

    backend: "gloo", "nccl" or "auto" (nccl if CUDA is available, else gloo).
    config_class / layer_spec_fn: passed to `build_model` (must be importable top-level objects:
        they are pickled to the spawned processes).
    """
    global_batch_size = global_batch["tokens"].shape[0]
    if global_batch_size % (micro_batch_size * layout.dp) != 0:
        raise ValueError(
            f"global batch {global_batch_size} not divisible by micro batch {micro_batch_size} "
            f"x dp {layout.dp}"
        )
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and layout.world_size > torch.cuda.device_count():
        raise ValueError(f"{layout}: needs {layout.world_size} GPUs")
    job = _Job(
        layout=layout,
        model_args=dict(model_args),
        global_batch=dict(global_batch),
        micro_batch_size=micro_batch_size,
        backend=backend,
        tracker_names=tuple(tracker_names),
        seed=seed,
        config_class=config_class,
        layer_spec_fn=layer_spec_fn,
    )
    with tempfile.TemporaryDirectory(prefix="parallel_check_") as workdir:
        for checkpoint in ("weights", "grads"):
            (Path(workdir) / checkpoint).mkdir()
        mp.spawn(_worker, args=(job, workdir), nprocs=layout.world_size, join=True)
        return torch.load(Path(workdir) / "result.pt", weights_only=False)


@dataclasses.dataclass(frozen=True)
class _Job:
    layout: Layout
    model_args: dict[str, Any]
    global_batch: dict[str, torch.Tensor]
    micro_batch_size: int
    backend: str
    tracker_names: tuple[str, ...]
    seed: int
    config_class: Optional[type]
    layer_spec_fn: Optional[LayerSpecFn]

    @property
    def num_microbatches(self) -> int:
        """Micro-batches per DP rank."""
        return self.global_batch["tokens"].shape[0] // (self.micro_batch_size * self.layout.dp)


def _worker(rank: int, job: _Job, workdir: str) -> None:
    """Entry point of each spawned process; rank 0 writes the Result to workdir/result.pt."""
    if job.backend == "gloo":
        from megatron_patch.cpu_compat import apply_cpu_gloo_patches

        torch.set_num_threads(1)  # the world shares the machine's cores
        apply_cpu_gloo_patches()
    else:
        torch.cuda.set_device(rank)
    world_size = job.layout.world_size
    work = Path(workdir)
    # Rendezvous through a file in the run's own directory: no port to race for.
    store = dist.FileStore(str(work / "store"), world_size)
    dist.init_process_group(job.backend, store=store, rank=rank, world_size=world_size)
    _use_in_process_results_queue()
    try:
        _save_reference_weights(job, work / "weights")
        lm_loss, trackers, coefficients = _train_step(job, work / "weights", work / "grads")
        grads = _load_full_tensors(job, work / "grads")
        if rank == 0:
            torch.save(Result(job.layout, lm_loss, trackers, grads, coefficients),
                       work / "result.pt")
    finally:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def _use_in_process_results_queue() -> None:
    """Speed only: give dist_checkpointing's writer an in-process results queue.

    By default its first save starts a *spawned* multiprocessing Manager to host the queue
    (~3 s of CPU per process here, for two tiny checkpoints). The saves here are synchronous:
    the function that puts the write results and the one that reads them both run in this
    process (only the per-bucket writers are forked, with their own queue), so a thread-safe
    `queue.Queue` is enough. (An `mp.Queue` is not: its `put` goes through a feeder thread,
    and megatron's immediate `get_nowait` can find it still empty.)
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:
        filesystem_async._results_queue = queue.Queue()


def _single_device_layout(job: _Job) -> Layout:
    """tp=pp=ep=1 over the whole world: every rank holds the full model."""
    return Layout(dp=job.layout.world_size)


def _init_parallel(job: _Job, layout: Layout) -> None:
    from megatron_patch.training.initialize import init_model_parallel

    init_model_parallel(tp=layout.tp, pp=layout.pp, ep=layout.ep, etp=layout.etp, seed=job.seed)


def _build(job: _Job, layout: Layout) -> torch.nn.Module:
    from megatron_patch.parallel_check.model import build_model

    model = build_model(job.model_args, layout, job.config_class, job.layer_spec_fn)
    return model.cuda() if job.backend == "nccl" else model


def _save_reference_weights(job: _Job, weights_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    _init_parallel(job, _single_device_layout(job))
    dist_checkpointing.save(_build(job, _single_device_layout(job)).sharded_state_dict(),
                            str(weights_dir))


def _load_into(model: torch.nn.Module, checkpoint_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(checkpoint_dir))
    model.load_state_dict(state)


def _microbatches(job: _Job, dp_rank: int, device: torch.device) -> Iterator[dict]:
    """Micro-batches of this DP rank: block m * dp + r of the global batch, m = 0..M-1."""
    mbs, seq = job.micro_batch_size, job.global_batch["tokens"].shape[1]
    position_ids = torch.arange(seq, device=device).unsqueeze(0).expand(mbs, -1)
    # True = masked out (causal); an explicit mask is needed by the local attention on CPU.
    attention_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool, device=device), 1)
    for m in range(job.num_microbatches):
        start = (m * job.layout.dp + dp_rank) * mbs
        yield {
            "tokens": job.global_batch["tokens"][start : start + mbs].to(device),
            "labels": job.global_batch["labels"][start : start + mbs].to(device),
            "position_ids": position_ids,
            "attention_mask": attention_mask.view(1, 1, seq, seq),
        }


def _loss_func(token_losses: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean token loss of a micro-batch; token_losses: [mbs, s] from GPTModel given labels."""
    loss = token_losses.float().mean()
    # The schedule divides the returned loss in place: report a copy.
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(data_iterator: Iterator[dict], model: torch.nn.Module) -> tuple:
    batch = next(data_iterator)
    output = model(
        batch["tokens"],
        batch["position_ids"],
        batch["attention_mask"],
        labels=batch["labels"],
    )
    return output, _loss_func


def _train_step(
    job: _Job, weights_dir: Path, grads_dir: Path
) -> tuple[float, dict[str, torch.Tensor], list[dict[str, list[float]]]]:
    """Phase 2: returns (lm_loss, trackers, coefficients) on every rank; leaves full-model grads
    in grads_dir."""
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.moe.moe_utils import (
        get_moe_layer_wise_logging_tracker,
        reduce_aux_losses_tracker_across_ranks,
    )

    _init_parallel(job, job.layout)
    model = _build(job, job.layout)
    _load_into(model, weights_dir)
    config = model.config
    ddp_model = DistributedDataParallel(
        config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model
    )
    config.no_sync_func = ddp_model.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    ddp_model.zero_grad_buffer()

    device = torch.device("cuda") if job.backend == "nccl" else torch.device("cpu")
    schedule_kwargs = dict(
        forward_step_func=_forward_step,
        model=[ddp_model],
        num_microbatches=job.num_microbatches,
        seq_length=job.global_batch["tokens"].shape[1],
        micro_batch_size=job.micro_batch_size,
    )
    if needs_calibration(model):
        calibrate_coefficients(
            model, config,
            lambda: get_forward_backward_func()(
                data_iterator=_microbatches(job, parallel_state.get_data_parallel_rank(), device),
                forward_only=True, **schedule_kwargs),
            job.num_microbatches,
        )
    coefficients = _gather_coefficients(model)
    data = _microbatches(job, parallel_state.get_data_parallel_rank(), device)
    losses_reduced = get_forward_backward_func()(
        data_iterator=data,
        forward_only=False,
        **schedule_kwargs,
    )

    # LM loss lives on the last stage: mean over micro-batches, average over DP, then summed
    # over the PP group (other stages contribute 0) so that every rank holds it.
    lm_loss = torch.zeros((), device=device)
    if parallel_state.is_pipeline_last_stage():
        lm_loss += torch.stack([x["lm loss"] for x in losses_reduced]).mean()
        dist.all_reduce(lm_loss, op=dist.ReduceOp.AVG,
                        group=parallel_state.get_data_parallel_group())
    dist.all_reduce(lm_loss, group=parallel_state.get_pipeline_model_parallel_group())

    reduce_aux_losses_tracker_across_ranks(list(job.tracker_names))
    tracker = get_moe_layer_wise_logging_tracker()
    trackers = {
        name: (tracker[name]["values"] / job.num_microbatches).cpu()
        for name in job.tracker_names
    }

    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.main_grad)
    dist_checkpointing.save(model.sharded_state_dict(), str(grads_dir))
    return lm_loss.item(), trackers, coefficients


def _gather_coefficients(model: torch.nn.Module) -> list[dict[str, list[float]]]:
    """Every rank's L_o / L_v coefficient buffers, gathered to all ranks (rank order)."""
    local = {"ortho_loss": [], "var_loss": []}
    for name, buffer in model.named_buffers():
        if name.endswith("ortho_loss_coeff"):
            local["ortho_loss"].append(buffer.item())
        elif name.endswith("var_loss_coeff"):
            local["var_loss"].append(buffer.item())
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return gathered


def _load_full_tensors(job: _Job, checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Phase 3: the parameters of `checkpoint_dir` loaded into the single-device model."""
    layout = _single_device_layout(job)
    _init_parallel(job, layout)
    model = _build(job, layout)
    _load_into(model, checkpoint_dir)
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
