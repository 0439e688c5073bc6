"""``svgd_fx::virtual_grad``: the custom op the rewritten graphs call (see the package docstring)."""

from __future__ import annotations

import os

import torch

from ..errors import nonfinite_error
from . import _triton_impl
from .applier import all_reduce, eager
from .t_formula import (broadcast_shape, denominator, finite, per_sample, scaled, square_sums, statistic,
                        update_r_in_place, updated_r)

triton_available = _triton_impl.available


def _kernel_choice(g: torch.Tensor, reduce_dims: list[int]) -> str:
    forced = os.environ.get("SVGD_FX_KERNEL", "")
    if forced == "torch":
        return "torch"
    if forced == "triton":
        if not triton_available():
            raise RuntimeError("SVGD_FX_KERNEL=triton but Triton cannot be imported")
        return "triton"
    if g.is_cuda and not reduce_dims and triton_available():
        return "triton"
    return "torch"


def _batch_sums(u: torch.Tensor, reduce_dims: list[int], sync: bool) -> tuple[torch.Tensor, float]:
    """Σ_b u[b]² (per-sample shape; averaged over ``reduce_dims`` of u) and the number of
    samples; with ``sync``, summed over torch.distributed's default group."""
    summed = square_sums(eager, u, reduce_dims)
    if not sync:
        return summed, float(u.shape[0])
    buffer = all_reduce(torch.cat([summed.flatten(), summed.new_tensor([float(u.shape[0])])]))
    return buffer[:-1].view_as(summed), float(buffer[-1])


def virtual_grad_reference(
    g: torch.Tensor,
    r: torch.Tensor,
    s: float,
    rho: float,
    eps: float,
    mean_reduction: bool,
    reduce_dims: list[int],
    raise_nonfinite: bool = False,
    name: str = "",
    inv_scale: torch.Tensor | None = None,
    sync: bool = False,
    acc: torch.Tensor | None = None,
    collect: bool = False,
    lagged: bool = False,
) -> torch.Tensor:
    """The torch implementation of T (also the fallback wherever Triton is not used).

    ``inv_scale`` (a GradScaler's 1/S): g arrives S× too large; r is built from g/S, and the
    output stays S× large for ``scaler.unscale_`` to divide. ``sync``: the batch statistic is
    all-reduced over torch.distributed's default group (sum of per-sample squares and sample
    count), so every rank's r is the one a single process would build on the joined batch.

    ``collect`` (gradient accumulation, see :mod:`svgd_fx._accumulate`): r is not updated; the
    batch's raw Σ_b (g/S)² is added to ``acc[:-2]`` and its sample count (all ranks', this
    rank's) to ``acc[-2]``, ``acc[-1]``, for one update of r from all micro-batches later.

    ``lagged`` (``variant="authors"``): T reads r as it was before this step's update.

    r is never updated from a non-finite statistic: such elements keep their old value (or,
    with ``raise_nonfinite``, r is left untouched and ``NonFiniteGradientError`` is raised).
    """
    batch = g.shape[0]
    gr = g.to(r.dtype)
    u = gr if inv_scale is None else gr * inv_scale.to(r.dtype)
    if collect:
        sums, count = _batch_sums(u, reduce_dims, sync)
        ok = finite(eager, sums)
        if raise_nonfinite and not bool(ok.all()):
            raise nonfinite_error(name)
        acc[:-2].add_(torch.where(ok, sums, 0).flatten())
        acc[-2:].add_(acc.new_tensor([count, float(batch)]))
    else:
        before = r.clone() if lagged else None
        # sums of the per-sample gradient's squares (scaled before squaring: with ``sync`` the count is
        # every rank's), so stat = sums / count
        sums, count = _batch_sums(per_sample(eager, u, batch, mean_reduction), reduce_dims, sync)
        stat = statistic(eager, sums, count, False)
        ok = finite(eager, stat)
        if bool(ok.all()):
            update_r_in_place(eager, r, stat, rho)
        elif raise_nonfinite:
            raise nonfinite_error(name)
        else:
            r.copy_(updated_r(eager, r, stat, rho, ok))
    # r over the kept dims, broadcast over the batch and the rest
    read = before if lagged and not collect else r
    denom = denominator(eager, read, eps, broadcast_shape(g.shape, reduce_dims) if g.dim() > 1 else None)
    return scaled(eager, gr, s, denom).to(g.dtype).contiguous()


@torch.library.custom_op("svgd_fx::virtual_grad", mutates_args=("r", "acc"))
def virtual_grad(
    g: torch.Tensor,
    r: torch.Tensor,
    s: float,
    rho: float,
    eps: float,
    mean_reduction: bool,
    reduce_dims: list[int],
    raise_nonfinite: bool = False,
    name: str = "",
    inv_scale: torch.Tensor | None = None,
    sync: bool = False,
    acc: torch.Tensor | None = None,
    collect: torch.Tensor | None = None,
    lagged: bool = False,
) -> torch.Tensor:
    if g.shape[0] == 0 and not sync:  # an empty batch carries no statistics: r stays as it is
        return torch.empty_like(g, memory_format=torch.contiguous_format)
    collecting = collect is not None and bool(collect)   # a CPU scalar: no device sync
    if collecting and acc is None:
        raise RuntimeError(f"svgd_fx: σ' node {name!r} is asked to collect statistics but has no accumulator")
    if collecting:
        return virtual_grad_reference(g, r, s, rho, eps, mean_reduction, reduce_dims, raise_nonfinite, name,
                                      inv_scale, sync, acc, True)
    if inv_scale is None and not sync and not lagged and _kernel_choice(g, reduce_dims) == "triton":
        if raise_nonfinite and not bool(torch.isfinite(g).all()):
            raise nonfinite_error(name)
        return _triton_impl.virtual_grad_triton(g, r, s, rho, eps, mean_reduction)
    return virtual_grad_reference(g, r, s, rho, eps, mean_reduction, reduce_dims, raise_nonfinite, name,
                                  inv_scale, sync, lagged=lagged)


@virtual_grad.register_fake
def _(g, r, s, rho, eps, mean_reduction, reduce_dims, raise_nonfinite=False, name="", inv_scale=None,
      sync=False, acc=None, collect=None, lagged=False):
    return torch.empty_like(g, memory_format=torch.contiguous_format)
