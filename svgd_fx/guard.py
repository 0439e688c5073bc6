"""The check that no parameter trains on a plain gradient by accident, made where gradients arise.

Rule: a trainable parameter that *receives a gradient* in a backward without having gone through
an SVGD graph since the forward that started the step would train on its plain gradient: that is
an error, raised at the end of that backward (before any optimizer step can use it). A parameter
that receives no gradient (an auxiliary head not used this step, the branch not taken) is fine,
and so is one the user excluded.

Mechanism, cheap per step: every compiled SVGD graph that runs with grad enabled puts a pre-hook
on its own backward node (AOTAutograd's ``CompiledFunctionBackward``), which marks the graph as
*passed* when a backward runs through it; every parameter has a post-accumulate-grad hook that
notes it received a gradient (one Python call per parameter per backward) and, the first time in
a backward, queues one callback for the end of that backward. The callback compares the
parameters that received gradients with those of the graphs that backward passed. Marking in
the backward, not the forward, tells a second backward through the same graph
(``retain_graph=True``: covered) from a forward that ran uncompiled after an earlier one that
did not (past TorchDynamo's recompile limit: not covered).
"""

from __future__ import annotations

import warnings
import weakref
from typing import Callable

import torch
from torch import nn

from .errors import CoverageError, GradientAccumulationWarning
from .sharding import ParamIds, fsdp2_params


class GradientGuard:
    def __init__(self, model: nn.Module, excluded: frozenset[str],
                 explain: Callable[[list[str]], str]) -> None:
        self.ids = ParamIds(model)                 # FSDP2: an unsharded tensor -> its shard's id
        self.names = {self.ids.canonical(id(p)): n for n, p in model.named_parameters()}
        self.excluded = excluded
        self.explain = explain                     # the names of the offenders -> the error message
        self.plan_params: dict[object, frozenset[int]] = {}
        self.passed: set[object] = set()           # graphs whose backward this backward ran through
        self.received: set[int] = set()
        self.callback_queued = False
        self.on_first_check: list[Callable[[], None]] = []
        self.checks = 0
        self.handles: dict[int, object] = {}
        self.quiet: Callable[[], bool] = lambda: False     # the owner's: inside svgd_fx.accumulate
        self.probe: tuple | None = None    # (id, weakref, AccumulateGrad node) of the parameter watched
        self.last_grad: tuple | None = None  # (weakref, version) of its .grad after the previous backward
        self.accumulated = False             # this backward added into that .grad, untouched since
        self.warned = False
        self.arm(model)

    def arm(self, model: nn.Module) -> None:
        """Hooks on the parameters that require grad (again at each compile: one unfrozen later)."""
        guard = weakref.ref(self)
        shards = [fp.sharded_param for fp in fsdp2_params(model)] if self.ids.sharded else []
        for p in [*model.parameters(), *shards]:      # (inside FSDP2's forward: unsharded ones, skipped)
            if p.requires_grad and id(p) not in self.handles and id(p) == self.ids.canonical(id(p)):
                self.handles[id(p)] = p.register_post_accumulate_grad_hook(_noting(guard, id(p)))

    def disarm(self) -> None:
        """Remove the parameters' hooks (the owner was superseded)."""
        for handle in self.handles.values():
            handle.remove()
        self.handles.clear()

    def watch(self, plan_key: object, params: Callable[[], frozenset[int]], outputs) -> None:
        """A compiled SVGD graph ran with grad enabled and returned ``outputs``; ``params()`` gives
        its parameters' ids. A backward through it marks the graph passed."""
        node = _backward_node(outputs)
        if node is None:
            return
        if plan_key not in self.plan_params:
            self.plan_params[plan_key] = frozenset(self.ids.canonical(pid) for pid in params())
        node.register_prehook(_passing(weakref.ref(self), plan_key))

    def note(self, pid: int, param: torch.Tensor) -> None:
        pid = self.ids.canonical(pid)
        self.received.add(pid)
        if self.probe is None and type(param).__name__ != "DTensor":   # (FSDP2 sets a shard's .grad itself)
            self._watch(pid, param)
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.check)

    def check(self) -> None:
        self.callback_queued = False
        received, self.received = self.received, set()
        passed, self.passed = self.passed, set()
        covered = set().union(*(self.plan_params[k] for k in passed))
        offenders = [self.names[pid] for pid in received
                     if pid not in covered and pid in self.names and self.names[pid] not in self.excluded]
        self.checks += 1
        if offenders:
            raise CoverageError(self.explain(sorted(offenders, key=list(self.names.values()).index)))
        if not self.warned:
            self._watch_accumulation()
        while self.on_first_check:
            self.on_first_check.pop()()

    def _watch(self, pid: int, param: torch.Tensor) -> None:
        """Watch one parameter for gradient accumulation: a pre-hook on its AccumulateGrad node
        sees whether its ``.grad`` is still the tensor the previous backward left, untouched
        (same object, same version: nobody zeroed or replaced it) when the next one adds to it."""
        with torch.enable_grad():
            node = param.view_as(param).grad_fn.next_functions[0][0]
        self.probe = (pid, weakref.ref(param), node)      # holding the node keeps it the one autograd uses
        node.register_prehook(_before_accumulating(weakref.ref(self)))

    def before_accumulating(self) -> None:
        param = self.probe[1]()
        grad = param.grad if param is not None else None
        last = self.last_grad
        if grad is not None and last is not None and last[0]() is grad and grad._version == last[1] \
                and not self.quiet():
            self.accumulated = True

    def _watch_accumulation(self) -> None:
        """At the end of a backward: warn once if it added into the watched ``.grad`` outside
        ``svgd_fx.accumulate``; remember that ``.grad`` for the next backward."""
        if self.accumulated:
            self.warned = True
            warnings.warn(
                "svgd_fx: several backward passes accumulated into .grad before one optimizer step (gradient "
                "accumulation, e.g. a framework's gradient_accumulation_steps / accumulate_grad_batches): each "
                "backward updated r from its own micro-batch, so the virtual gradients are not the accumulated "
                "batch's. Run the micro-batches of a step inside `with svgd_fx.accumulate(model):` (see its "
                "docs). Warned once.", GradientAccumulationWarning, stacklevel=2)
        param = self.probe[1]() if self.probe is not None else None
        grad = param.grad if param is not None else None
        self.last_grad = (weakref.ref(grad), grad._version) if grad is not None else None


def _backward_node(outputs):
    """AOTAutograd's backward node of a compiled graph, from its outputs (a view output hangs
    one node below it)."""
    for out in outputs if isinstance(outputs, (list, tuple)) else (outputs,):
        node = getattr(out, "grad_fn", None) if isinstance(out, torch.Tensor) else None
        for _ in range(3):
            if node is None:
                break
            if type(node).__name__ == "CompiledFunctionBackward":
                return node
            node = next((f for f, _ in node.next_functions if f is not None), None)
    return None


def _noting(guard: "weakref.ref[GradientGuard]", pid: int):
    def hook(param: torch.Tensor) -> None:
        g = guard()
        if g is not None:
            g.note(pid, param)
    return hook


def _before_accumulating(guard: "weakref.ref[GradientGuard]"):
    def prehook(grad_outputs):
        g = guard()
        if g is not None and not g.warned:
            g.before_accumulating()
    return prehook


def _passing(guard: "weakref.ref[GradientGuard]", plan_key: object):
    def prehook(grad_outputs):
        g = guard()
        if g is not None:
            g.passed.add(plan_key)
    return prehook
