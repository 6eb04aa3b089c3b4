"""The model side of an evaluation: greedy generation and log-likelihoods of continuations.

``LanguageModel`` is what ``runner.evaluate`` needs; ``HFModel`` implements it with transformers
on a Hugging Face checkpoint (an exported one: ``tools/export_hf.py``), with the prompt rendered
exactly as ``megatron_patch.data.instructions`` renders training conversations:

    chat template:     user turn + generation prompt; the answer is the assistant turn's content
                       and its end-of-turn token (generation stops there)
    no chat template:  prompt, then answer + EOS (generation stops at EOS)
    raw items (code):  the prompt as text, the completion continues it (``EvalItem.chat`` False)

Generation is greedy with transformers' KV cache; prompts of a batch are left-padded. Shapes:
a batch of B prompts -> B strings; B (prompt, continuation) pairs -> B (sum of log-probabilities,
tokens) of the continuations.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch

from megatron_patch.evaluation.items import EvalItem


class LanguageModel(Protocol):
    """What an evaluation runs on."""

    def generate(self, items: Sequence[EvalItem], max_new_tokens: int) -> list[str]:
        """Greedy answers (text after the prompt, up to the stop token) of ``items``."""

    def loglikelihoods(self, items: Sequence[EvalItem],
                       continuations: Sequence[str]) -> list[tuple[float, int]]:
        """(sum of log-probabilities, number of tokens) of each continuation after its item's
        prompt."""


class HFModel:
    """A transformers causal LM and its tokenizer from one checkpoint directory (float32 on
    CPU, the model's dtype on GPU; eager attention: the same numbers in every process)."""

    def __init__(self, path: str, device: str | torch.device = "cpu") -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = path
        self.device = torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        dtype = torch.float32 if self.device.type == "cpu" else "auto"
        self.model = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager").to(self.device).eval()
        eos = self.tokenizer.eos_token_id
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else eos
        self.chat = self.tokenizer.chat_template is not None

    # --- token ids ------------------------------------------------------------------------

    def _user(self, item: EvalItem) -> list[dict]:
        return [{"role": "user", "content": item.prompt}]

    def prompt_ids(self, item: EvalItem) -> list[int]:
        """The prompt's token ids, as the model saw prompts in training."""
        if not item.chat:
            return self.tokenizer.encode(item.prompt)
        if self.chat:
            return list(self.tokenizer.apply_chat_template(self._user(item),
                                                           add_generation_prompt=True))
        return self.tokenizer.encode(item.prompt, add_special_tokens=False)

    def continuation_ids(self, item: EvalItem, text: str) -> list[int]:
        """Token ids of ``text`` as the answer to ``item`` (with the end-of-turn token or EOS
        that ends an answer in training)."""
        if not item.chat:
            return self.tokenizer.encode(text, add_special_tokens=False)
        if not self.chat:
            return self.tokenizer.encode(text, add_special_tokens=False) + [
                self.tokenizer.eos_token_id]
        prompt = self.prompt_ids(item)
        full = list(self.tokenizer.apply_chat_template(
            self._user(item) + [{"role": "assistant", "content": text}]))
        if full[:len(prompt)] != prompt:
            raise ValueError(f"{self.path}: the chat template does not render the prompt as a "
                             "prefix of the conversation")
        return full[len(prompt):]

    def stop_ids(self, item: EvalItem) -> list[int]:
        """Tokens that end an answer: EOS, and the chat template's end-of-turn token."""
        stops = [self.tokenizer.eos_token_id]
        if item.chat and self.chat:
            content = self.tokenizer.encode("0", add_special_tokens=False)
            answer = self.continuation_ids(item, "0")
            if answer[:len(content)] == content and len(answer) > len(content):
                stops.append(answer[len(content)])
        return sorted(set(stops))

    # --- LanguageModel --------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, items: Sequence[EvalItem], max_new_tokens: int) -> list[str]:
        prompts = [self.prompt_ids(item) for item in items]
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding
            ids[row, width - len(prompt):] = torch.tensor(prompt)
            mask[row, width - len(prompt):] = 1
        stops = sorted({stop for item in items for stop in self.stop_ids(item)})
        output = self.model.generate(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            eos_token_id=stops, pad_token_id=self.pad_id, top_p=None, top_k=None,
            temperature=None)
        answers = []
        for item, row in zip(items, output[:, width:].tolist()):
            item_stops = set(self.stop_ids(item))
            cut = next((i for i, token in enumerate(row) if token in item_stops), len(row))
            answers.append(self.tokenizer.decode(row[:cut], skip_special_tokens=True))
        return answers

    @torch.no_grad()
    def loglikelihoods(self, items: Sequence[EvalItem],
                       continuations: Sequence[str]) -> list[tuple[float, int]]:
        pairs = [(self.prompt_ids(item), self.continuation_ids(item, text))
                 for item, text in zip(items, continuations)]
        width = max(len(prompt) + len(cont) for prompt, cont in pairs)
        ids = torch.full((len(pairs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for row, (prompt, cont) in enumerate(pairs):  # right padding
            ids[row, :len(prompt) + len(cont)] = torch.tensor(prompt + cont)
            mask[row, :len(prompt) + len(cont)] = 1
        logits = self.model(input_ids=ids.to(self.device),
                            attention_mask=mask.to(self.device)).logits.float().cpu()
        logprobs = torch.log_softmax(logits, dim=-1)
        results = []
        for row, (prompt, cont) in enumerate(pairs):
            positions = torch.arange(len(prompt) - 1, len(prompt) + len(cont) - 1)
            targets = torch.tensor(cont)
            results.append((float(logprobs[row, positions, targets].double().sum()), len(cont)))
        return results
