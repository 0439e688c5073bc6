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

import torch
from torch import nn

from . import _backend, kernels  # noqa: F401  (kernels registers torch.ops.svgd_fx.virtual_grad)
from ._accumulate import accumulate
from ._backend import backend, state_of
from ._explain import Report, explain
from ._tso import SwitchOnPlateau, switch_to_sgd, switched
from .errors import (CoverageError, EagerLayerWarning, FactorError, GradientAccumulationWarning, NonFiniteGradientError,
                     RerouteError, StateShapeError, SVGDError)
from ._transform import ExcludeSpec, SVGDConfig, SVGDModule, _check_model, _resolve_exclude, resolve_codegen

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
    reduction: str = "mean",
    exclude: ExcludeSpec = None,
    r_shape: str | None = None,
    nonfinite: str | None = None,
    grad_scaler=None,
    distributed: bool | None = None,
    gamma: float | None = None,
    t_int: int | None = None,
    damping: float | None = None,
    switch_at_step: int | None = None,
    codegen: str | None = None,
) -> SVGDModule:
    """Return ``model`` with SVGD's backward: after ``loss.backward()`` every ``p.grad`` holds
    the virtual gradient (docs/contract.md), to be used by plain SGD (``torch.optim.SGD``).

    model:     any ``nn.Module`` (or ``torch.fx.GraphModule``); it is not modified, and the
               result shares its parameters and buffers.
    s:         T's scale (> 0), required for SVGD. The paper used 0.1, 0.01 and 0.001.
    method:    "svgd" (default) or "tso-alra" (Ida & Fujiwara: two-sided Kronecker T on Linear
               and Conv2d layers, then a switch to SGD; docs/tso-alra.md).
    rho, eps:  r's decay in [0, 1) (default 0.9) and the floor under sqrt(r + eps) (1e-6).
    reduction: how the loss combines the batch: "mean" (torch's default; the per-sample
               gradient is B·g) or "sum" (it is g).
    exclude:   parameter names, or a predicate ``(name, param) -> bool``, to keep on plain
               gradients.
    r_shape:   "full" (r has the σ' output's per-sample shape, the default) or "channel"
               (r over the channel dimension only, for σ' nodes whose per-sample shape varies,
               e.g. a sequence length that changes between batches).
    nonfinite: "raise" (default without a scaler): an inf/NaN in ∇σ'J raises
               ``NonFiniteGradientError`` naming the σ' node, inside the backward, before any
               optimizer step; "skip" (default with a scaler): training goes on. Either way r
               is never updated from a non-finite statistic.
    grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (fp16 training). r is then
               built from the unscaled gradient, and a step the scaler skips (inf/NaN found)
               leaves r as it was. Call ``scaler.update()`` once per step, as usual. A forward
               under fp16 autocast with grad enabled raises unless a scaler is given, or
               ``grad_scaler=False`` says that this fp16 training has none.
    distributed: with DDP (each rank sees part of the batch), ``True`` all-reduces T's batch statistic
               over torch.distributed's default group before T, so every rank's r is what one
               process would build on the joined batch (r-sized, one all-reduce per σ' node).
    gamma, t_int, damping, switch_at_step:  TSO-ALRA's options (method="tso-alra" only): the
               new observation's weight in the factors' averages (0.05), steps between inverse
               roots (20), ε in U(Λ+εI)^-½Uᵀ (1e-6), and after how many steps to train on plain
               gradients (None: when ``svgd_fx.switch_to_sgd(model_t)`` is called).
    codegen:   "inductor" (default): the rewritten graphs are compiled by inductor, T fused into its
               kernels (as ``backend="svgd"`` does); a non-finite ∇σ'J is then counted in the
               kernels and raised by the *next* forward. "fx": the rewritten FX graphs run as
               they are, T as the ``svgd_fx::virtual_grad`` op (raises inside the backward):
               for debugging and exact comparisons. The environment variable
               ``SVGD_FX_CODEGEN`` sets the default.
    """
    config = make_config(s=s, method=method, rho=rho, eps=eps, reduction=reduction, r_shape=r_shape,
                         nonfinite=nonfinite, grad_scaler=grad_scaler, distributed=distributed, gamma=gamma,
                         t_int=t_int, damping=damping, switch_at_step=switch_at_step)
    if isinstance(model, SVGDModule):
        raise TypeError("svgd_fx.transform: this is already what svgd_fx.transform returned (for "
                        f"{type(model.model).__name__}); train it as it is. For other options, transform a fresh "
                        "model (fresh.load_state_dict(model_t.model.state_dict())).")
    _check_model(model)
    bound = _backend._bound(getattr(model, "_orig_mod", model))
    if bound is not None and bound.config is not None:
        raise TypeError("svgd_fx.transform: this model is compiled with backend 'svgd', which gives it SVGD "
                        "already (one model, one SVGD state): use one entry point per model.")
    if getattr(model, "_orig_mod", None) is not None:
        raise TypeError("svgd_fx.transform: this is what torch.compile returned; pass the model itself "
                        "(transform compiles it): svgd_fx.transform(model_c._orig_mod, ...).")
    excluded = _resolve_exclude(model, exclude)
    return SVGDModule(model, config, excluded, _check_scaler(grad_scaler), resolve_codegen(codegen))


def make_config(*, s, method, rho, eps, reduction, r_shape, nonfinite, grad_scaler, distributed, gamma, t_int,
                damping, switch_at_step, accumulation=False) -> SVGDConfig:
    scaling = isinstance(grad_scaler, torch.amp.GradScaler)
    if method == "tso-alra" and scaling:
        raise ValueError("svgd_fx: grad_scaler is not supported with method='tso-alra' yet (the factors "
                         "would be built from S× scaled gradients)")
    if nonfinite is None:
        nonfinite = "skip" if scaling else "raise"
    return SVGDConfig.from_options(method=method, s=s, rho=rho, eps=eps, reduction=reduction, r_shape=r_shape,
                                   nonfinite=nonfinite, distributed=None if distributed is None else bool(distributed),
                                   gamma=gamma, t_int=t_int,
                                   damping=damping, switch_at_step=switch_at_step, accumulation=bool(accumulation))


def _check_scaler(scaler):
    """The GradScaler to read, None (not given: an fp16 autocast forward raises), or False (no
    scaler, knowingly: given as False, or a disabled scaler, which scales nothing)."""
    if scaler is None or scaler is False:
        return scaler
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"svgd_fx: grad_scaler must be a torch.amp.GradScaler (or False: fp16 without a scaler), "
                        f"got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else False
