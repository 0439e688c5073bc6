"""Bad input gets a ValueError that says what and why; capture problems name what to do."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx


@pytest.mark.parametrize("kwargs,match", [
    ({"s": 0.0}, "s must be a finite number > 0"),
    ({"s": -1.0}, "s must be a finite number > 0"),
    ({"s": float("inf")}, "s must be a finite number > 0"),
    ({"s": float("nan")}, "s must be a real number"),
    ({"s": 0.1, "rho": 1.0}, r"rho must lie in \[0, 1\)"),
    ({"s": 0.1, "rho": -0.1}, r"rho must lie in \[0, 1\)"),
    ({"s": 0.1, "eps": 0.0}, "eps must be a finite number > 0"),
    ({"s": 0.1, "eps": -1e-6}, "eps must be a finite number > 0"),
    ({"s": 0.1, "reduction": "none"}, "reduction must be 'mean' or 'sum'"),
    ({"s": 0.1, "r_shape": "row"}, "r_shape must be 'full'"),
    ({"s": 0.1, "exclude": ["nope.weight"]}, "exclude names parameters the model does not have"),
])
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        svgd_fx.transform(nn.Linear(3, 2), **kwargs)


def test_no_trainable_parameters():
    model = nn.Linear(3, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        svgd_fx.transform(model, s=0.1)
    with pytest.raises(ValueError, match="no trainable parameters"):
        svgd_fx.transform(nn.ReLU(), s=0.1)


def test_non_float_parameters():
    model = nn.Linear(3, 2)
    model.c = nn.Parameter(torch.ones(2, dtype=torch.complex64))
    with pytest.raises(ValueError, match=r"floating-point parameters.*c \(torch.complex64\)"):
        svgd_fx.transform(model, s=0.1)


def test_not_a_module():
    with pytest.raises(TypeError, match="takes an nn.Module"):
        svgd_fx.transform(lambda x: x, s=0.1)


class HiddenParams(nn.Module):
    """Code Dynamo is told not to trace uses b's parameters: they are never seen by the pass (a
    torch.nn layer called there would get a graph of its own: tests/test_eager_layers.py)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    @torch._dynamo.disable
    def _untraceable(self, h):
        return F.linear(h, self.b.weight, self.b.bias)

    def forward(self, x):
        return self._untraceable(torch.relu(self.a(x)))


def test_graph_break_hiding_parameters_raises_naming_them():
    """b's gradient does not come through an SVGD graph: the backward that computes it raises
    (before any optimizer step), naming the parameters and the graph break."""
    model = HiddenParams()
    model_t = svgd_fx.transform(model, s=0.1)
    out = model_t(torch.randn(3, 4))                 # the forward itself is fine
    with pytest.raises(svgd_fx.CoverageError, match=r"\['b.weight', 'b.bias'\].*exclude=") as info:
        F.cross_entropy(out, torch.tensor([0, 1, 0])).backward()
    assert "test_errors.py:" in str(info.value) and "self._untraceable(" in str(info.value)


def test_graph_break_hiding_parameters_can_be_excluded_knowingly():
    model = HiddenParams()
    model_t = svgd_fx.transform(model, s=0.1, exclude=["b.weight", "b.bias"])
    F.cross_entropy(model_t(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
    report = svgd_fx.explain(model_t)
    assert report.params_plain["b.weight"] == "excluded by the user"
    assert {r["node"]: r["t_in_graph"] for r in report.rows} == {"a.linear": True}


class DataDependent(nn.Module):
    """Data-dependent Python control flow: Dynamo splits the graph; both halves are covered."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)
        self.c = nn.Linear(4, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.sum() > 0:
            return self.b(h)
        return self.c(h)


def test_data_dependent_branch_trains_and_checks_per_step():
    """Each step checks the parameters that received gradients: the branch not taken gets none
    (c at step 0), which is fine; the other branch compiles when first taken, with T."""
    model = DataDependent()
    with torch.no_grad():
        model.a.weight.copy_(torch.eye(4))
        model.a.bias.zero_()
    model_t = svgd_fx.transform(model, s=0.1)
    y = torch.tensor([0, 1, 0])
    F.cross_entropy(model_t(torch.ones(3, 4)), y).backward()       # the `b` branch
    assert model.c.weight.grad is None and model.b.weight.grad is not None
    F.cross_entropy(model_t(-torch.ones(3, 4)), y).backward()      # relu -> 0: the `c` branch
    assert model.c.weight.grad is not None
    assert {r["node"]: r["t_in_graph"] for r in svgd_fx.explain(model_t).rows} == {
        "a.linear": True, "b.linear": True, "c.linear": True}


class AuxHead(nn.Module):
    """An auxiliary head that a step may not use: eager leaves its .grad None, and so must svgd_fx."""

    def __init__(self):
        super().__init__()
        self.body, self.head, self.aux = nn.Linear(4, 4), nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x, with_aux: bool = False):
        h = torch.relu(self.body(x))
        return self.head(h) + (self.aux(h) if with_aux else 0)


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_an_unused_parameter_is_not_an_error(kind):
    model = AuxHead()
    wrapped = svgd_fx.transform(model, s=0.1) if kind == "transform" else \
        torch.compile(model, backend="svgd", options={"s": 0.1})
    F.cross_entropy(wrapped(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
    assert model.aux.weight.grad is None and model.head.weight.grad is not None
    F.cross_entropy(wrapped(torch.randn(3, 4), with_aux=True), torch.tensor([0, 1, 0])).backward()
    assert model.aux.weight.grad is not None
    assert {r["node"] for r in svgd_fx.explain(wrapped).rows if r["t_in_graph"]} >= {"aux.linear", "head.linear"}


def _small():
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


class _Functional(nn.Module):
    """Parameters used by functional calls (a frame run uncompiled leaves them outside the graphs;
    torch.nn layers would get graphs of their own there)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.randn(5, 6)), nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, self.w1)), self.w2)


def test_recompile_limit_is_loud_not_plain_gradients():
    """A frame Dynamo stops compiling (its recompile limit) would run uncompiled: plain gradients.
    transform raises instead — on a later recompile of a model already trained, and for the
    transform that goes past the limit of one model class."""
    model_t = svgd_fx.transform(_small(), s=0.1)
    with torch._dynamo.config.patch(recompile_limit=1):
        model_t(torch.randn(8, 6)).sum().backward()
        assert svgd_fx.explain(model_t).rows[0]["t_in_graph"]
        with pytest.raises(svgd_fx.SVGDError, match=r"recompile limit \(.*= 1\).*plain gradients.*reset\(\)"):
            model_t(torch.randn(5, 6))          # a new batch size needs a second graph
    torch._dynamo.reset()     # what the message advises between models
    with torch._dynamo.config.patch(recompile_limit=2):
        for _ in range(2):
            svgd_fx.transform(_small(), s=0.1)(torch.randn(8, 6)).sum().backward()
        with pytest.raises(svgd_fx.SVGDError, match="recompile limit"):
            svgd_fx.transform(_small(), s=0.1)(torch.randn(8, 6))


def test_backend_past_the_recompile_limit_is_loud_not_plain_gradients():
    """Under the backend, a forward past TorchDynamo's recompile limit runs uncompiled after
    earlier ones ran through SVGD graphs: its backward raises, naming the limit (it used to count
    as covered by the graphs of the step before)."""
    torch._dynamo.reset()
    model = _Functional()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1}, dynamic=False)
    with torch._dynamo.config.patch(recompile_limit=2):
        for batch in (8, 5):
            model_c(torch.randn(batch, 6)).sum().backward()
        assert all(row["t_in_graph"] for row in svgd_fx.explain(model_c).rows)
        out = model_c(torch.randn(3, 6))          # a third shape: Dynamo runs it uncompiled
        with pytest.raises(svgd_fx.CoverageError, match=r"'w1'.*recompile limit \(.*= 2\)"):
            out.sum().backward()


def test_backend_inside_another_compile_is_loud():
    """torch.compile(torch.compile(model, backend='svgd')) compiles the model with the outer
    compile's backend: no SVGD graph, and the error says so."""
    torch._dynamo.reset()
    model_c = torch.compile(_small(), backend="svgd", options={"s": 0.1})
    outer = torch.compile(model_c)
    with pytest.raises(svgd_fx.CoverageError, match="No graph of Sequential.*torch.compile around"):
        outer(torch.randn(4, 6)).sum().backward()


def test_a_second_backward_through_the_same_graph_is_covered():
    """retain_graph=True, then a second backward through the same SVGD graph (the backend's fused
    T takes it as a second observation): virtual gradients, not a coverage error; coverage is
    marked by the backward that passes the graph, not by the forward."""
    torch._dynamo.reset()
    model = _small()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    loss = model_c(torch.randn(4, 6)).pow(2).sum()
    loss.backward(retain_graph=True)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    assert all(row["t_in_graph"] for row in svgd_fx.explain(model_c).rows)


def test_one_model_one_entry_point():
    """transform of what transform returned, of a compiled model, or of a model under backend
    'svgd' (and the backend on a transformed model) name the mistake; a second transform of one
    model (a re-run notebook cell) takes over, and the first one raises when called (its
    gradient checks would otherwise flag the second one's gradients as a graph break)."""
    torch._dynamo.reset()
    model = _small()
    first = svgd_fx.transform(model, s=0.1)
    with pytest.raises(TypeError, match="already what svgd_fx.transform returned"):
        svgd_fx.transform(first, s=0.1)
    second = svgd_fx.transform(model, s=0.1)
    second(torch.randn(4, 6)).sum().backward()                   # no coverage error from `first`
    assert all(row["t_in_graph"] for row in svgd_fx.explain(second).rows)
    with pytest.raises(svgd_fx.SVGDError, match="superseded by a later svgd_fx.transform"):
        first(torch.randn(4, 6))
    with pytest.raises((torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.InternalTorchDynamoError),
                       match="given to svgd_fx.transform"):
        torch.compile(model, backend="svgd", options={"s": 0.1})(torch.randn(4, 6))

    other = _small()
    other_c = torch.compile(other, backend="svgd", options={"s": 0.1})
    other_c(torch.randn(4, 6)).sum().backward()
    with pytest.raises(TypeError, match="compiled with backend 'svgd'"):
        svgd_fx.transform(other, s=0.1)
    with pytest.raises(TypeError, match="what torch.compile returned"):
        svgd_fx.transform(torch.compile(_small()), s=0.1)


def test_owner_lookups_name_the_caller_and_what_they_take():
    """explain / state_of / accumulate / switch_to_sgd resolve the model the same way (owner_of)."""
    model_t = svgd_fx.transform(_small(), s=0.1)
    assert svgd_fx.state_of(model_t) is model_t.svgd_state
    plain = _small()
    with pytest.raises(TypeError, match=r"svgd_fx.explain takes .* after its first forward; got Sequential"):
        svgd_fx.explain(plain)               # never compiled: explain must not bind it
    assert svgd_fx.capture.backend.binding_of(plain) is None
    with pytest.raises(TypeError, match=r"svgd_fx.explain takes .*; got object"):
        svgd_fx.explain(object())
    with pytest.raises(TypeError, match=r"svgd_fx.state_of takes .*; got int"):
        svgd_fx.state_of(3)
    with pytest.raises(ValueError, match=r"switch_to_sgd: this model does not use method='tso-alra'"):
        svgd_fx.switch_to_sgd(model_t)
