"""The preconditioners: each one plans its state and rewrites the joint graph.

A method is an object with

* ``plan(ctx) -> MethodPlan``: for one Dynamo graph (``ctx``: the σ' nodes ``locate`` found,
  the parameter inputs, the owner's state and config, the graph's :class:`~svgd_fx.runtime.StateLayout`),
  record each σ' node in the pass log, create its state, add its extra inputs to the layout and
  return the specs of its joint-graph rewrite;
* ``rewrite(joint, plan, ...) -> set[str]``: run that rewrite on AOTAutograd's joint graph
  (in place), returning the σ' names that got their T;
* ``supports``: the features it has beyond the plain step (``"accumulate"``, ...).

The pipeline (:mod:`svgd_fx.plan`) never asks which method it runs. A third preconditioner is one
file here and its joint-graph pass in :mod:`svgd_fx.passes`.
"""

from __future__ import annotations

from ..config import SVGD, TSO_ALRA, SVGDConfig
from .base import Method, MethodPlan, PlanContext
from .svgd import SVGDMethod
from .tso import TSOMethod

__all__ = ["Method", "MethodPlan", "PlanContext", "SVGDMethod", "TSOMethod", "method_for"]

METHODS = {SVGD: SVGDMethod, TSO_ALRA: TSOMethod}


def method_for(config: SVGDConfig) -> Method:
    return METHODS[config.method](config)
