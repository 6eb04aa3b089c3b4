"""OWM-style projectors onto the orthogonal complement of the other experts' subspace.

For a subspace spanned by the columns of A (d x n), Orthogonal Weights Modification (Zeng et al.,
2019) uses P = I - A (A^T A + a I)^{-1} A^T, kept up to date from new vectors r by
k = P r;  P <- P - k k^T / (a + r^T k). By the Woodbury identity P = a (A A^T + a I)^{-1}, so with
S = A A^T = sum of r r^T over the spanning vectors, the projector of expert i is

    P_i = a (S_total - S_i + a I)^{-1}

where S_total sums every expert's d x d second-moment matrix. Each rank therefore needs only the
d x d sums of the other experts, never their weights: that is what crosses expert-parallel ranks.
"""

from __future__ import annotations

import torch


def owm_projector(vectors: torch.Tensor, alpha: float) -> torch.Tensor:
    """P = I - A (A^T A + alpha I)^{-1} A^T for the columns of ``vectors`` (A: [d, n]); float64."""
    a = vectors.to(torch.float64)
    gram = a.T @ a + alpha * torch.eye(a.shape[1], dtype=a.dtype, device=a.device)
    return torch.eye(a.shape[0], dtype=a.dtype, device=a.device) - a @ torch.linalg.solve(gram, a.T)


def owm_update(projector: torch.Tensor, vector: torch.Tensor, alpha: float) -> torch.Tensor:
    """The recursive OWM update of ``projector`` [d, d] with one new spanning vector [d]."""
    k = projector @ vector
    return projector - torch.outer(k, k) / (alpha + vector @ k)


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    """S = rows^T rows for spanning vectors stored as the rows of ``rows`` [n, d]; float64 [d, d].

    float64 because the projector needs S_-i = S_total - S_i: in float32 the subtraction's
    rounding (~1e-7 of the largest eigenvalue) would swamp a small regularizer ``a`` and leak the
    other experts' directions through the projection.
    """
    r = rows.double()
    return r.T @ r


def projectors_from_moments(
    own: torch.Tensor, total: torch.Tensor, alpha: float
) -> torch.Tensor:
    """P_i = alpha (total - own_i + alpha I)^{-1} for every expert i.

    Args:
        own: [E_local, d, d] second moments of this rank's experts (float64).
        total: [d, d] second moment summed over all experts of the layer (float64).
        alpha: the OWM regularizer ``a``.

    Returns:
        [E_local, d, d] float32 projectors (symmetric, eigenvalues in (0, 1]).
    """
    d = total.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=total.device)
    others = total.double().unsqueeze(0) - own.double()
    return (alpha * torch.linalg.inv(others + alpha * eye)).float()
