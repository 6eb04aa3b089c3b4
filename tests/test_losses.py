"""The specialization losses against independent naive references (explicit loops)."""

import pytest
import torch

from megatron_patch.moe.losses import (
    orthogonality_loss,
    orthogonality_loss_per_slot,
    variance_loss,
)
from megatron_patch.moe.reference import naive_pairwise, naive_span, naive_variance


@pytest.mark.parametrize("k,hidden", [(2, 8), (3, 16), (4, 5), (6, 4), (8, 3)])
def test_span_matches_gram_schmidt(k, hidden):
    torch.manual_seed(k * 100 + hidden)
    x = torch.randn(7, k, hidden, dtype=torch.float64)
    got = orthogonality_loss(x, form="span", eps=1e-12)
    # k > H: the others span R^H once k - 1 >= H, and the projection is x_i itself.
    torch.testing.assert_close(got, naive_span(x), rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("k,hidden", [(2, 8), (3, 16), (6, 4)])
def test_pairwise_matches_eq6(k, hidden):
    torch.manual_seed(k + hidden)
    x = torch.randn(5, k, hidden, dtype=torch.float64)
    got = orthogonality_loss(x, form="pairwise", eps=1e-6)
    torch.testing.assert_close(got, naive_pairwise(x, 1e-6), rtol=1e-10, atol=1e-12)


def test_span_k_greater_than_h_projects_fully():
    torch.manual_seed(0)
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    per_slot = orthogonality_loss_per_slot(x, form="span", eps=1e-12)
    torch.testing.assert_close(per_slot, x.square().sum(-1), rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_k1_is_zero(form):
    x = torch.randn(6, 1, 8, requires_grad=True)
    loss = orthogonality_loss(x, form=form)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(x.grad == 0)


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_orthogonal_outputs_give_zero(form):
    x = torch.eye(4, dtype=torch.float64)[:3].expand(2, 3, 4) * 3.0
    assert orthogonality_loss(x, form=form).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_zero_and_duplicated_outputs_are_finite(form):
    torch.manual_seed(1)
    base = torch.randn(3, 16)
    x = torch.stack([base, base, torch.zeros_like(base)], dim=1)  # [3 tokens, k=3, H]
    x = torch.cat([x, torch.zeros(1, 3, 16)], dim=0).requires_grad_(True)
    loss = orthogonality_loss(x, form=form)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # Two identical outputs: each is fully in the span of the other.
    expected_first_token = 2 * base[0].square().sum() / 3
    per_slot = orthogonality_loss_per_slot(x.detach(), form=form)
    torch.testing.assert_close(per_slot[0].sum() / 3, expected_first_token, rtol=1e-4, atol=1e-4)


def test_zero_slot_does_not_change_other_slots():
    torch.manual_seed(2)
    x = torch.randn(5, 3, 8, dtype=torch.float64)
    padded = torch.cat([x, torch.zeros(5, 1, 8, dtype=torch.float64)], dim=1)
    for form in ("span", "pairwise"):
        a = orthogonality_loss_per_slot(x, form=form).sum(-1)
        b = orthogonality_loss_per_slot(padded, form=form).sum(-1)
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_bf16_input_is_computed_in_float32(form):
    torch.manual_seed(3)
    x32 = torch.randn(16, 4, 64)
    x16 = x32.bfloat16()
    got = orthogonality_loss(x16, form=form)
    assert got.dtype == torch.float32
    ref = orthogonality_loss(x16.double(), form=form)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_gradcheck(form):
    torch.manual_seed(4)
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: orthogonality_loss(t, form=form, eps=1e-3), (x,))


def test_unknown_form_and_bad_shape():
    with pytest.raises(ValueError, match="form"):
        orthogonality_loss(torch.randn(2, 2, 2), form="cosine")
    with pytest.raises(ValueError, match=r"\[T, k, H\]"):
        orthogonality_loss(torch.randn(2, 2))


def test_variance_loss_matches_loop_and_gradcheck():
    torch.manual_seed(5)
    scores = torch.softmax(torch.randn(9, 8, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(variance_loss(scores), naive_variance(scores))
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(variance_loss, (x,))


def test_variance_loss_extremes():
    uniform = torch.full((3, 4), 0.25)
    assert variance_loss(uniform).item() == 0.0
    one_hot = torch.eye(4)[:3]
    # Unbiased variance of a one-hot over 4 entries: (3 * (1/4)^2 + (3/4)^2) / 3 = 1/4.
    assert variance_loss(one_hot).item() == pytest.approx(-0.25)


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_half_precision_gradient_matches_float32(form):
    """bf16 outputs: the float32-accumulated Gram path gives the float32 loss's gradient."""
    torch.manual_seed(6)
    x16 = torch.randn(32, 4, 64).bfloat16().requires_grad_(True)
    x32 = x16.detach().float().requires_grad_(True)
    orthogonality_loss(x16, form=form).backward()
    orthogonality_loss(x32, form=form).backward()
    assert x16.grad.dtype == torch.bfloat16
    # bf16 keeps ~3 significant digits: compare the whole gradient, relative to its norm.
    error = (x16.grad.float() - x32.grad).norm() / x32.grad.norm()
    assert error < 1e-2


@pytest.mark.parametrize("form", ["span", "pairwise"])
def test_normalized_ortho_loss_is_the_loss_of_unit_rows_and_cannot_shrink_them(form):
    torch.manual_seed(11)
    x = torch.randn(9, 3, 12, dtype=torch.float64)
    x[2, 1] = 0.0  # an empty slot stays empty
    eps = 1e-6
    unit = x / (x.square().sum(-1, keepdim=True) + eps).sqrt()
    got = orthogonality_loss_per_slot(x, form=form, eps=eps, normalize=True)
    want = orthogonality_loss_per_slot(unit, form=form, eps=eps)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert got[2, 1] == 0
    # Penalties of unit vectors: at most the whole squared norm, 1 (span); scale-free per row.
    assert got.max() < 1 + 1e-9 or form == "pairwise"
    row_scales = torch.rand(9, 3, 1, dtype=torch.float64) * 100 + 0.5
    scaled = orthogonality_loss_per_slot(x * row_scales, form=form, eps=eps, normalize=True)
    torch.testing.assert_close(scaled, got, rtol=1e-4, atol=1e-8)
    # Its gradient has no component along any row: it turns outputs apart, never shrinks them.
    x.requires_grad_(True)
    orthogonality_loss(x, form=form, eps=eps, normalize=True).backward()
    radial = (x.grad * x).sum(-1) / (x.grad.norm(dim=-1) * x.norm(dim=-1)).clamp(min=1e-30)
    assert radial.abs().max() < 1e-4
    x.grad = None
    orthogonality_loss(x, form=form, eps=eps).backward()
    radial = (x.grad * x).sum(-1) / (x.grad.norm(dim=-1) * x.norm(dim=-1)).clamp(min=1e-30)
    assert radial.abs().max() > 0.1  # the plain loss does push along the rows
