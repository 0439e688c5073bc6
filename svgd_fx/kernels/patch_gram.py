"""Σ ppᵀ over a stride-1 conv2d input's patches p without forming the patches.

The patch matrix of a k×k conv repeats every input pixel k² times, so Σ ppᵀ by one matmul of it
costs samples·locations·(C·k²)² — 9× the conv's own forward for a 3×3 conv with as many output as
input channels. Block (t, t') of that sum (kernel taps t = (i, j), t' = (i', j'), each a C×C
block) is the sum over the output locations of x[q]·x[q + δ]ᵀ, q running over tap t's window of
the input and δ = (t' − t)·dilation. So every block is one of the input's autocorrelations

    F_δ = Σ_q x[q]·x[q + δ]ᵀ        (q and q + δ inside the image, summed over the batch too)

less the few border rows and columns that lie outside tap t's window. Only the lexicographically
non-negative shifts are needed (F_{−δ} = F_δᵀ: 13 for a 3×3 kernel instead of 81 blocks), each one
matmul with no copy: the input is laid out once as ``[C, rows, columns, batch]`` with zero rows
above and below and (k−1)·dilation zero columns on the right, so that a shift by δ is a shift of
the flattened (row, column, batch) axis — a product that would wrap from one row into the next
meets a zero column. The border terms are matmuls over one flat range of whole rows, or over
the same strips of a transposed layout for columns; the corners where both meet are tiny copies.

The functions take ``op(target, *args)``: ``lambda f, *a: f(*a)`` runs them eagerly (the custom
op's refresh steps), the pass's emitter writes them into the joint graph as aten nodes inductor
schedules. :func:`applies` says when they are used (stride 1, static sizes); the patches' own
matmul (:func:`svgd_fx.kernels.kron_op.patches`) serves every other conv.
"""

from __future__ import annotations

import operator

import torch

from .applier import arith, shape, size, value

aten = torch.ops.aten


def _full(op, like, sizes: list[int], fill: float):
    return op(aten.full.default, sizes, fill, dtype=value(like).dtype, device=value(like).device)


def _stack(op, parts: list, dim: int):
    """``torch.stack`` as core aten ops (the joint graph is decomposed: no ``aten.stack`` there)."""
    return op(aten.cat.default, [op(aten.unsqueeze.default, p, dim) for p in parts], dim)


def bordered(op, aa, sums, count):
    """``[[aa, sums], [sumsᵀ, count]]``: Σ āāᵀ for ā = [p, 1] from Σ ppᵀ, Σ p and the count of p."""
    column = op(aten.view.default, sums, [-1, 1])
    corner = op(aten.mul.Tensor, _full(op, sums, [1, 1], 1.0), count)
    return op(aten.cat.default, [op(aten.cat.default, [aa, column], 1),
                                 op(aten.cat.default, [op(aten.permute.default, column, [1, 0]), corner], 1)], 0)


def applies(shape, stride) -> bool:
    """Whether :func:`patch_gram` serves a conv with input ``shape`` [B, C, H, W] and ``stride``:
    stride 1 and a height and width known when the graph is built (they choose the border terms;
    the batch size may change)."""
    return tuple(stride) == (1, 1) and all(isinstance(d, int) for d in shape[1:])


def _windows(size: int, k: int, dil: int, pad: int) -> list[tuple[int, int]]:
    """Per tap index: the input positions [lo, hi) the tap reads at the conv's output locations."""
    out = size + 2 * pad - dil * (k - 1)
    return [(t * dil - pad, t * dil - pad + out) for t in range(k)]


def _excluded(window: tuple[int, int], valid: tuple[int, int]) -> list[tuple[int, int]]:
    """The parts of ``valid`` outside ``window`` (at most one on each side)."""
    (a, b), (lo, hi) = window, valid
    parts = [(lo, min(a, hi)), (max(b, lo), hi)]
    return [(s, e) for s, e in parts if s < e]


def patch_gram(op, x, kernel, dilation, padding) -> object:
    """Σ over samples and output locations of p·pᵀ, p a patch of ``x`` ``[B, C, H, W]`` in W's own
    flattening (channel-major, then the taps): ``[C·kh·kw, C·kh·kw]``, in ``x``'s dtype."""
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    _, c, h, w = shape(x)
    n = size(op, x, 0)
    zc = (kw - 1) * dw                                  # zero columns: room for a shifted product to wrap into
    wz = w + zc
    xz = op(aten.constant_pad_nd.default, x, [0, zc, 1, 1], 0.0)           # [B, C, H + 2, W + zc]
    flat = op(aten.view.default, op(aten.clone.default, op(aten.permute.default, xz, [1, 2, 3, 0]),
                                    memory_format=torch.contiguous_format), [c, -1])
    zr = (kh - 1) * dh
    transposed = []

    def flat_t():
        """The same layout of the transposed image (its rows are x's columns), formed where a column
        strip needs it: column strips are then whole rows."""
        if not transposed:
            xt = op(aten.constant_pad_nd.default, op(aten.permute.default, x, [0, 1, 3, 2]), [0, zr, 1, 1], 0.0)
            transposed.append(op(aten.view.default, op(aten.clone.default, op(aten.permute.default, xt, [1, 2, 3, 0]),
                                                       memory_format=torch.contiguous_format), [c, -1]))
        return transposed[0]

    grid = op(aten.view.default, flat, [c, h + 2, wz, -1])

    def rows_product(src, width, rows, shift):
        """Σ x[q]·x[q + shift]ᵀ over q in whole rows ``rows`` (of a layout ``width`` wide): one mm."""
        (r0, r1), (sr, sc) = rows, shift
        if r1 <= r0:                                    # no pair of positions this far apart
            return _full(op, src, [c, c], 0.0)
        start = (r0 + 1) * width
        stop = (r1 + 1) * width
        off = sr * width + sc
        left = op(aten.slice.Tensor, src, 1, arith(op, operator.mul, start, n), arith(op, operator.mul, stop, n))
        right = op(aten.slice.Tensor, src, 1, arith(op, operator.mul, start + off, n),
                     arith(op, operator.mul, stop + off, n))
        return op(aten.mm.default, left, op(aten.permute.default, right, [1, 0]))

    def box_product(rows, cols, shift):
        """The same sum over a rectangle of positions (copies of its few pixels)."""
        (r0, r1), (c0, c1), (sr, sc) = rows, cols, shift
        sides = []
        for dr, dc in ((0, 0), (sr, sc)):
            part = op(aten.slice.Tensor, op(aten.slice.Tensor, grid, 1, r0 + 1 + dr, r1 + 1 + dr), 2, c0 + dc, c1 + dc)
            sides.append(op(aten.view.default, op(aten.clone.default, part, memory_format=torch.contiguous_format),
                            [c, -1]))
        return op(aten.mm.default, sides[0], op(aten.permute.default, sides[1], [1, 0]))

    win_r, win_c = _windows(h, kh, dh, ph), _windows(w, kw, dw, pw)
    taps = [(i, j) for i in range(kh) for j in range(kw)]
    full, row_strip, col_strip, corner, blocks = {}, {}, {}, {}, {}
    for ta, (i, j) in enumerate(taps):
        for tb in range(ta, len(taps)):
            i2, j2 = taps[tb]
            sr, sc = (i2 - i) * dh, (j2 - j) * dw           # sr ≥ 0; sc < 0 only with sr > 0
            valid_r, valid_c = (0, h - sr), (max(0, -sc), w - max(0, sc))
            if (sr, sc) not in full:
                full[sr, sc] = rows_product(flat, wz, valid_r, (sr, sc))
            block = full[sr, sc]
            ex_r, ex_c = _excluded(win_r[i], valid_r), _excluded(win_c[j], valid_c)
            for rows in ex_r:
                if (rows, sr, sc) not in row_strip:
                    row_strip[rows, sr, sc] = rows_product(flat, wz, rows, (sr, sc))
                block = op(aten.sub.Tensor, block, row_strip[rows, sr, sc])
            for cols in ex_c:                               # the transposed image: shift (sc, sr)
                if (cols, sr, sc) not in col_strip:
                    col_strip[cols, sr, sc] = rows_product(flat_t(), h + zr, cols, (sc, sr))
                block = op(aten.sub.Tensor, block, col_strip[cols, sr, sc])
            for rows in ex_r:
                for cols in ex_c:
                    if (rows, cols, sr, sc) not in corner:
                        corner[rows, cols, sr, sc] = box_product(rows, cols, (sr, sc))
                    block = op(aten.add.Tensor, block, corner[rows, cols, sr, sc])
            blocks[ta, tb] = block
    k = len(taps)
    ordered = [blocks[a, b] if a <= b else op(aten.permute.default, blocks[b, a], [1, 0])
               for a in range(k) for b in range(k)]
    stacked = op(aten.view.default, op(aten.cat.default, ordered), [k, k, c, c])
    return op(aten.view.default, op(aten.clone.default, op(aten.permute.default, stacked, [2, 0, 3, 1]),
                                    memory_format=torch.contiguous_format), [c * k, c * k])


def patch_sums(op, x, kernel, dilation, padding) -> object:
    """Σ p over samples and output locations, ``[C·kh·kw]`` (the bias row of Σ āāᵀ)."""
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    _, c, h, w = shape(x)
    image = op(aten.sum.dim_IntList, x, [0])                                   # [C, H, W]
    sums = []
    for lo_r, hi_r in _windows(h, kh, dh, ph):
        rows = op(aten.slice.Tensor, image, 1, max(lo_r, 0), max(min(hi_r, h), 0))
        for lo_c, hi_c in _windows(w, kw, dw, pw):
            box = op(aten.slice.Tensor, rows, 2, max(lo_c, 0), max(min(hi_c, w), 0))
            sums.append(op(aten.sum.dim_IntList, box, [1, 2]))
    return op(aten.view.default, _stack(op, sums, 1), [c * kh * kw])


def patch_statistic(op, x, kernel, dilation, padding, has_bias: bool) -> tuple[object, int]:
    """Σ āāᵀ (ā = [p, 1] with a bias: the row and column Σ p, the corner the count) and the count
    of patches, samples × output locations (an int, or a node for a symbolic batch size)."""
    (kh, kw), (dh, dw), (ph, pw) = kernel, dilation, padding
    _, _, h, w = shape(x)
    count = arith(op, operator.mul, size(op, x, 0), (h + 2 * ph - dh * (kh - 1)) * (w + 2 * pw - dw * (kw - 1)))
    aa = patch_gram(op, x, kernel, dilation, padding)
    if has_bias:
        aa = bordered(op, aa, patch_sums(op, x, kernel, dilation, padding), count)
    return aa, count
