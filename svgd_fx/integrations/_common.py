"""What the framework integrations share: the options given once, and the warnings that name a
framework setting which changes what SVGD computes."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ..config import TRANSFORM, names
from ..errors import FrameworkSettingWarning

# set by each integration from the framework's own objects, never by the user
_FROM_FRAMEWORK = ("grad_scaler",)


def check_options(options: dict[str, Any], caller: str) -> dict[str, Any]:
    """``options`` as ``svgd_fx.transform`` takes them (``s`` among them); unknown names are a
    TypeError naming the known ones."""
    allowed = [n for n in names(TRANSFORM) if n not in _FROM_FRAMEWORK]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        given = [n for n in unknown if n in _FROM_FRAMEWORK]
        raise TypeError(f"{caller}: unknown SVGD option(s) {unknown}"
                        + (f" ({given} come from the framework's own mixed-precision setting)" if given else "")
                        + f"; the options are those of svgd_fx.transform: {allowed}")
    return dict(options)


def warn_if_not_sgd(optimizer: Any, setting: str) -> None:
    """SVGD's virtual gradient is meant for plain SGD (``p ← p − α·T(g)``): another optimizer
    rescales it again. ``optimizer``: an optimizer (or a framework's wrapper of one) or a class."""
    inner = getattr(optimizer, "optimizer", optimizer)      # accelerate's / Lightning's wrappers
    kind = inner if isinstance(inner, type) else type(inner)
    if inner is not None and not issubclass(kind, torch.optim.SGD):
        warnings.warn(
            f"svgd_fx: the optimizer is {kind.__name__}, not torch.optim.SGD: it rescales SVGD's virtual "
            f"gradients again, so the steps are not SVGD's. Set {setting} to torch.optim.SGD (or knowingly keep it).",
            FrameworkSettingWarning, stacklevel=3)


def warn_if_clipping(max_norm: float | None, setting: str) -> None:
    """Clipping by the gradient norm rescales the whole virtual gradient whenever its norm
    exceeds the limit (virtual gradients are often larger than plain ones)."""
    if max_norm is not None and max_norm > 0:
        warnings.warn(
            f"svgd_fx: gradient clipping is on ({setting}={max_norm}): every step whose virtual-gradient norm "
            f"exceeds it is rescaled, which changes SVGD's step. Set {setting}=0 (or None) to turn it off, or "
            "keep it knowingly.", FrameworkSettingWarning, stacklevel=3)
