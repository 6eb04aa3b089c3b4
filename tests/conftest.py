"""Shared fixtures; also puts the repository root on sys.path so tests run from a plain checkout.

Without a GPU, Triton kernels run under Triton's interpreter (set before triton is imported).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def single_process_megatron():
    """One gloo process with megatron-core's parallel state initialised (all sizes 1)."""
    from megatron.core import parallel_state

    from megatron_patch.distributed import Layout, init_model_parallel, init_world

    init_world("gloo", rank=0, world_size=1)
    init_model_parallel(Layout(), seed=1234)
    yield
    parallel_state.destroy_model_parallel()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A small real-text dataset: stdlib code and docs -> tokenizer -> train/valid .bin/.idx."""
    from types import SimpleNamespace

    from megatron_patch.data.corpus import build_corpus
    from megatron_patch.data.preprocess import preprocess_jsonl
    from megatron_patch.data.tokenizer import train_sentencepiece

    root = tmp_path_factory.mktemp("tiny_data")
    corpus = root / "corpus.jsonl"
    build_corpus(corpus, root / "cache", ("python_code", "python_docs"), max_mb_per_domain=0.15,
                 valid_fraction=0.2, seed=3)
    model = train_sentencepiece(corpus, root / "tok", vocab_size=512, sample_size=20000)
    for split in ("train", "valid"):
        preprocess_jsonl(corpus, str(root / split), str(model), workers=1, only_split=split)
    return SimpleNamespace(root=root, tokenizer=str(model), train=str(root / "train"),
                           valid=str(root / "valid"))
