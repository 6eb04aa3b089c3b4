"""Checkpoint -> GPT-MoE in this process layout, and the validation data with domain labels.

A checkpoint written by ``megatron_patch.training.pretrain`` carries the run's flags (common
state key ``args``), from which the model is rebuilt with ``build_config`` / ``build_model``.
With one process every parallel size is forced to 1 and ``dist_checkpointing`` reshards
the checkpoint (an EP=2 run loads into one process). Under torchrun the checkpoint's own
TP/PP/EP layout is kept; only layouts with TP = PP = 1 (data + expert parallelism) are supported.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_patch.training.checkpointing import (
    CheckpointMismatchError,
    check_signature,
    checkpoint_path,
    latest_iteration,
    model_signature,
)



class AnalysisError(RuntimeError):
    """Bad input for the analysis (checkpoint, data, layout); the message names the fix."""


def resolve_checkpoint(load: str) -> Path:
    """The ``iter_*`` directory of ``load``: a ``--save`` directory (its newest checkpoint) or an
    ``iter_*`` directory itself."""
    path = Path(load)
    if (path / "metadata.json").is_file() or (path / "common.pt").is_file():
        return path
    if not path.is_dir():
        raise AnalysisError(f"--load {load}: no such directory")
    iteration = latest_iteration(str(path))
    if iteration is None:
        raise AnalysisError(f"--load {load}: neither a checkpoint (iter_*) directory nor a --save "
                            "directory with latest_checkpointed_iteration.txt")
    return checkpoint_path(str(path), iteration)


def checkpoint_args(where: Path, config_file: Optional[str] = None) -> tuple[argparse.Namespace,
                                                                             dict]:
    """(the run's flags, the common state) of checkpoint ``where``.

    Checkpoints written before the flags were saved need ``config_file``: a YAML of pretrain
    flags (as for ``pretrain --config``) describing the same model.
    """
    from megatron_patch.training.arguments import parse_args

    common = dist_checkpointing.load_common_state_dict(str(where))
    saved = common.get("args")
    if saved is not None:
        # Flags added after the checkpoint was written take their defaults.
        defaults = vars(parse_args(["--data-path", "unknown", "--tokenizer-model", "unknown"]))
        return argparse.Namespace(**{**defaults, **saved}), common
    if config_file is None:
        raise AnalysisError(
            f"{where} does not record the run's flags (written before checkpoints carried them); "
            "pass --config with the pretraining YAML (e.g. examples/pretrain/configs/tiny_cpu.yaml)"
            " and --tokenizer-model")
    args = parse_args(["--config", config_file, "--data-path", "unknown",
                       "--tokenizer-model", "unknown"])
    return args, common


def analysis_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """The run's flags adapted to this analysis: one process -> every parallel size 1; several
    -> the checkpoint's layout, which must have TP = PP = 1 (EP and DP only)."""
    args = copy.deepcopy(args)
    if world_size == 1:
        args.tensor_model_parallel_size = args.pipeline_model_parallel_size = 1
        args.expert_model_parallel_size = args.expert_tensor_parallel_size = 1
        args.sequence_parallel = False
    elif args.tensor_model_parallel_size != 1 or args.pipeline_model_parallel_size != 1 or \
            args.expert_tensor_parallel_size != 1:
        raise AnalysisError(
            f"analysis with {world_size} processes supports data and expert parallelism only "
            f"(checkpoint layout: TP {args.tensor_model_parallel_size}, PP "
            f"{args.pipeline_model_parallel_size}, ETP {args.expert_tensor_parallel_size}); run "
            "it as one process (the checkpoint is resharded), or under torchrun with "
            "--expert-model-parallel-size alone")
    args.micro_batch_size = max(1, args.micro_batch_size)
    args.global_batch_size = args.micro_batch_size * world_size
    args.train_iters = max(args.train_iters, args.lr_warmup_iters + 1)
    args.recompute_granularity = None
    args.use_distributed_optimizer = False
    args.load = args.save = None
    args.save_interval = None
    return args


def build_and_load_model(args: argparse.Namespace, where: Path, common: dict,
                         vocab_size: int) -> torch.nn.Module:
    """The GPTModel (unwrapped from DDP) with the checkpoint's weights, in eval mode."""
    from megatron_patch.training.model import build_config, build_model

    config = build_config(args)
    saved_signature = common.get("signature")
    if saved_signature is not None:
        try:
            check_signature(saved_signature, model_signature(args, vocab_size), where)
        except CheckpointMismatchError as error:
            raise AnalysisError(str(error)) from error
    model = build_model(args, config, vocab_size)[0].module
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


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1
