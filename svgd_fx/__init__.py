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

from . import kernels  # noqa: F401  (registers torch.ops.svgd_fx.virtual_grad)
from ._accumulate import AccumulationWindow, accumulate
from .capture.backend import backend
from .owners import state_of
from ._explain import Report, explain
from .errors import (CoverageError, EagerLayerWarning, FactorError, FrameworkSettingWarning, GradientAccumulationWarning,
                     NonFiniteGradientError, RerouteError, StateShapeError, SVGDError)
from .capture.transform import SVGDModule, transform
from .switch import SwitchOnPlateau, switch_to_sgd, switched
from .config import SVGDConfig
from .sharding import with_saved_state

__all__ = ["transform", "accumulate", "with_saved_state", "AccumulationWindow", "FrameworkSettingWarning", "switch_to_sgd", "switched", "SwitchOnPlateau", "FactorError", "backend", "state_of", "explain", "Report", "SVGDModule", "SVGDConfig", "SVGDError", "StateShapeError",
           "RerouteError", "CoverageError", "NonFiniteGradientError", "GradientAccumulationWarning",
           "EagerLayerWarning"]
__version__ = "0.1.0"
