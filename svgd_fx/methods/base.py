"""The method interface (see :mod:`svgd_fx.methods`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from ..passes.locate import Analysis
from ..runtime import StateLayout
from ..session import Session


@dataclass
class PlanContext:
    """What a method plans from, for one Dynamo graph."""
    owner: Session                         # the model's state, log, config (svgd_fx.session)
    analysis: Analysis                     # locate's σ' nodes and node kinds
    param_nodes: dict                      # placeholder node -> parameter name
    name_to_input: dict[str, int]          # parameter name -> graph-input index
    placeholders: list[torch.fx.Node]
    layout: StateLayout
    accumulating: bool                     # graphs with svgd_fx.accumulate's inputs
    # graph-input index -> {param: linear} of the inputs an earlier graph computed from parameters
    derived_inputs: dict[int, dict[str, bool]] = field(default_factory=dict)
    # a graph planned again for one call's real inputs (``Plan.wrap``'s rebuild): the size that call
    # gives each symbol of Dynamo's graph; empty when Dynamo itself compiles (its hints are the call's)
    call_sizes: dict = field(default_factory=dict)


@dataclass
class MethodPlan:
    specs: list                            # the rewrite's per-σ' specs
    state_specs: list[tuple]               # SVGDState.get_or_create arguments, per "state" entry
    examples: list[torch.Tensor]           # one tensor per extra input, in layout order
    collect_device: Any = None
    t_names: set[str] = field(default_factory=set)
    # svgd_fx.accumulate's accumulators: (key in state.accs, the state key whose dtype and device
    # it takes, its size less the two counts; None: that state tensor's numel)
    acc_specs: list[tuple[str, str, int | None]] = field(default_factory=list)
    # the "flag" inputs: raised at the next call (SVGD's fused T), or by the method itself (TSO-ALRA,
    # at the end of the backward that set them)
    flags_raised_at_next_call: bool = True


@dataclass(frozen=True)
class Variants:
    """Graphs a method compiles beside its main one, for the calls whose state ``choose`` names
    (``choose(state)``: one of ``names``, or None for the main graph); ``ran(state, name, node)``
    follows every call with grad enabled (``node``: the call's backward node, for hooks)."""
    names: tuple[str, ...]
    choose: Any
    ran: Any


class Method(Protocol):
    supports: frozenset[str]

    def plan(self, ctx: PlanContext) -> MethodPlan: ...

    def commit(self, state, phase: str) -> None: ...   # the end of an svgd_fx.accumulate block

    def rewrite(self, joint: torch.fx.GraphModule, plan: MethodPlan, param_sources: set[str],
                param_inputs: set[int], entry: str) -> set[str]: ...
