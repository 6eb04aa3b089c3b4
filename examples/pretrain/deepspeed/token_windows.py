"""Training samples from a megatron-core indexed dataset (``.bin``/``.idx``, e.g. ``make data``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def load_token_stream(prefix: str) -> np.ndarray:
    """All documents of ``prefix.bin/.idx`` concatenated, as one int64 array.

    Raises:
        FileNotFoundError: the dataset is missing, with how to build it.
    """
    missing = [str(Path(prefix + suffix)) for suffix in (".bin", ".idx") if not Path(prefix + suffix).is_file()]
    if missing:
        raise FileNotFoundError(
            f"dataset {prefix!r} not found ({', '.join(missing)} missing). Build the project's corpus "
            "with `make data` (writes data/corpus_train.bin/.idx), or pass --data-prefix to your own "
            "dataset made by tools/preprocess_data.py.")
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(prefix)
    return np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64)


class TokenWindows:
    """Random windows of ``seq_length + 1`` tokens, a different stream on every data-parallel rank."""

    def __init__(self, stream: np.ndarray, seq_length: int, seed: int, rank: int) -> None:
        if stream.size <= seq_length + 1:
            raise ValueError(f"dataset has {stream.size} tokens, fewer than seq_length + 1 = {seq_length + 1}")
        self.stream = stream
        self.seq_length = seq_length
        self.rng = np.random.default_rng([seed, rank])

    def batch(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens, labels), each [batch_size, seq_length] int64; labels are tokens shifted by one."""
        starts = self.rng.integers(0, self.stream.size - self.seq_length - 1, size=batch_size)
        windows = np.stack([self.stream[s:s + self.seq_length + 1] for s in starts])
        windows = torch.from_numpy(windows)
        return windows[:, :-1], windows[:, 1:]
