"""TSO-ALRA (``transform(model, method="tso-alra")``): planning, and the switch to SGD.

The numbers are in ``docs/tso-alra.md``; the joint-graph rewrite in
:mod:`svgd_fx.passes.kronecker`; the T node (``svgd_fx::kron_t``) in
:mod:`svgd_fx.kernels.kron_op`. The state per Kronecker layer ``<σ'>`` is
``<σ'>.A``, ``.A_root``, ``.B``, ``.B_root``, ``.steps``, and one ``tso.switched`` flag per model,
all in ``state_dict()``.
"""

from __future__ import annotations

import math

import torch

from .passes.kronecker import STATE_PARTS, KronSpec, kronecker_layer
from .passes.locate import ParamInput

SWITCHED_KEY = "tso.switched"


def plan_layers(owner, analysis, param_nodes, name_to_input, first_input: int):
    """Kronecker specs and their state for the σ' nodes of one graph.

    Marks every σ' node's parameter inputs for ``explain()``: preconditioned (weight and
    bias of a Kronecker layer) or plain, with the reason. Returns ``(specs, r_specs)`` where
    ``r_specs`` are ``SVGDState.get_or_create`` arguments, in graph-input order from
    ``first_input`` (the last one is the model's ``tso.switched`` flag).
    """
    config, log = owner.config, owner.log
    trainable = set(name_to_input) - set(owner.excluded)
    layers, r_specs = [], []
    for sigma in analysis.sigmas:
        layer, why = kronecker_layer(sigma, param_nodes, trainable)
        own = {layer.weight, layer.bias} - {None} if layer else set()
        sigma.param_inputs = [_marked(p, layer, own, why, owner.excluded) for p in sigma.param_inputs]
        key = sigma.name if layer else None
        record = log.records.setdefault(sigma.name, _record(sigma, key, layer))
        if layer is None:
            continue
        record.state_keys = tuple(f"{sigma.name}.{part}" for part in STATE_PARTS)
        n, m = layer.sizes
        dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        where = f"{sigma.name!r} ({sigma.location})"
        for key, shape in zip(record.state_keys, ((n, n), (n, n), (m, m), (m, m))):
            r_specs.append((key, shape, dtype, sigma.device, where))
        r_specs.append((record.state_keys[-1], (), torch.int64, torch.device("cpu"), where))
        layers.append((sigma, layer))
    r_specs.append((SWITCHED_KEY, (), torch.float32, torch.device("cpu"), "TSO-ALRA's switch to SGD"))
    switched_input = first_input + len(r_specs) - 1
    specs = [
        KronSpec(
            source=sigma.source, name=sigma.name, layer=layer,
            weight_input=name_to_input[layer.weight],
            bias_input=name_to_input[layer.bias] if layer.bias is not None else None,
            state_inputs=tuple(first_input + len(STATE_PARTS) * i + j for j in range(len(STATE_PARTS))),
            switched_input=switched_input, gamma=config.gamma, t_int=config.t_int, damping=config.damping,
            mean_reduction=config.reduction == "mean",
            switch_at_step=-1 if config.switch_at_step is None else config.switch_at_step,
        )
        for i, (sigma, layer) in enumerate(layers)
    ]
    return specs, r_specs


def _marked(p: ParamInput, layer, own: set[str], why: str, excluded) -> ParamInput:
    """``p`` as explain() should show it: preconditioned when all its parameters are the
    layer's weight/bias, otherwise plain with the reason."""
    if own.intersection(p.params):
        n, m = layer.sizes
        folded = " (bias folded into A as a constant-1 input)" if layer.bias is not None else ""
        return ParamInput(p.arg, p.params, set(p.params) <= own,
                          f"TSO-ALRA: Kronecker factors A {n}x{n}, B {m}x{m} of this {layer.kind}{folded}")
    return ParamInput(p.arg, p.params, False, "excluded by the user" if set(p.params) & set(excluded) else why)


def _record(sigma, key, layer):
    from ._transform import SigmaRecord

    return SigmaRecord(sigma, key, layer.sizes if layer else None)


def _tso_owner(model, caller: str):
    """The SVGDModule or backend binding of a TSO-ALRA model (a ValueError for any other)."""
    from ._backend import owner_of

    owner = owner_of(model, caller)
    if owner.config is None or owner.config.method != "tso-alra":
        raise ValueError(f"svgd_fx.{caller}: this model does not use method='tso-alra'")
    return owner


def switch_to_sgd(model) -> None:
    """TSO-ALRA's second stage, from the next backward on: plain gradients for every parameter,
    factors frozen (Algorithm 1, lines 10–12). Irreversible except by loading a state."""
    state = _tso_owner(model, "switch_to_sgd").svgd_state
    flag = state.tensors.get(SWITCHED_KEY)
    if flag is None:           # before the first forward: the flag is created switched
        state._pending[SWITCHED_KEY] = torch.ones(())
    else:
        flag.fill_(1.0)


def switched(model) -> bool:
    """Whether TSO-ALRA has switched to SGD (by ``switch_to_sgd`` or ``switch_at_step``)."""
    owner = _tso_owner(model, "switched")
    state = owner.svgd_state
    flag = state.tensors.get(SWITCHED_KEY, state._pending.get(SWITCHED_KEY))
    if flag is not None and bool(flag):
        return True
    k = owner.config.switch_at_step
    steps = [int(t) for key, t in state.tensors.items() if key.endswith(".steps")]
    return k is not None and bool(steps) and max(steps) >= k


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
