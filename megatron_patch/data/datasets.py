"""Train and valid ``GPTDataset`` blends, built with megatron-core after validating the data.

Uses ``BlendedMegatronDatasetBuilder(GPTDataset, ...)``. Call :func:`build_train_valid_datasets`
on every rank: with torch.distributed initialized, rank 0 builds and caches the sample indices
first, the other ranks wait at a barrier and then load them, and ranks where
``is_built_on_rank()`` is False get ``None``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Sequence

import torch
from torch.utils.data import Dataset

from megatron_patch.data.validation import DataError, check_indexed_dataset

if TYPE_CHECKING:
    from megatron.core.tokenizers import MegatronTokenizerBase

logger = logging.getLogger(__name__)

Blend = tuple[list[str], list[float] | None]


def parse_data_path(data_path: Sequence[str | float]) -> Blend:
    """Parse megatron's ``[prefix]``, ``[prefix, prefix, ...]`` or ``[w, prefix, w, prefix, ...]``.

    Raises:
        DataError: an empty list, a missing prefix, or a weight that is not a positive number.
    """
    items = [str(item).strip() for item in data_path]
    if not items:
        raise DataError("data_path is empty; give [prefix] or [weight, prefix, weight, prefix...]")
    if len(items) % 2 == 1 or not _is_number(items[0]):
        if any(_is_number(item) for item in items):
            raise DataError(f"data_path {items} mixes weights and prefixes; give "
                            "[weight, prefix, weight, prefix, ...] or only prefixes")
        return items, None
    weights, prefixes = items[0::2], items[1::2]
    bad = [w for w in weights if not _is_number(w) or float(w) <= 0]
    if bad or any(_is_number(p) for p in prefixes):
        raise DataError(f"data_path {items}: expected [weight, prefix, ...] with positive "
                        f"weights; bad weights {bad}")
    return prefixes, [float(w) for w in weights]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def default_is_built_on_rank() -> bool:
    """Megatron's rule: tensor-parallel rank 0 of the first and last pipeline stages builds.

    Without initialized model parallelism every process builds.
    """
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return True
    return (parallel_state.is_pipeline_first_stage(ignore_virtual=True)
            or parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            ) and parallel_state.get_tensor_model_parallel_rank() == 0


def _check_split_sizes(infos: dict, split_matrix: list, seq_length: int) -> None:
    """Every prefix must give the train and valid splits at least one full sample."""
    for name, bounds in zip(("train", "valid"), split_matrix[:2]):
        if bounds is None:
            continue
        for prefix, info in infos.items():
            begin, end = (int(round(b * info.documents)) for b in bounds)
            tokens = int(info.sequence_lengths[begin:end].sum())
            if tokens < seq_length + 1:
                raise DataError(
                    f"dataset {prefix!r}: the {name} split holds documents [{begin}, {end}) with "
                    f"{tokens} tokens, fewer than one sample of seq_length + 1 = {seq_length + 1}"
                    f"; use more data, a shorter sequence or a larger {name} share of the split")


def _cache_path(cache_path: str | None, blends: list[Blend]) -> str | None:
    """megatron-core 0.16.1 ``BlendedDataset`` calls ``torch.distributed.get_rank()`` on a cache
    miss, so without torch.distributed a blend of several prefixes cannot use ``cache_path``."""
    blended = any(len(prefixes) > 1 for prefixes, _ in blends)
    if cache_path and blended and not torch.distributed.is_initialized():
        logger.warning("cache_path %s ignored: torch.distributed is not initialized; GPTDataset "
                       "indices go to megatron's default <prefix>/cache/", cache_path)
        return None
    return cache_path


def build_train_valid_datasets(
    data_path: Sequence[str | float],
    split: str,
    seq_length: int,
    seed: int,
    train_samples: int,
    valid_samples: int,
    tokenizer: MegatronTokenizerBase,
    *,
    valid_data_path: Sequence[str | float] | None = None,
    cache_path: str | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    scan_token_ids: bool = True,
) -> tuple[Dataset | None, Dataset | None]:
    """Validate the data, then build the train and valid datasets.

    Args:
        data_path: megatron-style blend, ``[prefix]`` or ``[weight, prefix, weight, prefix...]``.
        split: megatron split string such as ``"98,2,0"``: contiguous document ranges of every
            prefix; ignored when ``valid_data_path`` is given.
        seq_length: tokens per sample.
        seed: seed of the document and sample shuffles and of the blend.
        train_samples: samples the train dataset must provide.
        valid_samples: samples the valid dataset must provide.
        tokenizer: a megatron-core tokenizer (``vocab_size``, ``eod``), e.g. from
            :func:`megatron_patch.data.tokenizer.load_tokenizer`.
        valid_data_path: an optional separate valid blend; then ``data_path`` is all train.
        cache_path: directory for the sample indices, shared by all ranks; None uses megatron's
            default ``<prefix>/cache/GPTDataset_indices`` (blend indices are then not cached).
            Ignored for multi-prefix blends when torch.distributed is not initialized.
        is_built_on_rank: which ranks get datasets; default :func:`default_is_built_on_rank`.
        reset_position_ids, reset_attention_mask, eod_mask_loss, create_attention_mask: as in
            ``GPTDatasetConfig``.
        scan_token_ids: check every token id against ``tokenizer.vocab_size`` (reads all data).

    Returns:
        ``(train_ds, valid_ds)``: ``GPTDataset`` or ``BlendedDataset`` each, or ``None`` on
        ranks that do not build (and ``valid_ds`` is None when the valid share is 0).

    Raises:
        DataError: missing, corrupt or truncated data, token ids beyond the tokenizer's
            vocabulary, a malformed ``data_path``, or a split too small for one sample.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    blends = [parse_data_path(data_path)]
    if valid_data_path is not None:
        blends.append(parse_data_path(valid_data_path))
    infos = {prefix: check_indexed_dataset(prefix, tokenizer.vocab_size, scan_token_ids)
             for prefixes, _ in blends for prefix in prefixes}

    common = dict(
        random_seed=seed, sequence_length=seq_length, tokenizer=tokenizer,
        path_to_cache=_cache_path(cache_path, blends), reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask, eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask)
    if valid_data_path is None:
        config = GPTDatasetConfig(blend=blends[0], split=split, **common)
        _check_split_sizes(infos, config.split_matrix, seq_length)
    else:
        config = GPTDatasetConfig(blend_per_split=[blends[0], blends[1], None], **common)
        for bounds, (prefixes, _) in (([(0.0, 1.0), None], blends[0]),
                                      ([None, (0.0, 1.0)], blends[1])):
            _check_split_sizes({p: infos[p] for p in prefixes}, bounds, seq_length)
    # With blend weights, a None size fails megatron's "size_is_none => weights_are_none" check.
    sizes = [train_samples, valid_samples, 0]
    train_ds, valid_ds, _ = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or default_is_built_on_rank, config).build()
    return train_ds, valid_ds
