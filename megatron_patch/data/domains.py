"""The domain sidecar of an indexed dataset: one domain id per document, plus the name table.

For a dataset prefix ``P`` (``P.bin``/``P.idx``), ``P.domains.npy`` holds the domain id of each
document (``int16``, in document order) and ``P.domains.json`` the name of each id. Since every
document is one sequence of the indexed dataset, a ``GPTDataset``'s document index, which holds
sequence ids, maps samples and token positions to domains.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np

if TYPE_CHECKING:
    from megatron.core.datasets.gpt_dataset import GPTDataset

NO_DOMAIN = -1
"""Domain id of padding positions in :func:`sample_token_domains`."""


def sidecar_paths(prefix: str | Path) -> tuple[Path, Path]:
    """``(ids .npy, names .json)`` paths of the sidecar of dataset ``prefix``."""
    return Path(f"{prefix}.domains.npy"), Path(f"{prefix}.domains.json")


@dataclass(frozen=True)
class DomainSidecar:
    """Per-document domain ids of one indexed dataset and the table of their names."""

    ids: np.ndarray
    names: tuple[str, ...]

    def write(self, prefix: str | Path) -> None:
        """Write ``<prefix>.domains.npy`` and ``<prefix>.domains.json``."""
        ids_path, names_path = sidecar_paths(prefix)
        np.save(ids_path, self.ids.astype(np.int16), allow_pickle=False)
        counts = Counter(self.ids.tolist())
        names_path.write_text(json.dumps({
            "names": list(self.names),
            "documents_per_domain": {n: counts.get(i, 0) for i, n in enumerate(self.names)},
        }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, prefix: str | Path) -> "DomainSidecar":
        """Read the sidecar of dataset ``prefix``.

        Raises:
            FileNotFoundError: a sidecar file is missing.
        """
        ids_path, names_path = sidecar_paths(prefix)
        ids = np.load(ids_path, allow_pickle=False)
        names = json.loads(names_path.read_text(encoding="utf-8"))["names"]
        return cls(ids, tuple(names))


def sample_token_domains(dataset: GPTDataset, index: int,
                         document_domains: Sequence[int]) -> np.ndarray:
    """The domain id of each input token of sample ``index`` of a megatron-core ``GPTDataset``.

    Mirrors ``GPTDataset._query_document_sample_shuffle_indices``: a sample covers
    ``sequence_length + add_extra_token_to_sequence`` tokens drawn from consecutive entries of
    the document index; the input tokens are the first ``sequence_length`` of them. Padding
    positions get :data:`NO_DOMAIN`.

    Args:
        dataset: a built ``GPTDataset`` (not a ``BlendedDataset``: use its ``dataset_index`` and
            ``dataset_sample_index`` to reach the ``GPTDataset`` of a blended sample).
        index: the sample index, as passed to ``dataset[index]``.
        document_domains: domain id per document of ``dataset.dataset`` (``DomainSidecar.ids``).
    """
    config = dataset.config
    extra = int(config.add_extra_token_to_sequence)
    sample = dataset.shuffle_index[index]
    doc_beg, offset_beg = dataset.sample_index[sample]
    doc_end, offset_end = dataset.sample_index[sample + 1]
    lengths = dataset.dataset.sequence_lengths
    domains, counts = [], []
    for position in range(doc_beg, doc_end + 1):
        document = dataset.document_index[position]
        offset = offset_beg if position == doc_beg else 0
        if position == doc_end:
            count = offset_end + extra - offset
        else:
            count = lengths[document] - offset
        domains.append(document_domains[document])
        counts.append(count)
    per_token = np.repeat(np.asarray(domains, dtype=np.int64), counts)
    total = config.sequence_length + extra
    per_token = np.pad(per_token, (0, total - len(per_token)), constant_values=NO_DOMAIN)
    return per_token[: config.sequence_length]
