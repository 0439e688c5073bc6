"""Gradient accumulation: several backward passes per optimizer step.

Semantics (the paper's minibatch m is the whole accumulated batch): the K micro-batches of
one step form one batch of N = Σ_k B_k samples, and the accumulated loss is its mean
(``loss / K`` per micro-batch with equal sizes; in general Σ_k sum-of-losses_k / N), or its
sum with ``reduction="sum"``. The per-sample gradient is then N·g (or g), and one step is::

    r_t = ρ·r_{t-1} + (1-ρ)·mean over all N samples of (N·g)²
    T(g_k) = s·g_k / sqrt(r_t + ε)        for every micro-batch k

T of every micro-batch needs r_t, which depends on all micro-batches. For a 2-D linear σ'
T is a row scaling of grad_W that could wait for the last micro-batch, but for a conv or a
``[B, T, C]`` linear the scaling varies over output positions and does not factor out of the
parameter gradient. So there are two ways, both here:

* **exact, two passes** — ``phase="statistics"`` runs the micro-batches once to pool their
  statistics and commit r_t (gradients and buffers such as BatchNorm's running stats are put
  back as they were at exit), then ``phase="gradients"`` runs them again with T on that r_t
  and r left alone. Equal to one big batch (for models without batch-coupled layers such as
  BatchNorm, whose statistics differ per micro-batch anyway; random layers such as dropout
  must draw the same masks in both passes). Costs two forward/backward passes.
* **one pass** (``phase="single"``, the default) — T of every micro-batch uses r_{t-1} (r as
  the previous step left it) and r is updated once, at the end, from the pooled statistics of
  all micro-batches. Equal to one big batch with T reading r *before* the step's update: the
  ordering of the authors' TensorFlow code (docs/contract.md, the authors' TensorFlow code).

TSO-ALRA pools its factors' statistics the same way; its T is linear in the gradient, so the
two passes equal one big batch and the one pass reads the roots the previous step left
(docs/tso-alra.md, "Gradient accumulation").

Mechanism: graphs built for accumulation have a 0-dim "collect" input and an r-sized
accumulator per σ'; inside ``accumulate`` "collect" is 1, and T then adds Σ_b (g/S)² and the
sample counts to the accumulator instead of updating r. The exit commits. ``transform``
compiles these graphs at the first accumulated step and uses them only inside ``accumulate``
(a plain step keeps its graphs without the extra inputs); the compile backend builds them when
compiled with ``options={"accumulation": True}`` and uses them for every step.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .config import BACKEND
from .errors import SVGDError, without_accumulation
from .methods import method_for
from .owners import owner_of

_PHASES = ("single", "statistics", "gradients")


@contextmanager
def accumulate(model, phase: str = "single") -> Iterator[None]:
    """Run the micro-batches of one optimizer step inside this block (see the module docstring).

    >>> with svgd_fx.accumulate(model_t):                      # one pass, T on r_{t-1}
    ...     for x, y in zip(xs, ys):
    ...         (F.cross_entropy(model_t(x), y) / len(xs)).backward()
    >>> opt.step(); opt.zero_grad()

    Exact (Algorithm 1 on the accumulated batch), two passes over the same micro-batches:

    >>> with svgd_fx.accumulate(model_t, phase="statistics"):  # r_t; .grad and buffers restored
    ...     for x, y in zip(xs, ys):
    ...         (F.cross_entropy(model_t(x), y) / len(xs)).backward()
    >>> with svgd_fx.accumulate(model_t, phase="gradients"):   # T with r_t; r unchanged
    ...     for x, y in zip(xs, ys):
    ...         (F.cross_entropy(model_t(x), y) / len(xs)).backward()
    >>> opt.step(); opt.zero_grad()

    Forwards and backwards must both happen inside the block. If the block raises, r is left
    as it was before it.
    """
    if phase not in _PHASES:
        raise ValueError(f"svgd_fx.accumulate: phase must be one of {_PHASES}, got {phase!r}")
    owner = owner_of(model, "accumulate")
    config = getattr(owner, "config", None)
    if config is None and not hasattr(model, "_orig_mod"):
        raise TypeError(f"svgd_fx.accumulate: this {type(model).__name__} has not been compiled with the svgd backend "
                        "(nor returned by svgd_fx.transform), so no SVGD state would collect anything. Pass what "
                        "svgd_fx.transform returned, or torch.compile(model, backend='svgd', options={..., "
                        "'accumulation': True}).")
    if config is not None and owner.entry == BACKEND and not config.accumulation:
        raise without_accumulation()   # (not compiled yet: the first graph call checks)
    state = owner.svgd_state
    if state.accumulating:
        raise SVGDError("svgd_fx.accumulate: already inside an accumulate block for this model (they do not nest)")
    restore = _snapshot(owner.model) if phase == "statistics" else None
    state.clear_accumulators()
    state.set_collecting(True)
    committed = False
    try:
        yield
        committed = True
    finally:
        state.set_collecting(False)
        config = getattr(owner, "config", None)    # (the backend's first graph may come in the block)
        if committed and config is not None:
            method_for(config).commit(state, phase)
        state.clear_accumulators()
        if restore is not None:
            restore()


class AccumulationWindow:
    """:func:`accumulate` for a framework that runs the micro-batches of one optimizer step one
    call at a time (Trainer's ``gradient_accumulation_steps``, accelerate's ``accumulate``,
    Lightning's ``accumulate_grad_batches``): ``open()`` before each micro-batch's forward (the
    first one enters the block), ``close()`` after the last backward and before the optimizer step
    (commits r), ``abandon()`` when a step fails (r stays as it was). One-pass semantics
    (``phase="single"``): T of every micro-batch reads r_{t-1}, r is updated once from all of them.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._block = None

    @classmethod
    def of(cls, model) -> "AccumulationWindow":
        """The window of ``model``'s SVGD, kept in its session: one per model, whichever wrapper
        (DDP, what ``torch.compile`` returned) is passed."""
        session = owner_of(model, "accumulate")
        if session.window is None:
            session.window = cls(model)
        return session.window

    def open(self) -> None:
        if self._block is None:
            block = accumulate(self.model)
            block.__enter__()
            self._block = block

    def close(self) -> None:
        block, self._block = self._block, None
        if block is not None:
            block.__exit__(None, None, None)

    def abandon(self) -> None:
        block, self._block = self._block, None
        if block is not None:
            failure = SVGDError("svgd_fx: the accumulated step was abandoned")
            block.__exit__(SVGDError, failure, None)


def _snapshot(model: nn.Module):
    """Gradients and buffers now, and a function that puts them back (the statistics pass)."""
    grads = {p: (None if p.grad is None else p.grad.clone()) for p in model.parameters()}
    buffers = {b: b.clone() for b in model.buffers()}

    @torch.no_grad()
    def restore() -> None:
        for p, g in grads.items():
            p.grad = g
        for b, saved in buffers.items():
            b.copy_(saved)

    return restore
