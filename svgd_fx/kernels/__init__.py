"""The T operator of SVGD as one custom op, with a Triton kernel on CUDA and torch elsewhere.

``torch.ops.svgd_fx.virtual_grad(g, r, s, rho, eps, batch_scale, channel_dim)``

    B    = g.shape[0]                        (read at run time, never baked in)
    u    = batch_scale(B) * g                (B·g for a mean loss, g for a sum)
    r   <- rho * r + (1 - rho) * mean_{batch [, non-channel dims]} u**2     (in place)
    out  = s * g / sqrt(r + eps)             (r broadcast over the batch dim)

``r`` is float32 (float64 when ``g`` is float64); the arithmetic runs in r's dtype and
the result has g's dtype. ``channel_dim < 0`` keeps r at the full per-sample shape of g
(SPEC's default); ``channel_dim = c >= 1`` keeps r over dim ``c`` of g only.

TSO-ALRA's two-sided T (``torch.ops.svgd_fx.kron_t``) is in :mod:`.kron_op`.
"""

from .kron_op import inverse_root, kron_t, patch_rows
from .t_op import virtual_grad, virtual_grad_reference, triton_available

__all__ = ["virtual_grad", "virtual_grad_reference", "triton_available", "kron_t", "patch_rows", "inverse_root"]
