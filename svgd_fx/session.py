"""One model's SVGD, whichever entry point made it: :class:`Session`, and its pass log.

A session holds the model (weakly), the options (:class:`~svgd_fx.config.SVGDConfig`, the
excluded parameters, the GradScaler), the state (:class:`~svgd_fx.state.SVGDState`), the pass
log (what the pass found per σ' node) and the gradient guard (the coverage check). ``transform``'s
``SVGDModule`` holds one; the compile backend keeps one (a ``Binding``, which adds how it travels
with the model through copies and pickling) in the model's ``__dict__``. Everything downstream,
the plan, the methods, the runtime feeder, ``explain``, ``accumulate`` and the switch, reads a
session and nothing else; ``entry`` ("transform" / "backend") only picks how messages spell an
option.
"""

from __future__ import annotations

import functools
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .guard import GradientGuard
from .state import SVGDState
from .config import SVGDConfig, describe
from .errors import SVGDError
from .passes.locate import SigmaNode


# the state's keys in a state_dict: <prefix>svgd_state.<σ' name>.r, beside the model's own keys
STATE_PREFIX = "svgd_state."


@dataclass
class SigmaRecord:
    """What the pass found for one σ' node (merged over all graphs that contain it)."""
    sigma: SigmaNode
    key: str | None                           # state key ("fc.linear.r"), or None if not routed
    r_shape: tuple[int, ...] | None
    t_graphs: int = 0                         # number of backward graphs with a T node for it
    state_keys: tuple[str, ...] = ()          # TSO-ALRA: the layer's factor, root and step keys


@dataclass
class PassLog:
    records: dict[str, SigmaRecord] = field(default_factory=dict)
    params_seen: set[str] = field(default_factory=set)
    graphs: int = 0
    backward_graphs: list[torch.fx.GraphModule] = field(default_factory=list)
    forward_graphs: list[torch.fx.GraphModule] = field(default_factory=list)
    key_locations: dict[str, str] = field(default_factory=dict)

    def name(self, sigma: SigmaNode) -> None:
        """Keep one name per σ' across graphs: the same name from another source line gets a suffix."""
        where = sigma.location.split("  ", 1)[0]
        known = self.key_locations.setdefault(sigma.name, where)
        if known != where:
            sigma.name = f"{sigma.name}@{where}"
            self.key_locations.setdefault(sigma.name, where)


@dataclass(eq=False)
class Session:
    model_ref: weakref.ref
    entry: str                                      # "transform" or "backend": how messages spell an option
    svgd_state: SVGDState = field(default_factory=SVGDState)
    log: PassLog = field(default_factory=PassLog)
    config: SVGDConfig | None = None                # None: bound before its options are known (backend)
    excluded: frozenset[str] = frozenset()
    grad_scaler: Any = None
    # the coverage error's message for these parameter names (each entry point knows its likely causes)
    coverage_message: Callable[[list[str]], str] | None = field(default=None, repr=False)
    plans: set[int] = field(default_factory=set)   # ids of the compiled graphs whose σ' nodes are in log
    layers: dict = field(default_factory=dict, repr=False)  # torch.nn layer -> its own graph (capture.eager_layers)
    window: Any = field(default=None, repr=False)   # its AccumulationWindow, for frameworks (_accumulate)
    _guard: GradientGuard | None = field(default=None, repr=False)

    @property
    def model(self) -> nn.Module:
        model = self.model_ref()
        if model is None:
            raise SVGDError("svgd_fx: the model of this SVGD state no longer exists")
        return model

    @property
    def guard(self) -> GradientGuard:
        """The coverage check (see :mod:`svgd_fx.guard`), made at first use (a copy's model is
        complete by then); its first passing check also checks that a loaded state was claimed."""
        if self._guard is None:
            self._guard = GradientGuard(self.model, self.excluded, lambda names: self.coverage_message(names))
            self._guard.on_first_check.append(lambda: self.svgd_state.check_claimed(self.log.records))
            self._guard.quiet = lambda: self.svgd_state.accumulating
        return self._guard

    def configure(self, config: SVGDConfig, excluded: frozenset[str], grad_scaler=None) -> None:
        """Give a session bound before its options were known its options; other options than the
        ones it has are an error (one r per σ' node, built with one set of options)."""
        if self.config is None:
            self.config, self.excluded, self.grad_scaler = config, excluded, grad_scaler
            self.guard.arm(self.model)
        elif (self.config, self.excluded) != (config, excluded):
            raise SVGDError(
                f"svgd_fx: {type(self.model).__name__} is already compiled with SVGD options "
                f"{describe(self.config, self.excluded)}; now asked for {describe(config, excluded)}. "
                "One model keeps one r per σ' node, built with one set of options (a deepcopy of the model "
                "carries them along): for other options, build a fresh model and load the weights into it "
                "(fresh.load_state_dict(model.state_dict()))."
            )


# ----------------------------------------------------------------------------- the state in state_dict
# One pair of hooks for both entry points. ``find(module, prefix, loading)`` is the entry point's
# answer to "whose state goes with this module's keys, and does state_dict() write it there":
# transform's SVGDModule always its own; the compile backend the model's binding, written when the
# keys are written through what torch.compile returned.

def save_state_hook(find: Callable, module: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """``state_dict()``'s post-hook: the session's r tensors as ``<prefix>svgd_state.<σ' name>.r``."""
    session, written = find(module, prefix, False)
    if written:
        session.svgd_state.write(state_dict, prefix + STATE_PREFIX)


def load_state_hook(find: Callable, module: nn.Module, state_dict: dict, prefix: str, local_metadata, strict: bool,
                    missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    """``load_state_dict()``'s pre-hook: takes the ``<prefix>svgd_state.`` keys out (the model never
    sees them) and loads them into the session's state, which reports missing and unexpected keys
    under the names ``state_dict()`` writes (missing ones only where it writes them)."""
    own = prefix + STATE_PREFIX
    mine = {key: state_dict.pop(key) for key in list(state_dict) if key.startswith(own)}
    session, written = find(module, prefix, True)
    if session is None:
        unexpected_keys.extend(mine)
    else:
        session.svgd_state.read(mine, own, strict and written, missing_keys, error_msgs)


def install_state_hooks(module: nn.Module, find: Callable) -> None:
    """The pair of hooks on ``module``, once (a deep copy carries its original's)."""
    if any(getattr(hook, "func", None) is save_state_hook for hook in module._state_dict_hooks.values()):
        return
    module.register_state_dict_post_hook(functools.partial(save_state_hook, find))
    module.register_load_state_dict_pre_hook(functools.partial(load_state_hook, find))
