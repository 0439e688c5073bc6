"""``model.compile(backend="svgd")``, in place.

``nn.Module.compile`` compiles the module's ``_call_impl``, whose frame TorchDynamo skips for the
forward's frame below it. A forward that lives in torch's own files (``nn.Sequential``,
``nn.TransformerEncoderLayer``, a bare ``nn.Linear``) is skipped as well, so nothing at all is
compiled: any other backend just runs eagerly, but these models would train on plain gradients.
Each model here is checked against the float64 reference over steps that move the weights, with T
where the reference has it, whether svgd_fx was imported before the call or only loaded by the
backend's entry point during it.
"""

import copy
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from helpers import pickled, t_fired
from reference import SVGDReference


class _UserNet(nn.Module):
    """A forward of the user's own: Dynamo compiles its frame (the path that always worked)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 8)
        self.head = nn.Sequential(nn.GELU(), nn.Linear(8, 3))

    def forward(self, x):
        return self.head(self.fc(x))


class _Disabled(_UserNet):
    """A forward Dynamo never compiles: its torch.nn layers go through graphs of their own."""

    @torch._dynamo.disable
    def forward(self, x):
        return super().forward(x)


MODELS = {
    "sequential": (lambda: nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.GELU(), nn.Linear(8, 3)),
                   lambda g: torch.randn(5, 4, generator=g), {"0.linear", "1.layer_norm", "3.linear"}),
    "linear": (lambda: nn.Linear(4, 3), lambda g: torch.randn(5, 4, generator=g), {"weight.linear"}),
    "conv_bn": (lambda: nn.Sequential(nn.Conv1d(3, 4, 3, padding=1), nn.BatchNorm1d(4), nn.ReLU()),
                lambda g: torch.randn(2, 3, 7, generator=g), {"0.conv1d", "1.batch_norm"}),
    "encoder_layer": (lambda: nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                      lambda g: torch.randn(2, 5, 8, generator=g), None),
    "user": (_UserNet, lambda g: torch.randn(5, 4, generator=g), {"fc.linear", "head.1.linear"}),
    "user_disabled": (_Disabled, lambda g: torch.randn(5, 4, generator=g), {"fc.linear", "head.1.linear"}),
}


def _train(model, ref, inputs, steps=3):
    """Steps of SGD on both; the gradients compared at every step. Returns the warnings raised."""
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for step in range(steps):
            x = inputs(gen).double()
            model.zero_grad()
            ref.model.zero_grad()
            model(x).square().mean().backward()
            ref(x).square().mean().backward()
            for (name, p), q in zip(model.named_parameters(), ref.model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=lambda m: f"{step} {name}: {m}")
            with torch.no_grad():
                for p, q in zip(model.parameters(), ref.model.parameters()):
                    p -= 0.1 * p.grad
                    q.copy_(p)
    return [w for w in seen if issubclass(w.category, svgd_fx.EagerLayerWarning)]


@pytest.mark.parametrize("name", list(MODELS))
def test_in_place_compile_is_exact(name):
    make, inputs, expected = MODELS[name]
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make().double().train()
    ref = SVGDReference(copy.deepcopy(model), s=0.1)
    model.compile(backend="svgd", options={"s": 0.1})
    layer_warnings = _train(model, ref, inputs)
    if expected is None:        # the encoder layer: T wherever the backend puts it on torch.compile(model)
        twin = copy.deepcopy(make().double())
        twin_c = torch.compile(twin, backend="svgd", options={"s": 0.1})
        twin_c(inputs(torch.Generator().manual_seed(1)).double()).sum().backward()
        expected = t_fired(twin_c)
        assert len(expected) >= 6, expected
    assert t_fired(model) == expected
    assert all(r.abs().sum() > 0 for r in svgd_fx.state_of(model).tensors.values())
    # torch.nn's own models are compiled whole, not layer by layer
    assert len(layer_warnings) == (1 if name == "user_disabled" else 0), [str(w.message) for w in layer_warnings]


class _FunctionalNet(nn.Module):
    """A parameter used by functional code (no torch.nn layer to send through a graph of its own)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 4) / 2)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.tanh(F.linear(x, self.w)))


@pytest.mark.parametrize("name", ["sequential", "functional"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_continues_compiled(name, how):
    """torch drops the compiled call from a model's copies; the copy of a model compiled in place
    with backend 'svgd' is compiled again as it is made, and continues from the same r: exact from
    its first step (a functional parameter would otherwise train on a plain gradient there), with
    its own state (the original's r does not move)."""
    make, inputs = (MODELS["sequential"][:2] if name == "sequential"
                    else (_FunctionalNet, lambda g: torch.randn(5, 4, generator=g)))
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make().double().train()
    ref = SVGDReference(copy.deepcopy(model), s=0.1)
    model.compile(backend="svgd", options={"s": 0.1})
    _train(model, ref, inputs, steps=2)
    copied = copy.deepcopy(model) if how == "deepcopy" else pickled(model)
    assert copied._compiled_call_impl is not None
    before = {k: r.clone() for k, r in svgd_fx.state_of(model).tensors.items()}
    layer_warnings = _train(copied, ref, inputs, steps=2)           # the reference goes on where the original stopped
    assert not layer_warnings
    assert t_fired(copied) == t_fired(model)
    assert all(torch.equal(r, before[k]) for k, r in svgd_fx.state_of(model).tensors.items())
    assert not any(torch.equal(r, before[k]) for k, r in svgd_fx.state_of(copied).tensors.items())


def test_a_shallow_copy_is_refused_at_its_first_call():
    """``copy.copy`` shares the original's parameters and is not compiled: an error before any
    gradient, and the original trains on as before."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = MODELS["sequential"][0]().double()
    ref = SVGDReference(copy.deepcopy(model), s=0.1)
    model.compile(backend="svgd", options={"s": 0.1})
    with pytest.raises(svgd_fx.SVGDError, match=r"shallow copy \(copy.copy\).*copy.deepcopy"):
        copy.copy(model)(torch.randn(5, 4, dtype=torch.float64))
    assert all(p.grad is None for p in model.parameters())
    _train(model, ref, MODELS["sequential"][1])
    assert t_fired(model) == MODELS["sequential"][2]


def test_options_are_checked_at_the_call():
    with pytest.raises(ValueError, match="unknown svgd backend options"):
        nn.Linear(2, 2).compile(backend="svgd", options={"s": 0.1, "bogus": 1})
    with pytest.raises(ValueError, match="no mode="):
        nn.Linear(2, 2).compile(backend="svgd", mode="max-autotune")


def test_compile_with_another_backend_is_not_svgd():
    """The last ``model.compile`` decides: a model compiled again with inductor trains on plain
    gradients, and the gradient check of its earlier SVGD binding says so."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(4, 3))
    model.compile(backend="svgd", options={"s": 0.1})
    model(torch.randn(5, 4)).sum().backward()
    model.compile(backend="eager")
    with pytest.raises(svgd_fx.CoverageError, match="0.weight"):
        model(torch.randn(5, 4)).sum().backward()


def test_in_place_compile_before_svgd_fx_is_imported():
    """A fresh interpreter where ``model.compile(backend="svgd")`` is the first thing that loads
    svgd_fx (through the ``torch_dynamo_backends`` entry point, inside that call)."""
    code = textwrap.dedent("""
        import copy, sys
        import torch
        from torch import nn
        sys.path.insert(0, sys.argv[1])
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()
        twin = copy.deepcopy(model)
        model.compile(backend="svgd", options={"s": 0.1})
        assert "svgd_fx" in sys.modules                   # loaded by the entry point, in that call
        from reference import SVGDReference
        import svgd_fx
        ref = SVGDReference(twin, s=0.1)
        gen = torch.Generator().manual_seed(1)
        for step in range(3):
            x = torch.randn(5, 4, generator=gen, dtype=torch.float64)
            model.zero_grad(); twin.zero_grad()
            model(x).square().mean().backward()
            ref(x).square().mean().backward()
            for p, q in zip(model.parameters(), twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
            with torch.no_grad():
                for p, q in zip(model.parameters(), twin.parameters()):
                    p -= 0.1 * p.grad
                    q.copy_(p)
        fired = {row["node"] for row in svgd_fx.explain(model).rows if row["t_in_graph"]}
        assert fired == {"0.linear", "2.linear"}, fired
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok" in done.stdout
