"""An independent reference for ``variant="authors"`` (the authors' TensorFlow code's T): module
hooks, eager autograd, float64. It shares no code with ``svgd_fx``.

For every ``nn.Linear`` and ``nn.Conv2d`` (its weight only; biases, norms and every other
parameter train on the plain gradient), with g = ∂J/∂(layer output) as autograd delivers it
(no B factor) and r of the output's per-sample shape::

    T(g) = s·g / sqrt(r_{t-1} + ε)            (r before this step's update; zero at t = 1)
    r_t  = ρ·r_{t-1} + (1−ρ)·mean_b g_b²
    ∇W   = the layer's weight gradient with T(g) in place of g
"""

from __future__ import annotations

import torch
import torch.nn as nn


class AuthorsReference:
    def __init__(self, model: nn.Module, s: float, rho: float = 0.9, eps: float = 1e-6):
        self.model, self.s, self.rho, self.eps = model, s, rho, eps
        self.r: dict[str, torch.Tensor] = {}
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self._seen = {}
        for name, mod in self.layers.items():
            mod.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def fwd(mod, inputs, out):
            x = inputs[0].detach()
            out.register_hook(lambda g: self._seen.__setitem__(name, (x, g.detach())))
        return fwd

    def grads(self, x, y, loss_fn) -> dict[str, torch.Tensor]:
        self.model.zero_grad(set_to_none=True)
        self._seen = {}
        loss_fn(self.model(x), y).backward()
        out = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        for name, mod in self.layers.items():
            if name not in self._seen:
                continue
            a, g = self._seen[name]
            r = self.r.get(name, torch.zeros_like(g[0]))
            tg = self.s * g / torch.sqrt(r + self.eps)
            self.r[name] = self.rho * r + (1 - self.rho) * (g * g).mean(0)
            if isinstance(mod, nn.Linear):
                w = torch.einsum("...o,...i->oi", tg, a)
            else:
                w = torch.nn.grad.conv2d_weight(a, mod.weight.shape, tg, mod.stride, mod.padding, mod.dilation,
                                                mod.groups)
            out[f"{name}.weight"] = w
        return out
