"""The downstream task suite (megatron_patch.data.tasks): number words by hand, answers
re-derived independently from the prompts, no test prompt in train or valid, reproducible."""

from __future__ import annotations

import json
import re

import pytest

from megatron_patch.data.number_words import LANGUAGES, number_word
from megatron_patch.data.tasks import FAMILIES, split_of, write_task_suite


@pytest.mark.parametrize("n, words", [
    (1, ("one", "eins", "un", "uno")),
    (16, ("sixteen", "sechzehn", "seize", "dieciséis")),
    (21, ("twenty-one", "einundzwanzig", "vingt et un", "veintiuno")),
    (30, ("thirty", "dreißig", "trente", "treinta")),
    (71, ("seventy-one", "einundsiebzig", "soixante et onze", "setenta y uno")),
    (80, ("eighty", "achtzig", "quatre-vingts", "ochenta")),
    (97, ("ninety-seven", "siebenundneunzig", "quatre-vingt-dix-sept", "noventa y siete")),
])
def test_number_words(n, words):
    assert tuple(number_word(n, language) for language in ("en", "de", "fr", "es")) == words


def test_number_words_are_distinct_per_language():
    for language in LANGUAGES:
        assert len({number_word(n, language) for n in range(100)}) == 100


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _answer(task: str, prompt: str, choices) -> str:
    """The answer re-derived from the prompt text alone (independently of the generators)."""
    if task == "python":
        return repr(eval(prompt.split("\n", 1)[1]))
    if task == "translation":
        word, target = re.fullmatch(r'Write the \w+ number "(.+)" in (\w+)\.', prompt).groups()
        source = prompt.split()[2]
        codes = {name: code for code, name in LANGUAGES.items()}
        n = [number_word(i, codes[source]) for i in range(100)].index(word)
        return number_word(n, codes[target])
    if task == "compare":
        options = re.search(r": (\S+) or (\S+)\?$", prompt).groups()
        assert choices is None or list(options) == choices
        return max(options, key=int) if "larger" in prompt else min(options)
    if task == "strings":
        quoted = re.findall(r'"(\w+)"', prompt)
        word = quoted[-1] if quoted else ""
        if prompt.startswith("Reverse"):
            return word[::-1]
        if prompt.startswith("Sort the letters"):
            return "".join(sorted(word))
        if prompt.startswith("Write"):
            return word.upper()
        if prompt.startswith("How many"):
            letter = re.search(r'letter "(\w)"', prompt).group(1)
            return str(word.count(letter))
        return " ".join(map(str, sorted(map(int, prompt.split(": ")[1].split()))))
    numbers = list(map(int, re.findall(r"\d+", prompt)))
    if "gets" in prompt:
        return str(numbers[0] + numbers[1] - numbers[2])
    if "gives all" in prompt:
        return str(numbers[0] + numbers[1])
    if "bags" in prompt:
        return str(numbers[0] * numbers[1] + numbers[2])
    return str(numbers[0] // numbers[1])


def test_suite_answers_splits_and_reproducibility(tmp_path):
    suite = write_task_suite(tmp_path / "a", train_per_task=200, eval_per_task=30, seed=7)
    assert suite["test_prompts_in_train_or_valid"] == 0
    rows = {split: _rows(tmp_path / "a" / f"{split}.jsonl") for split in ("train", "valid", "test")}
    prompts = {split: [row["prompt"] for row in r] for split, r in rows.items()}
    assert not set(prompts["test"]) & (set(prompts["train"]) | set(prompts["valid"]))
    assert not set(prompts["valid"]) & set(prompts["train"])
    for split, split_rows in rows.items():
        assert {row["task"] for row in split_rows} == set(FAMILIES)
        for row in split_rows:
            answer = row.get("answer", row.get("response"))
            assert _answer(row["task"], row["prompt"], row.get("choices")) == answer, row
            assert split_of(row["prompt"], 30 / 260, 30 / 260) == split
    assert {r["task"] for r in rows["test"] if "choices" in r} == {"compare"}
    assert all(suite["counts"][f]["test"] == 30 for f in FAMILIES if f != "translation")
    again = write_task_suite(tmp_path / "b", train_per_task=200, eval_per_task=30, seed=7)
    assert again == suite
    assert (tmp_path / "a" / "test.jsonl").read_text() == (tmp_path / "b" / "test.jsonl").read_text()
    other = write_task_suite(tmp_path / "c", train_per_task=200, eval_per_task=30, seed=8)
    assert _rows(tmp_path / "c" / "train.jsonl") != rows["train"] and other["counts"]
