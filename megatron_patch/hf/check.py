"""Check a Hugging Face import: the megatron model built from a checkpoint, under each parallel
layout, gives transformers' logits for the same token ids, and exports back to the same tensors.

    reference_logits(path, tokens)       transformers' float32 forward (eager attention)
    run_import(jobs, layouts, d)         in the layouts' world size of processes, each checkpoint
                                         and layout in turn: build the model with this project's
                                         spec, load the checkpoint, forward the tokens (pipeline
                                         schedule, forward only), gather the logits, export
    compare_export(source, exported)     max |difference| per tensor, missing and extra names
    check_imports(paths, layouts)        all of it -> one ``ImportResult`` per path and layout
    check_import(path, layouts)          the same for one checkpoint
    check_export(load, exported)         a saved checkpoint's logits against transformers' of
                                         its export (``tools/export_hf.py --check``)
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from megatron_patch.distributed import Layout, init_model_parallel, spawn
from megatron_patch.hf.architectures import read_checkpoint
from megatron_patch.hf.model import build_hf_gpt_model
from megatron_patch.hf.weights import export_hf_weights, load_hf_weights
from megatron_patch.training.config import JobConfig
from megatron_patch.training.step import collate

LOGITS_FILE = "logits.pt"
EXPORT_DIR = "export"


@dataclasses.dataclass
class ImportResult:
    """One layout's check. logit_diff: max |megatron - transformers| over all logits;
    logit_scale: max |transformers logit|; export_diff: max |exported - source| over tensors;
    missing / extra: tensor names the export lacks / adds."""

    layout: Layout
    logit_diff: float
    logit_scale: float
    export_diff: float
    missing: list[str]
    extra: list[str]

    def passed(self, tolerance: float) -> bool:
        return (self.logit_diff <= tolerance and self.export_diff == 0.0
                and not self.missing and not self.extra)


def _yarn_mscale(factor: float, mscale: float) -> float:
    return 0.1 * mscale * math.log(factor) + 1.0 if factor > 1 else 1.0


def correct_deepseek_v2_yarn(model: torch.nn.Module) -> None:
    """Give transformers' DeepSeek-V2 attention the YaRN softmax factor mscale(factor,
    mscale_all_dim)^2 that DeepSeek's own modeling code (and megatron-core, vLLM) apply and
    transformers 4.57's native ``deepseek_v2`` port leaves out (DeepSeek-V2-Lite: x1.59)."""
    config = model.config
    scaling = getattr(config, "rope_scaling", None) or {}
    if config.model_type != "deepseek_v2" or not scaling.get("mscale_all_dim"):
        return
    factor = _yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"])) ** 2
    for layer in model.model.layers:
        layer.self_attn.scaling *= factor


def reference_logits(path: str | Path, tokens: torch.Tensor) -> torch.Tensor:
    """transformers' logits [b, s, vocab] of ``tokens`` [b, s] (float32, eager attention;
    DeepSeek-V2 with ``correct_deepseek_v2_yarn``)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager")
    correct_deepseek_v2_yarn(model)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def random_tokens(vocab_size: int, batch: int, seq_length: int, seed: int = 0) -> torch.Tensor:
    """Token ids [batch, seq_length], reproducible from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_length), generator=generator)


@torch.no_grad()
def megatron_logits(model: torch.nn.Module, tokens: torch.Tensor,
                    device: torch.device) -> Optional[torch.Tensor]:
    """Full logits [b, s, vocab] of ``tokens`` through megatron's forward-only pipeline
    schedule; on the last pipeline stage (vocabulary shards gathered over the tensor-parallel
    group), None elsewhere."""
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    rows = [{"tokens": row, "labels": row, "loss_mask": torch.ones(len(row)),
             "position_ids": torch.arange(len(row))} for row in tokens]
    batch = collate(rows, device)

    def forward_step(data_iterator, chunk):
        data = next(data_iterator)
        output = chunk(data["tokens"], data["position_ids"], data["attention_mask"])

        def keep(logits):
            return logits.sum() * 0.0, {"logits": logits.detach()}

        return output, keep

    model.eval()
    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([batch]), model=[model],
        num_microbatches=1, seq_length=tokens.shape[1], micro_batch_size=tokens.shape[0],
        forward_only=True)
    if not outputs:
        return None
    return gather_from_tensor_model_parallel_region(outputs[0]["logits"]).float().cpu()


def _import_worker(rank: int, jobs: list[tuple[str, torch.Tensor]], layouts: list[Layout],
                   workdir: str) -> None:
    from megatron.core import parallel_state

    from megatron_patch.parallel_check.runner import job_for_layout

    for number, (path, tokens) in enumerate(jobs):
        checkpoint = read_checkpoint(path)
        for index, layout in enumerate(layouts):
            init_model_parallel(layout, seed=0)
            model = build_hf_gpt_model(checkpoint, job_for_layout(JobConfig(), layout))
            load_hf_weights(model, checkpoint)
            logits = megatron_logits(model, tokens, next(model.parameters()).device)
            out = Path(workdir) / f"{number}_{index}"
            if (logits is not None and parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_data_parallel_rank() == 0):
                out.mkdir(exist_ok=True)
                torch.save(logits, out / LOGITS_FILE)
            export_hf_weights(model, checkpoint, out / EXPORT_DIR)
            dist.barrier()


def run_import(jobs: list[tuple[str | Path, torch.Tensor]], layouts: list[Layout],
               workdir: Path, backend: str = "auto") -> list[list[tuple[torch.Tensor, Path]]]:
    """Import each checkpoint of ``jobs`` (path, token ids [b, s]) under each of ``layouts``
    (one world size: the same processes run them all in turn) and forward its tokens; returns
    per checkpoint, per layout, the logits and the export directory (under ``workdir``)."""
    sizes = {layout.world_size for layout in layouts}
    if len(sizes) != 1:
        raise ValueError(f"run_import: layouts of one world size, got {sorted(sizes)}")
    spawn(_import_worker, sizes.pop(), [(str(path), tokens) for path, tokens in jobs], layouts,
          str(workdir), backend=backend)
    return [[(torch.load(workdir / f"{n}_{i}" / LOGITS_FILE), workdir / f"{n}_{i}" / EXPORT_DIR)
             for i in range(len(layouts))] for n in range(len(jobs))]


def compare_export(source: str | Path, exported: str | Path) -> tuple[float, list[str], list[str]]:
    """(max |exported - source| over the tensors both hold, names only in the source, names
    only in the export). A dtype change counts as a difference of inf."""
    reference, result = read_checkpoint(source), read_checkpoint(exported)
    missing = sorted(set(reference.weight_files) - set(result.weight_files))
    extra = sorted(set(result.weight_files) - set(reference.weight_files))
    from safetensors import safe_open

    worst = 0.0
    for name in sorted(set(reference.weight_files) & set(result.weight_files)):
        with safe_open(reference.weight_files[name], "pt") as a, \
                safe_open(result.weight_files[name], "pt") as b:
            x, y = a.get_tensor(name), b.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return float("inf"), missing, extra
        worst = max(worst, (x.double() - y.double()).abs().max().item())
    return worst, missing, extra


def check_imports(paths: list[str | Path], layouts: list[Layout], *, batch: int = 2,
                  seq_length: int = 16, seed: int = 0,
                  backend: str = "auto") -> list[list[ImportResult]]:
    """Run the import check of each of ``paths`` under each layout (see the module docstring):
    one set of processes per world size runs every checkpoint. Returns per path, per layout,
    an ``ImportResult``."""
    checkpoints = [read_checkpoint(path) for path in paths]  # unsupported ones fail here
    tokens = [random_tokens(checkpoint.vocab_size, batch, seq_length, seed)
              for checkpoint in checkpoints]
    expected = [reference_logits(path, ids) for path, ids in zip(paths, tokens)]
    results: dict[tuple[int, Layout], ImportResult] = {}
    for size in sorted({layout.world_size for layout in layouts}):
        group = [layout for layout in layouts if layout.world_size == size]
        with tempfile.TemporaryDirectory(prefix="hf_import_") as workdir:
            outputs = run_import(list(zip(paths, tokens)), group, Path(workdir), backend)
            for number, per_layout in enumerate(outputs):
                for layout, (logits, export) in zip(group, per_layout):
                    export_diff, missing, extra = compare_export(paths[number], export)
                    results[number, layout] = ImportResult(
                        layout=layout, logit_diff=(logits - expected[number]).abs().max().item(),
                        logit_scale=expected[number].abs().max().item(),
                        export_diff=export_diff, missing=missing, extra=extra)
    return [[results[number, layout] for layout in layouts] for number in range(len(paths))]


def check_import(path: str | Path, layouts: list[Layout], **options) -> list[ImportResult]:
    """``check_imports`` of one checkpoint: one ``ImportResult`` per layout."""
    return check_imports([path], layouts, **options)[0]


def _saved_logits_worker(rank: int, load: str, tokens: torch.Tensor, out: str) -> None:
    from megatron_patch.analysis.loading import (
        analysis_job,
        build_and_load_model,
        checkpoint_job,
        resolve_checkpoint,
    )
    from megatron_patch.data.tokenizer import load_tokenizer

    where = resolve_checkpoint(load)
    job, common = checkpoint_job(where)
    job = analysis_job(job, 1, None)
    init_model_parallel(Layout(), job.training.seed)
    tokenizer = job.data.tokenizer_model
    model = build_and_load_model(job, where, common, load_tokenizer(tokenizer).vocab_size,
                                 tokenizer)
    torch.save(megatron_logits(model, tokens, next(model.parameters()).device), out)


def check_export(load: str | Path, exported: str | Path, *, batch: int = 2,
                 seq_length: int = 16, seed: int = 0) -> tuple[float, float]:
    """(max |megatron - transformers| logit difference, max |transformers logit|) between a
    saved checkpoint ``load`` (its model in one process) and its Hugging Face export
    ``exported``, for the same random token ids."""
    checkpoint = read_checkpoint(exported)
    tokens = random_tokens(checkpoint.vocab_size, batch, seq_length, seed)
    expected = reference_logits(exported, tokens)
    with tempfile.TemporaryDirectory(prefix="hf_export_check_") as workdir:
        out = Path(workdir) / LOGITS_FILE
        spawn(_saved_logits_worker, 1, str(load), tokens, str(out))
        logits = torch.load(out)
    return (logits - expected).abs().max().item(), expected.abs().max().item()
