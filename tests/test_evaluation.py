"""Downstream evaluation (megatron_patch.evaluation, tools/evaluate.py): scores against
hand-computed ones, the transformers model side against step-by-step references, HumanEval's
execution, the same numbers in one process and under data parallelism, bad task files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from megatron_patch.evaluation import EvalItem, TaskFileError, evaluate, load_items, task_scores
from megatron_patch.evaluation.items import CHOICE, EXACT, NUMERIC
from megatron_patch.evaluation.scoring import chosen, first_number, generation_correct
from training_helpers import REPO, clean_env

ITEMS = [
    {"prompt": "2 + 3 =", "answer": "5", "task": "arith"},
    {"prompt": "7 - 4 =", "answer": "3", "task": "arith"},
    {"prompt": "10 / 4 =", "answer": "2.5", "task": "arith"},
    {"prompt": "Reverse: abc", "answer": "cba", "task": "strings"},
    {"prompt": "Upper: dog", "answer": "DOG", "task": "strings"},
    {"prompt": "Larger: 3 or 8?", "answer": "8", "choices": ["3", "8"], "task": "compare"},
    {"prompt": "Smaller: 3 or 8?", "answer": "3", "choices": ["3", "8", "5"], "task": "compare"},
]


def _task_file(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


class ScriptedModel:
    """A LanguageModel whose answers and log-likelihoods are given: ``answers`` maps a prompt
    to its generation, ``logliks`` a (prompt, continuation) to (log-likelihood, tokens)."""

    def __init__(self, answers, logliks):
        self.answers, self.logliks, self.calls = answers, logliks, 0

    def generate(self, items, max_new_tokens):
        self.calls += 1
        return [self.answers[item.prompt] for item in items]

    def loglikelihoods(self, items, continuations):
        self.calls += 1
        return [self.logliks[item.prompt, text] for item, text in zip(items, continuations)]


def _oracle(items, right: bool) -> ScriptedModel:
    """Every answer right (the reference; its choice most likely) or every answer wrong."""
    answers = {item.prompt: (item.answer if right else "none") for item in items}
    logliks = {}
    for item in items:
        for choice in item.choices or (item.answer,):
            good = (choice == item.answer) == right
            logliks[item.prompt, choice] = (-1.0 if good else -9.0, 2)
    return ScriptedModel(answers, logliks)


def test_metrics_follow_the_answer_and_choices(tmp_path):
    items = load_items(_task_file(tmp_path / "mixed.jsonl", ITEMS + [
        {"prompt": "p", "answer": "42", "metric": "exact"}]))
    assert [item.metric for item in items] == [NUMERIC] * 3 + [EXACT] * 2 + [CHOICE] * 2 + [EXACT]
    assert items[-1].task == "mixed"  # the file's name when the record names none
    assert first_number("The answer is -12.5 apples, not 3") == -12.5
    assert generation_correct(items[0], " 5 apples") and not generation_correct(items[0], "15")
    assert generation_correct(items[2], "2.50") and not generation_correct(items[2], "none")
    assert generation_correct(items[3], "  cba \n") and not generation_correct(items[4], "dog")
    assert chosen(items[6], [-2.0, -1.0, -1.0]) == "8"  # the first of equals


def test_scores_of_right_wrong_and_mixed_models_are_the_hand_computed_ones(tmp_path):
    items = load_items(_task_file(tmp_path / "t.jsonl", ITEMS))
    right = task_scores(evaluate(_oracle(items, True), items, batch_size=3, progress=False))
    assert {task: s["accuracy"] for task, s in right.items()} == {
        "arith": 1.0, "compare": 1.0, "strings": 1.0}
    # answer loss: -log-likelihood -1.0 over 2 tokens per item -> 0.5 nats per token
    assert all(s["answer_loss"] == pytest.approx(0.5) for s in right.values())
    wrong = task_scores(evaluate(_oracle(items, False), items, batch_size=3, progress=False))
    assert {task: s["correct"] for task, s in wrong.items()} == {
        "arith": 0, "compare": 0, "strings": 0}
    assert all(s["answer_loss"] == pytest.approx(4.5) for s in wrong.values())

    # Mixed, computed by hand: arith 2 of 3 ("3 apples" has the number 3; "2" is not 2.5),
    # strings 1 of 2 (case matters), compare 1 of 2; answer loss of arith (1 + 3 + 5) / 6.
    answers = {"2 + 3 =": "5", "7 - 4 =": "3 apples", "10 / 4 =": "2", "Reverse: abc": "cba",
               "Upper: dog": "Dog"}
    logliks = {("2 + 3 =", "5"): (-1.0, 2), ("7 - 4 =", "3"): (-3.0, 2),
               ("10 / 4 =", "2.5"): (-5.0, 2), ("Reverse: abc", "cba"): (-2.0, 1),
               ("Upper: dog", "DOG"): (-2.0, 3),
               ("Larger: 3 or 8?", "3"): (-4.0, 1), ("Larger: 3 or 8?", "8"): (-1.0, 1),
               ("Smaller: 3 or 8?", "3"): (-3.0, 1), ("Smaller: 3 or 8?", "8"): (-1.0, 1),
               ("Smaller: 3 or 8?", "5"): (-2.0, 1)}
    mixed = task_scores(evaluate(ScriptedModel(answers, logliks), items, batch_size=2,
                                 progress=False))
    assert {t: (s["correct"], s["items"]) for t, s in mixed.items()} == {
        "arith": (2, 3), "compare": (1, 2), "strings": (1, 2)}
    assert mixed["arith"]["answer_loss"] == pytest.approx(9 / 6)
    assert mixed["compare"]["answer_loss"] == pytest.approx(4 / 2)  # the answers' choices
    assert mixed["strings"]["answer_loss"] == pytest.approx(4 / 4)


@pytest.mark.parametrize("line, message", [
    ("{not json", "t.jsonl:2: not JSON"),
    (json.dumps({"prompt": "p"}), "no string 'answer'"),
    (json.dumps({"prompt": "p", "answer": "c", "choices": ["a", "b"]}), "not one of its choices"),
    (json.dumps({"prompt": "p", "answer": "x", "metric": "numeric"}), "is not a number"),
    (json.dumps({"prompt": "p", "answer": "x", "metric": "bleu"}), "metric 'bleu'"),
])
def test_bad_task_files_name_the_line_and_the_fix(tmp_path, line, message):
    path = tmp_path / "t.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    with pytest.raises(TaskFileError, match=message):
        load_items(path)
    with pytest.raises(TaskFileError, match="not found"):
        load_items(tmp_path / "missing.jsonl")


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    from megatron_patch.evaluation.humaneval import humaneval_items, passes, truncate

    items = humaneval_items(3)
    assert [item.extra["task_id"] for item in items] == [f"HumanEval/{i}" for i in range(3)]
    right = ScriptedModel({item.prompt: item.answer + "\ndef unrelated():\n    raise" for item
                           in items}, {})
    wrong = ScriptedModel({item.prompt: "    return None\n" for item in items}, {})
    for model, expected in ((right, 1.0), (wrong, 0.0)):
        results = evaluate(model, items, batch_size=2, execution_check=passes, progress=False)
        assert task_scores(results)["humaneval"]["accuracy"] == expected
    assert truncate("    return 1\n\nprint(2)") == "    return 1\n"


@pytest.fixture(scope="module")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Qwen3-MoE with a byte-level BPE tokenizer and the ChatML template, and a
    task file for it."""
    from megatron_patch.hf.tiny import save_tiny_model, save_tiny_tokenizer

    root = tmp_path_factory.mktemp("tiny_eval")
    texts = [f"{a} plus {b} is {a + b}. Reverse abc is cba." for a in range(30) for b in range(5)]
    vocab = save_tiny_tokenizer(root / "model", texts, vocab_size=320)
    save_tiny_model("qwen3_moe", root / "model", vocab_size=vocab)
    tasks = _task_file(root / "tasks.jsonl", ITEMS)
    return SimpleNamespace(path=root / "model", tasks=tasks)


def test_hf_model_matches_step_by_step_references(tiny_chat_model):
    """Log-likelihoods (right-padded batch) equal one unpadded forward per pair; greedy
    generation (KV cache, left-padded batch of one) equals argmax decoding without a cache up to
    the end-of-turn token; prompts and answers are rendered as the training data renders
    them."""
    from transformers import AutoModelForCausalLM

    from megatron_patch.evaluation.models import HFModel

    model = HFModel(str(tiny_chat_model.path))
    items = load_items(tiny_chat_model.tasks)
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_chat_model.path),
                                                     dtype=torch.float32).eval()
    got = model.loglikelihoods(items[:4], ["5", "3 apples", "2.5", "cba"])
    for item, text, (value, tokens) in zip(items, ["5", "3 apples", "2.5", "cba"], got):
        prompt, answer = model.prompt_ids(item), model.continuation_ids(item, text)
        with torch.no_grad():
            logits = reference(input_ids=torch.tensor([prompt + answer])).logits[0].double()
        logprobs = torch.log_softmax(logits, dim=-1)
        expected = sum(logprobs[len(prompt) - 1 + j, t].item() for j, t in enumerate(answer))
        assert tokens == len(answer) and value == pytest.approx(expected, abs=1e-4)
    # The ChatML answer ends with <|im_end|>: the template's end-of-turn token stops generation.
    end_of_turn = model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert model.continuation_ids(items[0], "5")[-2] == end_of_turn
    assert end_of_turn in model.stop_ids(items[0])

    item = items[3]
    ids = model.prompt_ids(item)
    stops = set(model.stop_ids(item))
    generated = []
    with torch.no_grad():
        for _ in range(12):
            token = int(reference(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if token in stops:
                break
            generated.append(token)
            ids.append(token)
    assert generated  # a random model that stops at once would make this comparison vacuous
    expected = model.tokenizer.decode(generated, skip_special_tokens=True)
    assert model.generate([item], max_new_tokens=12) == [expected]


def _evaluate_tool(model_dir, tasks, out, nproc: int = 1, *extra):
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(nproc)] if nproc > 1 else [sys.executable])
    return subprocess.run([*launcher, "tools/evaluate.py", "--hf", str(model_dir), "--tasks",
                           str(tasks), "--output-dir", str(out), "--batch-size", "3",
                           "--max-new-tokens", "6", "--no-progress-bar", *extra],
                          cwd=REPO, env=clean_env(), capture_output=True, text=True, timeout=300)


def test_tool_gives_the_same_numbers_in_one_process_and_under_data_parallelism(
        tiny_chat_model, tmp_path):
    one = _evaluate_tool(tiny_chat_model.path, tiny_chat_model.tasks, tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    assert "| arith | numeric | 3 |" in one.stdout
    two = _evaluate_tool(tiny_chat_model.path, tiny_chat_model.tasks, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-3000:]
    reports = [json.loads((tmp_path / d / "evaluation.json").read_text()) for d in ("one", "two")]
    assert reports[0]["items"] == reports[1]["items"]  # predictions and losses, exactly
    assert reports[0]["tasks"] == reports[1]["tasks"]
    assert (tmp_path / "one" / "evaluation.md").read_text().startswith("# Evaluation of")

    bad = _task_file(tmp_path / "bad.jsonl", [{"prompt": "only a prompt"}])
    refused = _evaluate_tool(tiny_chat_model.path, bad, tmp_path / "bad")
    assert refused.returncode == 2 and "bad.jsonl:1: no string 'answer'" in refused.stderr
    nowhere = _evaluate_tool(tmp_path / "nowhere", tiny_chat_model.tasks, tmp_path / "x")
    assert nowhere.returncode == 2 and "no config.json" in nowhere.stderr
