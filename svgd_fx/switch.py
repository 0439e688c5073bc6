"""TSO-ALRA's second stage: the switch from the Kronecker T to plain SGD (Algorithm 1, lines 10–12).

By step count (``switch_at_step``), by hand (:func:`switch_to_sgd`), or when the validation loss
stops improving (:class:`SwitchOnPlateau`, the paper's real-time switch). The flag is the state
entry ``tso.switched`` (in ``state_dict()``), read by every Kronecker T node.
"""

from __future__ import annotations

import math

from .owners import owner_of
from .config import TSO_ALRA
from .methods.tso import SWITCHED_KEY, switched_off


def _tso_owner(model, caller: str):
    """The SVGDModule or backend binding of a TSO-ALRA model (a ValueError for any other)."""
    owner = owner_of(model, caller)
    if owner.config is None or owner.config.method != TSO_ALRA:
        raise ValueError(f"svgd_fx.{caller}: this model does not use method='tso-alra'")
    return owner


def switch_to_sgd(model) -> None:
    """TSO-ALRA's second stage, from the next backward on: plain gradients for every parameter,
    factors frozen (Algorithm 1, lines 10–12). Irreversible except by loading a state."""
    _tso_owner(model, "switch_to_sgd").svgd_state.fill(SWITCHED_KEY, 1.0)


def switched(model) -> bool:
    """Whether TSO-ALRA has switched to SGD (by ``switch_to_sgd`` or ``switch_at_step``)."""
    owner = _tso_owner(model, "switched")
    state = owner.svgd_state
    return switched_off(state, owner.config.switch_at_step, [key for key in state.tensors if key.endswith(".steps")])


class SwitchOnPlateau:
    """The paper's real-time switch: once per epoch, ``.step(val_loss)``; when the best validation
    loss has not improved (by more than ``min_delta``) for ``patience`` epochs, switch to SGD.

    >>> switch = svgd_fx.SwitchOnPlateau(model_t, patience=3)
    >>> for epoch in range(epochs):
    ...     train_one_epoch(); switch.step(validate())
    """

    def __init__(self, model, patience: int = 3, min_delta: float = 0.0) -> None:
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValueError(f"svgd_fx.SwitchOnPlateau: patience must be an int ≥ 1, got {patience!r}")
        _tso_owner(model, "SwitchOnPlateau")
        self.model, self.patience, self.min_delta = model, patience, float(min_delta)
        self.best, self.stale, self.switched_at_epoch = math.inf, 0, None
        self.epoch = 0

    def step(self, val_loss: float) -> bool:
        """Record one epoch's validation loss; True once the switch has happened."""
        self.epoch += 1
        if self.switched_at_epoch is not None:
            return True
        if float(val_loss) < self.best - self.min_delta:
            self.best, self.stale = float(val_loss), 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            switch_to_sgd(self.model)
            self.switched_at_epoch = self.epoch
        return self.switched_at_epoch is not None
