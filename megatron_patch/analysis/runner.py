"""The whole analysis: checkpoint + validation data -> per-layer and averaged metrics (a dict).

1. Rebuild the model from the checkpoint's flags (one process: all parallel sizes 1, the
   checkpoint is resharded; torchrun: its TP = PP = 1 layout, see ``loading``).
2. One pass over the first ``num_samples`` sequences of one (seeded) shuffled epoch of the
   validation prefix, split over data-parallel ranks, with ``RoutingCapture`` hooks: exact
   load / entropy / variance / domain statistics over every token, and the router input and
   routing decision of a seeded *token sample* of ``sample_tokens`` positions.
3. On the token sample: every expert's unweighted output (expert overlap, output similarity,
   silhouette of the routed outputs); the expert weights (weight similarity).

The result depends only on the checkpoint, the data, the seed and the sizes, not on the number
of ranks or the micro-batch size (up to float summation order).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from megatron_patch.analysis import metrics
from megatron_patch.analysis.accumulate import LayerAccumulator
from megatron_patch.analysis.capture import RoutingCapture
from megatron_patch.analysis.experts import all_expert_outputs, expert_weight_vectors
from megatron_patch.analysis.loading import (
    AnalysisError,
    analysis_job,
    build_and_load_model,
    build_dataset,
    checkpoint_job,
    resolve_checkpoint,
)

SCALAR_METRICS = (
    "expert_overlap", "routing_overlap", "routing_overlap_same_domain",
    "routing_overlap_cross_domain", "routing_variance", "routing_entropy", "max_vio",
    "silhouette", "output_similarity_mean", "weight_similarity_mean", "domain_mi", "domain_nmi",
    "domain_mi_over_domain_entropy", "routed_output_rms",
)


@dataclass
class AnalysisOptions:
    load: str
    data_path: Optional[str] = None
    tokenizer_model: Optional[str] = None
    config: Optional[str] = None
    num_samples: Optional[int] = 64
    max_tokens: Optional[int] = None
    sample_tokens: int = 2048
    silhouette_points: int = 2000
    silhouette_metric: str = "cosine"
    micro_batch_size: Optional[int] = None
    seed: int = 1234
    progress: bool = True


def _default_prefix(run_job) -> str:
    from megatron_patch.data.datasets import parse_data_path

    if not run_job.data.valid_data_path:
        raise AnalysisError("the checkpoint's run had no --valid-data-path (it split --data-path); "
                            "pass --data-path PREFIX of a validation set")
    prefixes, _ = parse_data_path(run_job.data.valid_data_path)
    if len(prefixes) != 1:
        raise AnalysisError(f"the run validated on a blend of {len(prefixes)} prefixes "
                            f"{prefixes}; pick one with --data-path")
    return prefixes[0]


def _load_domains(prefix: str, num_documents: int):
    from megatron_patch.data.domains import DomainSidecar, sidecar_paths

    if not all(p.is_file() for p in sidecar_paths(prefix)):
        return None
    sidecar = DomainSidecar.load(prefix)
    if len(sidecar.ids) != num_documents:
        raise AnalysisError(f"{prefix}.domains.npy has {len(sidecar.ids)} documents, the dataset "
                            f"{num_documents}; rebuild the sidecar with the data")
    return sidecar


def _plan(num_available: int, seq_length: int, opts: AnalysisOptions) -> int:
    num = num_available if opts.num_samples is None else min(opts.num_samples, num_available)
    if opts.max_tokens is not None:
        num = min(num, max(1, opts.max_tokens // seq_length))
    return num


def _batches(num_samples: int, rank: int, world: int, mbs: int) -> list[list[int]]:
    """This rank's micro-batches of sample indices; every rank gets the same count (the expert
    all-to-all is collective), short ranks get ``-1`` entries (run, then ignored)."""
    mine = list(range(rank, num_samples, world))
    per_rank = math.ceil(num_samples / world)
    count = max(1, math.ceil(per_rank / mbs))
    mine += [-1] * (count * mbs - len(mine))
    return [mine[i * mbs:(i + 1) * mbs] for i in range(count)]


def _make_batch(dataset, indices, seq_length, sidecar, device):
    from megatron_patch.data.domains import sample_token_domains
    from megatron_patch.training.step import collate

    samples, domains = [], []
    for i in indices:
        samples.append(dataset[max(i, 0)])
        if i < 0:
            domains.append(np.full(seq_length, -1))
        elif sidecar is None:
            domains.append(np.zeros(seq_length, dtype=np.int64))
        else:
            domains.append(sample_token_domains(dataset, i, sidecar.ids))
    batch = collate(samples, device)
    dom = torch.as_tensor(np.stack(domains), dtype=torch.int64)  # [B, S]
    idx = torch.as_tensor(indices, dtype=torch.int64)
    positions = idx[:, None] * seq_length + torch.arange(seq_length)[None, :]  # [B, S]
    # Captures are flattened in megatron's [S, B] order.
    return batch, dom.T.reshape(-1), positions.T.reshape(-1), dom


def _layer_expert_metrics(layer, sample, opts: AnalysisOptions, layer_number: int) -> dict:
    out = {"token_sample": 0, "expert_overlap": float("nan"), "silhouette": float("nan"),
           "silhouette_points": 0, "routed_output_rms": float("nan")}
    weights = expert_weight_vectors(layer)
    weight_sim = metrics.cosine_similarity_matrix(weights)
    out["weight_similarity"] = weight_sim.tolist()
    out["weight_similarity_mean"] = metrics.mean_off_diagonal(weight_sim)
    if sample is None:
        out["output_similarity"], out["output_similarity_mean"] = None, float("nan")
        return out
    outputs = all_expert_outputs(layer, sample["hidden"])  # [N, E, H]
    routing_map = sample["routing_map"]
    sim, overlap = metrics.expert_output_cosines(outputs, routing_map)
    out.update(token_sample=int(outputs.shape[0]), expert_overlap=overlap,
               output_similarity=sim.tolist(), output_similarity_mean=metrics.mean_off_diagonal(sim),
               routed_output_rms=metrics.routed_output_rms(outputs, routing_map))
    tokens, experts = routing_map.nonzero(as_tuple=True)
    gen = torch.Generator().manual_seed(opts.seed + layer_number)
    pick = torch.randperm(tokens.numel(), generator=gen)[: opts.silhouette_points].sort().values
    tokens, experts = tokens[pick], experts[pick]
    out["silhouette"] = metrics.silhouette_score(outputs[tokens, experts], experts,
                                                 opts.silhouette_metric)
    out["silhouette_points"] = int(pick.numel())
    return out


def run_analysis(opts: AnalysisOptions) -> dict:
    """Collective over all ranks (torchrun) or one process; returns the result on every rank.

    Raises:
        AnalysisError: a checkpoint, data or layout problem, with the fix.
    """
    from megatron_patch.data.tokenizer import load_tokenizer
    from megatron_patch.distributed import init_model_parallel, init_world, world_from_environment
    from megatron_patch.flags import ConfigError
    from megatron_patch.training.step import model_forward

    where = resolve_checkpoint(opts.load)
    run_job, common = checkpoint_job(where, opts.config)
    _, world, _ = world_from_environment()
    job = analysis_job(run_job, world, opts.micro_batch_size)
    tokenizer_model = opts.tokenizer_model or job.data.tokenizer_model
    if not tokenizer_model or not Path(tokenizer_model).exists():
        raise AnalysisError(f"tokenizer {tokenizer_model!r} not found (a sentencepiece model or a "
                            "Hugging Face tokenizer directory); pass --tokenizer-model")
    prefix = opts.data_path or _default_prefix(run_job)
    try:
        layout = job.layout(world)
    except ConfigError as error:
        raise AnalysisError(str(error)) from None
    device = init_world(job.parallel.distributed_backend)
    pg_collection = init_model_parallel(layout, job.training.seed)
    rank = dist.get_rank()
    tokenizer = load_tokenizer(tokenizer_model)
    model = build_and_load_model(job, where, common, tokenizer.vocab_size, tokenizer_model)
    seq_length = job.model.seq_length
    dataset = build_dataset(prefix, tokenizer, seq_length, opts.seed)
    sidecar = _load_domains(prefix, len(dataset.dataset))
    domain_names = list(sidecar.names) if sidecar is not None else ["all"]
    num_samples = _plan(len(dataset), seq_length, opts)

    gen = torch.Generator().manual_seed(opts.seed)
    total_positions = num_samples * seq_length
    sample_positions = torch.randperm(total_positions, generator=gen)[: opts.sample_tokens]
    sample_positions = sample_positions.sort().values
    capture = RoutingCapture(model)
    config = model.config
    accs = {
        number: LayerAccumulator(config.num_moe_experts, len(domain_names), config.moe_router_topk,
                                 layer.router.score_function, sample_positions)
        for number, layer in capture.layers.items()
    }
    loss_sum = torch.zeros(2, dtype=torch.float64)
    batches = _batches(num_samples, rank, world, job.training.micro_batch_size)
    with capture, torch.no_grad():
        for indices in tqdm(batches, desc="analyze", unit="batch",
                            disable=not opts.progress or rank != 0):
            batch, domains, positions, dom_bs = _make_batch(dataset, indices, seq_length, sidecar,
                                                            device)
            loss = model_forward(model, batch)
            mask = batch["loss_mask"].float() * (dom_bs >= 0).to(device).float()
            loss_sum += torch.stack([(loss.float() * mask).sum(), mask.sum()]).double().cpu()
            for number, rec in capture.pop().items():
                accs[number].update(rec.hidden, rec.logits, rec.routing_map, domains, positions)

    dp_group = pg_collection.dp
    if world > 1:
        packed = loss_sum.to(device)
        dist.all_reduce(packed, group=dp_group)
        loss_sum = packed.cpu()
    layers = []
    for number, layer in capture.layers.items():
        acc = accs[number]
        acc.reduce(dp_group)
        result = {"layer_number": number, **acc.routing_metrics()}
        result.update(_layer_expert_metrics(layer, acc.sample, opts, number))
        layers.append(result)
    mean = {}
    for key in SCALAR_METRICS:
        values = [layer[key] for layer in layers if not math.isnan(layer[key])]
        mean[key] = float(np.mean(values)) if values else float("nan")
    return {
        "checkpoint": str(where),
        "iteration": common.get("iteration"),
        "data_path": prefix,
        "domains": domain_names,
        "has_domains": sidecar is not None,
        "num_samples": num_samples,
        "seq_length": seq_length,
        "num_tokens": layers[0]["num_tokens"] if layers else 0,
        "token_sample": opts.sample_tokens,
        "seed": opts.seed,
        "silhouette_metric": opts.silhouette_metric,
        "lm_loss": float(loss_sum[0] / loss_sum[1]) if loss_sum[1] > 0 else float("nan"),
        "world_size": world,
        "model": {
            "num_layers": config.num_layers, "hidden_size": config.hidden_size,
            "num_experts": config.num_moe_experts, "topk": config.moe_router_topk,
            "score_function": next(iter(capture.layers.values())).router.score_function,
            "moe_layers": [layer["layer_number"] for layer in layers],
        },
        "mean": mean,
        "layers": layers,
    }
