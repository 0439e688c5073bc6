"""Copies and pickles of every object a user holds carry the SVGD state and continue from it;
the bare model's own state_dict stays a plain model's."""

import copy
import io

import pytest
import torch
import torch.nn.functional as F

import svgd_fx
from cases import CASES, PaperMLP
from helpers import assert_t_fired, pickled, state, wrap

MLP_T = next(c for c in CASES if c.name == "paper_mlp").t_nodes


def _batches(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 784, generator=g, dtype=torch.float64), torch.randint(0, 10, (16,), generator=g))
            for _ in range(n)]


def _step(wrapped, model, opt, batch):
    opt.zero_grad()
    F.cross_entropy(wrapped(batch[0]), batch[1]).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return grads


def _inner(wrapped):
    return wrapped.model if isinstance(wrapped, svgd_fx.SVGDModule) else wrapped._orig_mod


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
@pytest.mark.parametrize("kind", ["transform", "backend_fused"])
def test_a_copy_continues_from_the_same_r(kind, how):
    """After 2 steps, a copy (deepcopy, or torch.save/torch.load of the whole object) has the
    same r in its own tensors, and its next steps give the original's virtual gradients."""
    torch.manual_seed(0)
    model = PaperMLP().double()
    wrapped = wrap(model, kind)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = _batches(4)
    for batch in batches[:2]:
        _step(wrapped, model, opt, batch)

    copied = copy.deepcopy(wrapped) if how == "deepcopy" else pickled(wrapped)
    copied_model = _inner(copied)
    assert copied_model is not model
    r, r_copy = state(wrapped, model).tensors, state(copied, copied_model).tensors
    assert sorted(r_copy) == sorted(r) and all(r[k].abs().sum() > 0 for k in r)
    for key in r:
        assert torch.equal(r_copy[key], r[key]) and r_copy[key].data_ptr() != r[key].data_ptr(), key

    opt_copy = torch.optim.SGD(copied_model.parameters(), lr=0.05)
    for batch in batches[2:]:
        want = _step(wrapped, model, opt, batch)
        got = _step(copied, copied_model, opt_copy, batch)
        for (name, _), a, b in zip(model.named_parameters(), want, got):
            assert torch.equal(a, b), name
    for key in r:
        assert torch.equal(r_copy[key], r[key]), key
    assert_t_fired(copied, state(copied, copied_model), MLP_T)


def test_a_pickled_bare_model_carries_its_state_to_its_next_compile():
    """The model itself (not what torch.compile returned), pickled after training under the
    backend and compiled again with the same options, continues from its r; other options are
    refused, naming how to start over."""
    torch.manual_seed(0)
    model = PaperMLP().double()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    batches = _batches(3)
    for batch in batches[:2]:
        _step(model_c, model, opt, batch)

    loaded = pickled(model)
    loaded_c = torch.compile(loaded, backend="svgd", options={"s": 0.1})
    want = _step(model_c, model, opt, batches[2])
    got = _step(loaded_c, loaded, torch.optim.SGD(loaded.parameters(), lr=0.05), batches[2])
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    assert_t_fired(loaded_c, svgd_fx.state_of(loaded_c), MLP_T)

    other = torch.compile(pickled(model), backend="svgd", options={"s": 0.01})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match=r"fresh\.load_state_dict\(model\.state_dict"):
        other(batches[0][0])


def test_the_bare_models_state_dict_stays_plain():
    """r belongs to what was compiled: ``model_c.state_dict()`` carries it, ``model.state_dict()``
    loads strictly into a fresh plain model (and after ``model.compile(backend="svgd")``, in
    place, the model's own state_dict carries it)."""
    torch.manual_seed(0)
    model = PaperMLP()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    F.cross_entropy(model_c(x), y).backward()
    assert not [k for k in model.state_dict() if "svgd" in k]
    PaperMLP().load_state_dict(model.state_dict())                  # strict
    assert sorted(k for k in model_c.state_dict() if "svgd_state" in k) == \
        sorted(f"_orig_mod.svgd_state.{k}" for k in svgd_fx.state_of(model_c).tensors)
    torch.save(model, io.BytesIO())
    torch.save(model_c, io.BytesIO())

    in_place = PaperMLP()
    in_place.compile(backend="svgd", options={"s": 0.1})
    F.cross_entropy(in_place(x), y).backward()
    assert sorted(k for k in in_place.state_dict() if "svgd_state" in k) == \
        sorted(f"svgd_state.{k}" for k in svgd_fx.state_of(in_place).tensors)
    assert_t_fired(in_place, svgd_fx.state_of(in_place), MLP_T)


def test_a_deepcopy_shares_the_users_grad_scaler():
    """The copy is stepped with the user's scaler, so it reads that scaler's scale."""
    scaler = torch.amp.GradScaler("cpu")
    model_t = svgd_fx.transform(PaperMLP(), s=0.1, grad_scaler=scaler)
    assert copy.deepcopy(model_t).grad_scaler is scaler
    model_c = torch.compile(PaperMLP(), backend=svgd_fx.backend(s=0.1, grad_scaler=scaler))
    assert svgd_fx.state_of(model_c) is not None
    assert svgd_fx.capture.backend.binding_of(copy.deepcopy(model_c)).grad_scaler is scaler


def test_averaged_model_of_a_transformed_model():
    """torch.optim.swa_utils.AveragedModel deep-copies the model it averages: it takes model_t
    (a copy with its own state), averages its parameters and runs forwards."""
    torch.manual_seed(0)
    model = PaperMLP()
    model_t = svgd_fx.transform(model, s=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, y = torch.randn(8, 784), torch.randint(0, 10, (8,))
    averaged = torch.optim.swa_utils.AveragedModel(model_t)
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model_t(x), y).backward()
        opt.step()
        averaged.update_parameters(model_t)
    assert isinstance(averaged.module, svgd_fx.SVGDModule) and averaged.module.model is not model
    for p, q in zip(averaged.module.parameters(), model_t.parameters()):
        assert not torch.equal(p, q)           # the mean of two steps, not the last one
    with torch.no_grad():
        assert averaged(x).shape == (8, 10)
