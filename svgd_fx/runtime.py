"""What runs at every call of a rewritten graph: the graph's extra inputs, fed from the state.

A rewritten graph takes Dynamo's inputs followed by the *extra inputs* of :class:`StateLayout`,
grouped by kind in this order::

    state      one per state tensor (SVGD: r per routed σ'; TSO-ALRA: factors, roots, counters)
    flag       one non-finite counter per routed σ' (fused T with nonfinite="raise")
    acc        one accumulator per r (graphs built for svgd_fx.accumulate)
    inv_scale  a GradScaler's 1/S (one, when a scaler is given)
    collect    the 0-dim "collect" mode (graphs built for svgd_fx.accumulate)

The layout is the one place that knows this order: a method asks it for the index of an
entry when it writes its specs, the plan names the placeholders from it, and
:func:`feeder` builds the tensors of each call from it. Compiled graphs never hold a state
tensor: each call passes the current ones, so ``.to(device)`` and ``load_state_dict`` can
replace or overwrite them freely.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .errors import fp16_without_scaler, nonfinite_error, without_accumulation

KINDS = ("state", "flag", "acc", "inv_scale", "collect")


@dataclass
class StateLayout:
    """The graph's extra inputs, by kind and key, after its ``first`` own inputs."""
    first: int
    entries: dict[str, list[str]] = field(default_factory=lambda: {kind: [] for kind in KINDS})

    def add(self, kind: str, key: str) -> None:
        self.entries[kind].append(key)

    def keys(self, kind: str) -> list[str]:
        return self.entries[kind]

    def index(self, kind: str, key: str) -> int:
        """The graph-input index of entry ``(kind, key)``."""
        offset = self.first
        for k in KINDS:
            if k == kind:
                return offset + self.entries[k].index(key)
            offset += len(self.entries[k])
        raise KeyError(kind)

    def optional_index(self, kind: str, key: str) -> int | None:
        return self.index(kind, key) if key in self.entries[kind] else None

    def placeholder_names(self) -> list[str]:
        return [re.sub(r"\W", "_", f"svgd_{key}") for kind in KINDS for key in self.entries[kind]]


@dataclass
class Feed:
    """What a plan's graph reads besides Dynamo's inputs (see :func:`feeder`)."""
    layout: StateLayout
    state_specs: list[tuple]          # SVGDState.get_or_create arguments, per "state" entry
    compiled_for: list[tuple]         # (shape, dtype, device) of each state tensor when compiled
    device: Any                       # where the state lives (the σ' nodes' device)
    collect_device: Any               # where the "collect" mode input lives
    accumulating: bool = False        # built for svgd_fx.accumulate (with or without σ' nodes to collect)
    acc_specs: list = field(default_factory=list)   # the method's accumulators (MethodPlan.acc_specs)
    raise_flags: bool = True          # raise a flag set in the previous backward (MethodPlan.flags_raised_at_next_call)


def feeder(feed: Feed) -> Callable[[Any], list[torch.Tensor]]:
    """``tensors(owner)``: the extra inputs of one call, from ``owner``'s state, in layout order.

    Also the per-call checks: an fp16 autocast forward without a scaler, an ``accumulate``
    block around graphs built without accumulation, the version of the state the graph was
    fitted to (a replaced tensor is moved where the graph reads it), and a non-finite
    gradient the fused T counted in the previous backward (raised here, at the next call).
    """
    layout = feed.layout
    keys, specs, compiled_for = layout.keys("state"), feed.state_specs, list(feed.compiled_for)
    flag_keys = layout.keys("flag")
    scaled, collecting = bool(layout.keys("inv_scale")), bool(layout.keys("collect"))
    accumulating = feed.accumulating
    device, collect_device = feed.device, feed.collect_device
    autocast_device = torch.device(device).type if device is not None else None
    checked = [None]     # the state's version the tensors were last fitted at

    def tensors(owner) -> list[torch.Tensor]:
        state = owner.svgd_state
        if owner.grad_scaler is None and autocast_device is not None and torch.is_grad_enabled() \
                and torch.is_autocast_enabled(autocast_device) \
                and torch.get_autocast_dtype(autocast_device) == torch.float16:
            raise fp16_without_scaler(owner.entry)
        if state.accumulating and not accumulating:
            raise without_accumulation()
        try:
            rs = [state.tensors[k] for k in keys]
        except KeyError:  # a model first seen through a graph compiled for another one
            rs = [state.get_or_create(*spec) for spec in specs]
        if state.version != checked[0]:
            rs = state.fit(keys, rs, compiled_for)
            checked[0] = state.version
        out = [own_version(r) for r in rs]
        if flag_keys:
            flags = [state.flag(k, device) for k in flag_keys]
            if feed.raise_flags:
                raise_if_flagged(state, flag_keys, flags)
            out += flags
        if feed.acc_specs:
            by_key = dict(zip(keys, rs))
            out += [own_version(state.acc(k, by_key[like].numel() if numel is None else numel, by_key[like].dtype,
                                          by_key[like].device)) for k, like, numel in feed.acc_specs]
        if scaled:
            out.append(scaler_step_boundary(owner, device))
        if collecting:
            out.append(state.collect_flag(collect_device))
        return out

    return tensors


def own_version(r: torch.Tensor) -> torch.Tensor:
    """r as this call's graph sees it: the same storage, its own autograd version counter.

    Autograd saves r for the backward, where T updates it in place (bumping the version of the
    tensor it was given). With one alias per call, two forwards before one backward (a model
    called twice, e.g. a siamese loss) each find their saved r unchanged, and update r in turn.
    """
    return r.data    # shares r's storage; a fresh version counter (0.2 µs, against 2 µs for set_())


def scaler_step_boundary(owner, device) -> torch.Tensor:
    """With a GradScaler: 1/S for T's statistic, and r rolled back after a skipped step.

    Called at every forward. GradScaler lowers its scale exactly when it found inf/NaN and
    skipped ``optimizer.step()`` (its backoff factor is < 1), so a scale below the one of the
    previous forward means that step's r update must be discarded: r goes back to its copy
    from the start of that step. (Call ``scaler.update()`` once per step, as torch documents.)
    """
    scaler, state = owner.grad_scaler, owner.svgd_state
    if scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(torch.device(device))
    now = float(scaler._scale.item())
    if state.scale_used is not None and now < state.scale_used:
        state.roll_back()
    state.scale_used = now
    if torch.is_grad_enabled():
        state.keep_for_roll_back()
    return torch.reciprocal(scaler._scale.to(device)).reshape(())


def raise_if_flagged(state, flag_keys: list[str], flags: list[torch.Tensor]) -> None:
    """The fused T cannot raise inside inductor's kernels: it counts, and the next call raises."""
    if flags[0].device.type == "cpu":
        if not any(f.item() for f in flags):   # a few µs per flag
            return
    elif not bool(torch.stack(flags).any()):   # one device sync per forward, not one per flag
        return
    names = [k.rsplit(".", 1)[0] for k, f in zip(flag_keys, flags) if bool(f)]
    for f in flags:
        f.zero_()
    raise nonfinite_error(", ".join(names), deferred=True)
