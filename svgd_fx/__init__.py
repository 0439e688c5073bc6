"""svgd_fx — SVGD (Stochastic Virtual Gradient Descent, Li & Shu) for any PyTorch model.

>>> import torch, svgd_fx
>>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
>>> model_t = svgd_fx.transform(model, s=0.1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.3)
>>> loss = torch.nn.functional.cross_entropy(model_t(torch.randn(16, 4)), torch.randint(0, 3, (16,)))
>>> loss.backward()              # p.grad now holds the virtual gradient
>>> opt.step()
"""

from __future__ import annotations

from torch import nn

from . import _backend, kernels  # noqa: F401  (kernels registers torch.ops.svgd_fx.virtual_grad)
from ._accumulate import accumulate
from ._backend import backend
from .owners import state_of
from ._explain import Report, explain
from .errors import (CoverageError, EagerLayerWarning, FactorError, GradientAccumulationWarning, NonFiniteGradientError,
                     RerouteError, StateShapeError, SVGDError)
from ._transform import SVGDModule, check_model
from .switch import SwitchOnPlateau, switch_to_sgd, switched
from .config import (ExcludeSpec, SVGDConfig, check_scaler, make_config, options_doc, resolve_codegen,
                     resolve_exclude)

__all__ = ["transform", "accumulate", "switch_to_sgd", "switched", "SwitchOnPlateau", "FactorError", "backend", "state_of", "explain", "Report", "SVGDModule", "SVGDConfig", "SVGDError", "StateShapeError",
           "RerouteError", "CoverageError", "NonFiniteGradientError", "GradientAccumulationWarning",
           "EagerLayerWarning"]
__version__ = "0.1.0"


def transform(
    model: nn.Module,
    s: float | None = None,
    *,
    method: str = "svgd",
    rho: float | None = None,
    eps: float | None = None,
    r_shape: str | None = None,
    reduction: str = "mean",
    nonfinite: str | None = None,
    exclude: ExcludeSpec = None,
    grad_scaler=None,
    distributed: bool | None = None,
    t_impl: str = "fused",
    gamma: float | None = None,
    t_int: int | None = None,
    damping: float | None = None,
    switch_at_step: int | None = None,
    codegen: str | None = None,
) -> SVGDModule:
    """Return ``model`` with SVGD's backward: after ``loss.backward()`` every ``p.grad`` holds
    the virtual gradient (docs/contract.md), to be used by plain SGD (``torch.optim.SGD``).

    ``model`` is any ``nn.Module`` (or ``torch.fx.GraphModule``); it is not modified, and the
    result shares its parameters and buffers. The options (``svgd_fx.config.OPTIONS``):

"""
    codegen = resolve_codegen(codegen)
    config = make_config(s=s, method=method, rho=rho, eps=eps, r_shape=r_shape, reduction=reduction,
                         nonfinite=nonfinite, grad_scaler=grad_scaler, distributed=distributed,
                         t_impl=t_impl if codegen == "inductor" else "op", gamma=gamma, t_int=t_int,
                         damping=damping, switch_at_step=switch_at_step)
    if isinstance(model, SVGDModule):
        raise TypeError("svgd_fx.transform: this is already what svgd_fx.transform returned (for "
                        f"{type(model.model).__name__}); train it as it is. For other options, transform a fresh "
                        "model (fresh.load_state_dict(model_t.model.state_dict())).")
    check_model(model)
    if _backend.binding_of(model) is not None and _backend.binding_of(model).config is not None:
        raise TypeError("svgd_fx.transform: this model is compiled with backend 'svgd', which gives it SVGD "
                        "already (one model, one SVGD state): use one entry point per model.")
    if getattr(model, "_orig_mod", None) is not None:
        raise TypeError("svgd_fx.transform: this is what torch.compile returned; pass the model itself "
                        "(transform compiles it): svgd_fx.transform(model_c._orig_mod, ...).")
    return SVGDModule(model, config, resolve_exclude(model, exclude), check_scaler(grad_scaler), codegen)


transform.__doc__ += options_doc("transform")
