"""The option list is written once (``svgd_fx.config.OPTIONS``): the entry points follow it."""

import inspect

import pytest
import torch

import svgd_fx
from svgd_fx import config


@pytest.mark.parametrize("entry, fn, skip", [("transform", svgd_fx.transform, {"model"}),
                                             ("backend", svgd_fx.backend.__init__, {"self"})])
def test_each_entry_point_takes_exactly_the_listed_options_with_their_defaults(entry, fn, skip):
    params = [p for name, p in inspect.signature(fn).parameters.items() if name not in skip]
    assert [p.name for p in params] == list(config.names(entry))
    assert {p.name: p.default for p in params} == {n: config.BY_NAME[n].default for n in config.names(entry)}
    doc = fn.__doc__ if entry == "transform" else svgd_fx.backend.__doc__
    for name in config.names(entry):
        assert f"    {name}: " in doc, f"{name} is not documented in {entry}'s docstring"


def test_entry_only_options_are_only_where_they_belong():
    assert "codegen" in config.names("transform") and "codegen" not in config.names("backend")
    assert "accumulation" in config.names("backend") and "accumulation" not in config.names("transform")


def test_the_backend_options_dict_knows_the_same_names():
    model = torch.nn.Linear(3, 2)
    compiled = torch.compile(model, backend="svgd", options={"s": 0.1, "codegen": "fx"})
    with pytest.raises(Exception, match=r"unknown svgd backend options \['codegen'\]"):   # in Dynamo's wrapping
        compiled(torch.randn(4, 3))


@pytest.mark.parametrize("method, foreign", [("svgd", {"gamma": 0.1}), ("tso-alra", {"rho": 0.5})])
def test_an_option_of_the_other_method_is_refused_by_name(method, foreign):
    kw = {"s": 0.1} if method == "svgd" else {}
    with pytest.raises(ValueError, match=f"{next(iter(foreign))!r}.*not an option of method={method!r}"):
        svgd_fx.transform(torch.nn.Linear(3, 2), method=method, **kw, **foreign)


def test_defaults_are_filled_per_method():
    svgd = config.make_config(s=0.1)
    assert (svgd.rho, svgd.eps, svgd.r_shape, svgd.nonfinite) == (0.9, 1e-6, "full", "raise")
    tso = config.make_config(method="tso-alra")
    assert (tso.gamma, tso.t_int, tso.damping, tso.switch_at_step) == (0.05, 20, 1e-6, None)
    assert config.make_config(s=0.1, grad_scaler=torch.amp.GradScaler("cpu")).nonfinite == "skip"
