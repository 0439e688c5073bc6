"""``svgd_fx::kron_t``: TSO-ALRA's two-sided T for one Kronecker layer (``docs/tso-alra.md``).

One node per layer takes the rows of ∇σ'J (``g``, ``[N, m]``) and the rows of the layer's input
(``a``, ``[N, n]``, the bias column of ones already appended), updates the Kronecker factors
from this batch (Eqs. 17–18), refreshes their inverse roots every ``t_int`` steps, and returns
the preconditioned weight gradient with the bias as its last column, ``R_B·(gᵀa)·R_A`` (Eq. 16),
``[m, n]``. Two associations of that product, chosen per call by their matmul cost:
``(g·R_B)ᵀ(a·R_A)`` costs N·(m² + n² + m·n), ``R_B·(gᵀa)·R_A`` costs N·m·n + m·n·(m + n) —
the first wins for few rows (an MLP's layers), the second for many (N = samples × locations:
25,088 rows for a 28×28 conv at B=32). After the switch to SGD it returns the plain ``gᵀa``
and leaves the factors alone.
"""

from __future__ import annotations

import torch

from ..errors import factor_error


def inverse_root(factor: torch.Tensor, damping: float, name: str = "", side: str = "") -> torch.Tensor:
    """``U (Λ + ε I)^{-1/2} Uᵀ`` by ``torch.linalg.eigh`` in float64, in the factor's dtype."""
    f64 = factor.double()
    if not bool(torch.isfinite(f64).all()):
        raise factor_error(name, side, "holds inf/NaN")
    f64 = (f64 + f64.mT) / 2        # symmetric by construction; keep eigh's input exactly so
    try:
        lam, u = torch.linalg.eigh(f64)
    except RuntimeError as failure:   # torch.linalg.LinAlgError: eigh did not converge
        raise factor_error(name, side, f"could not be decomposed ({failure})") from None
    damped = lam + damping
    if not bool(torch.isfinite(damped).all()) or float(damped.min()) <= 0:
        raise factor_error(name, side, f"is not positive definite after damping (smallest eigenvalue "
                                        f"{float(lam.min()):.3e}, damping {damping:g})")
    return ((u * damped.rsqrt()) @ u.mT).to(factor.dtype)


@torch.library.custom_op("svgd_fx::kron_t", mutates_args=("A", "A_root", "B", "B_root", "steps"))
def kron_t(
    g: torch.Tensor,
    a: torch.Tensor,
    A: torch.Tensor,
    A_root: torch.Tensor,
    B: torch.Tensor,
    B_root: torch.Tensor,
    steps: torch.Tensor,
    switched: torch.Tensor,
    gamma: float,
    t_int: int,
    damping: float,
    batch: int,
    mean_reduction: bool,
    switch_at_step: int,
    name: str,
) -> torch.Tensor:
    t = int(steps) + 1                   # steps and switched live on the CPU: no device sync
    if bool(switched) or (switch_at_step >= 0 and t > switch_at_step) or g.shape[0] == 0:
        return g.mT @ a
    gf, af = g.to(B.dtype), a.to(A.dtype)
    stat_a = af.mT @ af / af.shape[0]                           # mean over samples and locations
    # β = B·g (mean loss) or g (sum): (1/B) Σ ββᵀ = B·Σ ggᵀ or Σ ggᵀ / B (sum over locations)
    stat_b = (gf.mT @ gf) * (batch if mean_reduction else 1.0 / batch)
    for side, stat in (("A", stat_a), ("B", stat_b)):
        if not bool(torch.isfinite(stat).all()):
            raise factor_error(name, side, "would be updated from a non-finite statistic (inf/NaN in "
                                            + ("the layer's input)" if side == "A" else "∇σ'J)"))
    if t == 1:
        A.copy_(stat_a)
        B.copy_(stat_b)
    else:
        A.mul_(1.0 - gamma).add_(stat_a, alpha=gamma)
        B.mul_(1.0 - gamma).add_(stat_b, alpha=gamma)
    if (t - 1) % t_int == 0:
        A_root.copy_(inverse_root(A, damping, name, "A"))
        B_root.copy_(inverse_root(B, damping, name, "B"))
    steps.fill_(t)
    rows, (n, m) = gf.shape[0], (af.shape[1], gf.shape[1])
    if rows * (m * m + n * n) <= m * n * (m + n):
        delta = (gf @ B_root).mT @ (af @ A_root)
    else:
        delta = B_root @ (gf.mT @ af) @ A_root
    return delta.to(g.dtype)


@kron_t.register_fake
def _(g, a, A, A_root, B, B_root, steps, switched, gamma, t_int, damping, batch, mean_reduction,
      switch_at_step, name):
    return g.new_empty((g.shape[1], a.shape[1]))


@torch.library.custom_op("svgd_fx::patch_rows", mutates_args=())
def patch_rows(x: torch.Tensor, kernel: list[int], dilation: list[int], padding: list[int],
               stride: list[int]) -> torch.Tensor:
    """A conv2d input's patches as rows ``[B·L, C_in·kh·kw]`` (``F.unfold``; W's own flattening).

    An op of its own because inductor decomposes ``im2col`` and refuses it in a joint pass."""
    patches = torch.nn.functional.unfold(x, kernel, dilation, padding, stride)     # [B, n, L]
    return patches.transpose(1, 2).reshape(-1, patches.shape[1])


@patch_rows.register_fake
def _(x, kernel, dilation, padding, stride):
    h, w = ((size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, k, d, p, s in zip(x.shape[2:], kernel, dilation, padding, stride))
    return x.new_empty((x.shape[0] * h * w, x.shape[1] * kernel[0] * kernel[1]))
