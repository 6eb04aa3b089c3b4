"""Sentencepiece tokenizer: training from a corpus jsonl, and loading (it, or a Hugging Face
tokenizer directory) through megatron-core.

The model is trained for exact round trips (identity normalization, whitespace kept, no dummy
prefix, byte fallback), so code indentation and newlines survive and
``detokenize(tokenize(text)) == text`` for any text. The end-of-document token is ``</s>``.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

from megatron_patch.data.jsonl import iter_jsonl

if TYPE_CHECKING:
    from megatron.core.tokenizers import MegatronTokenizerBase

MODEL_TYPES = ("bpe", "unigram")


def sample_lines(texts: Iterable[str], sample_size: int, seed: int) -> list[str]:
    """Non-blank lines of ``texts``: all of them, or a seeded uniform sample of ``sample_size``.

    Sentencepiece trains on lines (sentences); reservoir sampling keeps memory at
    ``sample_size`` lines whatever the corpus size.
    """
    rng = random.Random(seed)
    reservoir: list[str] = []
    seen = 0
    for text in texts:
        for line in text.splitlines():
            if not line.strip():
                continue
            seen += 1
            if sample_size <= 0 or len(reservoir) < sample_size:
                reservoir.append(line)
            else:
                slot = rng.randrange(seen)
                if slot < sample_size:
                    reservoir[slot] = line
    return reservoir


def _texts(path: Path, text_key: str) -> Iterator[str]:
    for record in iter_jsonl(path):
        text = record.get(text_key)
        if isinstance(text, str):
            yield text


def train_sentencepiece(
    input_path: Path,
    model_prefix: Path,
    vocab_size: int,
    model_type: str = "bpe",
    sample_size: int = 1_000_000,
    seed: int = 1234,
    text_key: str = "text",
) -> Path:
    """Train a sentencepiece model on the ``text_key`` field of a jsonl; return ``<prefix>.model``.

    Args:
        input_path: corpus jsonl.
        model_prefix: output prefix; writes ``<prefix>.model`` and ``<prefix>.vocab``.
        vocab_size: number of pieces, including the 256 byte-fallback pieces and 3 specials.
        model_type: ``"bpe"`` or ``"unigram"``.
        sample_size: lines sampled for training; 0 or less uses every line.
        seed: seed of the line sample.
        text_key: the jsonl field holding the text.

    Raises:
        FileNotFoundError: ``input_path`` does not exist.
        ValueError: bad arguments, no text in the input, or sentencepiece rejected the settings
            (e.g. a vocabulary larger than the text supports).
    """
    import sentencepiece as spm

    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    lines = sample_lines(_texts(input_path, text_key), sample_size, seed)
    if not lines:
        raise ValueError(f"{input_path} has no non-blank {text_key!r} text to train on")
    model_prefix.parent.mkdir(parents=True, exist_ok=True)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_prefix=str(model_prefix),
            vocab_size=vocab_size,
            model_type=model_type,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=0.9995,
            input_sentence_size=0,
            num_threads=os.cpu_count() or 1,
            minloglevel=1,
        )
    except RuntimeError as err:
        raise ValueError(f"sentencepiece training failed: {err}") from err
    return model_prefix.with_name(model_prefix.name + ".model")


def load_tokenizer(model_path: str | os.PathLike) -> MegatronTokenizerBase:
    """Load a sentencepiece model file, or a Hugging Face tokenizer directory (a post-trained
    model's own, e.g. the ``--hf-load`` checkpoint), as a megatron-core tokenizer
    (``vocab_size``, ``eod``, ``tokenize``, ``detokenize``), the type ``GPTDatasetConfig``
    expects.

    Raises:
        FileNotFoundError: no such model file, or a directory without a Hugging Face tokenizer.
    """
    from megatron.core.tokenizers import MegatronTokenizer

    path = Path(model_path)
    if path.is_dir():
        if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json")):
            raise FileNotFoundError(
                f"tokenizer directory {path} has no tokenizer.json or tokenizer_config.json; "
                "give the directory of a Hugging Face tokenizer (save_pretrained) or a "
                "sentencepiece .model file")
        return MegatronTokenizer.from_pretrained(
            str(path), metadata_path={"library": "huggingface"})
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer model not found: {model_path}; train one with "
            f"python tools/train_tokenizer.py --input <corpus.jsonl> --model-prefix <prefix>")
    return MegatronTokenizer.from_pretrained(
        str(model_path), metadata_path={"library": "sentencepiece"})
