"""An independent reference for TSO-ALRA (docs/tso-alra.md): eager autograd, float64, module hooks.

It shares no code with ``svgd_fx``. Kronecker layers are the ``nn.Linear`` and ``nn.Conv2d``
(groups == 1) modules whose weight requires grad, keyed by module name. A forward hook records
each one's input ``a`` and a tensor hook on its output records ``g = dJ/d(output)``. From those
rows (samples x locations, bias folded as ``[a, 1]``) the reference builds, in float64,

    stat_A = (1/(B·L)) Σ ā āᵀ,   stat_B = (1/B) Σ β βᵀ  (β = B·g for "mean", g for "sum"),
    A, B   = first stat at t = 1, then (1−γ)·old + γ·stat,
    roots  = U (Λ + ε)^(-1/2) Uᵀ via eigh, refreshed at t = 1, 1 + T_int, ...,
    Δ      = R_B Ĝ R_A  with  Ĝ = Σ g āᵀ  (asserted equal to autograd's [grad_W | grad_b]);
             with ``lagged_roots`` the roots are those before this step's refresh (zero at t = 1).

Every other trainable parameter gets its plain gradient; after the switch to SGD all do.
Limits: each Kronecker module runs once per forward; a weight tied between Kronecker modules
gets the sum of their Δs (and of their Ĝs for the check), but not one also used elsewhere.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.testing import assert_close


def _conv_rows(mod: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """[B, L, C_in·kh·kw] patches in W's flattening order (channel, kernel row, kernel column)."""
    (kh, kw), (dh, dw) = mod.kernel_size, mod.dilation
    if isinstance(mod.padding, str):  # 'valid' / 'same' (odd extra padding goes right/bottom)
        th, tw = (dh * (kh - 1), dw * (kw - 1)) if mod.padding == "same" else (0, 0)
        pad = (tw // 2, tw - tw // 2, th // 2, th - th // 2)
    else:
        pad = (mod.padding[1], mod.padding[1], mod.padding[0], mod.padding[0])
    x = F.pad(x, pad, mode="constant" if mod.padding_mode == "zeros" else mod.padding_mode)
    return F.unfold(x, mod.kernel_size, dilation=mod.dilation, stride=mod.stride).transpose(1, 2)


class TSOReference:
    """Reference TSO-ALRA gradients for ``model`` (pass a float64 model)."""

    def __init__(self, model, gamma, t_int, damping, reduction="mean", switch_at_step=None, t_stat=1,
                 lagged_roots=False):
        assert reduction in ("mean", "sum")
        self.lagged_roots = lagged_roots   # Δ from the roots the previous step left (zero before any)
        self.model, self.gamma, self.t_int, self.damping = model, gamma, t_int, damping
        self.t_stat = t_stat       # factors updated at t = 1, 1 + t_stat, ...
        self.reduction, self.switch_at_step = reduction, switch_at_step
        self.t = 0                 # grads() calls so far (drives switch_at_step)
        self.switched = switch_at_step == 0
        self.state: dict[str, dict] = {}   # name -> {A, B, A_root, B_root, steps}; set at t = 1
        self.layers = {n: m for n, m in model.named_modules()
                       if (isinstance(m, nn.Linear) or (isinstance(m, nn.Conv2d) and m.groups == 1))
                       and m.weight.requires_grad}
        self._a, self._g, self._active = {}, {}, False
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def remove_hooks(self):
        for h in self._handles:
            h.remove()

    def _hook(self, name):
        def fwd(mod, inputs, out):
            if not self._active:
                return
            assert name not in self._a, f"Kronecker layer {name} called twice in one forward"
            self._a[name] = inputs[0].detach().to(torch.float64)
            out.register_hook(lambda g: self._g.__setitem__(name, g.detach().to(torch.float64)))
        return fwd

    def switch_to_sgd(self):
        self.switched = True

    def _root(self, M: torch.Tensor, name: str) -> torch.Tensor:
        lam, U = torch.linalg.eigh(M.to(torch.float64))
        lam = lam + self.damping
        if not (torch.isfinite(lam).all() and (lam > 0).all()):
            raise RuntimeError(f"bad factor eigenvalues in layer {name}")
        return (U * lam.rsqrt()) @ U.T

    def grads(self, x, y, loss_fn) -> dict[str, torch.Tensor]:
        params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.model.zero_grad(set_to_none=True)
        self._a, self._g = {}, {}
        self._active = True
        try:
            x = x.to(torch.float64) if torch.is_floating_point(x) else x
            loss_fn(self.model(x), y).backward()
        finally:
            self._active = False
        plain = {n: p.grad.detach().to(torch.float64).clone()
                 for n, p in params.items() if p.grad is not None}
        if self.switch_at_step is not None and self.t >= self.switch_at_step:
            self.switched = True
        self.t += 1
        if self.switched:
            return plain

        G_sum, D_sum, pname = {}, {}, {id(p): n for n, p in params.items()}
        for name, mod in self.layers.items():
            if name not in self._a:
                continue  # not used in this forward
            a, g = self._a[name], self._g[name]
            B = a.shape[0]
            if isinstance(mod, nn.Linear):    # [B, ..., C] -> [B, L, C]
                a, g = a.reshape(B, -1, a.shape[-1]), g.reshape(B, -1, g.shape[-1])
            else:                             # patches [B, L, n], g [B, C_out, H, W] -> [B, L, C_out]
                a, g = _conv_rows(mod, a), g.reshape(B, g.shape[1], -1).transpose(1, 2)
            L = a.shape[1]
            has_b = mod.bias is not None and mod.bias.requires_grad
            if has_b:
                a = torch.cat([a, a.new_ones(B, L, 1)], dim=2)
            beta = B * g if self.reduction == "mean" else g
            stat_A = torch.einsum("bli,blj->ij", a, a) / (B * L)
            stat_B = torch.einsum("bli,blj->ij", beta, beta) / B
            st = self.state.get(name)
            n_a, n_b = a.shape[2], g.shape[2]
            before = (st["B_root"], st["A_root"]) if st is not None else (torch.zeros(n_b, n_b, dtype=a.dtype),
                                                                          torch.zeros(n_a, n_a, dtype=a.dtype))
            if st is None:                    # t = 1: the first observation initialises
                st = self.state[name] = {"A": stat_A, "B": stat_B, "steps": 0}
            elif st["steps"] % self.t_stat == 0:
                st["A"] = (1 - self.gamma) * st["A"] + self.gamma * stat_A
                st["B"] = (1 - self.gamma) * st["B"] + self.gamma * stat_B
            st["steps"] += 1
            if (st["steps"] - 1) % self.t_int == 0:
                st["A_root"], st["B_root"] = self._root(st["A"], name), self._root(st["B"], name)
            G = torch.einsum("bli,blj->ij", g, a)            # Ĝ = [grad_W | grad_b], m x n
            R_B, R_A = before if self.lagged_roots else (st["B_root"], st["A_root"])
            D = R_B @ G @ R_A
            parts = [(mod.weight, G[:, :-1] if has_b else G, D[:, :-1] if has_b else D)]
            if has_b:
                parts.append((mod.bias, G[:, -1], D[:, -1]))
            for p, Gp, Dp in parts:
                n = pname[id(p)]
                G_sum[n] = G_sum.get(n, 0) + Gp.reshape(p.shape)
                D_sum[n] = D_sum.get(n, 0) + Dp.reshape(p.shape)
        for n, Gp in G_sum.items():           # row construction check against autograd
            assert_close(Gp, plain[n], rtol=1e-10, atol=1e-12 * max(1.0, plain[n].abs().max().item()),
                         msg=lambda m, n=n: f"Ĝ of {n} != autograd grad\n{m}")
        return {**plain, **D_sum}


if __name__ == "__main__":
    torch.manual_seed(0)
    dt = torch.float64

    def plain_grads(model, x, y, loss_fn):
        ps = {n: p for n, p in model.named_parameters() if p.requires_grad}
        return dict(zip(ps, torch.autograd.grad(loss_fn(model(x), y), list(ps.values()))))

    mlp = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3)).to(dt)
    cnn = nn.Sequential(nn.Conv2d(3, 4, (2, 3), padding="same"), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, stride=2, padding=1, bias=False), nn.Flatten(),
                        nn.Linear(5 * 3 * 3, 2)).to(dt)
    seq = nn.Sequential(nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 2)).to(dt)  # [B, T, C] input
    cases = [("mlp", mlp, lambda: torch.randn(8, 5, dtype=dt), "mean", nn.CrossEntropyLoss()),
             ("cnn", cnn, lambda: torch.randn(6, 3, 6, 6, dtype=dt), "sum",
              nn.CrossEntropyLoss(reduction="sum")),
             ("seq", seq, lambda: torch.randn(4, 3, 4, dtype=dt), "mean",
              lambda out, y: F.cross_entropy(out.reshape(-1, 2), y.reshape(-1)))]
    for label, model, make_x, red, loss_fn in cases:
        ref = TSOReference(model, gamma=0.3, t_int=2, damping=1e-3, reduction=red, switch_at_step=3)
        opt = torch.optim.SGD(model.parameters(), lr=1e-2)
        first = next(iter(ref.layers))
        for step in range(1, 5):
            x = make_x()
            y = torch.randint(0, 2, (x.shape[0],) + ((x.shape[1],) if label == "seq" else ()))
            plain = plain_grads(model, x, y, loss_fn)
            prev = {k: v.clone() for k, v in ref.state[first].items() if k != "steps"} if step > 1 else {}
            grads = ref.grads(x, y, loss_fn)                 # (1) asserts Ĝ == autograd inside
            st = ref.state[first]
            if step <= 3:
                R_A, R_B, n = st["A_root"], st["B_root"], st["A"].shape[0]
                eye = torch.eye(n, dtype=dt)                 # roots really are (A + εI)^(-1/2)
                if step != 2:
                    assert_close(R_A @ R_A @ (st["A"] + 1e-3 * eye), eye)
                else:                                        # t = 2: no refresh, factors moved
                    assert_close(R_A, prev["A_root"], rtol=0, atol=0)
                    assert not torch.equal(st["A"], prev["A"])
                if label == "mlp":                           # (2) brute-force Kronecker product
                    w, b = plain[f"{first}.weight"], plain[f"{first}.bias"]
                    G = torch.cat([w, b[:, None]], dim=1)
                    D = torch.cat([grads[f"{first}.weight"], grads[f"{first}.bias"][:, None]], dim=1)
                    assert_close(D.reshape(-1), torch.kron(R_B, R_A) @ G.reshape(-1))
                    assert not torch.allclose(D, G)
            else:                                            # (3) after the switch: plain SGD
                assert st["steps"] == 3 and torch.equal(st["A"], prev["A"])
                for k in plain:
                    assert_close(grads[k], plain[k], rtol=0, atol=0)
            for k, p in model.named_parameters():
                p.grad = grads[k].to(p.dtype)
            opt.step()
        print(f"{label}: ok ({', '.join(ref.layers)})")
    print("reference_tso self-check passed")
