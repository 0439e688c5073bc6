"""The op-applier the kernels are written against, and what goes with it.

A kernel function takes ``op(target, *args, **kwargs)`` with aten targets: :func:`eager` runs
them on tensors (the custom ops' torch implementations), the joint-graph emitter of
:mod:`svgd_fx.passes.joint` adds them to a graph as FX nodes. Sizes are ints, or, where a graph's
size is symbolic, ``sym_size`` nodes (a graph takes no raw SymInt arguments): :func:`size` and
:func:`arith` keep that choice in one place. :func:`all_reduce` is the one collective of the
eager paths (``distributed=True``), :func:`all_reduce_in_graph` its spelling in a graph.
"""

from __future__ import annotations

import torch

aten = torch.ops.aten


def eager(target, *args, **kwargs):
    """The op-applier that runs ``target`` on tensors."""
    return target(*args, **kwargs)


def value(x) -> torch.Tensor:
    """A tensor, or a graph node's fake value."""
    return x.meta["val"] if isinstance(x, torch.fx.Node) else x


def shape(x) -> tuple:
    return tuple(value(x).shape)


def size(op, x, d: int):
    """``x``'s size along ``d``: an int, or a ``sym_size`` node for a symbolic one."""
    n = shape(x)[d]
    return n if isinstance(n, int) else op(aten.sym_size.int, x, d)


def arith(op, fn, a, b):
    """``fn(a, b)`` on sizes: computed for two ints, a node where either is one."""
    return fn(a, b) if isinstance(a, int) and isinstance(b, int) else op(fn, a, b)


def _distributed():
    import torch.distributed as dist   # imported lazily: only distributed=True needs torch.distributed

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("svgd_fx: distributed=True, but torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    return dist


def all_reduce(buffer: torch.Tensor) -> torch.Tensor:
    """Sum ``buffer`` over torch.distributed's default group, in place."""
    _distributed().all_reduce(buffer)
    return buffer


def default_group_name() -> str:
    """The name of torch.distributed's default group, as functional collectives in a graph take it."""
    return _distributed().group.WORLD.group_name


def size_tensor(op, n, like) -> object:
    """The size ``n`` (an int, or a ``sym_size`` node) as a 1-element tensor of ``like``'s dtype and device."""
    val = value(like)
    return op(aten.view.default, op(aten.scalar_tensor.default, n, dtype=val.dtype, device=val.device), [1])


def all_reduce_in_graph(op, buffer):
    """``buffer`` summed over torch.distributed's default group, as a functional collective and its
    wait (graphs: every rank runs the same graph, so the ranks issue the same collectives in order)."""
    reduced = op(torch.ops._c10d_functional.all_reduce.default, buffer, "sum", default_group_name())
    return op(torch.ops._c10d_functional.wait_tensor.default, reduced)
