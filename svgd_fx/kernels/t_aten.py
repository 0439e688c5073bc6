"""SVGD's T spelled in aten ops on the joint graph, for inductor to fuse (``RerouteSpec.fused``).

The formula is :mod:`.t_formula`'s, applied through a graph emitter (``emit(target, *args)``
adds one FX node, see :func:`svgd_fx.passes.joint.emitter`) instead of run on tensors. What
this spelling adds, because a fused kernel can neither raise nor branch nor be trusted with the
order of a write and a read of one buffer, is explained at :func:`fused_t`.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from .applier import all_reduce_in_graph, size, size_tensor
from .t_formula import broadcast_shape, denominator, finite, scaled, square_sums, statistic, updated_r

aten = torch.ops.aten
_convert = torch.ops.prims.convert_element_type.default


def fused_t(emit, g: Node, r: Node, *, s: float, rho: float, eps: float, mean_reduction: bool,
             reduce_dims=(), flag: Node | None = None, acc: Node | None = None,
             collect: Node | None = None, sync: bool = False) -> Node:
    """T(g) as aten nodes (the formula of ``virtual_grad_reference``):

    ``r ← ρ·r + (1-ρ)·mean_b (B·g)²`` written back into r with ``copy_``, then
    ``T(g) = s·g / sqrt(r + ε)``. T reads the functional ``r_new``, never r's buffer, so no
    kernel fusion can order a read before the write-back. B is read from g at run time.
    Elements whose statistic is not finite keep their old r; with a ``flag`` input, such a
    step also adds 1 to it (the caller raises at the next call: kernels cannot raise).
    With ``acc`` and ``collect`` inputs (gradient accumulation): where ``collect`` is 1, r is
    kept and Σ_b g² and B are added to ``acc`` instead (kernels cannot branch: both are
    computed, ``where`` picks; the extra work is r-sized).
    With ``sync`` (``distributed=True``), the batch sums and the sample count are every rank's
    (:func:`_synced`), so that r is the one a single process would build on the joined batch.

    The result's ``meta["svgd_t_parts"]`` is ``(g in r's dtype, sqrt(r + ε) as broadcast, s)``,
    for rewrites of T's users that factor the scaling out of a batch sum.
    """
    g_val, r_val = g.meta["val"], r.meta["val"]
    batch = size(emit, g, 0)
    gr = g if g_val.dtype == r_val.dtype else emit(_convert, g, r_val.dtype)
    # r over the kept dims: the mean over the reduced ones comes first
    sums = square_sums(emit, gr, reduce_dims, reduce_first=True)
    collecting = emit(aten.gt.Scalar, collect, 0.5) if acc is not None else None
    if not sync:
        # mean_b (B·g)² = B·Σ_b g² for a mean loss; mean_b g² = Σ_b g² / B for a sum loss
        stat = statistic(emit, sums, batch, mean_reduction)
        count = batch
    else:
        sums, count = _synced(emit, sums, batch, mean_reduction, collecting)
        stat = emit(aten.div.Tensor, sums, count)
    ok = finite(emit, stat)
    r_new = updated_r(emit, r, stat, rho, ok)
    if acc is not None:
        r_new = emit(aten.where.self, collecting, r, r_new)
        numel = r_val.numel()     # acc = [Σ_b g² (r's numel), N_all, N_here]
        pooled_before = emit(aten.view.default, emit(aten.slice.Tensor, acc, 0, 0, numel), [-1])
        keep = emit(aten.logical_and.default, ok, collecting)
        added = emit(aten.view.default, emit(aten.where.ScalarOther, keep, sums, 0.0), [-1])
        pooled = emit(aten.add.Tensor, pooled_before, added)
        counted = (emit(aten.mul.Tensor, collect, batch) if not sync else
                   emit(aten.mul.Tensor, collect, emit(aten.cat.default, [emit(aten.view.default, count, [1]),
                                                                         size_tensor(emit, batch, count)])))
        counts = emit(aten.add.Tensor, emit(aten.slice.Tensor, acc, 0, numel, numel + 2), counted)
        acc_now = emit(aten.copy_.default, acc, emit(aten.cat.default, [pooled, counts]))
    writes = [emit(aten.copy_.default, r, r_new)]
    if acc is not None:
        writes.append(acc_now)
    if flag is not None:   # count a non-finite step
        bad = emit(aten.sum.default, emit(_convert, emit(aten.logical_not.default, ok), torch.float32))
        writes.append(emit(aten.copy_.default, flag, emit(aten.add.Tensor, flag, bad)))
    # Every read of the new r is a read of the functional r_new, never of r's buffer after the
    # copy_: inductor may fuse the write-back into the same loop as a read and load the buffer
    # before its store. The write-backs still need a user (else the partitioner drops them):
    # one element of each, times 0, added to r_new (finite, so the value is r_new's).
    alive = [emit(aten.select.int, emit(aten.view.default, w, [-1]), 0, 0) for w in writes]
    r_read = r_new
    for a in alive:
        r_read = emit(aten.add.Tensor, r_read, emit(aten.mul.Tensor, a, 0.0))
    denom = denominator(emit, r_read, eps, broadcast_shape(g_val.shape, reduce_dims) if reduce_dims else None)
    out = scaled(emit, gr, s, denom)
    out.meta["svgd_t_parts"] = (gr, denom, s)
    if g_val.dtype != r_val.dtype:
        out = emit(_convert, out, g_val.dtype)
    return out


def _synced(emit, sums: Node, batch, mean_reduction: bool, collecting: Node | None):
    """Every rank's batch sums of squares and sample count (one all-reduce of [sums, B]), as
    ``(sums, count)`` with ``stat = sums / count``. For a mean loss each rank's per-sample gradient
    is its own B·g, so the rank's term is B²·Σ_b g²; while collecting (``svgd_fx.accumulate``), the
    raw Σ_b g², as the accumulator keeps them. A functional collective: inductor schedules its wait."""
    local = sums
    if mean_reduction:
        b = size_tensor(emit, batch, sums)
        squared = emit(aten.mul.Tensor, b, b)
        if collecting is not None:
            squared = emit(aten.where.ScalarSelf, collecting, 1.0, squared)
        local = emit(aten.mul.Tensor, sums, squared)
    shape = list(sums.meta["val"].shape)
    buffer = emit(aten.cat.default, [emit(aten.view.default, local, [-1]), size_tensor(emit, batch, sums)])
    reduced = all_reduce_in_graph(emit, buffer)
    numel = buffer.meta["val"].shape[0] - 1
    total = emit(aten.view.default, emit(aten.slice.Tensor, reduced, 0, 0, numel), shape)
    return total, emit(aten.select.int, reduced, 0, numel)
