"""Checkpoint -> GPT-MoE in this process layout, and the validation data with domain labels.

A checkpoint written by the trainer carries the job's configuration (common state ``job``;
``args`` in older ones), from which the model is rebuilt with ``training.model.build_model``.
With one process every parallel size is 1 and ``dist_checkpointing`` reshards the checkpoint (an
EP=2 run loads into one process). Under torchrun the checkpoint's own EP layout is kept; only
layouts with TP = PP = ETP = 1 (data + expert parallelism) are supported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from megatron.core import dist_checkpointing

from megatron_patch.data.provenance import tokenizer_fingerprint
from megatron_patch.training.checkpoint_files import (
    CheckpointMismatchError,
    checkpoint_path,
    latest_iteration,
)
from megatron_patch.training.checkpointing import check_signature, model_signature, saved_job
from megatron_patch.training.config import JobConfig, ParallelConfig


class AnalysisError(RuntimeError):
    """Bad input for the analysis (checkpoint, data, layout); the message names the fix."""


def resolve_checkpoint(load: str) -> Path:
    """The ``iter_*`` directory of ``load``: a ``--save`` directory (its newest checkpoint) or an
    ``iter_*`` directory itself."""
    path = Path(load)
    if (path / "metadata.json").is_file():
        return path
    if not path.is_dir():
        raise AnalysisError(f"--load {load}: no such directory")
    iteration = latest_iteration(str(path))
    if iteration is None:
        raise AnalysisError(f"--load {load}: neither a checkpoint (iter_*) directory nor a --save "
                            "directory with latest_checkpointed_iteration.txt")
    return checkpoint_path(str(path), iteration)


def checkpoint_job(where: Path, config_file: Optional[str] = None) -> tuple[JobConfig, dict]:
    """(the run's configuration, the common state) of checkpoint ``where``.

    Checkpoints written before they carried the configuration need ``config_file``: a YAML of
    pretrain flags (as for ``pretrain --config``) describing the same model.
    """
    from megatron_patch.training.arguments import parse_args

    common = dist_checkpointing.load_common_state_dict(str(where))
    job = saved_job(common)
    if job is not None:
        return job, common
    if config_file is None:
        raise AnalysisError(
            f"{where} does not record the run's configuration (written before checkpoints "
            "carried it); pass --config with the pretraining YAML (e.g. "
            "examples/pretrain/configs/tiny_cpu.yaml) and --tokenizer-model")
    return parse_args(["--config", config_file]), common


def analysis_job(job: JobConfig, world_size: int, micro_batch_size: Optional[int]) -> JobConfig:
    """The run's configuration adapted to this analysis: one process -> every parallel size 1;
    several -> the checkpoint's expert parallelism, which must come with TP = PP = ETP = 1."""
    parallel = job.parallel
    if world_size == 1:
        parallel = ParallelConfig(distributed_backend=parallel.distributed_backend)
    elif (parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size,
          parallel.expert_tensor_parallel_size) != (1, 1, 1):
        raise AnalysisError(
            f"analysis with {world_size} processes supports data and expert parallelism only "
            f"(checkpoint layout: TP {parallel.tensor_model_parallel_size}, PP "
            f"{parallel.pipeline_model_parallel_size}, ETP "
            f"{parallel.expert_tensor_parallel_size}); run it as one process (the checkpoint "
            "is resharded), or under torchrun with --expert-model-parallel-size alone")
    else:
        parallel = dataclasses.replace(parallel, use_distributed_optimizer=False)
    mbs = micro_batch_size or job.training.micro_batch_size
    return job.replace(
        parallel=dataclasses.asdict(parallel),
        training={"micro_batch_size": mbs, "global_batch_size": mbs * world_size,
                  "recompute_granularity": None, "recompute_modules": None},
        checkpoint={"load": None, "save": None, "save_interval": None, "finetune": False},
    )


def build_and_load_model(job: JobConfig, where: Path, common: dict, vocab_size: int,
                         tokenizer_model: str) -> torch.nn.Module:
    """The GPTModel (unwrapped from DDP) with the checkpoint's weights, in eval mode; the
    checkpoint must fit the model and the tokenizer."""
    from megatron_patch.training.model import build_model

    saved_signature = common.get("signature")
    if saved_signature is not None:
        signature = model_signature(job, vocab_size, tokenizer_fingerprint(tokenizer_model))
        try:
            check_signature(saved_signature, signature, where)
        except CheckpointMismatchError as error:
            raise AnalysisError(str(error)) from error
    model = build_model(job, vocab_size)[0].module
    state = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(where))
    model.load_state_dict(state["model"])
    model.eval()
    return model


def build_dataset(prefix: str, tokenizer, seq_length: int, seed: int):
    """One epoch of ``prefix`` as a megatron-core ``GPTDataset`` (shuffled by ``seed``), built in
    memory (no index cache is written next to the data)."""
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from megatron.core.datasets.utils import Split

    from megatron_patch.data.validation import DataError, check_indexed_dataset

    try:
        check_indexed_dataset(prefix, tokenizer.vocab_size, False)
    except DataError as error:
        raise AnalysisError(str(error)) from error
    config = GPTDatasetConfig(
        random_seed=seed, sequence_length=seq_length, blend=([prefix], None), split="0,100,0",
        tokenizer=tokenizer, path_to_cache="", reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, create_attention_mask=False)
    indexed = IndexedDataset(prefix, multimodal=False, mmap=True)
    indices = np.arange(len(indexed), dtype=np.int32)
    return GPTDataset(indexed, prefix, indices, None, Split.valid, config)
