"""SVGD's state: one r per σ' node, under stable names, inside ``state_dict()``.

Keys are ``<prefix><σ' name>.r`` (``svgd_state.fc.linear.r``), where the σ' name comes from
the parameter names and the op (``fc.linear``, ``bn.batch_norm``, ``pos.add``,
``blocks.0.attn.linear#1`` for a second call inside one module): a fresh ``transform`` of
the same model produces the same names, so a saved state loads and continues bit-identically.

r tensors are created at the first forward (their shape is the σ' output's, which only the
trace knows). A state loaded before that is held and checked against the traced shape then.
A dimension of a σ' output that varies between calls is averaged from then on (``layouts``):
r keeps the others. ``version`` is renewed at every replacement of a state tensor (a layout change, a
dtype or device move): each compiled graph checks its state against it at every call.
Compiled graphs never hold an r: the wrapper passes the current tensors at every call, so
``.to(device)`` and ``load_state_dict`` can replace or overwrite them freely.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from typing import Iterator

import torch
from torch import nn

from .errors import StaleLayoutError, StateShapeError, SVGDError


# versions are unique across states: a graph shared by several models (Dynamo serves instances
# of one class from one graph) compares the version of the state it is given, never another's
_VERSIONS = itertools.count(1)


class SVGDState(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tensors: dict[str, torch.Tensor] = {}      # "<σ' name>.r" -> tensor
        self._pending: dict[str, torch.Tensor] = {}     # loaded before the first trace
        self._pending_strict = False                    # loaded with strict=True: all must be claimed
        self.strict_load = True                         # the strict= of the load in progress (see loading)
        self.flags: dict[str, torch.Tensor] = {}        # "<σ' name>.nonfinite" -> count (not saved)
        self.prev: dict[str, torch.Tensor] = {}         # r at the start of the step (GradScaler)
        self.scale_used: float | None = None            # the GradScaler scale of the last forward
        self.accs: dict[str, torch.Tensor] = {}         # "<σ' name>.r" -> [Σ g², n_all, n_here] (not saved)
        self.collecting: dict[str, torch.Tensor] = {}   # device -> 0-dim 0/1: T collects (accumulation)
        self.accumulating = False                       # inside svgd_fx.accumulate (picks the graphs)
        self.layouts: dict[str, tuple[int, ...]] = {}   # "<σ' name>.r" -> dims averaged besides the batch
        self.version = next(_VERSIONS)                  # renewed when a state tensor is replaced

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.version = next(_VERSIONS)      # a copy's tensors are its own

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def __contains__(self, key: str) -> bool:
        return key in self.tensors

    def get_or_create(self, key: str, shape: tuple, dtype: torch.dtype, device: torch.device, where: str,
                      reduce: tuple[int, ...] | None = None) -> torch.Tensor:
        """The state tensor ``key``; created zero (or from a pending load) on first use.

        With ``reduce`` (SVGD's r), ``shape`` is the σ' output's full per-sample shape (SymInts
        where it varies) and ``reduce`` the dims (of the output, ≥ 1) averaged into r's statistic
        besides the batch: r keeps the others. Layouts only grow: a dimension once seen to vary
        (symbolic in a graph, a size that differs from r's, a checkpoint without it) stays
        averaged, and r is converted by its mean over that dimension, which is exactly the r the
        smaller layout would have built (both are linear in the per-step statistics).
        """
        existing = self.tensors.get(key)
        if existing is not None and (existing.device != torch.device(device) or existing.dtype != dtype):
            # the model moved (``model.to(...)`` under the compile backend, where r is not a
            # submodule of it) or changed dtype: the recompiled graph gets r where its values are
            existing = self.tensors[key] = existing.to(device=device, dtype=dtype)
            self.version = next(_VERSIONS)
        if reduce is None:
            return self._fixed(key, existing, shape, dtype, device, where)
        pending = self._pending.pop(key, None)
        current = existing if existing is not None else pending
        reduce = set(reduce) | set(self.layouts.get(key, ()))
        if current is not None:
            reduce |= _varying_against(current, shape, self.layouts.get(key), where, key, loaded=existing is None)
        reduce = tuple(sorted(reduce))
        kept = tuple(shape[d - 1] for d in range(1, len(shape) + 1) if d not in reduce)
        if not all(isinstance(size, int) for size in kept):    # never int() a SymInt: it would guard
            raise StateShapeError(f"svgd_fx: σ' node {where}: a dimension kept in r varies ({shape})")
        if current is None:
            tensor = torch.zeros(kept, dtype=dtype, device=device)
        else:
            tensor = _averaged(current, self.layouts.get(key), reduce, len(shape)).to(device=device, dtype=dtype)
        if existing is not None and tensor is not existing:
            self.version = next(_VERSIONS)        # graphs compiled for the old r are stale
        self.tensors[key] = tensor
        self.layouts[key] = reduce
        return self.tensors[key]

    def _fixed(self, key, existing, shape, dtype, device, where) -> torch.Tensor:
        """A state tensor of one fixed shape (TSO-ALRA's factors and counters)."""
        if existing is not None:
            if tuple(existing.shape) != tuple(shape):
                raise StateShapeError(
                    f"svgd_fx: the state {key!r} of σ' node {where} has shape {tuple(existing.shape)}, "
                    f"but this call needs {tuple(shape)}: the state comes from a different model."
                )
            return existing
        tensor = torch.zeros(shape, dtype=dtype, device=device)
        pending = self._pending.pop(key, None)
        if pending is not None:
            if tuple(pending.shape) != tuple(shape):
                raise StateShapeError(
                    f"svgd_fx: loaded state {key!r} has shape {tuple(pending.shape)}, but σ' node "
                    f"{where} needs {tuple(shape)}: the state comes from a different model."
                )
            tensor.copy_(pending)
        self.tensors[key] = tensor
        return tensor

    @contextmanager
    def loading(self, strict: bool) -> Iterator[None]:
        """Around a ``load_state_dict(strict=...)`` call: nn.Module passes strict=True to every
        ``_load_from_state_dict``, so the caller's choice is kept here."""
        self.strict_load = strict
        try:
            yield
        finally:
            self.strict_load = True

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        with self.loading(strict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def check_claimed(self, nodes) -> None:
        """After the first forward: a strictly loaded state key that no σ' node claimed would
        silently start that node's r at zero (a checkpoint of another model or other options)."""
        if self._pending_strict and self._pending:
            raise SVGDError(
                f"svgd_fx: the loaded state has keys that no σ' node of this model uses: {sorted(self._pending)[:6]} "
                f"(σ' nodes found: {sorted(nodes)[:6]}{' ...' if len(nodes) > 6 else ''}). The checkpoint comes from "
                "another model or other options; load it with strict=False to drop them knowingly.")

    def fit(self, keys: list[str], tensors: list[torch.Tensor], compiled_for: list[tuple]) -> list[torch.Tensor]:
        """The state tensors ``keys`` as a graph compiled for ``(shape, dtype, device)`` each needs
        them: moved where the graph reads them (a model cast back and forth runs the graphs of both
        dtypes in turn: r follows the graph that reads it, never has its bytes reinterpreted).
        A shape that differs is a graph of an older layout: ``StateShapeError``."""
        fitted = []
        for key, tensor, (shape, dtype, device) in zip(keys, tensors, compiled_for):
            if tuple(tensor.shape) != shape:
                raise StaleLayoutError(
                    "svgd_fx: this graph was compiled for an r of another shape "
                    f"({key}: {shape} -> {tuple(tensor.shape)}): a dimension of its σ' output started to vary "
                    "between calls after it was compiled, and r is now averaged over it, but TorchDynamo ran "
                    "this older graph, static in that dimension, again (its guards still pass: with "
                    "torch.compile(..., dynamic=False), or sizes that come back, as image sizes in multi-scale "
                    "training). The call that meets it plans and compiles the graph again for the current r.")
            if tensor.dtype != dtype or tensor.device != device:
                tensor = self.tensors[key] = tensor.to(device=device, dtype=dtype)
                self.version = next(_VERSIONS)
            fitted.append(tensor)
        return fitted

    @torch.no_grad()
    def fill(self, key: str, value: float) -> None:
        """Set every element of state tensor ``key``; before the first forward it waits, as a
        loaded one would, for the graph that creates it."""
        tensor = self.tensors.get(key)
        if tensor is None:
            self._pending[key] = torch.full((), float(value))
        else:
            tensor.fill_(value)

    def varied(self, key: str, dim: int, size: int) -> bool:
        """Whether dim ``dim`` (≥ 1) of the σ' output of r ``key`` has been seen to vary: r averages
        it, or keeps it with another size than ``size``. False before r exists."""
        r, layout = self.tensors.get(key), self.layouts.get(key)
        if r is None:
            return False
        if dim in set(layout or ()):
            return True
        kept = _kept_dims(r.dim() + len(layout or ()), layout)
        return int(r.shape[kept.index(dim)]) != size

    def peek(self, key: str) -> torch.Tensor | None:
        """State tensor ``key``, or its pending (loaded or filled) value before the first forward."""
        return self.tensors.get(key, self._pending.get(key))

    @torch.no_grad()
    def keep_for_roll_back(self) -> None:
        """Copy every state tensor as the step starts (GradScaler: the step may be skipped)."""
        for key, r in self.tensors.items():
            kept = self.prev.get(key)
            if kept is None or kept.shape != r.shape or kept.dtype != r.dtype or kept.device != r.device:
                self.prev[key] = r.clone()
            else:
                kept.copy_(r)

    @torch.no_grad()
    def roll_back(self) -> None:
        """Put back the copies of :meth:`keep_for_roll_back` (the scaler skipped that step)."""
        for key, r in self.tensors.items():
            if key in self.prev:
                r.copy_(self.prev[key])

    def flag(self, key: str, device: torch.device) -> torch.Tensor:
        """A 0-dim counter the fused T increments when ∇σ'J is not finite (``nonfinite="raise"``)."""
        flag = self.flags.get(key)
        if flag is None or flag.device != torch.device(device):
            flag = self.flags[key] = torch.zeros((), dtype=torch.float32, device=device)
        return flag

    def acc(self, key: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """Gradient accumulation's pooled statistic for r ``key``: Σ (g/S)², then the sample
        counts of all ranks and of this one (see :mod:`svgd_fx._accumulate`)."""
        acc = self.accs.get(key)
        if acc is None or acc.numel() != numel + 2 or acc.dtype != dtype or acc.device != torch.device(device):
            acc = self.accs[key] = torch.zeros(numel + 2, dtype=dtype, device=device)
        return acc

    def collect_flag(self, device: torch.device) -> torch.Tensor:
        """The 0-dim mode input of every graph on ``device``: 1 inside ``svgd_fx.accumulate``."""
        key = str(torch.device(device))
        flag = self.collecting.get(key)
        if flag is None:
            flag = self.collecting[key] = torch.full((), float(self.accumulating), dtype=torch.float32,
                                                         device=device)
        return flag

    def set_collecting(self, on: bool) -> None:
        """Enter (``True``) or leave ``svgd_fx.accumulate``: every graph's "collect" input follows."""
        self.accumulating = on
        self.collect_flag("cpu")
        for flag in self.collecting.values():
            flag.fill_(1.0 if on else 0.0)

    def clear_accumulators(self) -> None:
        for acc in self.accs.values():
            acc.zero_()

    @torch.no_grad()
    def commit_accumulated(self, rho: float, mean_reduction: bool) -> None:
        """r ← ρ·r + (1-ρ)·stat, stat = mean over the accumulated batch of the per-sample gradient²."""
        for key, acc in self.accs.items():
            r = self.tensors.get(key)
            n_all, n_here = float(acc[-2]), float(acc[-1])
            if r is None or n_all == 0:
                continue    # this σ' saw no micro-batch (no backward reached it)
            sums = acc[:-2].view_as(r)
            # mean loss: the per-sample gradient is N_here·g (N_here = this rank's accumulated
            # batch: its loss is the mean over it), averaged over the N_all samples of all ranks
            stat = sums * (n_here * n_here / n_all) if mean_reduction else sums / n_all
            r.mul_(rho).add_(stat, alpha=1.0 - rho)

    # -- nn.Module plumbing: dotted keys, device moves, state_dict ---------------------------
    def _apply(self, fn, recurse=True):
        self.tensors = {k: fn(v) for k, v in self.tensors.items()}
        self._pending = {k: fn(v) for k, v in self._pending.items()}
        self.flags = {k: fn(v).float() for k, v in self.flags.items()}
        self.prev = {}
        self.accs = {}
        self.collecting = {}
        self.version = next(_VERSIONS)
        return self

    def write(self, destination: dict, prefix: str) -> None:
        """Every r (and every r loaded but not yet claimed by a trace) as ``<prefix><σ' name>.r``."""
        for key, value in itertools.chain(self.tensors.items(), self._pending.items()):
            destination[prefix + key] = value.detach()

    def read(self, state_dict: dict, prefix: str, strict: bool, missing_keys: list, error_msgs: list) -> None:
        """Load ``<prefix><σ' name>.r`` entries: into an existing r (same shape), or held until the
        first trace creates it. Missing keys are reported with ``prefix`` (as ``write`` names them)."""
        seen = set()
        for full_key, value in state_dict.items():
            key = full_key[len(prefix):]
            seen.add(key)
            current = self.tensors.get(key)
            if current is None:
                self._pending[key] = value.detach().clone()
                # torch passes strict=True to the hooks whatever the caller said: the caller's is strict_load
                self._pending_strict = self._pending_strict or self.strict_load
            elif tuple(current.shape) != tuple(value.shape):
                error_msgs.append(
                    f"svgd_fx: state {key!r} has shape {tuple(value.shape)} in the checkpoint but "
                    f"{tuple(current.shape)} in this model (σ' node {key.rsplit('.', 1)[0]!r}). Load a "
                    "checkpoint whose r was averaged over a varying dimension before the first forward."
                )
            else:
                with torch.no_grad():
                    current.copy_(value)
        if strict:
            missing_keys.extend(prefix + k for k in self.tensors if k not in seen)

    def _save_to_state_dict(self, destination, prefix, keep_vars):     # state.state_dict()
        self.write(destination, prefix)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict,
                              missing_keys, unexpected_keys, error_msgs):   # state.load_state_dict()
        self.read({k: v for k, v in state_dict.items() if k.startswith(prefix)}, prefix, strict,
                  missing_keys, error_msgs)


def _kept_dims(ndim: int, reduce) -> list[int]:
    return [d for d in range(1, ndim + 1) if d not in set(reduce or ())]


def _varying_against(current: torch.Tensor, shape: tuple, layout, where: str, key: str, loaded: bool) -> set[int]:
    """Dims of the σ' output (≥ 1) that ``current`` shows to vary: kept in r with another size
    than ``shape`` has (a graph of another static shape), or missing from an r loaded from a
    checkpoint that averaged them. A loaded r with all dims but other sizes is another model's."""
    ndim = len(shape)
    if layout is not None or current.dim() == ndim:
        dims = _kept_dims(ndim, layout)
        varying = {d for d, size in zip(dims, current.shape) if isinstance(shape[d - 1], int) and size != shape[d - 1]}
        if varying and loaded:
            raise StateShapeError(
                f"svgd_fx: loaded state {key!r} has shape {tuple(current.shape)}, but σ' node {where} needs "
                f"{tuple(shape)}: the state comes from a different model or r_shape.")
        return varying
    # a checkpoint's r with fewer dims: the dims it averaged are those it does not match, the
    # latest dims matched first (varying ones are sequence dims, before the features)
    sizes, matched = list(current.shape), []
    for d in range(ndim, 0, -1):
        if sizes and isinstance(shape[d - 1], int) and sizes[-1] == shape[d - 1]:
            matched.append(d)
            sizes.pop()
    if sizes:
        raise StateShapeError(f"svgd_fx: loaded state {key!r} has shape {tuple(current.shape)}, which does not fit "
                              f"σ' node {where} (per-sample shape {tuple(shape)}): a different model?")
    return {d for d in range(1, ndim + 1) if d not in matched}


def _averaged(current: torch.Tensor, layout, reduce: tuple[int, ...], ndim: int) -> torch.Tensor:
    """``current`` (r over the dims its layout keeps) averaged over the dims ``reduce`` adds."""
    dims = _kept_dims(ndim, layout) if layout is not None or current.dim() == ndim else None
    if dims is None:                     # a reduced checkpoint: already in the new layout
        return current
    extra = [i for i, d in enumerate(dims) if d in reduce]
    return current.mean(dim=extra) if extra else current
