"""GPT data and step functions for Megatron-LM's ``pretrain()``: megatron-core's GPT datasets from
Megatron-LM's data flags, and a forward step whose loss is the token-summed cross entropy.

``pretrain`` sums ``(loss, num_tokens)`` over micro-batches and data-parallel ranks and divides
once, so the reported ``lm loss`` is the mean over every unmasked token of the global batch, the
same on any layout.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.tokenizers.utils.build_tokenizer import build_tokenizer
from megatron.training.global_vars import get_args
from megatron.training.utils.common_utils import get_blend_and_blend_per_split

LM_LOSS_LABEL = "lm loss"


def datasets_provider(num_samples: list[int], vp_stage: Optional[int] = None) -> tuple:
    """Train/valid/test GPT datasets of ``num_samples`` samples from ``--data-path`` (or the
    per-split paths), or megatron-core's mock data with ``--mock-data``; every rank builds them."""
    args = get_args()
    blend, blend_per_split = get_blend_and_blend_per_split(args)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=blend,
        blend_per_split=blend_per_split,
        split=args.split,
        path_to_cache=args.data_cache_path,
        tokenizer=build_tokenizer(args),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=args.reset_attention_mask,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=args.create_attention_mask_in_dataloader,
    )
    dataset_class = MockGPTDataset if args.mock_data else GPTDataset
    return BlendedMegatronDatasetBuilder(dataset_class, num_samples, lambda: True, config).build()


datasets_provider.is_distributed = True


def token_loss(loss_mask: torch.Tensor, output: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(summed loss, token count, logged ``[sum, count]``) of per-token losses ``output``
    [b, s] over the tokens where ``loss_mask`` [b, s] is 1."""
    mask = loss_mask.reshape(-1).float()
    total = (output.reshape(-1).float() * mask).sum()
    count = mask.sum().to(torch.int)
    return total, count, {LM_LOSS_LABEL: torch.stack([total.detach(), count.float()])}


def forward_step(data_iterator: Iterator[dict[str, torch.Tensor]], model: torch.nn.Module,
                 return_schedule_plan: bool = False) -> tuple[torch.Tensor, Callable[..., Any]]:
    """One micro-batch through ``model``: per-token losses [b, s] and the function reducing them.

    Batches hold ``tokens``, ``labels``, ``loss_mask``, ``position_ids`` [b, s] and, unless
    ``--no-create-attention-mask-in-dataloader``, the causal ``attention_mask`` [b, 1, s, s]
    (True: masked), which megatron-core's local attention needs.
    """
    if return_schedule_plan:
        raise ValueError("--overlap-moe-expert-parallel-comm (schedule plans) is not supported by "
                         "megatron_patch.megatron_lm.gpt.forward_step; drop it.")
    batch = {key: value.cuda(non_blocking=True) for key, value in next(data_iterator).items()
             if isinstance(value, torch.Tensor)}
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                   labels=batch["labels"])
    return output, functools.partial(token_loss, batch["loss_mask"])
