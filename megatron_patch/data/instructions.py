"""Instruction data for post-training: jsonl records -> token ids with a loss mask on the
response tokens, one conversation per sample, padded to the sequence length.

Records (one JSON object per line):

    {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}
    {"prompt": "...", "response": "..."}

A tokenizer with a chat template renders both (a prompt/response pair as one user and one
assistant message); the loss covers every assistant message as the template writes it (its
content and end-of-turn tokens, not the role header), found by rendering the conversation up to
each assistant turn with and without that turn. Without a chat template, ``prompt`` + ``response``
+ EOS are concatenated (loss on the response and EOS); ``messages`` need a template.

Records that cannot be used are counted by reason and reported, never dropped silently:
``not JSON``, ``no messages or prompt/response``, ``malformed messages``, ``no assistant
message``, ``empty response``, ``longer than the sequence length``.

On disk (``preprocess_instructions``): the tokens as a megatron indexed dataset ``<prefix>``,
the loss mask as a second one ``<prefix>_loss_mask`` (same documents, uint8), and
``<prefix>.instruction.json`` (sequence length, counts); plus the tokenizer record of
``data.provenance``. ``InstructionDataset`` reads them for the trainer.
"""

from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from megatron_patch.data.provenance import tokenizer_fingerprint, write_provenance
from megatron_patch.data.validation import DataError

SIDECAR_SUFFIX = ".instruction.json"
MASK_SUFFIX = "_loss_mask"
ASSISTANT = "assistant"


class BadRecord(ValueError):
    """A record that cannot be used; ``str(error)`` is the reason it is counted under."""


@dataclasses.dataclass
class InstructionSummary:
    """What preprocessing wrote: conversations kept, tokens and loss (response) tokens, and the
    records left out, by reason."""

    kept: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    bad: Counter = dataclasses.field(default_factory=Counter)


def _messages(record: dict) -> Optional[list[dict]]:
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str)
                and isinstance(m.get("content"), str) for m in messages):
            raise BadRecord("malformed messages")
        if not any(m["role"] == ASSISTANT for m in messages):
            raise BadRecord("no assistant message")
        if any(m["role"] == ASSISTANT and not m["content"].strip() for m in messages):
            raise BadRecord("empty response")
        return messages
    if not (isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str)):
        raise BadRecord("no messages or prompt/response")
    if not record["response"].strip():
        raise BadRecord("empty response")
    return None


def render(record: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids and loss mask (1 on tokens the loss covers) of one record.

    Args:
        tokenizer: a transformers tokenizer (its chat template, if any, and EOS).

    Raises:
        BadRecord: the record cannot be used (see the module docstring).
    """
    messages = _messages(record)
    if tokenizer.chat_template is None:
        if messages is not None:
            raise BadRecord("messages without a chat template")
        prompt = tokenizer.encode(record["prompt"], add_special_tokens=False)
        response = tokenizer.encode(record["response"], add_special_tokens=False)
        response.append(tokenizer.eos_token_id)
        return prompt + response, [0] * len(prompt) + [1] * len(response)
    if messages is None:
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": ASSISTANT, "content": record["response"]}]
    ids: list[int] = []
    mask: list[int] = []
    for turn, message in enumerate(messages):
        if message["role"] != ASSISTANT:
            continue
        before = tokenizer.apply_chat_template(messages[:turn], add_generation_prompt=True)
        through = tokenizer.apply_chat_template(messages[:turn + 1])
        if through[:len(before)] != before or before[:len(ids)] != ids:
            raise BadRecord("chat template does not render turns as prefixes")
        mask += [0] * (len(before) - len(ids)) + [1] * (len(through) - len(before))
        ids = list(through)
    return ids, mask


def preprocess_instructions(input_path: Path, output_prefix: str, tokenizer_dir: str,
                            seq_length: int) -> InstructionSummary:
    """Render every record of ``input_path`` and write the kept conversations (at most
    ``seq_length`` + 1 tokens: a sample's inputs and its shifted labels) to ``output_prefix``.

    Raises:
        FileNotFoundError: no input file or tokenizer.
        DataError: no record could be used (the summary's reasons are in the message).
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    from megatron_patch.data.tokenizer import load_tokenizer

    load_tokenizer(tokenizer_dir)  # the trainer's view of it must load too
    if not input_path.is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    tokens = IndexedDatasetBuilder(f"{output_prefix}.bin",
                                   dtype=DType.optimal_dtype(len(tokenizer)))
    masks = IndexedDatasetBuilder(f"{output_prefix}{MASK_SUFFIX}.bin", dtype=np.uint8)
    summary = InstructionSummary()
    with input_path.open(encoding="utf-8") as lines:
        for line in lines:
            if not line.strip():
                continue
            try:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    raise BadRecord("not JSON") from None
                if not isinstance(record, dict):
                    raise BadRecord("not JSON")
                ids, mask = render(record, tokenizer)
                if len(ids) > seq_length + 1:
                    raise BadRecord("longer than the sequence length")
            except BadRecord as reason:
                summary.bad[str(reason)] += 1
                continue
            tokens.add_document(np.asarray(ids, dtype=np.int64), [len(ids)])
            masks.add_document(np.asarray(mask, dtype=np.uint8), [len(mask)])
            summary.kept += 1
            summary.tokens += len(ids)
            summary.loss_tokens += sum(mask)
    if summary.kept == 0:
        tokens.data_file.close()
        masks.data_file.close()
        for path in (f"{output_prefix}.bin", f"{output_prefix}{MASK_SUFFIX}.bin"):
            Path(path).unlink(missing_ok=True)
        raise DataError(f"{input_path}: no usable record; left out: {dict(summary.bad)}")
    tokens.finalize(f"{output_prefix}.idx")
    masks.finalize(f"{output_prefix}{MASK_SUFFIX}.idx")
    Path(output_prefix + SIDECAR_SUFFIX).write_text(json.dumps(
        {"seq_length": seq_length, "conversations": summary.kept, "tokens": summary.tokens,
         "loss_tokens": summary.loss_tokens, "left_out": dict(summary.bad)}, indent=1) + "\n")
    write_provenance(output_prefix, tokenizer_dir, tokenizer_fingerprint(tokenizer_dir))
    return summary


def is_instruction_dataset(prefix: str) -> bool:
    """Whether ``prefix`` was written by ``preprocess_instructions``."""
    return Path(prefix + SIDECAR_SUFFIX).is_file()


class InstructionDataset(Dataset):
    """Samples of an instruction dataset for the trainer: conversation ``order[i mod n]`` of
    its document range, padded to ``seq_length``.

    A sample: ``tokens``, ``labels`` (tokens shifted by one), ``loss_mask`` (1 where the label
    is a response token), ``position_ids`` and ``padding_mask`` (True past the conversation:
    left out of the LM loss, L_o, L_v and the routing statistics), each [seq_length].
    """

    def __init__(self, prefix: str, seq_length: int, documents: range, num_samples: int,
                 seed: int, pad_id: int) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDataset

        written = json.loads(Path(prefix + SIDECAR_SUFFIX).read_text())["seq_length"]
        if written > seq_length:
            raise DataError(
                f"{prefix} was preprocessed for --seq-length {written} (conversations up to "
                f"{written + 1} tokens); this run has --seq-length {seq_length}: preprocess it "
                "again with the run's sequence length, or raise --seq-length")
        if len(documents) == 0:
            raise DataError(f"{prefix}: no conversation in this split; give more data or "
                            "another --split")
        self.tokens = IndexedDataset(prefix, mmap=True)
        self.masks = IndexedDataset(prefix + MASK_SUFFIX, mmap=True)
        self.seq_length, self.num_samples, self.pad_id = seq_length, num_samples, pad_id
        generator = np.random.default_rng(seed)
        self.order = np.asarray(documents)[generator.permutation(len(documents))]

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        document = int(self.order[index % len(self.order)])
        ids = torch.from_numpy(self.tokens[document].astype(np.int64))
        mask = torch.from_numpy(self.masks[document].astype(np.float32))
        length, s = len(ids) - 1, self.seq_length
        tokens = torch.full((s,), self.pad_id, dtype=torch.long)
        labels = torch.full((s,), self.pad_id, dtype=torch.long)
        loss_mask = torch.zeros(s)
        tokens[:length], labels[:length], loss_mask[:length] = ids[:-1], ids[1:], mask[1:]
        padding = torch.arange(s) >= length
        return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask,
                "position_ids": torch.arange(s), "padding_mask": padding}


def _single_prefix(data_path: Sequence[str | float], flag: str) -> str:
    from megatron_patch.data.datasets import parse_data_path

    prefixes, weights = parse_data_path(data_path)
    if len(prefixes) != 1 or weights is not None:
        raise DataError(f"{flag} {list(data_path)}: instruction data is one dataset prefix "
                        "(blends are not supported); preprocess the records into one prefix")
    if not is_instruction_dataset(prefixes[0]):
        raise DataError(f"{flag} {prefixes[0]} is not instruction data (no "
                        f"{SIDECAR_SUFFIX}); write it with tools/preprocess_instructions.py")
    return prefixes[0]


def build_instruction_datasets(
    data_path: Sequence[str | float], split: str, seq_length: int, seed: int,
    train_samples: int, valid_samples: int, tokenizer: Any,
    valid_data_path: Optional[Sequence[str | float]] = None,
) -> tuple[InstructionDataset, Optional[InstructionDataset]]:
    """The train and valid ``InstructionDataset`` (the counterpart of
    ``datasets.build_train_valid_datasets``): ``data_path``'s conversations split into
    contiguous document ranges by megatron's ``split`` string ("98,2,0"; the test share is
    unused), or all of them with ``valid_data_path``'s for validation.

    Raises:
        DataError: not one instruction dataset prefix, corrupt files, token ids beyond the
            tokenizer, conversations longer than ``seq_length`` + 1, an empty split.
    """
    from megatron_patch.data.validation import check_indexed_dataset

    train_prefix = _single_prefix(data_path, "--data-path")
    valid_prefix = (_single_prefix(valid_data_path, "--valid-data-path")
                    if valid_data_path is not None else None)
    counts = {prefix: check_indexed_dataset(prefix, tokenizer.vocab_size).documents
              for prefix in filter(None, (train_prefix, valid_prefix))}
    for prefix in counts:
        check_indexed_dataset(prefix + MASK_SUFFIX)
    pad = tokenizer.eod
    if valid_prefix is not None:
        ranges = [range(counts[train_prefix]), range(counts[valid_prefix])]
    else:
        weights = [float(part) for part in split.replace("/", ",").split(",")]
        if len(weights) != 3 or sum(weights) <= 0 or min(weights) < 0:
            raise DataError(f"--split {split!r}: expected three non-negative proportions, "
                            "e.g. 98,2,0")
        bounds = np.cumsum([0.0] + weights) / sum(weights) * counts[train_prefix]
        ranges = [range(int(round(bounds[i])), int(round(bounds[i + 1]))) for i in range(2)]
    train = InstructionDataset(train_prefix, seq_length, ranges[0], train_samples, seed, pad)
    valid = None
    if len(ranges[1]) and valid_samples:
        valid = InstructionDataset(valid_prefix or train_prefix, seq_length, ranges[1],
                                   valid_samples, seed + 1, pad)
    return train, valid
