"""TSO-ALRA's two-sided T for one Kronecker layer (``docs/tso-alra.md``): ``svgd_fx::kron_t``
(linear layers) and ``svgd_fx::kron_t_conv`` (conv2d layers).

Each node updates the layer's Kronecker factors from this batch (Eqs. 17–18) on the steps that
update them (every ``t_stat``-th, from t = 1), refreshes their inverse roots every ``t_int`` steps
(:func:`inverse_root`: float32 eigh where accurate enough, else float64), and returns the
preconditioned weight gradient with the bias as its last column, ``Δ = R_B·Ĝ·R_A`` (Eq. 16),
``[m, n]``. After the switch to SGD it returns the plain Ĝ and leaves the factors alone.

- ``kron_t`` takes the rows of ∇σ'J (``g``, ``[N, m]``) and of the input (``a``, ``[N, n]``, the bias
  column of ones appended): views for a linear layer. It forms Δ in the cheaper association per
  call: ``(g·R_B)ᵀ(a·R_A)`` costs N·(m² + n² + m·n), ``R_B·(gᵀa)·R_A`` N·m·n + m·n·(m + n) — the
  first wins for few rows (an MLP's layers).
- ``kron_t_conv`` takes Ĝ from the graph's own weight (and bias) gradient, so a step that leaves
  the factors alone costs two small matmuls, m·n·(m + n). The statistic Σ ppᵀ over the input's
  patches (N = samples × locations of them, 25,088 for a 28×28 conv at B=32) would cost N·n², 9× a
  3×3 conv's own forward; for a stride-1 conv it comes from the input's shifted products instead
  (:mod:`.patch_gram`: 13 matmuls of the input with itself for a 3×3 kernel, about 1.4× the
  forward), for other convs from the patches, formed from strided slices (:func:`patches`).
  ``t_stat`` is the knob K-FAC implementations use for the rest.
"""

from __future__ import annotations

import torch

from ..errors import factor_error
from . import patch_gram
from .applier import all_reduce, eager


FLOAT32_ROOT_LIMIT = 1e4
"""λ_max/ε up to which a float32 factor's root comes from float32 eigh (half the time of float64
here). Its relative error (Frobenius) was measured ≲ 6e-8·λ_max/ε on factors of trained models,
so ≲ 6e-4 at the limit; above it, float64."""


def inverse_root(factor: torch.Tensor, damping: float, name: str = "", side: str = "") -> torch.Tensor:
    """``U (Λ + ε I)^{-1/2} Uᵀ`` by ``torch.linalg.eigh``, in the factor's dtype: in float32 for a
    float32 factor whose largest eigenvalue is at most ``FLOAT32_ROOT_LIMIT``·ε, else in float64."""
    if not bool(torch.isfinite(factor).all()):
        raise factor_error(name, side, "holds inf/NaN")
    if factor.dtype == torch.float32 and not _above(factor, FLOAT32_ROOT_LIMIT * damping):
        sym = (factor + factor.mT) / 2      # symmetric by construction; keep eigh's input exactly so
        try:
            lam, u = torch.linalg.eigh(sym)
        except RuntimeError:                # not converged in float32: float64 decides
            lam = None
        if lam is not None and bool(torch.isfinite(lam).all()) and float(lam[-1]) <= FLOAT32_ROOT_LIMIT * damping:
            return _damped_root(lam, u, damping, name, side)
    f64 = factor.double()
    f64 = (f64 + f64.mT) / 2
    try:
        lam, u = torch.linalg.eigh(f64)
    except RuntimeError as failure:   # torch.linalg.LinAlgError: eigh did not converge
        raise factor_error(name, side, f"could not be decomposed ({failure})") from None
    return _damped_root(lam, u, damping, name, side).to(factor.dtype)


def _above(factor: torch.Tensor, limit: float, iterations: int = 8) -> bool:
    """Whether the largest eigenvalue of the symmetric factor is surely above ``limit``, from lower
    bounds that cost a few matrix-vector products (so that float32 eigh is not tried in vain): the
    largest diagonal entry, and the Rayleigh quotient after power iterations from the ones vector."""
    if float(factor.diagonal().max()) > limit:
        return True
    v = factor.new_ones(factor.shape[0])
    for _ in range(iterations):
        w = factor @ v
        norm = w.norm()
        if not bool(norm > 0):
            return False
        v = w / norm
    return float(v @ (factor @ v)) > limit * (1 + 1e-3)     # (a margin for float32 rounding)


def _damped_root(lam: torch.Tensor, u: torch.Tensor, damping: float, name: str, side: str) -> torch.Tensor:
    damped = lam + damping
    if not bool(torch.isfinite(damped).all()) or float(damped.min()) <= 0:
        raise factor_error(name, side, f"is not positive definite after damping (smallest eigenvalue "
                                        f"{float(lam.min()):.3e}, damping {damping:g})")
    return (u * damped.rsqrt()) @ u.mT


class Sums:
    """One batch's raw statistics of a layer (or several micro-batches', pooled): Σ āāᵀ over its
    ``rows`` (samples × locations), Σ ĝĝᵀ over the same rows (ĝ = ∇σ'J / S with a GradScaler) and
    the number of ``samples``."""

    def __init__(self, aa: torch.Tensor, rows: float, gg: torch.Tensor, samples: float) -> None:
        self.aa, self.rows, self.gg, self.samples = aa, rows, gg, samples

    def finite_side(self) -> str | None:
        """The side ("A" or "B") whose sum holds inf/NaN, or None."""
        for side, value in (("A", self.aa), ("B", self.gg)):
            if not bool(torch.isfinite(value).all()):
                return side
        return None


def _pooled(sums: Sums, mean_reduction: bool, sync: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """stat_A = Σ āāᵀ / rows and stat_B = Σ ββᵀ / samples (Eqs. 17–18's observations); β = B·ĝ
    for a mean loss (B: this rank's batch), ĝ for a sum. With ``sync`` the sums and counts are
    every rank's (one all-reduce): the statistics of the joined batch."""
    bb = sums.gg * (sums.samples * sums.samples if mean_reduction else 1.0)
    if not sync:
        return sums.aa / sums.rows, bb / sums.samples
    n, m = sums.aa.shape[0], bb.shape[0]
    buffer = all_reduce(torch.cat([sums.aa.flatten(), bb.flatten(), bb.new_tensor([sums.rows, sums.samples])]))
    return buffer[:n * n].view(n, n) / buffer[-2], buffer[n * n:n * n + m * m].view(m, m) / buffer[-1]


def _advance(A, A_root, B, B_root, steps, statistics, gamma: float, t_int: int, t_stat: int, damping: float,
             name: str, skip_nonfinite: bool = False, count: bool = True) -> None:
    """One step of a layer's factors: at t ≡ 1 (mod ``t_stat``) fold in ``statistics()`` (Eqs. 17–18; the
    first observation initialises), at t ≡ 1 (mod ``t_int``) refresh the inverse roots, then t += 1
    (unless not ``count``: the two-pass accumulation counts the step after its second pass).
    A non-finite statistic raises, or with ``skip_nonfinite`` leaves the layer's state as it was."""
    t = int(steps) + 1                   # steps lives on the CPU: no device sync
    if (t - 1) % t_stat == 0:
        stat_a, stat_b = statistics()
        for side, stat in (("A", stat_a), ("B", stat_b)):
            if not bool(torch.isfinite(stat).all()):
                if skip_nonfinite:
                    return
                raise nonfinite_statistic(name, side)
        if t == 1:
            A.copy_(stat_a)
            B.copy_(stat_b)
        else:
            A.mul_(1.0 - gamma).add_(stat_a, alpha=gamma)
            B.mul_(1.0 - gamma).add_(stat_b, alpha=gamma)
    if (t - 1) % t_int == 0:
        A_root.copy_(inverse_root(A, damping, name, "A"))
        B_root.copy_(inverse_root(B, damping, name, "B"))
    if count:
        steps.fill_(t)


def nonfinite_statistic(name: str, side: str):
    return factor_error(name, side, "would be updated from a non-finite statistic (inf/NaN in "
                        + ("the layer's input)" if side == "A" else "∇σ'J)"))


def _collect(acc: torch.Tensor, steps: torch.Tensor, t_stat: int, samples: int, sums, skip_nonfinite: bool,
             name: str) -> None:
    """Inside ``svgd_fx.accumulate``: add this micro-batch's raw sums to ``acc`` (laid out
    ``[Σāāᵀ, Σĝĝᵀ, rows, samples]``) on the steps that update the factors; the samples always
    (they tell the commit that the layer ran)."""
    if int(steps) % t_stat == 0:
        got = sums()
        side = got.finite_side()
        if side is not None:
            if skip_nonfinite:
                return
            raise nonfinite_statistic(name, side)
        n2 = got.aa.numel()
        acc[:n2].add_(got.aa.flatten())
        acc[n2:-2].add_(got.gg.flatten())
        acc[-2] += got.rows
    acc[-1] += samples


@torch.no_grad()
def commit(acc: torch.Tensor, A, A_root, B, B_root, steps, gamma: float, t_int: int, t_stat: int, damping: float,
           mean_reduction: bool, sync: bool, skip_nonfinite: bool, name: str, phase: str = "single") -> None:
    """The end of an accumulated pass for one layer. ``"single"``: fold the micro-batches' pooled
    statistics into the factors (on a statistics step), refresh the roots when due, count the step;
    ``"statistics"``: the same without counting (the second pass's T nodes take this step's roots);
    ``"gradients"``: count the step. A layer no micro-batch reached is left alone."""
    samples = float(acc[-1])
    if sync:   # whether any rank's micro-batch reached the layer (every rank takes part in the same sums)
        samples = float(all_reduce(acc[-1:].clone()))
    if samples == 0:
        return
    if phase == "gradients":
        steps.add_(1)
        return
    n, m = A.shape[0], B.shape[0]

    def statistics():
        return _pooled(Sums(acc[:n * n].view(n, n), float(acc[-2]), acc[n * n:-2].view(m, m), float(acc[-1])),
                       mean_reduction, sync)

    _advance(A, A_root, B, B_root, steps, statistics, gamma, t_int, t_stat, damping, name, skip_nonfinite,
             count=phase == "single")


def _is_off(steps: torch.Tensor, switched: torch.Tensor, switch_at_step: int) -> bool:
    """After the switch to SGD (by hand, or past ``switch_at_step``): plain gradients, factors left alone."""
    return bool(switched) or (switch_at_step >= 0 and int(steps) + 1 > switch_at_step)


def _step(acc, collect, A, A_root, B, B_root, steps, sums, samples: int, gamma, t_int, t_stat, damping,
          mean_reduction, sync, skip_nonfinite, name) -> None:
    """The factors' part of a T node: collect (inside ``svgd_fx.accumulate``) or advance."""
    if collect is not None and bool(collect):     # a CPU scalar: no device sync
        if acc is None:
            raise RuntimeError(f"svgd_fx: layer {name!r} is asked to collect statistics but has no accumulator")
        _collect(acc, steps, t_stat, samples, sums, skip_nonfinite, name)
    else:
        _advance(A, A_root, B, B_root, steps, lambda: _pooled(sums(), mean_reduction, sync),
                 gamma, t_int, t_stat, damping, name, skip_nonfinite)


def _unscaled(gram: torch.Tensor, inv_scale: torch.Tensor | None) -> torch.Tensor:
    """Σ ggᵀ of S·g, back to Σ ggᵀ of g (a GradScaler's 1/S, squared)."""
    return gram if inv_scale is None else gram * inv_scale.to(gram.dtype).square()


@torch.library.custom_op("svgd_fx::kron_t", mutates_args=("A", "A_root", "B", "B_root", "steps", "acc"))
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
    t_stat: int,
    damping: float,
    batch: int,
    mean_reduction: bool,
    switch_at_step: int,
    name: str,
    inv_scale: torch.Tensor | None = None,
    sync: bool = False,
    skip_nonfinite: bool = False,
    acc: torch.Tensor | None = None,
    collect: torch.Tensor | None = None,
) -> torch.Tensor:
    """A linear layer's T from its rows: ``g`` ``[N, m]``, ``a`` ``[N, n]`` (views of ∇σ'J and the input)."""
    if _is_off(steps, switched, switch_at_step) or (g.shape[0] == 0 and not sync):
        return g.mT @ a.to(g.dtype)     # (under autocast the input may be float32: the graph casts it)
    gf, af = g.to(B.dtype), a.to(A.dtype)
    _step(acc, collect, A, A_root, B, B_root, steps,
          lambda: Sums(af.mT @ af, float(af.shape[0]), _unscaled(gf.mT @ gf, inv_scale), float(batch)), batch,
          gamma, t_int, t_stat, damping, mean_reduction, sync, skip_nonfinite, name)
    rows, (n, m) = gf.shape[0], (af.shape[1], gf.shape[1])
    if rows * (m * m + n * n) <= m * n * (m + n):
        delta = (gf @ B_root).mT @ (af @ A_root)
    else:
        delta = B_root @ (gf.mT @ af) @ A_root
    return delta.to(g.dtype)


@kron_t.register_fake
def _(g, a, A, A_root, B, B_root, steps, switched, gamma, t_int, t_stat, damping, batch, mean_reduction,
      switch_at_step, name, inv_scale=None, sync=False, skip_nonfinite=False, acc=None, collect=None):
    return g.new_empty((g.shape[1], a.shape[1]))


def patches(x: torch.Tensor, kernel, dilation, padding, stride) -> torch.Tensor:
    """A conv2d input's patches as columns ``[C_in·kh·kw, B·L]`` (rows in W's own flattening; the
    values of ``F.unfold``), from kh·kw strided slices of the padded input, copied once: several
    times faster than ``F.unfold`` on CPU, and laid out for one matmul."""
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = kernel, dilation, padding, stride
    ho = (x.shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
    wo = (x.shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    xp = (torch.nn.functional.pad(x, (pw, pw, ph, ph)) if ph or pw else x).transpose(0, 1)   # [C, B, H, W]
    cols = [xp[:, :, i * dh: i * dh + sh * (ho - 1) + 1: sh, j * dw: j * dw + sw * (wo - 1) + 1: sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(cols, 1).reshape(x.shape[1] * kh * kw, -1)


def _conv_sums(g: torch.Tensor, x: torch.Tensor, has_bias: bool, geometry, inv_scale, dtype) -> Sums:
    """Σ āāᵀ over samples and locations (ā = [patch, 1] with a bias) without forming ā: for a stride-1
    conv from the input's shifted products (:mod:`.patch_gram`), else by one matmul of the patches,
    the bias row and column from Σ a and the count; Σ ĝĝᵀ by one matmul."""
    kernel, dilation, padding, stride = geometry
    x = x.to(dtype)
    if patch_gram.applies(x.shape, stride):
        aa, count = patch_gram.patch_statistic(eager, x, kernel, dilation, padding, has_bias)
    else:
        p = patches(x, *geometry)                                        # [k, N]
        count = p.shape[1]
        aa = p @ p.mT
        if has_bias:
            aa = patch_gram.bordered(eager, aa, p.sum(1), count)
    gc = g.to(dtype).transpose(0, 1).reshape(g.shape[1], -1)              # [m, N]
    return Sums(aa, float(count), _unscaled(gc @ gc.mT, inv_scale), float(g.shape[0]))


@torch.library.custom_op("svgd_fx::kron_t_conv", mutates_args=("A", "A_root", "B", "B_root", "steps", "acc"))
def kron_t_conv(
    g: torch.Tensor,
    x: torch.Tensor,
    grad: torch.Tensor,
    A: torch.Tensor,
    A_root: torch.Tensor,
    B: torch.Tensor,
    B_root: torch.Tensor,
    steps: torch.Tensor,
    switched: torch.Tensor,
    kernel: list[int],
    dilation: list[int],
    padding: list[int],
    stride: list[int],
    has_bias: bool,
    gamma: float,
    t_int: int,
    t_stat: int,
    damping: float,
    mean_reduction: bool,
    switch_at_step: int,
    name: str,
    inv_scale: torch.Tensor | None = None,
    sync: bool = False,
    skip_nonfinite: bool = False,
    acc: torch.Tensor | None = None,
    collect: torch.Tensor | None = None,
) -> torch.Tensor:
    """A conv2d layer's T: ``R_B·Ĝ·R_A`` from the plain gradient ``grad`` = Ĝ ``[m, n]`` (the graph's own
    weight gradient, bias as its last column), ∇σ'J ``g`` ``[B, m, H, W]`` and the input ``x``; patches
    of ``x`` are formed only on the steps that update the factors."""
    if _is_off(steps, switched, switch_at_step) or (g.shape[0] == 0 and not sync):
        return grad.clone()
    _step(acc, collect, A, A_root, B, B_root, steps,
          lambda: _conv_sums(g, x, has_bias, (kernel, dilation, padding, stride), inv_scale, A.dtype), g.shape[0],
          gamma, t_int, t_stat, damping, mean_reduction, sync, skip_nonfinite, name)
    return (B_root @ grad.to(B.dtype) @ A_root).to(grad.dtype)


@kron_t_conv.register_fake
def _(g, x, grad, A, A_root, B, B_root, steps, switched, kernel, dilation, padding, stride, has_bias, gamma,
      t_int, t_stat, damping, mean_reduction, switch_at_step, name, inv_scale=None, sync=False,
      skip_nonfinite=False, acc=None, collect=None):
    return grad.new_empty(grad.shape)
