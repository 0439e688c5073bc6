"""Which object holds a model's SVGD: one lookup for every public function that takes a model."""

from __future__ import annotations

from typing import Any

from .capture.backend import lookup_binding
from .state import SVGDState
from .capture.transform import SVGDModule
from .session import Session


def owner_of(model: Any, caller: str, create: bool = True) -> Session:
    """The :class:`~svgd_fx.session.Session` of a model: ``transform``'s ``SVGDModule``'s
    (also inside DDP), or the compile backend's binding of the model (given itself or as
    ``torch.compile`` returned it). ``create=False``: only a binding that has compiled graphs;
    otherwise one is made (see :func:`state_of`)."""
    inner = model.module if type(model).__name__ == "DistributedDataParallel" else model
    if isinstance(inner, SVGDModule):
        return inner.session
    return lookup_binding(model, inner, caller, create)


def state_of(model: Any) -> SVGDState:
    """The SVGD state (one r per σ' node) of a model compiled with ``backend="svgd"``.

    Accepts the model or what ``torch.compile`` returned (or ``transform``'s result). Creates
    the (empty) state if the model was not compiled yet, so ``model_c.load_state_dict(checkpoint)``
    can be called before the first forward: the r tensors wait there and are checked when traced.
    """
    return owner_of(model, "state_of").svgd_state
