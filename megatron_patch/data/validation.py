"""Checks of megatron-core indexed datasets that turn bad inputs into clear errors before training.

Covers: missing ``.bin``/``.idx`` files, truncated or corrupt files, token ids outside the
tokenizer's vocabulary (data tokenized with another tokenizer), and a domain sidecar that does
not match the documents. Reads the index with megatron-core 0.16.1's own ``_IndexReader`` after
checking the header, so a damaged file raises :class:`DataError` instead of an assertion.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

import numpy as np

from megatron_patch.data.domains import DomainSidecar, sidecar_paths

_HEADER_BYTES = 34  # magic (9) + version (8) + dtype code (1) + sequence and document counts (16)
_SCAN_TOKENS = 1 << 24


class DataError(ValueError):
    """Unusable training data; the message names the file and the command that fixes it."""


def preprocess_command(prefix: str) -> str:
    """The command that (re)creates dataset ``prefix``."""
    return (f"python tools/preprocess_data.py --input <corpus.jsonl> --output-prefix {prefix} "
            f"--tokenizer-model <tokenizer.model>")


@dataclass(frozen=True)
class DatasetInfo:
    """Facts about a validated indexed dataset."""

    prefix: str
    documents: int
    tokens: int
    max_token_id: int
    sequence_lengths: np.ndarray


def _require_files(prefix: str) -> None:
    missing = [p for p in (f"{prefix}.bin", f"{prefix}.idx") if not os.path.isfile(p)]
    if missing:
        raise DataError(f"dataset {prefix!r}: missing {' and '.join(missing)}. Create it with:\n"
                        f"  {preprocess_command(prefix)}")


def _corrupt(prefix: str, problem: str) -> DataError:
    return DataError(f"dataset {prefix!r} is corrupt or truncated: {problem}. Recreate it with:\n"
                     f"  {preprocess_command(prefix)}")


def _check_header(prefix: str) -> None:
    """The ``.idx`` header is megatron's and the file size matches the counts it declares."""
    from megatron.core.datasets.indexed_dataset import _INDEX_HEADER, DType

    idx = f"{prefix}.idx"
    with open(idx, "rb") as stream:
        head = stream.read(_HEADER_BYTES)
    if len(head) < _HEADER_BYTES:
        raise _corrupt(prefix, f"{idx} is shorter than the {_HEADER_BYTES}-byte header")
    magic, version, code, sequences, documents = struct.unpack("<9sQBQQ", head)
    if magic != _INDEX_HEADER or version != 1 or code not in {d.value for d in DType}:
        raise _corrupt(prefix, f"{idx} is not a megatron-core index (bad magic, version or dtype)")
    expected = _HEADER_BYTES + sequences * (4 + 8) + documents * 8
    if os.path.getsize(idx) != expected:
        raise _corrupt(prefix, f"{idx} has {os.path.getsize(idx)} bytes, its header implies "
                               f"{expected}")


def _check_contents(prefix: str, index) -> None:
    """Pointers, document boundaries and the ``.bin`` size agree with the sequence lengths."""
    lengths = index.sequence_lengths.astype(np.int64)
    if len(lengths) == 0:
        raise DataError(f"dataset {prefix!r} has no documents; was its input empty?")
    pointers = np.concatenate([[0], np.cumsum(lengths)[:-1]]) * index.dtype_size
    if not np.array_equal(index.sequence_pointers, pointers):
        raise _corrupt(prefix, f"{prefix}.idx sequence pointers disagree with its lengths")
    boundaries = index.document_indices
    if len(boundaries) == 0 or boundaries[0] != 0 or boundaries[-1] != len(lengths) or np.any(
            np.diff(boundaries) < 0):
        raise _corrupt(prefix, f"{prefix}.idx document boundaries do not cover its sequences")
    expected = int(lengths.sum()) * index.dtype_size
    if os.path.getsize(f"{prefix}.bin") != expected:
        raise _corrupt(prefix, f"{prefix}.bin has {os.path.getsize(f'{prefix}.bin')} bytes, the "
                               f"index implies {expected}")


def _max_token_id(prefix: str, dtype: np.dtype) -> int:
    tokens = np.memmap(f"{prefix}.bin", dtype=dtype, mode="r")
    chunks = range(0, len(tokens), _SCAN_TOKENS)
    return max((int(tokens[i:i + _SCAN_TOKENS].max()) for i in chunks), default=-1)


def _check_sidecar(prefix: str, documents: int) -> None:
    ids_path, names_path = sidecar_paths(prefix)
    if not (ids_path.exists() or names_path.exists()):
        return
    try:
        sidecar = DomainSidecar.load(prefix)
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"dataset {prefix!r}: unreadable domain sidecar ({err!r}). Recreate it "
                        f"with:\n  {preprocess_command(prefix)}") from err
    if len(sidecar.ids) != documents or (len(sidecar.ids) and (
            sidecar.ids.min() < 0 or sidecar.ids.max() >= len(sidecar.names))):
        raise DataError(f"dataset {prefix!r}: {ids_path} has {len(sidecar.ids)} domain ids for "
                        f"{documents} documents (or ids outside its {len(sidecar.names)} names); "
                        f"it belongs to other data. Recreate it with:\n"
                        f"  {preprocess_command(prefix)}")


def check_indexed_dataset(prefix: str, vocab_size: int | None = None,
                          scan_token_ids: bool = True) -> DatasetInfo:
    """Validate dataset ``prefix`` and return its document and token counts.

    Args:
        prefix: the path prefix of ``.bin``/``.idx``.
        vocab_size: the tokenizer's vocabulary size; every token id must be below it.
        scan_token_ids: read the whole ``.bin`` for the largest token id (needed for the vocab
            check; costs one sequential read of the data).

    Raises:
        DataError: missing files, corrupt or truncated files, a token id >= ``vocab_size``, or
            a domain sidecar that does not fit the documents.
    """
    from megatron.core.datasets.indexed_dataset import _IndexReader

    _require_files(prefix)
    _check_header(prefix)
    index = _IndexReader(f"{prefix}.idx", multimodal=False)
    _check_contents(prefix, index)
    dtype = index.dtype
    lengths = index.sequence_lengths.copy()  # the index's view dies with its mmap
    max_id = _max_token_id(prefix, dtype) if scan_token_ids else -1
    if vocab_size is not None and max_id >= vocab_size:
        raise DataError(
            f"dataset {prefix!r} contains token id {max_id} but the tokenizer's vocab size is "
            f"{vocab_size}: the data was tokenized with a different (larger) tokenizer. Use the "
            f"tokenizer model the data was preprocessed with, or re-tokenize:\n"
            f"  {preprocess_command(prefix)}")
    _check_sidecar(prefix, len(lengths))
    return DatasetInfo(prefix, len(lengths), int(lengths.sum()), max_id, lengths)
