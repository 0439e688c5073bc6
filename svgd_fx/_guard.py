"""The check that no parameter trains on a plain gradient by accident, made where gradients arise.

Rule: a trainable parameter that *receives a gradient* in a backward without having gone through
an SVGD graph since the forward that started the step would train on its plain gradient: that is
an error, raised at the end of that backward (before any optimizer step can use it). A parameter
that receives no gradient (an auxiliary head not used this step, the branch not taken) is fine,
and so is one the user excluded.

Mechanism, cheap per step: every compiled SVGD graph marks itself *entered* when it runs with
grad enabled (a set insert); every parameter has a post-accumulate-grad hook that notes it
received a gradient (one Python call per parameter per backward) and, the first time in a
backward, queues one callback for the end of that backward. The callback compares the
parameters that received gradients with those of the graphs entered.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from .errors import CoverageError


class GradientGuard:
    def __init__(self, model: nn.Module, excluded: frozenset[str],
                 explain: Callable[[list[str]], str]) -> None:
        self.names = {id(p): n for n, p in model.named_parameters()}
        self.excluded = excluded
        self.explain = explain                     # the names of the offenders -> the error message
        self.plan_params: dict[object, frozenset[int]] = {}
        self.entered_plans: set[object] = set()
        self.received: set[int] = set()
        self.step_open = False                     # a graph entered since the last check
        self.callback_queued = False
        self.on_first_check: list[Callable[[], None]] = []
        self.checks = 0
        self.handles: dict[int, object] = {}
        self.arm(model)

    def arm(self, model: nn.Module) -> None:
        """Hooks on the parameters that require grad (again at each compile: one unfrozen later)."""
        guard = weakref.ref(self)
        for p in model.parameters():
            if p.requires_grad and id(p) not in self.handles:
                self.handles[id(p)] = p.register_post_accumulate_grad_hook(_noting(guard, id(p)))

    def entered(self, plan_key: object, params: Callable[[], frozenset[int]]) -> None:
        """A compiled SVGD graph ran with grad enabled; ``params()`` gives its parameters' ids."""
        if not self.step_open:
            self.entered_plans.clear()
            self.step_open = True
        self.entered_plans.add(plan_key)
        if plan_key not in self.plan_params:
            self.plan_params[plan_key] = params()

    def note(self, pid: int) -> None:
        self.received.add(pid)
        if not self.callback_queued:
            self.callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.check)

    def check(self) -> None:
        self.callback_queued = False
        self.step_open = False
        received, self.received = self.received, set()
        covered = set().union(*(self.plan_params[k] for k in self.entered_plans))
        offenders = [self.names[pid] for pid in received
                     if pid not in covered and pid in self.names and self.names[pid] not in self.excluded]
        self.checks += 1
        if offenders:
            raise CoverageError(self.explain(sorted(offenders, key=list(self.names.values()).index)))
        while self.on_first_check:
            self.on_first_check.pop()()


def _noting(guard: "weakref.ref[GradientGuard]", pid: int):
    def hook(param: torch.Tensor) -> None:
        g = guard()
        if g is not None:
            g.note(pid)
    return hook
