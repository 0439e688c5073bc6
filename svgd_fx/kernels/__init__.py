"""The T operator of SVGD as one custom op, with a Triton kernel on CUDA and torch elsewhere.

``torch.ops.svgd_fx.virtual_grad(g, r, s, rho, eps, mean_reduction, reduce_dims)``

    B    = g.shape[0]                        (read at run time, never baked in)
    u    = B * g if mean_reduction else g    (the per-sample gradient)
    r   <- rho * r + (1 - rho) * mean_{batch, reduce_dims} u**2     (in place)
    out  = s * g / sqrt(r + eps)             (r broadcast over the batch and reduce_dims)

``r`` is float32 (float64 when ``g`` is float64); the arithmetic runs in r's dtype and
the result has g's dtype. ``reduce_dims = []`` keeps r at the full per-sample shape of g
(the default); otherwise r keeps the dims of g not listed (a channel, or the dims that do not
vary between calls).

TSO-ALRA's two-sided T (``torch.ops.svgd_fx.kron_t`` for linear layers, ``kron_t_conv`` for
conv2d layers) is in :mod:`.kron_op`.
"""

from .kron_op import inverse_root, kron_t, kron_t_conv, patches
from .t_op import virtual_grad, virtual_grad_reference, triton_available

__all__ = ["virtual_grad", "virtual_grad_reference", "triton_available", "kron_t", "kron_t_conv", "patches",
           "inverse_root"]
