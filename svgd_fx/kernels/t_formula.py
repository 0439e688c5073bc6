"""SVGD's T operator, written once against an op-applier.

For one σ' node with incoming gradient g = ∇σ'J (batch B, dim 0) and state r::

    u     = B·g (mean loss) or g (sum loss)            the per-sample gradient
    stat  = mean_b u[b]², averaged over reduce_dims     (r's shape: g's kept dims)
    r    ← ρ·r + (1−ρ)·stat     where stat is finite; elsewhere r keeps its value
    T(g)  = s·g / sqrt(r + ε)    r broadcast over the batch and reduce_dims

Each piece is written against ``op(target, *args, **kwargs)`` with aten targets: :func:`~svgd_fx.kernels.applier.eager`
calls them on tensors (:func:`svgd_fx.kernels.t_op.virtual_grad_reference`, the torch
implementation of the custom op), the joint-graph emitter of :mod:`svgd_fx.passes.joint` adds
them as FX nodes (:func:`svgd_fx.kernels.t_aten.fused_t`, T spelled in aten ops for inductor to
fuse). Both paths therefore share one formula; what only one of them does (a GradScaler's 1/S,
the all-reduce and the accumulation on the eager path; the non-finite counter and the
write-back on the fused one) stays with that path. The Triton kernel of :mod:`._triton_impl`
mirrors the same formula in its own spelling (one program per block of r's elements).

Two pieces have two spellings, equal in exact arithmetic and each chosen for its path; they
round differently, so each path keeps its own:

* the statistic of a mean loss. The eager path squares the per-sample gradient B·g and
  divides the batch sum by the sample count: with ``sync`` that count is every rank's, and each
  rank's per-sample gradient carries its own B. The fused path takes B·Σ_b g², one multiply per
  element of r instead of one per element of g.
* the order of the two reductions with ``reduce_dims``: the eager path sums over the batch
  first, the fused one averages the reduced dims first (its intermediate is [B, kept] instead
  of g's per-sample shape).

The update of r likewise comes functional (:func:`updated_r`, what a graph can hold) and in
place (:func:`update_r_in_place`, the eager path's common case: no new buffer, and one rounding
where the CPU fuses the multiply-add).
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def broadcast_shape(shape, reduce_dims) -> list:
    """r's shape as a view broadcast against g: 1 at the batch dim and at ``reduce_dims``."""
    return [1] + [1 if d in reduce_dims else shape[d] for d in range(1, len(shape))]


def per_sample(op, g, batch, mean_reduction: bool):
    """u = ∇ℓ_b: B·g for the gradient of a mean loss, g itself for a sum (docs/contract.md, "One step")."""
    return op(aten.mul.Tensor, g, batch) if mean_reduction else g


def square_sums(op, u, reduce_dims, reduce_first: bool = False):
    """Σ_b u[b]², averaged over ``reduce_dims`` (dims of u); ``reduce_first`` averages before the
    batch sum (see the module docstring)."""
    sq = op(aten.mul.Tensor, u, u)
    if reduce_dims and reduce_first:
        sq = op(aten.mean.dim, sq, list(reduce_dims))
    sums = op(aten.sum.dim_IntList, sq, [0])
    if reduce_dims and not reduce_first:
        sums = op(aten.mean.dim, sums, [d - 1 for d in reduce_dims])
    return sums


def statistic(op, sums, count, mean_reduction: bool):
    """mean_b u[b]² from the batch sums of squares of the gradient and the number of samples:
    ``sums / count``, or for the gradient of a mean loss (u = B·g, ``count`` = B) B·Σ_b g²."""
    return op(aten.mul.Tensor if mean_reduction else aten.div.Tensor, sums, count)


def finite(op, stat):
    """Where the statistic is finite: stat ≥ 0, so ``stat < inf`` is false for inf and NaN alone."""
    return op(aten.lt.Scalar, stat, float("inf"))


def updated_r(op, r, stat, rho: float, valid=None):
    """ρ·r + (1−ρ)·stat; with ``valid`` (a boolean mask, :func:`finite`), only where it is true:
    elsewhere r keeps its value."""
    r_new = op(aten.add.Tensor, op(aten.mul.Tensor, r, rho), op(aten.mul.Tensor, stat, 1.0 - rho))
    return r_new if valid is None else op(aten.where.self, valid, r_new, r)


def update_r_in_place(op, r, stat, rho: float):
    """r ← ρ·r + (1−ρ)·stat in r's buffer (every element of stat finite)."""
    return op(aten.add_.Tensor, op(aten.mul_.Tensor, r, rho), stat, alpha=1.0 - rho)


def denominator(op, r, eps: float, shape=None):
    """sqrt(r + ε), viewed as ``shape`` (:func:`broadcast_shape`) to broadcast against g."""
    denom = op(aten.sqrt.default, op(aten.add.Tensor, r, eps))
    return denom if shape is None else op(aten.view.default, denom, list(shape))


def scaled(op, x, s: float, denom):
    """s·x / denom: T(g) for x = g (in r's dtype), and any batch sum of it, Σ_b g·X, alike."""
    return op(aten.div.Tensor, op(aten.mul.Tensor, x, s), denom)
