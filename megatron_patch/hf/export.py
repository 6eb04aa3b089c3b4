"""Export a saved checkpoint as a Hugging Face checkpoint, in one process (``dist_checkpointing``
reshards whatever layout wrote it): ``tools/export_hf.py``. A ``--hf-load`` run exports in the
architecture of its source checkpoint, a model pretrained here as a Mixtral
(``megatron_patch.hf.native``)."""

from __future__ import annotations

import tempfile
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
from megatron_patch.hf.native import mixtral_checkpoint, refuse_non_mixtral
from megatron_patch.hf.weights import export_hf_weights


def export_saved_checkpoint(load: str, out_dir: str) -> Path:
    """Write the model of checkpoint ``load`` (a ``--save`` directory: its newest checkpoint,
    or an ``iter_*`` directory) to ``out_dir``: in the format of the run's ``--hf-load``
    checkpoint, or, for a model pretrained here, as a Mixtral with the run's tokenizer. Starts
    a one-process world.

    Raises:
        HFImportError: a model pretrained here that is no Mixtral or has no Hugging Face
            tokenizer (both named), or ``out_dir`` exists and is not empty.
    """
    where = resolve_checkpoint(load)
    job, common = checkpoint_job(where)
    if job.checkpoint.hf_load is None:
        refuse_non_mixtral(job)  # before any model is built
    job = analysis_job(job, 1, None)
    init_world(job.parallel.distributed_backend, rank=0, world_size=1, local_rank=0)
    init_model_parallel(Layout(), job.training.seed)
    tokenizer_model = job.data.tokenizer_model
    model = build_and_load_model(job, where, common, load_tokenizer(tokenizer_model).vocab_size,
                                 tokenizer_model)
    if job.checkpoint.hf_load is not None:
        return export_hf_weights(model, read_checkpoint(job.checkpoint.hf_load), out_dir)
    with tempfile.TemporaryDirectory(prefix="mixtral_config_") as template:
        return export_hf_weights(model, mixtral_checkpoint(job, model, template), out_dir)
