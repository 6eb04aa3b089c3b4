"""OWM-style projectors onto the orthogonal complement of the other experts' subspace.

For a subspace spanned by the columns of A (d x n), Orthogonal Weights Modification (Zeng et al.,
2019) uses P = I - A (A^T A + a I)^{-1} A^T, kept up to date from new vectors r by
k = P r;  P <- P - k k^T / (a + r^T k). By the Woodbury identity P = a (A A^T + a I)^{-1}, so with
S = A A^T = sum of r r^T over the spanning vectors, the projector of expert i is

    P_i = a (S_total - S_i + a I)^{-1}

where S_total sums every expert's d x d second-moment matrix; P_i is applied with a Cholesky
solve and never formed. Each rank therefore needs only the d x d sums of the other experts,
never their weights: that is what crosses expert-parallel ranks.
"""

from __future__ import annotations

import torch


def second_moment(rows: torch.Tensor) -> torch.Tensor:
    """S = rows^T rows for spanning vectors stored as the rows of ``rows`` [n, d]; float64 [d, d].

    float64 because the projector needs S_-i = S_total - S_i: in float32 the subtraction's
    rounding (~1e-7 of the largest eigenvalue) would swamp a small regularizer ``a`` and leak the
    other experts' directions through the projection.
    """
    r = rows.double()
    return r.T @ r


def project(
    grad: torch.Tensor, others_moment: torch.Tensor, alpha: float, side: str
) -> torch.Tensor:
    """Apply P = alpha (S_others + alpha I)^{-1} to a gradient without forming P.

    One float64 Cholesky factorization of the d x d matrix and a triangular solve: cheaper and
    better conditioned than an explicit inverse.

    Args:
        grad: [m, d] (``side="right"``: rows in R^d, returns grad P) or [d, m]
            (``side="left"``: columns in R^d, returns P grad).
        others_moment: [d, d] float64 second moment of the other experts' spanning vectors.
        alpha: the OWM regularizer ``a``.
        side: which side P multiplies.

    Returns:
        The projected gradient, in ``grad``'s dtype.
    """
    d = others_moment.shape[-1]
    eye = torch.eye(d, dtype=torch.float64, device=others_moment.device)
    factor = torch.linalg.cholesky(others_moment + alpha * eye)
    g = grad.double()
    if side == "right":
        projected = torch.cholesky_solve(g.T, factor).T
    elif side == "left":
        projected = torch.cholesky_solve(g, factor)
    else:
        raise ValueError(f"side must be 'left' or 'right', got {side!r}")
    return (alpha * projected).to(grad.dtype)
