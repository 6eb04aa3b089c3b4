"""Which tokenizer a dataset was made with: a fingerprint written beside the data
(``<prefix>.tokenizer.json``) by preprocessing and checked before training, so that data made with
another tokenizer of the same vocabulary size is refused instead of training silently (token ids
would all be in range, and all wrong). Checkpoints carry the fingerprint in their signature.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

from megatron_patch.data.validation import DataError, preprocess_command

SUFFIX = ".tokenizer.json"


def file_sha256(path: Path) -> str:
    """sha256 of the file at ``path`` (hex), read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The files of a Hugging Face tokenizer directory that define its token ids.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model",
                      "vocab.txt", "chat_template.jinja")


def tokenizer_fingerprint(model_path: str) -> str:
    """sha256 of the tokenizer model file, or of a Hugging Face tokenizer directory's
    ``HF_TOKENIZER_FILES`` (names and contents) (hex, first 16 digits)."""
    path = Path(model_path)
    if not path.is_dir():
        return file_sha256(path)[:16]
    digest = hashlib.sha256()
    for name in HF_TOKENIZER_FILES:
        if (path / name).is_file():
            digest.update(f"{name}:{file_sha256(path / name)}\n".encode())
    return digest.hexdigest()[:16]


def write_provenance(prefix: str, model_path: str, fingerprint: Optional[str] = None) -> None:
    """Record beside dataset ``prefix`` the tokenizer ``model_path`` it was made with (whose
    ``tokenizer_fingerprint`` is ``fingerprint``, computed when not given)."""
    record = {"tokenizer_model": str(Path(model_path).resolve()),
              "fingerprint": fingerprint or tokenizer_fingerprint(model_path)}
    Path(prefix + SUFFIX).write_text(json.dumps(record, indent=1) + "\n")


def check_provenance(prefixes: Iterable[str], model_path: str,
                     fingerprint: Optional[str] = None) -> list[str]:
    """Check that every dataset in ``prefixes`` was made with tokenizer ``model_path`` (whose
    ``tokenizer_fingerprint`` is ``fingerprint``, computed when not given).

    Returns:
        A warning per dataset without a record (made by another tool, or before records
        existed), which cannot be checked.

    Raises:
        DataError: a dataset made with another tokenizer, naming both.
    """
    fingerprint = fingerprint or tokenizer_fingerprint(model_path)
    unchecked = []
    for prefix in prefixes:
        record_path = Path(prefix + SUFFIX)
        if not record_path.is_file():
            unchecked.append(prefix)
            continue
        try:
            record = json.loads(record_path.read_text())
        except ValueError as error:
            raise DataError(f"{record_path} is not valid JSON ({error}); recreate the dataset:\n"
                            f"  {preprocess_command(prefix)}") from None
        if record.get("fingerprint") != fingerprint:
            raise DataError(
                f"dataset {prefix!r} was tokenized with {record.get('tokenizer_model')} "
                f"(fingerprint {record.get('fingerprint')}), but --tokenizer-model is "
                f"{model_path} (fingerprint {fingerprint}): the token ids would mean other "
                "words. Pass the tokenizer the data was made with, or re-tokenize:\n"
                f"  {preprocess_command(prefix)}")
    if not unchecked:
        return []
    return [f"no tokenizer record ({SUFFIX}) beside {', '.join(unchecked)}: cannot check that "
            f"it was tokenized with {model_path} (tools/preprocess_data.py writes the record)"]
