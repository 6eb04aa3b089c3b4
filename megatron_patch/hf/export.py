"""Export a saved checkpoint of a ``--hf-load`` run as a Hugging Face checkpoint, in one process
(``dist_checkpointing`` reshards whatever layout wrote it): ``tools/export_hf.py``."""

from __future__ import annotations

from pathlib import Path

from megatron_patch.analysis.loading import (
    analysis_job,
    build_and_load_model,
    checkpoint_job,
    resolve_checkpoint,
)
from megatron_patch.data.tokenizer import load_tokenizer
from megatron_patch.distributed import Layout, init_model_parallel, init_world
from megatron_patch.hf.architectures import HFImportError, read_checkpoint
from megatron_patch.hf.weights import export_hf_weights


def export_saved_checkpoint(load: str, out_dir: str) -> Path:
    """Write the model of checkpoint ``load`` (a ``--save`` directory: its newest checkpoint,
    or an ``iter_*`` directory) to ``out_dir`` in the format of the run's ``--hf-load``
    checkpoint. Starts a one-process world.

    Raises:
        HFImportError: the run did not start from a Hugging Face checkpoint, or ``out_dir``
            exists and is not empty.
    """
    where = resolve_checkpoint(load)
    job, common = checkpoint_job(where)
    if job.checkpoint.hf_load is None:
        raise HFImportError(
            f"{where} is not from a --hf-load run: there is no Hugging Face architecture to "
            "export it to")
    source = read_checkpoint(job.checkpoint.hf_load)
    job = analysis_job(job, 1, None)
    init_world(job.parallel.distributed_backend, rank=0, world_size=1, local_rank=0)
    init_model_parallel(Layout(), job.training.seed)
    tokenizer_model = job.data.tokenizer_model
    model = build_and_load_model(job, where, common, load_tokenizer(tokenizer_model).vocab_size,
                                 tokenizer_model)
    return export_hf_weights(model, source, out_dir)
