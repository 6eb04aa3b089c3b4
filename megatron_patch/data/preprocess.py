"""Corpus jsonl -> megatron-core indexed dataset (``.bin``/``.idx``) plus the domain sidecar.

Each jsonl record becomes one document: the tokenized ``text`` followed by the tokenizer's EOD
token, stored as a single sequence. Its ``domain`` label goes to ``<prefix>.domains.npy``
(see :mod:`megatron_patch.data.domains`); the domain name table lists every domain of the input
file in sorted order, so ids agree across datasets built from the same file (e.g. its train and
valid splits, or the per-domain datasets).
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from megatron_patch.data.domains import DomainSidecar
from megatron_patch.data.provenance import tokenizer_fingerprint, write_provenance
from megatron_patch.data.jsonl import iter_jsonl

UNLABELED = "unlabeled"
"""Domain of records without a domain field."""

_SAFE_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_worker: dict = {}


@dataclass
class PreprocessSummary:
    """What :func:`preprocess_jsonl` wrote."""

    prefixes: list[str]
    domain_names: tuple[str, ...]
    documents: dict[str, int] = field(default_factory=dict)
    tokens: dict[str, int] = field(default_factory=dict)
    skipped_empty: int = 0
    skipped_other_split: int = 0


class _PrefixWriter:
    """One indexed dataset being written, with the domain id of each document."""

    def __init__(self, prefix: str, dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        Path(prefix).parent.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix
        self.builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
        self.domain_ids: list[int] = []

    def add(self, tokens: np.ndarray, domain_id: int) -> None:
        """Append one document (its tokens, EOD included) of domain ``domain_id``."""
        self.builder.add_document(tokens, [len(tokens)])
        self.domain_ids.append(domain_id)

    def finalize(self, names: tuple[str, ...]) -> None:
        """Write the ``.idx`` and the domain sidecar."""
        self.builder.finalize(f"{self.prefix}.idx")
        DomainSidecar(np.asarray(self.domain_ids, dtype=np.int16), names).write(self.prefix)

    def abort(self) -> None:
        """Close and delete the partial ``.bin``."""
        self.builder.data_file.close()
        Path(f"{self.prefix}.bin").unlink(missing_ok=True)


def _init_worker(tokenizer_model: str, only_split: str | None, text_key: str,
                 domain_key: str) -> None:
    from megatron_patch.data.tokenizer import load_tokenizer

    _worker.update(tokenizer=load_tokenizer(tokenizer_model), only_split=only_split,
                   text_key=text_key, domain_key=domain_key)


def _encode(line: str) -> tuple[str, np.ndarray | None] | None:
    """Tokenize one jsonl line: ``(domain, tokens + EOD)``, ``(domain, None)`` for a missing or
    empty text, or ``None`` when the record belongs to another split."""
    record = json.loads(line)
    if _worker["only_split"] and record.get("split") != _worker["only_split"]:
        return None
    domain = str(record.get(_worker["domain_key"]) or UNLABELED)
    text = record.get(_worker["text_key"])
    if not isinstance(text, str) or not text.strip():
        return domain, None
    tokenizer = _worker["tokenizer"]
    return domain, np.asarray([*tokenizer.tokenize(text), tokenizer.eod], dtype=np.int32)


def _scan(path: Path, domain_key: str) -> tuple[int, tuple[str, ...]]:
    """Validate the jsonl; return its record count and sorted domain names."""
    count, names = 0, set()
    for record in iter_jsonl(path):
        count += 1
        names.add(str(record.get(domain_key) or UNLABELED))
    return count, tuple(sorted(names))


def _lines(path: Path) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        yield from (line for line in lines if line.strip())


def domain_prefix(output_prefix: str, domain: str) -> str:
    """The prefix of the per-domain dataset of ``domain`` (with ``split_by_domain``)."""
    return f"{output_prefix}.{domain}"


def preprocess_jsonl(
    input_path: Path,
    output_prefix: str,
    tokenizer_model: str,
    workers: int = 1,
    split_by_domain: bool = False,
    only_split: str | None = None,
    text_key: str = "text",
    domain_key: str = "domain",
    progress: Callable[[Iterable, int], Iterable] = lambda items, total: items,
) -> PreprocessSummary:
    """Tokenize ``input_path`` into ``<output_prefix>.bin/.idx``, its domain sidecar and the
    record of its tokenizer (``data.provenance``).

    Args:
        input_path: corpus jsonl with ``text_key`` and (optionally) ``domain_key`` fields.
        output_prefix: path prefix of the combined dataset.
        tokenizer_model: sentencepiece ``.model`` file or Hugging Face tokenizer directory.
        workers: tokenizer processes; 1 tokenizes in this process.
        split_by_domain: also write one dataset per domain at :func:`domain_prefix`.
        only_split: keep only records whose ``split`` field equals this (``"train"``/``"valid"``).
        text_key: the jsonl field holding the text.
        domain_key: the jsonl field holding the domain label.
        progress: wraps the stream of encoded records (e.g. a tqdm bar of ``total`` records).

    Raises:
        FileNotFoundError: the input or the tokenizer model does not exist.
        ValueError: a malformed jsonl line, or no document left to write.
    """
    from megatron.core.datasets.indexed_dataset import DType

    from megatron_patch.data.tokenizer import load_tokenizer

    total, names = _scan(input_path, domain_key)
    if split_by_domain:
        unsafe = [n for n in names if not _SAFE_NAME.fullmatch(n)]
        if unsafe:
            raise ValueError(f"domain names {unsafe} cannot be file name parts; "
                             "use letters, digits, '_', '-' and '.' for --split-by-domain")
    tokenizer = load_tokenizer(tokenizer_model)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    ids = {name: i for i, name in enumerate(names)}
    initargs = (str(tokenizer_model), only_split, text_key, domain_key)

    writers = {None: _PrefixWriter(output_prefix, dtype)}
    if split_by_domain:
        writers.update({n: _PrefixWriter(domain_prefix(output_prefix, n), dtype) for n in names})
    summary = PreprocessSummary([], names)
    try:
        _write(input_path, writers, ids, workers, initargs, progress, total, summary)
        if not summary.documents:
            raise ValueError(f"no document to write from {input_path}"
                             + (f" with split == {only_split!r}" if only_split else ""))
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    fingerprint = tokenizer_fingerprint(tokenizer_model)
    for writer in writers.values():
        if writer.domain_ids:
            writer.finalize(names)
            write_provenance(writer.prefix, tokenizer_model, fingerprint)
            summary.prefixes.append(writer.prefix)
        else:
            writer.abort()
    return summary


def _write(input_path: Path, writers: dict[str | None, _PrefixWriter], ids: dict[str, int],
           workers: int, initargs: tuple, progress: Callable[[Iterable, int], Iterable],
           total: int, summary: PreprocessSummary) -> None:
    """Encode every line (in ``workers`` processes) and add each document to its writers."""
    with ExitStack() as stack:
        if workers > 1:
            pool = stack.enter_context(Pool(workers, _init_worker, initargs))
            encoded = pool.imap(_encode, _lines(input_path), chunksize=32)
        else:
            _init_worker(*initargs)
            encoded = map(_encode, _lines(input_path))
        for result in progress(encoded, total):
            if result is None:
                summary.skipped_other_split += 1
                continue
            domain, tokens = result
            if tokens is None:
                summary.skipped_empty += 1
                continue
            writers[None].add(tokens, ids[domain])
            if domain in writers:
                writers[domain].add(tokens, ids[domain])
            summary.documents[domain] = summary.documents.get(domain, 0) + 1
            summary.tokens[domain] = summary.tokens.get(domain, 0) + len(tokens)
