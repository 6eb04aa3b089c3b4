"""Slow, explicit reference implementations of the losses and the gated Gram matrices, for tests
and benchmarks: loops over tokens, slots and pairs in float64, written from the definitions
(Gram-Schmidt, the paper's Eq. 6, torch.var's unbiased variance), sharing no code with the
vectorized ``losses``, ``gated_gram`` and ``triton_gated_gram``."""

from __future__ import annotations

import torch


def naive_span(expert_outputs: torch.Tensor, tol: float = 1e-9) -> torch.Tensor:
    """L_o, span form: per token and slot, the squared norm of x_i's projection onto the span of
    the other outputs (Gram-Schmidt), averaged over the T*k slots. expert_outputs: [T, k, H]."""
    x = expert_outputs.double()
    num_tokens, k, _ = x.shape
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for t in range(num_tokens):
        for i in range(k):
            basis = []
            for j in range(k):
                if j == i:
                    continue
                v = x[t, j].clone()
                for q in basis:
                    v = v - torch.dot(q, v) * q
                norm = v.norm()
                if norm > tol * max(1.0, x[t, j].norm().item()):
                    basis.append(v / norm)
            for q in basis:
                total = total + torch.dot(q, x[t, i]) ** 2
    return total / (num_tokens * k)


def naive_pairwise(expert_outputs: torch.Tensor, eps: float) -> torch.Tensor:
    """L_o, pairwise form: the literal Eq. 6 double sum, averaged over the T*k slots."""
    x = expert_outputs.double()
    num_tokens, k, _ = x.shape
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for t in range(num_tokens):
        for i in range(k):
            for j in range(k):
                if i == j:
                    continue
                coef = torch.dot(x[t, i], x[t, j]) / (torch.dot(x[t, j], x[t, j]) + eps)
                total = total + (coef * x[t, j]).square().sum()
    return total / (num_tokens * k)


def naive_variance(scores: torch.Tensor) -> torch.Tensor:
    """L_v = -mean over tokens of the unbiased variance of their scores, with a loop over
    tokens. scores: [T, E]."""
    total = torch.zeros((), dtype=torch.float64, device=scores.device)
    for row in scores.double():
        mean = row.sum() / len(row)
        total = total + ((row - mean) ** 2).sum() / (len(row) - 1)
    return -total / len(scores)


def explicit_gated_gram(rows: torch.Tensor, gates: torch.Tensor, row_to_token: torch.Tensor,
                        num_tokens: int, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 loops: the gated rows [N, H], and per token the Gram matrix of its rows in row
    order [T, k, k] (zeros for missing slots)."""
    rows64, gates64 = rows.double(), gates.double()
    gated = rows64 * gates64[:, None]
    gram = torch.zeros(num_tokens, topk, topk, dtype=torch.float64, device=rows.device)
    for token in range(num_tokens):
        mine = rows64[(row_to_token == token).nonzero().flatten()]
        n = mine.shape[0]
        gram[token, :n, :n] = mine @ mine.T
    return gated, gram
