"""Run the trainer's training step under a parallel layout and collect what it reports.

The step is the one that trains: ``megatron_patch.training.step.forward_backward`` (and
``calibrate`` for "auto" coefficients) on the model ``training.model.build_gpt_model`` builds from
the job's configuration, in megatron DDP (``training.model.wrap_ddp``), fed by
``training.step.micro_batches``. Nothing of the step is re-implemented here.

``run_layout`` spawns ``layout.world_size`` processes (gloo on CPU, nccl on GPU;
``megatron_patch.distributed.spawn``). Each goes through three phases over the same world:

1. Reference weights. The single-device layout (tp=pp=ep=1, dp=world): every rank builds the full
   model from the seed exactly as a one-process run would, so the weights do not depend on the
   layout under test; they are saved with dist_checkpointing.
2. The step, in ``layout``: the model is built and the reference checkpoint loaded into it
   (dist_checkpointing reshards: TP partitions, expert indices across EP, layer offsets across
   PP), then one training step runs over the global batch.
3. Full gradients. Each ``param.main_grad`` (0 for a frozen parameter) is copied into its
   parameter and the model's sharded state dict saved, then loaded back in the single-device
   layout: this undoes every partitioning with megatron's own sharding metadata and yields full
   gradients keyed by the one-process model's parameter names.

The global batch [G, s] is the trainer's sample stream of one step (micro-batch m of DP rank r is
block m * dp + r), so every layout sees the same micro-batches, and the single-device layout runs
all of them with gradient accumulation.
"""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path
import torch
import torch.distributed as dist

from megatron_patch.distributed import Layout, init_model_parallel, resolve_backend, spawn
from megatron_patch.training.checkpointing import use_in_process_results_queue
from megatron_patch.training.config import JobConfig, ParallelConfig


@dataclasses.dataclass
class Result:
    """What one training step reports under one layout.

    lm_loss: mean token cross-entropy of the global batch (``StepOutput.lm_loss``).
    trackers: MoE loss name -> per-layer values [num_layers] (``StepOutput.moe_losses``).
    routing: ``load`` [L_moe, E], ``max_vio`` [L_moe], ``entropy`` [L_moe] of the step.
    grads: parameter name in the single-device model -> full gradient (``main_grad`` after DDP
        and ``finalize_model_grads``: mean over the global batch's micro-batches).
    coefficients: per rank, the L_o / L_v coefficient buffers of its MoE layers after
        calibration ("auto" coefficients are calibrated on the global batch before the step).
    """

    layout: Layout
    lm_loss: float
    trackers: dict[str, torch.Tensor]
    routing: dict[str, torch.Tensor]
    grads: dict[str, torch.Tensor]
    coefficients: list[dict[str, list[float]]] = dataclasses.field(default_factory=list)


def make_global_batch(
    global_batch_size: int, seq_length: int, vocab_size: int, seed: int = 0,
    padding: bool = False,
) -> list[dict[str, torch.Tensor]]:
    """A global batch of random token ids as the trainer's samples (``training.step``): tokens,
    labels (shifted by one), loss_mask, position_ids; with ``padding``, every other sample ends
    in 1..s/2 padding positions (``padding_mask`` True, loss_mask 0)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (global_batch_size, seq_length + 1), generator=generator)
    samples = []
    for i in range(global_batch_size):
        sample = {"tokens": ids[i, :-1].clone(), "labels": ids[i, 1:].clone(),
                  "loss_mask": torch.ones(seq_length), "position_ids": torch.arange(seq_length)}
        if padding:
            pad = torch.zeros(seq_length, dtype=torch.bool)
            if i % 2 == 1:
                pad[seq_length - 1 - (i // 2) % (seq_length // 2):] = True
            sample["padding_mask"] = pad
            sample["loss_mask"] = (~pad).float()
        samples.append(sample)
    return samples


def job_for_layout(job: JobConfig, layout: Layout) -> JobConfig:
    """``job`` with ``layout``'s parallel sizes."""
    parallel = dataclasses.asdict(ParallelConfig.of(layout))
    return job.replace(parallel=parallel)


def run_layout(
    layout: Layout,
    job: JobConfig,
    samples: list[dict[str, torch.Tensor]],
    vocab_size: int,
    backend: str = "auto",
) -> Result:
    """One training step of ``job``'s model over the global batch ``samples`` under ``layout``;
    see the module docstring.

    Args:
        job: the model (model, moe, losses sections), the micro-batch size and the seed
            (training section); its parallel section is replaced by ``layout``'s.
        samples: the global batch (``make_global_batch``).
        backend: "gloo", "nccl" or "auto" (nccl if CUDA is available, else gloo).
    """
    micro_batch_size = job.training.micro_batch_size
    if len(samples) % (micro_batch_size * layout.dp) != 0:
        raise ValueError(f"global batch {len(samples)} not divisible by micro batch "
                         f"{micro_batch_size} x dp {layout.dp}")
    backend = resolve_backend(backend)
    if backend == "nccl" and layout.world_size > torch.cuda.device_count():
        raise ValueError(f"{layout}: needs {layout.world_size} GPUs")
    with tempfile.TemporaryDirectory(prefix="parallel_check_") as workdir:
        spawn(_run_phases, layout.world_size, layout, job, samples, vocab_size, workdir,
              backend=backend)
        return torch.load(Path(workdir) / "result.pt", weights_only=False)


def _run_phases(rank: int, layout: Layout, job: JobConfig, samples: list, vocab_size: int,
                workdir: str) -> None:
    """Each spawned process; rank 0 writes the Result to workdir/result.pt."""
    work = Path(workdir)
    use_in_process_results_queue()
    single = Layout(dp=layout.world_size)
    _save_model(_build(job, single, vocab_size)[0], work / "weights")
    result = _train_step(job, layout, samples, vocab_size, work / "weights", work / "grads")
    model, _ = _build(job, single, vocab_size)
    _load_into(model, work / "grads")
    result.grads = {name: p.detach().cpu().clone() for name, p in model.named_parameters()}
    if rank == 0:
        torch.save(result, work / "result.pt")


def _build(job: JobConfig, layout: Layout, vocab_size: int):
    """Megatron's parallel state for ``layout`` and this rank's model: (model, process groups)."""
    from megatron_patch.training.model import build_gpt_model

    pg_collection = init_model_parallel(layout, job.training.seed)
    return build_gpt_model(job_for_layout(job, layout), vocab_size), pg_collection


def _save_model(model: torch.nn.Module, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    directory.mkdir(exist_ok=True)
    dist_checkpointing.save(model.sharded_state_dict(), str(directory))


def _load_into(model: torch.nn.Module, directory: Path) -> None:
    from megatron.core import dist_checkpointing

    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state)


def _train_step(job: JobConfig, layout: Layout, samples: list, vocab_size: int,
                weights_dir: Path, grads_dir: Path) -> Result:
    """Phase 2: the trainer's step; leaves full-model grads in grads_dir."""
    from megatron_patch.moe.calibration import coefficient_buffers, needs_calibration
    from megatron_patch.moe.routing_stats import RoutingStatistics
    from megatron_patch.training.model import wrap_ddp
    from megatron_patch.training.step import BatchShape, calibrate, forward_backward, micro_batches

    model, pg_collection = _build(job, layout, vocab_size)
    _load_into(model, weights_dir)
    chunks = wrap_ddp(model, use_distributed_optimizer=False)
    device = next(model.parameters()).device
    shape = BatchShape(len(samples) // (job.training.micro_batch_size * layout.dp),
                       job.training.micro_batch_size, len(samples[0]["tokens"]))
    if needs_calibration(chunks):
        calibrate(chunks, micro_batches(samples, 0, shape, pg_collection, device), shape,
                  pg_collection)
    local = {name: [b.item() for b in buffers]
             for name, buffers in coefficient_buffers(chunks).items()}
    coefficients: list = [None] * dist.get_world_size()
    dist.all_gather_object(coefficients, local)
    statistics = RoutingStatistics(model.config.num_layers, job.moe.num_experts, device)
    output = forward_backward(chunks, micro_batches(samples, 0, shape, pg_collection, device),
                              shape, pg_collection, statistics.attach(chunks))
    with torch.no_grad():
        for param in model.parameters():
            # Frozen parameters (LoRA runs) have no gradient: 0 in every layout.
            param.copy_(param.main_grad if param.requires_grad else torch.zeros_like(param))
    _save_model(model, grads_dir)
    routing = {name: value.cpu() for name, value in output.routing.items()}
    return Result(layout, output.lm_loss, output.moe_losses, routing, {}, coefficients)
