"""A downstream task suite a small MoE can learn on CPU, with checkable answers, in five
families that plausibly want different experts:

    arithmetic   two- and three-step word problems with small numbers    numeric match
    python       the value of a short Python expression (computed by running it)   exact match
    translation  a number 0-99 written out, from one corpus language into another  exact match
    strings      reverse / sort / upper-case letters, sort numbers, count a letter  exact match
    compare      the larger number or the alphabetically first word: two choices    log-likelihood

``write_task_suite`` generates every family's distinct prompts from one seed, splits them into
train / valid / test by a hash of the prompt (so a prompt is in one split only, whatever the
sizes), and writes ``train.jsonl`` / ``valid.jsonl`` (instruction records: ``prompt``,
``response``, ``task``, for ``tools/preprocess_instructions.py``) and ``test.jsonl`` (evaluation
items: ``prompt``, ``answer``, ``task``, ``choices`` for ``compare``, for ``tools/evaluate.py``),
plus ``suite.json`` (sizes, seed, the check that no test prompt is in train or valid).
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Callable, Iterator, Optional

from megatron_patch.data.number_words import LANGUAGES, number_word

FAMILIES = ("arithmetic", "python", "translation", "strings", "compare")
SPLITS = ("train", "valid", "test")
SUITE_FILE = "suite.json"

_NAMES = ("Ana", "Ben", "Carla", "David", "Emma", "Felix", "Greta", "Hugo", "Ines", "Jonas",
          "Kira", "Leo", "Mia", "Noah", "Olga", "Paul")
_THINGS = ("apples", "books", "coins", "pens", "stamps", "marbles", "cards", "shells")
_WORDS = ("river", "stone", "cloud", "apple", "tiger", "piano", "lemon", "house", "garden",
          "window", "paper", "silver", "candle", "forest", "orange", "rocket", "planet",
          "bridge", "flower", "winter", "summer", "island", "castle", "dragon", "music", "water",
          "light", "table", "chair", "bread", "green", "night", "storm", "ocean", "mountain",
          "pepper", "honey", "violin", "copper", "meadow")

# An item: (prompt, answer, choices or None).
Item = tuple[str, str, Optional[list[str]]]


def _arithmetic(rng: random.Random) -> Item:
    name, other = rng.sample(_NAMES, 2)
    thing = rng.choice(_THINGS)
    a, b, c = rng.randint(2, 20), rng.randint(1, 15), rng.randint(1, 9)
    kind = rng.randrange(4)
    if kind == 0:
        c = min(c, a + b)
        question = (f"{name} has {a} {thing}. {name} gets {b} more and gives {c} to {other}. "
                    f"How many {thing} does {name} have now?")
        return question, str(a + b - c), None
    if kind == 1:
        question = (f"{name} has {a} {thing} and {other} has {b}. {other} gives all of them to "
                    f"{name}. How many {thing} does {name} have now?")
        return question, str(a + b), None
    if kind == 2:
        bags, per = rng.randint(2, 6), rng.randint(2, 9)
        question = (f"{name} buys {bags} bags with {per} {thing} in each and already had {c}. "
                    f"How many {thing} does {name} have?")
        return question, str(bags * per + c), None
    total = rng.randint(2, 5) * rng.randint(2, 6)
    people = rng.choice([d for d in range(2, 7) if total % d == 0] or [1])
    question = (f"{name} shares {total} {thing} equally among {people} friends. How many "
                f"{thing} does each friend get?")
    return question, str(total // people), None


def _python_expression(rng: random.Random) -> str:
    word = rng.choice(_WORDS)
    numbers = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
    a, b = rng.randint(2, 30), rng.randint(2, 9)
    choices = (
        f"len({word!r}) + {b}",
        f"{word!r}.upper()",
        f"{word!r}[::-1]",
        f"{word!r}[{rng.randint(0, 3)}]",
        f"{word!r}[:{rng.randint(2, 4)}]",
        f"max({numbers})",
        f"min({numbers})",
        f"sum({numbers})",
        f"sorted({numbers})",
        f"{numbers}[{rng.randint(-2, 2)}]",
        f"{a} % {b}",
        f"{a} // {b}",
        f"{a} * {b} - {rng.randint(0, 9)}",
        f"len({numbers})",
        f"{word!r}.count({rng.choice(word)!r})",
    )
    return rng.choice(choices)


def _python(rng: random.Random) -> Item:
    expression = _python_expression(rng)
    value = eval(expression, {"__builtins__": {"len": len, "max": max, "min": min, "sum": sum,
                                               "sorted": sorted}})
    return (f"What does this Python expression evaluate to?\n{expression}", repr(value), None)


def _translation(rng: random.Random) -> Item:
    source, target = rng.sample(sorted(LANGUAGES), 2)
    n = rng.randint(0, 99)
    return (f"Write the {LANGUAGES[source]} number \"{number_word(n, source)}\" in "
            f"{LANGUAGES[target]}.", number_word(n, target), None)


def _strings(rng: random.Random) -> Item:
    word = rng.choice(_WORDS)
    kind = rng.randrange(5)
    if kind == 0:
        return f"Reverse the letters of \"{word}\".", word[::-1], None
    if kind == 1:
        return f"Sort the letters of \"{word}\" alphabetically.", "".join(sorted(word)), None
    if kind == 2:
        return f"Write \"{word}\" in capital letters.", word.upper(), None
    if kind == 3:
        letter = rng.choice(word)
        return f"How many times does the letter \"{letter}\" occur in \"{word}\"?", str(
            word.count(letter)), None
    numbers = [rng.randint(0, 99) for _ in range(rng.randint(3, 5))]
    listed = " ".join(map(str, numbers))
    return f"Sort these numbers from smallest to largest: {listed}", " ".join(
        map(str, sorted(numbers))), None


def _compare(rng: random.Random) -> Item:
    if rng.random() < 0.5:
        a, b = rng.sample(range(100), 2)
        return f"Which number is larger: {a} or {b}?", str(max(a, b)), [str(a), str(b)]
    first, second = rng.sample(_WORDS, 2)
    return (f"Which word comes first in alphabetical order: {first} or {second}?",
            min(first, second), [first, second])


GENERATORS: dict[str, Callable[[random.Random], Item]] = {
    "arithmetic": _arithmetic, "python": _python, "translation": _translation,
    "strings": _strings, "compare": _compare,
}


def _distinct(family: str, rng: random.Random, count: int) -> Iterator[Item]:
    """Up to ``count`` items of ``family`` with distinct prompts (fewer when the family has
    fewer: it stops after 50 draws in a row found nothing new)."""
    seen: set[str] = set()
    misses = 0
    while len(seen) < count and misses < 50:
        item = GENERATORS[family](rng)
        if item[0] in seen:
            misses += 1
            continue
        misses = 0
        seen.add(item[0])
        yield item


def split_of(prompt: str, valid_fraction: float, test_fraction: float) -> str:
    """The split of ``prompt``: a hash of its text, so the same prompt always lands in the same
    split (no test prompt can appear in training)."""
    digest = hashlib.sha256(prompt.encode()).digest()
    u = int.from_bytes(digest[:8], "little") / 2 ** 64
    return "test" if u < test_fraction else "valid" if u < test_fraction + valid_fraction \
        else "train"


def write_task_suite(output_dir: str | Path, *, train_per_task: int = 1600,
                     eval_per_task: int = 100, seed: int = 0,
                     families: tuple[str, ...] = FAMILIES) -> dict:
    """Generate the suite into ``output_dir`` (module docstring); returns ``suite.json``'s
    content: per family and split the item counts.

    ``eval_per_task`` items of each family go to valid and to test each (fewer when a family
    has fewer distinct prompts); the hash split draws prompts until every split is filled.
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown task families {unknown}; choose from {', '.join(FAMILIES)}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    wanted = {"train": train_per_task, "valid": eval_per_task, "test": eval_per_task}
    total = sum(wanted.values())
    fractions = (eval_per_task / total, eval_per_task / total)
    rows: dict[str, list[dict]] = {split: [] for split in SPLITS}
    counts: dict[str, dict[str, int]] = {}
    for number, family in enumerate(families):
        rng = random.Random(seed * 1000 + number)
        got = {split: 0 for split in SPLITS}
        for prompt, answer, choices in _distinct(family, rng, 20 * total):
            split = split_of(prompt, *fractions)
            if got[split] >= wanted[split]:
                if all(got[s] >= wanted[s] for s in SPLITS):
                    break
                continue
            got[split] += 1
            if split == "test":
                item = {"prompt": prompt, "answer": answer, "task": family}
                if choices is not None:
                    item["choices"] = choices
                rows[split].append(item)
            else:
                rows[split].append({"prompt": prompt, "response": answer, "task": family})
        counts[family] = got
    for split in SPLITS:
        random.Random(seed).shuffle(rows[split])
        with (output_dir / f"{split}.jsonl").open("w", encoding="utf-8") as out:
            for row in rows[split]:
                out.write(json.dumps(row, ensure_ascii=False) + "\n")
    test_prompts = {row["prompt"] for row in rows["test"]}
    seen_prompts = {row["prompt"] for split in ("train", "valid") for row in rows[split]}
    suite = {"seed": seed, "families": list(families), "counts": counts,
             "test_prompts_in_train_or_valid": len(test_prompts & seen_prompts)}
    (output_dir / SUITE_FILE).write_text(json.dumps(suite, indent=1) + "\n")
    return suite
