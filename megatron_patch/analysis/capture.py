"""Forward hooks that collect, per MoE layer, what the router saw and decided.

A forward hook on each MoE layer's router records, for the micro-batch just run:

- ``hidden`` [T, H]: the router's input, which is also what every expert is applied to
  (megatron-core's MoELayer routes and dispatches the same ``hidden_states``);
- ``logits`` [T, E]: ``router.gating(hidden)``, recomputed from the input (the same function
  the router applied; input jitter is off in eval mode);
- ``routing_map`` [T, E] bool: the router's top-k decision (after megatron's own routing: expert
  bias, group-limited routing, capacity dropping...).

Tokens are flattened in megatron's [S, B] order: token index ``s * B + b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer


@dataclass
class RoutedBatch:
    """One MoE layer's capture of one micro-batch."""

    hidden: torch.Tensor  # [T, H]
    logits: torch.Tensor  # [T, E] float32
    routing_map: torch.Tensor  # [T, E] bool


def moe_layers(model: torch.nn.Module) -> Iterator[tuple[int, MoELayer]]:
    """(global 1-based layer number, MoE layer) of a GPTModel's decoder, in order."""
    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            yield layer.layer_number, layer.mlp


class RoutingCapture:
    """Context manager: hooks on every MoE router of ``model``; ``pop()`` returns the captures.

    Example::

        with RoutingCapture(gpt_model) as capture:
            gpt_model(tokens, position_ids, attention_mask)
            batches = capture.pop()   # {layer_number: RoutedBatch}
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.layers = dict(moe_layers(model))
        if not self.layers:
            raise ValueError("the model has no MoE layer to analyze")
        self._handles: list = []
        self._records: dict[int, RoutedBatch] = {}

    def __enter__(self) -> "RoutingCapture":
        for number, layer in self.layers.items():
            self._handles.append(layer.router.register_forward_hook(self._hook(number)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, number: int):
        def hook(router, inputs, output):
            hidden = inputs[0].detach()
            hidden = hidden.reshape(-1, hidden.shape[-1])
            with torch.no_grad():
                logits = router.gating(hidden).float()
            _, routing_map = output
            self._records[number] = RoutedBatch(hidden, logits, routing_map.detach().bool())

        return hook

    def pop(self) -> dict[int, RoutedBatch]:
        """The captures of the last forward pass, by layer number; clears them."""
        records, self._records = self._records, {}
        return records
