"""Corpus records and their jsonl serialization (one JSON object per line, UTF-8)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator


@dataclass(frozen=True)
class Document:
    """One corpus document.

    Attributes:
        text: the document text.
        domain: the domain label (e.g. ``"python_code"``).
        source: a stable identifier of where the text came from, unique within the corpus.
        split: ``"train"`` or ``"valid"``; empty until the corpus assigns it.
    """

    text: str
    domain: str
    source: str
    split: str = ""


def write_jsonl(path: Path, documents: Iterable[Document]) -> int:
    """Write ``documents`` to ``path`` atomically (temp file + rename); return the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    count = 0
    with tmp.open("w", encoding="utf-8") as out:
        for doc in documents:
            out.write(json.dumps(asdict(doc), ensure_ascii=False) + "\n")
            count += 1
    tmp.replace(path)
    return count


def iter_jsonl(path: Path) -> Iterator[dict]:
    """Yield the JSON object of every non-blank line of ``path``.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: a line is not a JSON object; the message names the file and line.
    """
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{number}: expected a JSON object, "
                                 f"got {type(record).__name__}")
            yield record
