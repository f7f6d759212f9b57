"""The edited layer alone: base output untouched where no edit routes, row-exact batched deltas where one does."""
import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from sola_core.layer import SolaLayer, linear_shape
from sola_core.routing import RoutingState


def stacked_adapters(n: int, rank: int, in_f: int, out_f: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, rank, in_f, generator=g), torch.randn(n, out_f, rank, generator=g)  # (S, r, in), (S, out, r)


def routed(state: RoutingState, slot_per_row: list[int | None]) -> None:
    ids = torch.tensor([-1 if s is None else s for s in slot_per_row])
    rows = (ids >= 0).nonzero().flatten()
    state.routed(ids, rows, ids[rows])


@pytest.fixture(params=["linear", "conv1d"])
def base(request) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(8, 6) if request.param == "linear" else Conv1D(6, 8)  # Conv1D(nf=out, nx=in)


def test_shape_of_linear_and_conv1d(base):
    assert linear_shape(base) == (8, 6)


def test_refuses_other_modules():
    with pytest.raises(TypeError, match="can only edit nn.Linear or transformers Conv1D"):
        linear_shape(nn.Embedding(3, 4))


def test_no_route_is_bit_identical_to_base(base):
    x = torch.randn(3, 5, 8)
    layer = SolaLayer(base, 0, RoutingState())
    assert torch.equal(layer(x), base(x))
    assert layer.base_layer is base


def test_mixed_batch_equals_each_adapter_alone(base):
    """Rows hitting adapter 0, adapter 1 or nothing each match the single-adapter computation exactly."""
    A, B = stacked_adapters(2, 4, 8, 6)
    x = torch.randn(5, 7, 8)
    state = RoutingState(adapters=lambda layer: (A, B), scaling=0.5)
    layer = SolaLayer(base, 0, state)
    routed(state, [0, None, 1, 1, None])
    out = layer(x)
    for row, slot in enumerate([0, None, 1, 1, None]):
        expected = base(x[row:row + 1])
        if slot is not None:
            expected = expected + 0.5 * (x[row:row + 1] @ A[slot].T @ B[slot].T)
            assert torch.allclose(out[row:row + 1], expected, atol=1e-6)
        else:
            assert torch.equal(out[row], base(x)[row])


def test_forced_adapters_apply_each_to_its_own_rows(base):
    A, B = torch.randn(2, 2, 8), torch.randn(2, 6, 2)  # two adapters being trained
    state = RoutingState()
    x = torch.randn(3, 3, 8)
    with state.forcing([(A, B)], scaling=2.0):
        state.forced_rows = torch.tensor([1, 0, 1])
        out = SolaLayer(base, 0, state)(x)
        for row, g in enumerate([1, 0, 1]):
            assert torch.allclose(out[row], base(x[row]) + 2.0 * (x[row] @ A[g].T @ B[g].T), atol=1e-6)
    assert torch.equal(SolaLayer(base, 0, state)(x), base(x)) and state.scaling == 1.0
    assert state.forced is None and state.forced_rows is None


def test_router_runs_once_then_decision_is_reused(base):
    A, B = stacked_adapters(1, 2, 8, 6)
    state = RoutingState(adapters=lambda layer: (A, B))
    state.pending(torch.tensor([3, 3]), None)
    calls = []

    def router(x):
        calls.append(x.shape)
        routed(state, [0, None])

    first, second = SolaLayer(base, 0, state, router), SolaLayer(base, 1, state)
    x = torch.randn(2, 4, 8)
    first(x), second(x)
    assert calls == [(2, 4, 8)]
    assert not torch.equal(second(x)[0], base(x)[0]) and torch.equal(second(x)[1], base(x)[1])


def test_batch_size_change_after_decision_is_refused(base):
    A, B = stacked_adapters(1, 2, 8, 6)
    state = RoutingState(adapters=lambda layer: (A, B))
    routed(state, [0, None])
    with pytest.raises(RuntimeError, match="batch of 2 rows, got 3"):
        SolaLayer(base, 0, state)(torch.randn(3, 1, 8))
