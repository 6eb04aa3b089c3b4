"""Instruction data (megatron_patch.data.instructions): rendering and loss masks checked by hand,
bad records counted by reason, samples padded and masked."""

from __future__ import annotations

import json

import pytest
import torch

from megatron_patch.data.instructions import (
    InstructionDataset,
    build_instruction_datasets,
    preprocess_instructions,
    render,
)
from megatron_patch.data.tokenizer import load_tokenizer
from megatron_patch.data.validation import DataError
from megatron_patch.hf.tiny import save_tiny_tokenizer

TEXTS = [f"Question {i}: what is {i} + {i}? Answer: {2 * i}. Hello world, def f(x): return x."
         for i in range(200)]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """(with ChatML template, without template) transformers tokenizers and their directories."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tokenizers")
    save_tiny_tokenizer(root / "chat", TEXTS, vocab_size=320)
    save_tiny_tokenizer(root / "plain", TEXTS, vocab_size=320)
    plain = AutoTokenizer.from_pretrained(root / "plain")
    plain.chat_template = None
    plain.save_pretrained(root / "plain")
    (root / "plain" / "chat_template.jinja").unlink(missing_ok=True)
    return {name: (AutoTokenizer.from_pretrained(root / name), root / name)
            for name in ("chat", "plain")}


def _segments(ids, mask):
    """The runs of consecutive tokens with mask 1."""
    runs, current = [], []
    for token, keep in zip(ids, mask):
        if keep:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    return runs + ([current] if current else [])


def test_prompt_response_without_template_concatenates_with_eos(tokenizers):
    tokenizer, _ = tokenizers["plain"]
    assert tokenizer.chat_template is None
    ids, mask = render({"prompt": "what is 2 + 2?", "response": " 4"}, tokenizer)
    prompt = tokenizer.encode("what is 2 + 2?", add_special_tokens=False)
    response = tokenizer.encode(" 4", add_special_tokens=False) + [tokenizer.eos_token_id]
    assert ids == prompt + response
    assert mask == [0] * len(prompt) + [1] * len(response)
    with pytest.raises(ValueError, match="messages without a chat template"):
        render({"messages": [{"role": "assistant", "content": "x"}]}, tokenizer)


def test_chat_template_loss_covers_each_assistant_turn_and_its_end(tokenizers):
    tokenizer, _ = tokenizers["chat"]
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "what is 2 + 2?"},
                {"role": "assistant", "content": "Answer: 4."},
                {"role": "user", "content": "and 3 + 3?"},
                {"role": "assistant", "content": "Answer: 6."}]
    ids, mask = render({"messages": messages}, tokenizer)
    assert ids == tokenizer.apply_chat_template(messages)  # the whole conversation, rendered once
    # ChatML writes "<|im_start|>assistant\n{content}<|im_end|>\n": the loss covers the content
    # and its end of turn, not the header or the other roles' turns.
    assert [tokenizer.decode(run) for run in _segments(ids, mask)] == [
        "Answer: 4.<|im_end|>\n", "Answer: 6.<|im_end|>\n"]
    pair, pair_mask = render({"prompt": "what is 2 + 2?", "response": "Answer: 4."}, tokenizer)
    assert [tokenizer.decode(run) for run in _segments(pair, pair_mask)] == [
        "Answer: 4.<|im_end|>\n"]


def test_bad_records_are_counted_by_reason_and_never_dropped_silently(tokenizers, tmp_path):
    _, directory = tokenizers["chat"]
    long = "Hello world " * 200
    records = [
        {"prompt": "2 + 2?", "response": "4"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"}]},
        {"prompt": "no response"},
        {"prompt": "x", "response": "   "},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": "not a list"},
        {"prompt": "long", "response": long},
    ]
    source = tmp_path / "sft.jsonl"
    source.write_text("\n".join([json.dumps(r) for r in records] + ["{not json", "[1, 2]"]) + "\n")
    summary = preprocess_instructions(source, str(tmp_path / "sft"), str(directory), 64)
    assert summary.kept == 2
    assert dict(summary.bad) == {"no messages or prompt/response": 1, "empty response": 1,
                                 "no assistant message": 1, "malformed messages": 1,
                                 "longer than the sequence length": 1, "not JSON": 2}
    sidecar = json.loads((tmp_path / "sft.instruction.json").read_text())
    assert sidecar["conversations"] == 2 and sidecar["left_out"] == dict(summary.bad)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"prompt": "no response"}) + "\n")
    with pytest.raises(DataError, match="no usable record"):
        preprocess_instructions(empty, str(tmp_path / "empty"), str(directory), 64)
    assert not (tmp_path / "empty.bin").exists()


def test_samples_are_padded_and_masked_as_computed_by_hand(tokenizers, tmp_path):
    tokenizer, directory = tokenizers["chat"]
    record = {"prompt": "2 + 2?", "response": "4"}
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps(record) + "\n")
    preprocess_instructions(source, str(tmp_path / "one"), str(directory), 48)
    ids, mask = render(record, tokenizer)
    pad = load_tokenizer(directory).eod
    dataset = InstructionDataset(str(tmp_path / "one"), 48, range(1), 3, seed=0, pad_id=pad)
    sample = dataset[2]  # wraps around the one conversation
    n = len(ids) - 1
    assert sample["tokens"][:n].tolist() == ids[:-1] and sample["labels"][:n].tolist() == ids[1:]
    assert sample["loss_mask"].tolist() == mask[1:] + [0] * (48 - n)
    assert sample["padding_mask"].tolist() == [False] * n + [True] * (48 - n)
    assert torch.equal(sample["position_ids"], torch.arange(48))
    with pytest.raises(DataError, match="preprocessed for --seq-length 48"):
        InstructionDataset(str(tmp_path / "one"), 32, range(1), 1, seed=0, pad_id=pad)
    train, valid = build_instruction_datasets([str(tmp_path / "one")], "100,0,0", 48, 0, 4, 4,
                                              load_tokenizer(directory))
    assert len(train) == 4 and valid is None
    with pytest.raises(DataError, match="blends are not supported"):
        build_instruction_datasets(["1", str(tmp_path / "one"), "1", str(tmp_path / "one")],
                                   "100,0,0", 48, 0, 4, 4, load_tokenizer(directory))
