"""A small GPT whose MLPs are DeepSpeed MoE layers with the specialization losses (pure torch)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megatron_patch.deepspeed import SpecializationMoE
from megatron_patch.moe.loss_config import LossConfig


@dataclass(frozen=True)
class GPTMoEConfig:
    vocab_size: int
    seq_length: int = 128
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    ffn_hidden_size: int = 256
    num_experts: int = 8
    ep_size: int = 1
    topk: int = 2
    capacity_factor: float = 1.25
    losses: LossConfig = field(default_factory=LossConfig)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: [B, T, H] -> [B, T, H]."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, seq, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(attended.transpose(1, 2).reshape(batch, seq, hidden))


class Block(nn.Module):
    """Pre-norm transformer block whose MLP is a ``SpecializationMoE`` (the experts are MLPs)."""

    def __init__(self, config: GPTMoEConfig) -> None:
        super().__init__()
        self.ln_attn = nn.LayerNorm(config.hidden_size)
        self.attn = CausalSelfAttention(config.hidden_size, config.num_heads)
        self.ln_mlp = nn.LayerNorm(config.hidden_size)
        expert = nn.Sequential(nn.Linear(config.hidden_size, config.ffn_hidden_size), nn.GELU(),
                               nn.Linear(config.ffn_hidden_size, config.hidden_size))
        self.moe = SpecializationMoE(config.hidden_size, expert, num_experts=config.num_experts,
                                     ep_size=config.ep_size, k=config.topk,
                                     capacity_factor=config.capacity_factor, min_capacity=4,
                                     losses=config.losses)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, T, H] -> ([B, T, H], this layer's l_aux + beta * L_o + gamma * L_v)."""
        x = x + self.attn(self.ln_attn(x))
        moe_out, moe_loss, _ = self.moe(self.ln_mlp(x))
        return x + moe_out, moe_loss


def init_weights(module: nn.Module) -> None:
    """GPT-2 style: N(0, 0.02) weights, zero biases (every expert drawn separately)."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


class GPTMoE(nn.Module):
    """Token + position embeddings, ``num_layers`` MoE blocks, final norm, tied LM head."""

    def __init__(self, config: GPTMoEConfig) -> None:
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position = nn.Embedding(config.seq_length, config.hidden_size)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_layers))
        self.ln_final = nn.LayerNorm(config.hidden_size)
        self.apply(init_weights)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens, labels: [B, T] int64 -> (mean LM cross-entropy, sum over layers of MoE losses)."""
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        moe_losses = []
        for block in self.blocks:
            x, moe_loss = block(x)
            moe_losses.append(moe_loss)
        logits = F.linear(self.ln_final(x), self.embed.weight)
        lm_loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        return lm_loss, torch.stack(moe_losses).sum()
