"""Regrouping of combined rows by token, with rows that reveal which (token, expert) they are."""

import torch

from megatron_patch.moe.grouping import gather_slots, token_slot_rows


def group_rows_by_token(rows, row_to_token, num_tokens, topk, valid=None):
    slots = token_slot_rows(row_to_token, num_tokens, topk, valid)
    return gather_slots(rows, slots), slots.filled


def identity_rows(pairs):
    """Row for (token, expert) = [token, expert]: the grouped tensor shows where each row went."""
    return torch.tensor([[float(t), float(e)] for t, e in pairs])


def test_dropless_expert_major_rows_are_grouped_by_token():
    # Expert-major permuted order, as megatron's permute produces: expert 0's tokens, then 1's...
    routing = {0: [1, 3], 1: [0, 2], 2: [0, 3], 3: [1, 2]}  # token -> its k=2 experts
    pairs = sorted(((t, e) for t, es in routing.items() for e in es), key=lambda p: (p[1], p[0]))
    rows = identity_rows(pairs)
    row_to_token = torch.tensor([t for t, _ in pairs])
    grouped, filled = group_rows_by_token(rows, row_to_token, num_tokens=4, topk=2)
    assert filled.all()
    for token, experts in routing.items():
        assert grouped[token, :, 0].tolist() == [token, token]
        assert grouped[token, :, 1].tolist() == sorted(experts)


def test_dropped_and_padding_rows():
    # Token 1 lost one expert to capacity; a padding row (marked invalid) points at token 0.
    pairs = [(0, 0), (1, 0), (2, 0), (0, 1), (2, 1), (0, 2)]
    rows = identity_rows(pairs)
    row_to_token = torch.tensor([t for t, _ in pairs])
    valid = torch.tensor([True, True, True, True, True, False])
    grouped, filled = group_rows_by_token(rows, row_to_token, num_tokens=3, topk=2, valid=valid)
    assert filled.tolist() == [[True, True], [True, False], [True, True]]
    assert grouped[0].tolist() == [[0, 0], [0, 1]]
    assert grouped[1].tolist() == [[1, 0], [0, 0]]  # one real slot, one zero slot
    assert grouped[2].tolist() == [[2, 0], [2, 1]]


def test_grouping_is_differentiable():
    rows = torch.randn(6, 3, requires_grad=True)
    row_to_token = torch.tensor([2, 0, 1, 0, 2, 1])
    grouped, _ = group_rows_by_token(rows, row_to_token, num_tokens=3, topk=2)
    weights = torch.arange(18.0).view(3, 2, 3)
    (grouped * weights).sum().backward()
    order = torch.argsort(row_to_token, stable=True)
    expected = torch.empty(6, 3)
    expected[order] = weights.view(6, 3)
    torch.testing.assert_close(rows.grad, expected)
