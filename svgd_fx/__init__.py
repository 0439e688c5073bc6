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

from . import kernels  # noqa: F401  (registers torch.ops.svgd_fx.virtual_grad)
from ._backend import backend, state_of
from ._explain import Report, explain
from .errors import CoverageError, NonFiniteGradientError, RerouteError, StateShapeError, SVGDError
from ._transform import ExcludeSpec, SVGDConfig, SVGDModule, _check_model, _resolve_exclude

__all__ = ["transform", "backend", "state_of", "explain", "Report", "SVGDModule", "SVGDConfig", "SVGDError", "StateShapeError",
           "RerouteError", "CoverageError", "NonFiniteGradientError"]
__version__ = "0.1.0"


def transform(
    model: nn.Module,
    s: float,
    *,
    rho: float = 0.9,
    eps: float = 1e-6,
    reduction: str = "mean",
    exclude: ExcludeSpec = None,
    r_shape: str = "full",
    nonfinite: str | None = None,
    grad_scaler=None,
    distributed: bool = False,
) -> SVGDModule:
    """Return ``model`` with SVGD's backward: after ``loss.backward()`` every ``p.grad`` holds
    the virtual gradient (SPEC), to be used by plain SGD (``torch.optim.SGD``).

    model:     any ``nn.Module`` (or ``torch.fx.GraphModule``); it is not modified, and the
               result shares its parameters and buffers.
    s:         T's scale (> 0). The paper used 0.1, 0.01 and 0.001.
    rho, eps:  r's decay in [0, 1) and the floor under sqrt(r + eps).
    reduction: how the loss combines the batch: "mean" (torch's default; the per-sample
               gradient is B·g) or "sum" (it is g).
    exclude:   parameter names, or a predicate ``(name, param) -> bool``, to keep on plain
               gradients.
    r_shape:   "full" (r has the σ' output's per-sample shape, SPEC's default) or "channel"
               (r over the channel dimension only, for σ' nodes whose per-sample shape varies,
               e.g. a sequence length that changes between batches).
    nonfinite: "raise" (default without a scaler): an inf/NaN in ∇σ'J raises
               ``NonFiniteGradientError`` naming the σ' node, inside the backward, before any
               optimizer step; "skip" (default with a scaler): training goes on. Either way r
               is never updated from a non-finite statistic.
    grad_scaler: the ``torch.amp.GradScaler`` that scales the loss (fp16 training). r is then
               built from the unscaled gradient, and a step the scaler skips (inf/NaN found)
               leaves r as it was. Call ``scaler.update()`` once per step, as usual.
    distributed: with DDP (each rank sees part of the batch), all-reduce T's batch statistic
               over torch.distributed's default group before T, so every rank's r is what one
               process would build on the joined batch (r-sized, one all-reduce per σ' node).
    """
    if nonfinite is None:
        nonfinite = "skip" if grad_scaler is not None else "raise"
    config = SVGDConfig(s=s, rho=rho, eps=eps, reduction=reduction, r_shape=r_shape, nonfinite=nonfinite,
                        distributed=bool(distributed))
    _check_model(model)
    excluded = _resolve_exclude(model, exclude)
    return SVGDModule(model, config, excluded, _check_scaler(grad_scaler))


def _check_scaler(scaler):
    if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"svgd_fx: grad_scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    if scaler is not None and not scaler.is_enabled():
        return None    # a disabled scaler scales nothing
    return scaler
