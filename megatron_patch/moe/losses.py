"""Expert-specialization losses of arXiv 2505.22323, in pure torch (no megatron imports).

Both losses are per-token quantities averaged over tokens. The distributed code in this package
needs the per-token (or per-slot) *sums* so it can all-reduce sums and counts rather than means;
the `*_per_token` functions return them, and the scalar functions are their local means.

Orthogonality loss L_o
    For token t with the unweighted outputs x_1..x_k of its k routed experts (rows of
    ``expert_outputs[t]``, shape [k, H]) and Gram matrix G = X X^T (k x k):

    * ``span`` form (the authors' released code): for each slot i, the squared norm of the
      projection of x_i onto span{x_j : j != i}, i.e. g_i^T (G_{-i} + eps I)^{-1} g_i with
      g_i = G[-i, i] and G_{-i} the Gram matrix of the other k-1 outputs.
    * ``pairwise`` form (the paper's Eq. 6): sum over j != i of
      || <x_i, x_j> / (<x_j, x_j> + eps) x_j ||^2 = G_ij^2 G_jj / (G_jj + eps)^2.

    * ``normalize`` (an option of ours, either form): the penalty of the unit-normalized outputs
      x_i / sqrt(|x_i|^2 + eps), i.e. of the cosine matrix C = D^-1/2 G D^-1/2 (D = diag(G) +
      eps) in place of G. It is scale-free, so its gradient turns the outputs apart and has no
      component that shrinks them (the unnormalized squared projection norms are mostly reduced
      by shrinking the expert outputs at large coefficients).

    L_o is the sum over tokens and slots divided by the number of slots (T * k). Everything is a
    function of G, which is computed in float32 (float64 input stays float64); the k x k inverse
    of the span form runs in float64 so duplicated outputs (a near-singular G) stay accurate. A zero row contributes nothing and does not change the other slots' values, so
    padded or dropped slots may be filled with zeros as long as they are not counted.

Variance loss L_v
    ``-mean_t Var_e(s_t)`` over the routing scores s_t of all E experts, with torch.var's
    default (unbiased) convention.
"""

from __future__ import annotations

from typing import Literal

import torch

OrthoForm = Literal["span", "pairwise"]
ORTHO_FORMS: tuple[str, ...] = ("span", "pairwise")


class _Gram(torch.autograd.Function):
    """G = X X^T per token, with a backward of one batched product: dX = (dG + dG^T) X.

    Autograd's own backward of ``bmm(X, X^T)`` runs two batched products (one per operand) and
    adds them, a third pass over [T, k, H]. bf16/fp16 X: float32 accumulation and output without
    a float32 copy of X (``bmm(..., out_dtype=float32)`` on CUDA; an upcast elsewhere), and dX in
    X's dtype, like autocast would. float32 / float64 X: computed in X's dtype.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        if x.dtype in (torch.float32, torch.float64):
            return torch.bmm(x, x.transpose(1, 2))
        if x.is_cuda:
            return torch.bmm(x, x.transpose(1, 2), out_dtype=torch.float32)
        x32 = x.float()
        return torch.bmm(x32, x32.transpose(1, 2))

    @staticmethod
    def backward(ctx, grad_gram: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        symmetric = (grad_gram + grad_gram.transpose(1, 2)).to(x.dtype)
        return torch.bmm(symmetric, x)


def gram_matrices(expert_outputs: torch.Tensor) -> torch.Tensor:
    """Per-token Gram matrices.

    Args:
        expert_outputs: [T, k, H] expert outputs, any floating dtype.

    Returns:
        [T, k, k] G_t = X_t X_t^T in float32 (float64 if the input is float64). bf16/fp16
        inputs are multiplied in their own dtype with float32 accumulation and output.
    """
    if expert_outputs.dtype not in (torch.bfloat16, torch.float16, torch.float64):
        expert_outputs = expert_outputs.float()
    return _Gram.apply(expert_outputs)


def span_projection_norms(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """Squared norms of each slot's projection onto the span of the token's other slots.

    With M = G + eps I, the Schur complement of slot i in M is 1 / (M^-1)_ii, so
    g_i^T (G_{-i} + eps I)^{-1} g_i = M_ii - 1 / (M^-1)_ii: one k x k inverse per token (in
    float64) gives all k slots.

    Args:
        gram: [T, k, k] per-token Gram matrices.
        eps: ridge added to the diagonal.

    Returns:
        [T, k] values g_i^T (G_{-i} + eps I)^{-1} g_i, in the dtype of ``gram``.
    """
    k = gram.shape[-1]
    if k == 1:
        # Nothing to project onto; keep the result attached to the graph (zero gradient).
        return gram.diagonal(dim1=1, dim2=2) * 0.0
    ridge = gram.to(torch.float64) + eps * torch.eye(k, dtype=torch.float64, device=gram.device)
    # M is symmetric positive definite (G is PSD, eps > 0), so the inverse exists; inv_ex skips
    # linalg.inv's singularity check, a device-to-host sync per MoE layer on CUDA.
    inverse, _ = torch.linalg.inv_ex(ridge)
    inverse_diag = inverse.diagonal(dim1=1, dim2=2)
    return (ridge.diagonal(dim1=1, dim2=2) - inverse_diag.reciprocal()).to(gram.dtype)


def pairwise_projection_norms(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """Eq. 6 of the paper, per slot: sum_{j != i} G_ij^2 G_jj / (G_jj + eps)^2.

    Args:
        gram: [T, k, k] per-token Gram matrices.
        eps: added to <x_j, x_j> in the denominator.

    Returns:
        [T, k] per-slot values.
    """
    diag = torch.diagonal(gram, dim1=1, dim2=2)  # [T, k]
    weight = diag / (diag + eps).square()  # [T, k], indexed by j
    off_diag = ~torch.eye(gram.shape[-1], dtype=torch.bool, device=gram.device)
    terms = gram.square() * weight.unsqueeze(1) * off_diag
    return terms.sum(-1)


def orthogonality_loss_per_slot(
    expert_outputs: torch.Tensor,
    *,
    form: OrthoForm = "span",
    eps: float = 1e-6,
    normalize: bool = False,
) -> torch.Tensor:
    """Per-slot orthogonality penalties.

    Args:
        expert_outputs: [T, k, H] unweighted outputs of each token's k routed experts; unused
            slots must be zero rows.
        form: ``"span"`` or ``"pairwise"``.
        eps: regularizer (see module docstring).
        normalize: penalize the unit-normalized outputs (scale-free).

    Returns:
        [T, k] float32 (float64 for float64 input) per-slot values, >= 0.
    """
    if expert_outputs.dim() != 3:
        raise ValueError(
            f"expert_outputs must be [T, k, H], got shape {tuple(expert_outputs.shape)}"
        )
    return projection_norms(
        gram_matrices(expert_outputs), form=form, eps=eps, normalize=normalize
    )


def cosine_gram(gram: torch.Tensor, eps: float) -> torch.Tensor:
    """[T, k, k] Gram matrices of the unit-normalized rows x_i / sqrt(|x_i|^2 + eps).

    Zero rows (empty slots) stay zero rows.
    """
    scale = (gram.diagonal(dim1=1, dim2=2) + eps).rsqrt()  # [T, k]
    return gram * scale.unsqueeze(-1) * scale.unsqueeze(-2)


def projection_norms(
    gram: torch.Tensor, *, form: OrthoForm = "span", eps: float = 1e-6, normalize: bool = False
) -> torch.Tensor:
    """Per-slot orthogonality penalties from the per-token Gram matrices.

    Args:
        gram: [T, k, k] G_t = X_t X_t^T (``gram_matrices``, or the fused
            ``megatron_patch.moe.gated_gram``).
        form: ``"span"`` or ``"pairwise"``.
        eps: regularizer (see module docstring).
        normalize: penalize the unit-normalized outputs (``cosine_gram``) instead.

    Returns:
        [T, k] per-slot values in the dtype of ``gram``.
    """
    if form not in ORTHO_FORMS:
        raise ValueError(f"unknown orthogonality loss form {form!r}; choose one of {ORTHO_FORMS}")
    if normalize:
        gram = cosine_gram(gram, eps)
    if form == "span":
        return span_projection_norms(gram, eps)
    return pairwise_projection_norms(gram, eps)


def orthogonality_loss(
    expert_outputs: torch.Tensor,
    *,
    form: OrthoForm = "span",
    eps: float = 1e-6,
    normalize: bool = False,
) -> torch.Tensor:
    """L_o: mean over the T * k slots of the per-slot penalty.

    Args:
        expert_outputs: [T, k, H] unweighted expert outputs, token-major.
        form: ``"span"`` (released code) or ``"pairwise"`` (paper Eq. 6).
        eps: regularizer.
        normalize: penalize the unit-normalized outputs (scale-free).

    Returns:
        Scalar tensor (float32, or float64 for float64 input). 0 for k = 1 or T = 0.
    """
    per_slot = orthogonality_loss_per_slot(expert_outputs, form=form, eps=eps, normalize=normalize)
    if per_slot.numel() == 0:
        return per_slot.sum()
    return per_slot.mean()


def routing_variance_per_token(scores: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of each token's routing scores across experts.

    Args:
        scores: [T, E] routing scores of all experts (before top-k).

    Returns:
        [T] float32 (float64 for float64 input) variances.
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [T, E], got shape {tuple(scores.shape)}")
    compute_dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    return torch.var(scores.to(compute_dtype), dim=-1)


def variance_loss(scores: torch.Tensor) -> torch.Tensor:
    """L_v = -mean_t Var_e(scores[t]).

    Args:
        scores: [T, E] routing scores.

    Returns:
        Scalar tensor.
    """
    return -routing_variance_per_token(scores).mean()
