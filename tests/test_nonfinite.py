"""inf/NaN in ∇σ'J: never poisons r; raises naming the σ' node by default, or skips."""

import pytest
import torch

import svgd_fx
from cases import CASES, PaperMLP
from helpers import assert_t_fired, state, wrap

MLP_T = next(c for c in CASES if c.name == "paper_mlp").t_nodes

KINDS = ["transform", "transform_inductor", "backend_fused", "backend_op"]


_wrap, _state = wrap, state


def _backward(wrapped, x, y, blow_up=False):
    out = wrapped(x)
    loss = torch.nn.functional.cross_entropy(out, y)
    if blow_up:   # an overflow in the loss: ∇σ'J of the last layer is inf, the rest inf/NaN
        loss = loss * torch.tensor(float("inf"))
    loss.backward()


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_raises_naming_the_node_and_keeps_r(kind):
    torch.manual_seed(0)
    model = PaperMLP()
    wrapped = _wrap(model, kind)
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    _backward(wrapped, x, y)
    state = _state(wrapped, model)
    assert_t_fired(wrapped, state, MLP_T)
    before = {k: v.clone() for k, v in state.tensors.items()}
    if kind in ("backend_fused", "transform_inductor"):   # kernels cannot raise: counted, raised next forward
        _backward(wrapped, x, y, blow_up=True)
        with pytest.raises(svgd_fx.NonFiniteGradientError, match="net.12.linear"):
            wrapped(x)
    else:                          # raised inside the backward, before any optimizer step
        with pytest.raises(svgd_fx.NonFiniteGradientError, match="net.12.linear"):
            _backward(wrapped, x, y, blow_up=True)
    for k, v in state.tensors.items():
        assert torch.equal(v, before[k]), f"{kind}: {k} changed by a non-finite backward"
    model.zero_grad()
    _backward(wrapped, x, y)                      # and training goes on from the same r
    assert all(torch.isfinite(v).all() for v in state.tensors.values())


@pytest.mark.parametrize("kind", KINDS)
def test_nonfinite_skip_keeps_r_and_goes_on(kind):
    torch.manual_seed(0)
    model = PaperMLP()
    wrapped = _wrap(model, kind, nonfinite="skip")
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    _backward(wrapped, x, y)
    state = _state(wrapped, model)
    assert_t_fired(wrapped, state, MLP_T)
    before = {k: v.clone() for k, v in state.tensors.items()}
    model.zero_grad()
    _backward(wrapped, x, y, blow_up=True)       # no error
    for k, v in state.tensors.items():
        assert torch.equal(v, before[k]), f"{kind}: {k} changed by a non-finite backward"
    model.zero_grad()
    wrapped(x)
    _backward(wrapped, x, y)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="nonfinite must be"):
        svgd_fx.transform(PaperMLP(), s=0.1, nonfinite="ignore")
