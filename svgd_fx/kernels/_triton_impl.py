"""Triton kernel for T on a full-shape r. Triton is imported lazily: the package works without it.

g is viewed as ``[B, N]`` (N = per-sample numel) and r as ``[N]``. One program owns a block
of columns: it reduces ``sum_b (scale·g[b, n])²`` over the batch, updates r for its columns,
then writes ``s·g / sqrt(r + eps)`` for the same columns (the second read of the block is
served from cache for the batch sizes SVGD is used with).
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def available() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:  # ImportError, or a broken install: the torch path is used instead
        return False
    return True


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def _svgd_t_kernel(
        g_ptr, r_ptr, out_ptr, B, N, scale, s, rho, eps,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
    ):
        pid = tl.program_id(0)
        cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            m = (rows[:, None] < B) & col_mask[None, :]
            x = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
            u = x * scale
            acc += tl.sum(u * u, axis=0)
        r_old = tl.load(r_ptr + cols, mask=col_mask, other=0.0)
        stat = acc / B
        finite = (stat == stat) & (stat != float("inf"))     # never poison r with inf/NaN
        r_new = tl.where(finite, rho * r_old + (1.0 - rho) * stat, r_old)
        tl.store(r_ptr + cols, r_new, mask=col_mask)
        d = s / tl.sqrt(r_new + eps)
        for b0 in range(0, B, BLOCK_B):
            rows = b0 + tl.arange(0, BLOCK_B)
            m = (rows[:, None] < B) & col_mask[None, :]
            x = tl.load(g_ptr + rows[:, None] * N + cols[None, :], mask=m, other=0.0).to(tl.float32)
            y = x * d[None, :]
            tl.store(out_ptr + rows[:, None] * N + cols[None, :], y.to(out_ptr.dtype.element_ty), mask=m)

    return _svgd_t_kernel


def virtual_grad_triton(g, r, s, rho, eps, mean_reduction) -> torch.Tensor:
    import triton

    if r.dtype != torch.float32:
        raise TypeError(f"the Triton T kernel keeps r in float32, got r of dtype {r.dtype}")
    if not r.is_contiguous():
        raise ValueError("the Triton T kernel needs a contiguous r")
    g2 = g.contiguous()
    batch = g2.shape[0]
    n = g2.numel() // batch
    out = torch.empty_like(g2)
    block_n = 128
    block_b = 32
    grid = (triton.cdiv(n, block_n),)
    scale = float(batch) if mean_reduction else 1.0
    _kernel()[grid](
        g2, r, out, batch, n, scale, float(s), float(rho), float(eps),
        BLOCK_B=block_b, BLOCK_N=block_n,
    )
    return out
