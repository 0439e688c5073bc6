"""Training patterns around the backward: a model called twice before one backward, a second
backward through one forward (retain_graph), a frozen parameter unfrozen later."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from helpers import assert_t_fired

KINDS = ["transform", "fused", "op"]


def _net():
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()


def _wrap(model, kind):
    if kind == "transform":
        return svgd_fx.transform(model, s=0.1)
    return torch.compile(model, backend=svgd_fx.backend(s=0.1, t_impl=kind))


def _state(wrapped, model):
    return wrapped.svgd_state if isinstance(wrapped, svgd_fx.SVGDModule) else svgd_fx.state_of(model)


@pytest.mark.parametrize("kind", KINDS)
def test_two_forwards_then_one_backward(kind):
    """A siamese-style loss: each call's backward is one observation, r is updated by both in
    turn (the same as two forward/backward passes, second call's backward first)."""
    torch.manual_seed(0)
    model = _net()
    ref = copy.deepcopy(model)
    wrapped, ref_t = _wrap(model, kind), svgd_fx.transform(ref, s=0.1)
    x1, x2, y = torch.randn(6, 4).double(), torch.randn(6, 4).double(), torch.randint(0, 3, (6,))
    (F.cross_entropy(wrapped(x1), y) + F.cross_entropy(wrapped(x2), y)).backward()
    F.cross_entropy(ref_t(x2), y).backward()     # autograd runs the later call's backward first
    F.cross_entropy(ref_t(x1), y).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{kind} {n}: {m}")
    assert_t_fired(wrapped, _state(wrapped, model), {"0.linear", "2.linear"})


def test_retain_graph_second_backward():
    """Under the backend's fused T a second backward through one forward is a second
    observation of that batch. Through the T op (transform, t_impl="op") torch refuses it:
    the op updates r in place, and autograd saved r for that backward (documented limit)."""
    torch.manual_seed(0)
    model = _net()
    ref = copy.deepcopy(model)
    wrapped, ref_t = _wrap(model, "fused"), svgd_fx.transform(ref, s=0.1)
    x, y = torch.randn(6, 4).double(), torch.randint(0, 3, (6,))
    loss = F.cross_entropy(wrapped(x), y)
    loss.backward(retain_graph=True)
    loss.backward()
    for _ in range(2):
        F.cross_entropy(ref_t(x), y).backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
    assert_t_fired(wrapped, _state(wrapped, model), {"0.linear", "2.linear"})

    torch._dynamo.reset()
    loss = F.cross_entropy(svgd_fx.transform(_net(), s=0.1)(x), y)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@pytest.mark.parametrize("kind", KINDS)
def test_frozen_parameter_unfrozen_later(kind):
    """requires_grad switched on later: the recompiled graph routes the layer through T, with a
    fresh r; until then it had neither."""
    torch.manual_seed(0)
    model = _net()
    model[0].requires_grad_(False)
    wrapped = _wrap(model, kind)
    x, y = torch.randn(6, 4).double(), torch.randint(0, 3, (6,))
    F.cross_entropy(wrapped(x), y).backward()
    assert set(_state(wrapped, model).tensors) == {"2.linear.r"}
    model[0].requires_grad_(True)
    F.cross_entropy(wrapped(x), y).backward()
    state = _state(wrapped, model).tensors
    assert set(state) == {"0.linear.r", "2.linear.r"} and state["0.linear.r"].abs().sum() > 0
    assert {row["node"] for row in svgd_fx.explain(wrapped).rows if row["t_in_graph"]} == {"0.linear", "2.linear"}


def test_double_backward_is_refused_clearly():
    """create_graph=True through compiled graphs: torch's own error (documented in the README)."""
    model = _net()
    wrapped = svgd_fx.transform(model, s=0.1)
    x, y = torch.randn(6, 4, dtype=torch.float64, requires_grad=True), torch.randint(0, 3, (6,))
    (gx,) = torch.autograd.grad(F.cross_entropy(wrapped(x), y), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not currently support double backward"):
        gx.pow(2).sum().backward()
