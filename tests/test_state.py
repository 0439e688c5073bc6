"""State: r in state_dict under stable names; a fresh transform continues bit-identically."""

import copy
import io

import pytest
import torch

import svgd_fx
from cases import CASES, PaperMLP, loss_fn

CASE = {c.name: c for c in CASES}


def _batches(case, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=g)))
        out.append((case.inputs(case.batch), case.target(case.batch)))
    return out


def _train(model_t, params, batches, loss_kind):
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    grads = []
    for xs, y in batches:
        opt.zero_grad()
        loss_fn(loss_kind, model_t(*xs), y).backward()
        grads.append([p.grad.clone() for p in params])
        opt.step()
    return opt, grads


@pytest.mark.parametrize("name", ["paper_mlp", "res_cnn", "tiny_transformer"])
def test_state_dict_round_trip_bit_identical(name):
    case = CASE[name]
    torch.manual_seed(0)
    model = case.make()
    batches = _batches(case, 5)

    # uninterrupted: 5 steps
    full = copy.deepcopy(model)
    full_t = svgd_fx.transform(full, s=0.1)
    _, want = _train(full_t, list(full.parameters()), batches, case.loss)

    # interrupted after 3 steps: save, then a fresh model + fresh transform loads and continues
    first = copy.deepcopy(model)
    first_t = svgd_fx.transform(first, s=0.1)
    opt, _ = _train(first_t, list(first.parameters()), batches[:3], case.loss)
    buf = io.BytesIO()
    torch.save({"model": first_t.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert any(k.startswith("svgd_state.") and k.endswith(".r") for k in saved["model"])

    torch._dynamo.reset()
    second = case.make()
    second_t = svgd_fx.transform(second, s=0.1)
    second_t.load_state_dict(saved["model"])          # before the first forward: held until traced
    opt2 = torch.optim.SGD(second.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(saved["opt"])
    grads = []
    for xs, y in batches[3:]:
        opt2.zero_grad()
        loss_fn(case.loss, second_t(*xs), y).backward()
        grads.append([p.grad.clone() for p in second.parameters()])
        opt2.step()
    for got, exp in zip(grads, want[3:]):
        for a, b in zip(got, exp):
            assert torch.equal(a, b)


def test_model_keys_load_into_original_model():
    model = PaperMLP((12, 8, 4))
    model_t = svgd_fx.transform(model, s=0.1)
    model_t(torch.randn(4, 12)).sum().backward()
    sd = model_t.state_dict()
    own = {k: v for k, v in sd.items() if not k.startswith("svgd_state.")}
    assert set(own) == set(model.state_dict())
    PaperMLP((12, 8, 4)).load_state_dict(own)  # strict
    assert sorted(k for k in sd if k.startswith("svgd_state.")) == [
        "svgd_state.net.0.linear.r", "svgd_state.net.1.batch_norm.r", "svgd_state.net.3.linear.r"]


def test_load_after_first_forward_copies_in_place():
    torch.manual_seed(0)
    model = PaperMLP((12, 8, 4))
    model_t = svgd_fx.transform(model, s=0.1)
    x = torch.randn(4, 12)
    model_t(x).sum().backward()
    sd = {k: v.clone() + 1.0 if k.endswith(".r") else v for k, v in model_t.state_dict().items()}
    model_t.load_state_dict(sd)
    torch.testing.assert_close(model_t.svgd_state["net.0.linear.r"], sd["svgd_state.net.0.linear.r"])


def test_load_with_wrong_r_shape_names_the_node():
    model_t = svgd_fx.transform(PaperMLP((12, 8, 4)), s=0.1)
    model_t(torch.randn(4, 12)).sum().backward()
    sd = model_t.state_dict()
    sd["svgd_state.net.0.linear.r"] = torch.zeros(5)
    with pytest.raises(RuntimeError, match="net.0.linear"):
        model_t.load_state_dict(sd)

    fresh = svgd_fx.transform(PaperMLP((12, 8, 4)), s=0.1)
    fresh.load_state_dict(sd)
    with pytest.raises(svgd_fx.StateShapeError, match="net.0.linear"):
        fresh(torch.randn(4, 12))


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_incompatible_keys_are_named_as_state_dict_writes_them(kind):
    """Both entry points write r through one pair of state-dict hooks; a load reports missing and
    unexpected keys, the model's and the state's, under the names ``state_dict()`` wrote."""
    torch._dynamo.reset()
    model = PaperMLP((12, 8, 4))
    if kind == "transform":
        wrapped, prefix = svgd_fx.transform(model, s=0.1), ""
    else:
        wrapped, prefix = torch.compile(model, backend="svgd", options={"s": 0.1}), "_orig_mod."
    wrapped(torch.randn(4, 12)).sum().backward()
    sd = wrapped.state_dict()
    r_key, w_key = prefix + "svgd_state.net.0.linear.r", prefix + "net.0.weight"
    assert r_key in sd and w_key in sd
    sd.pop(r_key), sd.pop(w_key)
    sd[prefix + "net.7.weight"] = torch.zeros(1)
    result = wrapped.load_state_dict(sd, strict=False)
    assert sorted(result.missing_keys) == sorted([w_key, r_key])
    assert result.unexpected_keys == [prefix + "net.7.weight"]
    with pytest.raises(RuntimeError, match=r"Missing key\(s\) in state_dict: .*" + r_key.replace(".", r"\.")):
        wrapped.load_state_dict(sd)


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_strict_load_of_a_key_no_node_claims_is_an_error(kind):
    """A checkpoint key that no σ' node of this model uses would silently leave that r at zero:
    with strict=True (the default) the first forward (backend: backward) names it; strict=False
    drops it knowingly."""
    model_t = svgd_fx.transform(PaperMLP((12, 8, 4)), s=0.1)
    model_t(torch.randn(4, 12)).sum().backward()
    sd = {k.removeprefix("svgd_state."): v for k, v in model_t.state_dict().items() if k.startswith("svgd_state.")}
    sd["net.9.linear.r"] = torch.ones(4)              # a layer this model does not have
    for strict in (True, False):
        torch._dynamo.reset()
        fresh = PaperMLP((12, 8, 4))
        if kind == "transform":
            wrapped = svgd_fx.transform(fresh, s=0.1)
            wrapped.svgd_state.load_state_dict(sd, strict=strict)
        else:
            wrapped = torch.compile(fresh, backend="svgd", options={"s": 0.1})
            svgd_fx.state_of(wrapped).load_state_dict(sd, strict=strict)
        if strict:
            with pytest.raises(svgd_fx.SVGDError, match=r"no σ' node of this model uses: \['net.9.linear.r'\]"):
                wrapped(torch.randn(4, 12)).sum().backward()
        else:
            wrapped(torch.randn(4, 12)).sum().backward()


def test_r_shape_never_depends_on_batch():
    torch.manual_seed(0)
    case = CASE["res_cnn"]
    model = case.make()
    model_t = svgd_fx.transform(model, s=0.1)
    shapes = set()
    for batch in (8, 5, 8, 3, 7):
        xs, y = case.inputs(batch), case.target(batch)
        loss_fn(case.loss, model_t(*xs), y).backward()
        shapes.add(tuple((k, tuple(v.shape)) for k, v in model_t.svgd_state.tensors.items()))
    assert len(shapes) == 1
    assert dict(next(iter(shapes)))["stem.conv2d.r"] == (6, 8, 8)


_RESUME = r"""
import sys, torch, svgd_fx
sys.path.insert(0, {tests!r})
from cases import PaperMLP
torch.manual_seed(0)
mode, phase, path = sys.argv[1:4]
model = PaperMLP()
if mode == "transform":
    wrapped = svgd_fx.transform(model, s=0.1)
else:
    wrapped = torch.compile(model, backend="svgd", options={{"s": 0.1}})
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
gen = torch.Generator().manual_seed(1)
batches = [(torch.randn(16, 784, generator=gen), torch.randint(0, 10, (16,), generator=gen)) for _ in range(5)]
if phase == "resume":
    saved = torch.load(path + ".ckpt", weights_only=True)
    if mode == "backend, lenient load into the bare model":      # as Trainer and Lightning load
        result = model.load_state_dict({{k.removeprefix("_orig_mod."): v for k, v in saved["model"].items()}},
                                       strict=False)
        assert not result.missing_keys and not result.unexpected_keys, result
    else:
        wrapped.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    batches = batches[3:]
grads = []
for i, (x, y) in enumerate(batches):
    if phase == "full" and i == 3:
        torch.save({{"model": wrapped.state_dict(), "opt": opt.state_dict()}}, path + ".ckpt")
    opt.zero_grad()
    torch.nn.functional.cross_entropy(wrapped(x), y).backward()
    grads.append([p.grad.clone() for p in model.parameters()])
    opt.step()
fired = {{row["node"] for row in svgd_fx.explain(wrapped).rows if row["t_in_graph"]}}
state = wrapped.svgd_state if mode == "transform" else svgd_fx.state_of(wrapped)
assert len(fired) == 9 and all(r.abs().sum() > 0 for r in state.tensors.values()), fired   # T ran at all 9 σ'
torch.save(grads[-2:], path + "." + phase)
"""


@pytest.mark.parametrize("mode", ["transform", "backend", "backend, lenient load into the bare model"])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, mode):
    """Save after 3 steps; a new Python process builds a fresh model, loads model + optimizer
    state (weights_only=True) and its next 2 virtual gradients equal the uninterrupted run's.
    The compile backend's model binds its r when loaded before its first forward, also through
    the bare model with strict=False (r is never dropped)."""
    import os
    import subprocess
    import sys

    script = tmp_path / "resume.py"
    script.write_text(_RESUME.format(tests=os.path.dirname(__file__)))
    path = str(tmp_path / "run")
    for phase in ("full", "resume"):
        done = subprocess.run([sys.executable, str(script), mode, phase, path], capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    full, resumed = torch.load(path + ".full"), torch.load(path + ".resume")
    for step, (a, b) in enumerate(zip(full, resumed)):
        for i, (u, v) in enumerate(zip(a, b)):
            assert torch.equal(u, v), f"{mode}: step {step + 4}, parameter {i} differs after resuming"
