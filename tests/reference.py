"""An independent reference for the contract's virtual gradients: eager autograd, float64, no FX.

It shares no code with ``svgd_fx``: it watches the model's torch calls with a
``TorchFunctionMode``, tracks which tensors are parameter-derived or batch-dependent, and at
every σ' call computes the op twice —

    y_act = f(inputs, linear params detached)   -> carries g to activations and non-linear params
    y_par = f(inputs detached, linear params)   -> carries T(g) to the linear params

— joined by an autograd function whose backward hands ``g`` to the first and ``T(g)`` to the
second. T follows docs/contract.md line by line in float64. Its own small linearity table covers the ops
of the test models; anything else is treated as non-linear, as the contract (docs/contract.md) says.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

# op -> (argument positions that may hold a linear parameter input, a name for messages)
_LINEAR_POSITIONS = {
    torch._C._nn.linear: ((1, 2), "linear"),
    torch.conv1d: ((1, 2), "conv"), torch.conv2d: ((1, 2), "conv"), torch.conv3d: ((1, 2), "conv"),
    torch.conv_transpose1d: ((1, 2), "convT"), torch.conv_transpose2d: ((1, 2), "convT"),
    torch.conv_transpose3d: ((1, 2), "convT"),
    F.embedding: ((1,), "embedding"),
    F.layer_norm: ((2, 3), "layer_norm"), F.rms_norm: ((2,), "rms_norm"), F.group_norm: ((2, 3), "group_norm"),
    F.batch_norm: ((3, 4), "batch_norm"), F.instance_norm: ((3, 4), "instance_norm"),
    F.prelu: ((1,), "prelu"), torch.prelu: ((1,), "prelu"),
    torch.Tensor.mul: ((0, 1), "mul"), torch.Tensor.__mul__: ((0, 1), "mul"),
    torch.Tensor.__rmul__: ((0, 1), "mul"),
    torch.Tensor.add: ((0, 1), "add"), torch.Tensor.__add__: ((0, 1), "add"),
    torch.Tensor.__radd__: ((0, 1), "add"),
    # `x += p` reaches the mode as add_; computed out of place (Python rebinds x to the result;
    # a bare `x.add_(p)` statement would lose it: its forward would differ, and the tests see that)
    torch.Tensor.add_: ((0, 1), "add"),
    torch.Tensor.sub: ((0, 1), "sub"), torch.Tensor.__sub__: ((0, 1), "sub"), torch.Tensor.__rsub__: ((0, 1), "sub"),
    torch.sub: ((0, 1), "sub"), torch.rsub: ((0, 1), "sub"),
    torch.Tensor.div: ((0,), "div"), torch.Tensor.__truediv__: ((0,), "div"),
    torch.matmul: ((0, 1), "matmul"), torch.Tensor.matmul: ((0, 1), "matmul"),
    torch.Tensor.__matmul__: ((0, 1), "matmul"),
    torch.addmm: ((0, 1, 2), "addmm"),                    # GPT-2's Conv1D on [B*T, C] rows
    torch.cat: ((0,), "cat"), torch.stack: ((0,), "stack"),   # position 0 is the list of tensors
    torch.where: ((1, 2), "where"),
}
# parameter-only ops through which every parameter keeps its linearity
_CHAIN_LINEAR = {torch.Tensor.t, torch.Tensor.transpose, torch.Tensor.view, torch.Tensor.reshape,
                 torch.Tensor.permute, torch.Tensor.__getitem__, torch.Tensor.contiguous,
                 torch.Tensor.__neg__, torch.Tensor.unsqueeze, torch.Tensor.squeeze, torch.Tensor.expand,
                 torch.Tensor.to, torch.Tensor.type_as, torch.Tensor.split, torch.Tensor.chunk,
                 torch.Tensor.flatten, torch.Tensor.unflatten, torch.Tensor.repeat, torch.cat,
                 torch.Tensor.__add__, torch.Tensor.add, torch.Tensor.__radd__, torch.Tensor.sub,
                 torch.Tensor.__sub__, torch.Tensor.__rsub__, torch.sub, torch.rsub, torch.Tensor.float,
                 torch.Tensor.double, torch.Tensor.half, torch.Tensor.bfloat16, torch.Tensor.type,
                 torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.H.__get__, torch.Tensor.mH.__get__,
                 torch.rot90, torch.Tensor.rot90, torch.triu, torch.Tensor.triu, torch.tril, torch.Tensor.tril}
# parameter-only ops that are linear in the parameters of one argument position, if no other holds them:
# products (one factor), division (numerator), a row gather from a table, weight norm's magnitude g
_CHAIN_ONE_FACTOR = {
    torch.Tensor.__mul__: (0, 1), torch.Tensor.mul: (0, 1), torch.Tensor.__rmul__: (0, 1), torch.mul: (0, 1),
    torch.Tensor.__truediv__: (0,), torch.Tensor.div: (0,),
    F.embedding: (1,), torch._weight_norm: (1,),
}
# where(c, a, b): linear in a and b together, the condition constant
_CHAIN_SELECT = {torch.where: (1, 2)}


class _Split(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_act, y_par, t_fn):
        ctx.t_fn = t_fn
        return y_act.detach().clone()

    @staticmethod
    def backward(ctx, g):
        return g, ctx.t_fn(g), None


class SVGDReference:
    """Reference virtual gradients for ``model`` (run it in float64)."""

    def __init__(self, model, s, rho=0.9, eps=1e-6, reduction="mean", exclude=(), r_shape="full"):
        self.model = model
        self.s, self.rho, self.eps = s, rho, eps
        self.reduction, self.r_shape = reduction, r_shape
        self.param_names = {id(p): n for n, p in model.named_parameters()
                            if p.requires_grad and n not in set(exclude)}
        self.frozen = {id(p) for n, p in model.named_parameters() if id(p) not in self.param_names}
        self.r: dict[int, torch.Tensor] = {}          # kept with size-1 dims where averaged
        self.shapes: dict[int, tuple] = {}
        self.varying: dict[int, set[int]] = {}
        self.sigma_ops: list[str] = []         # op names of the routed σ' calls of the last forward

    def __call__(self, *inputs, **kw_inputs):
        mode = _Mode(self, list(inputs) + list(kw_inputs.values()))
        with mode:
            out = self.model(*inputs, **kw_inputs)
        self.sigma_ops = mode.routed
        return out

    def T(self, index: int, g: torch.Tensor, channel_dim: int | None) -> torch.Tensor:
        """the contract's T for the ``index``-th σ' call. r keeps the dims of g that have not varied so
        far (and, with r_shape="channel", only the channel); the statistic averages the batch
        and the others. When a dim first varies, r so far is averaged over it."""
        shape = tuple(g.shape)
        seen = self.shapes.get(index)
        varying = self.varying.setdefault(index, set())
        if seen is not None:
            varying |= {d for d in range(1, g.dim()) if seen[d] != shape[d]}
        self.shapes[index] = shape
        averaged = set(varying)
        if channel_dim is not None:
            averaged |= {d for d in range(1, g.dim()) if d != channel_dim}
        batch = g.shape[0]
        per_sample = g * batch if self.reduction == "mean" else g
        stat = (per_sample.double() ** 2).mean(dim=[0, *sorted(averaged)], keepdim=True)
        r = self.r.get(index)
        if r is not None:
            newly = [d for d in sorted(averaged) if r.shape[d] != 1]     # r is kept broadcastable
            r = r.mean(dim=newly, keepdim=True) if newly else r
        r = (1 - self.rho) * stat if r is None else self.rho * r + (1 - self.rho) * stat
        self.r[index] = r
        return (self.s * g.double() / (r + self.eps).sqrt()).to(g.dtype)


class _Mode(TorchFunctionMode):
    def __init__(self, ref: SVGDReference, inputs):
        super().__init__()
        self.ref = ref
        self.batch_ids = {id(x) for x in inputs if isinstance(x, torch.Tensor)}
        # id -> {param name: linear}; tensors are kept alive so ids are not reused
        self.derived: dict[int, dict[str, bool]] = {}
        self.recipes: dict[int, tuple] = {}    # id -> (func, args, kwargs) of a derived tensor
        self.keep: list[torch.Tensor] = list(inputs)
        self.count = 0
        self.routed: list[str] = []

    def _param_map(self, t) -> dict[str, bool] | None:
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.ref.param_names:
            return {self.ref.param_names[id(t)]: True}
        return self.derived.get(id(t))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opened = _COMPOSITES.get(func)
        if opened is not None and (func is not F.scaled_dot_product_attention or self._param_map(
                kwargs.get("attn_mask", args[3] if len(args) > 3 else None)) is not None):
            with self:          # σ' nodes inside: the projections (MHA), scores + mask (SDPA)
                return opened(*args, **kwargs)
        flat = list(args) + list(kwargs.values())
        flat = [a for x in flat for a in (x if isinstance(x, (list, tuple)) else [x])]
        tensors = [a for a in flat if isinstance(a, torch.Tensor)]
        is_batch = any(id(t) in self.batch_ids for t in tensors)
        maps = [self._param_map(t) for t in tensors]
        has_param = any(m is not None for m in maps)

        if is_batch and has_param:
            return self._sigma(func, args, kwargs)
        out = func(*args, **kwargs)
        outs = out if isinstance(out, (tuple, list)) else [out]
        for o in outs:
            if not isinstance(o, torch.Tensor):
                continue
            self.keep.append(o)
            if is_batch:
                self.batch_ids.add(id(o))
            elif has_param and not any(o is t for t in tensors):   # not an alias of an input (`.to`)
                self.derived[id(o)] = self._chain(func, args, kwargs)
                self.recipes[id(o)] = (func, args, kwargs, outs.index(o) if len(outs) > 1 else None)
        return out

    def _rebuilt(self, t, keep: set[str]):
        """A parameter-derived ``t`` computed again with only the parameters in ``keep`` attached."""
        if not isinstance(t, torch.Tensor):
            if isinstance(t, (list, tuple)):
                return type(t)(self._rebuilt(v, keep) for v in t)
            return t
        if id(t) in self.ref.param_names:
            return t if self.ref.param_names[id(t)] in keep else t.detach()
        if id(t) not in self.recipes:
            return t
        func, args, kwargs, index = self.recipes[id(t)]
        out = func(*[self._rebuilt(a, keep) for a in args], **{k: self._rebuilt(v, keep) for k, v in kwargs.items()})
        return out if index is None else out[index]

    def _chain(self, func, args, kwargs) -> dict[str, bool]:
        """{param: linear} of a parameter-only op's output."""
        slots = [(i, self._param_map(t)) for i, a in enumerate(list(args) + list(kwargs.values()))
                 for t in (a if isinstance(a, (list, tuple)) else [a])]
        slots = [(i, m) for i, m in slots if m]
        merged: dict[str, bool] = {}
        for i, m in slots:
            for p, lin in m.items():
                if func in _CHAIN_LINEAR:
                    ok = lin
                elif func in _CHAIN_ONE_FACTOR:
                    ok = lin and i in _CHAIN_ONE_FACTOR[func] and sum(p in m2 for _, m2 in slots) == 1
                elif func in _CHAIN_SELECT:
                    ok = lin and i in _CHAIN_SELECT[func]
                else:
                    ok = False
                merged[p] = merged.get(p, True) and ok
        return merged

    def _sigma(self, func, args, kwargs):
        positions, name = _LINEAR_POSITIONS.get(func, ((), "unknown"))
        func = torch.Tensor.__add__ if func is torch.Tensor.add_ else func
        args = list(args)
        # every tensor argument, lists opened: (position or keyword, index in the list or None)
        leaves = {}
        for key, value in list(enumerate(args)) + list(kwargs.items()):
            if isinstance(value, (list, tuple)):
                leaves.update({(key, j): v for j, v in enumerate(value) if isinstance(v, torch.Tensor)})
            elif isinstance(value, torch.Tensor):
                leaves[(key, None)] = value
        linear_keys = set(positions) | ({"weight", "bias"} if name != "unknown" else set())
        maps = {slot: self._param_map(t) or {} for slot, t in leaves.items()}
        # a parameter gets T when every occurrence is linear and at a position the op is linear in
        linear = {p for m in maps.values() for p in m}
        for slot, m in maps.items():
            linear -= {p for p, lin in m.items() if not lin or slot[0] not in linear_keys}
        if not linear:
            out = func(*args, **kwargs)
            self._mark_batch(out)
            return out

        def rebuilt(keep, activations: bool):
            """args, kwargs: parameter-derived leaves recomputed with only ``keep`` attached; the
            batch-dependent ones as they are, or detached."""
            def leaf(value):
                if not isinstance(value, torch.Tensor):
                    return value
                if self._param_map(value) is not None:
                    return self._rebuilt(value, keep)
                return value if activations else value.detach()

            def one(value):
                return type(value)(leaf(v) for v in value) if isinstance(value, (list, tuple)) else leaf(value)
            return [one(v) for v in args], {k: one(v) for k, v in kwargs.items()}

        every = {p for m in maps.values() for p in m}
        act_args, act_kwargs = rebuilt(every - linear, activations=True)
        y_act = func(*act_args, **act_kwargs)
        par_args, par_kwargs = rebuilt(linear, activations=False)
        training = (par_args[5] if len(par_args) > 5 else par_kwargs.get("training", False)) \
            if name == "batch_norm" else True
        if name in ("batch_norm", "instance_norm") and training and len(par_args) > 2:
            par_args[1] = par_args[2] = None  # no second running-stat update
        y_par = func(*par_args, **par_kwargs)

        index = self.count
        self.count += 1
        self.routed.append(name)
        channel_dim = None
        if self.ref.r_shape == "channel" and y_act.dim() >= 3:
            channel_dim = 1 if name in ("conv", "convT", "batch_norm", "instance_norm", "group_norm",
                                        "prelu") else y_act.dim() - 1
        out = _Split.apply(y_act, y_par, lambda g: self.ref.T(index, g, channel_dim))
        self._mark_batch(out)
        return out

    def _mark_batch(self, out):
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.keep.append(o)
                self.batch_ids.add(id(o))


def _mha(query, key, value, embed_dim, num_heads, in_w, in_b, bias_k, bias_v, add_zero_attn, dropout_p,
         out_w, out_b, training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
         use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None, v_proj_weight=None,
         static_k=None, static_v=None, average_attn_weights=True, is_causal=False):
    """nn.MultiheadAttention's math, batch first, with the projections torch groups the same way
    (one packed linear for self-attention; q, then packed k/v when key is value; else three).
    Dropout and static_k/v are not covered (the tests use neither)."""
    assert static_k is None and static_v is None and (dropout_p == 0.0 or not training)
    unbatched = query.dim() == 2
    x_q, x_k, x_v = (x.unsqueeze(1) if unbatched else x for x in (query, key, value))
    x_q, x_k, x_v = x_q.permute(1, 0, 2), x_k.permute(1, 0, 2), x_v.permute(1, 0, 2)   # [N, L, E]
    E, H = embed_dim, num_heads
    if use_separate_proj_weight:
        bq, bk, bv = (None, None, None) if in_b is None else (in_b[:E], in_b[E:2 * E], in_b[2 * E:])
        q, k, v = F.linear(x_q, q_proj_weight, bq), F.linear(x_k, k_proj_weight, bk), F.linear(x_v, v_proj_weight, bv)
    elif query is key and key is value:
        qkv = F.linear(x_q, in_w, in_b)
        q, k, v = qkv[..., :E], qkv[..., E:2 * E], qkv[..., 2 * E:]
    elif key is value:
        q = F.linear(x_q, in_w[:E], None if in_b is None else in_b[:E])
        kv = F.linear(x_k, in_w[E:], None if in_b is None else in_b[E:])
        k, v = kv[..., :E], kv[..., E:]
    else:
        q, k, v = (F.linear(x, in_w[i * E:(i + 1) * E], None if in_b is None else in_b[i * E:(i + 1) * E])
                   for i, x in enumerate((x_q, x_k, x_v)))
    n, tgt = q.shape[0], q.shape[1]

    def additive(mask):
        return torch.zeros(mask.shape, dtype=q.dtype).masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else mask

    bias = torch.zeros(n, H, tgt, k.shape[1], dtype=q.dtype)
    if attn_mask is not None:
        bias = bias + (additive(attn_mask) if attn_mask.dim() == 2 else additive(attn_mask).reshape(n, H, tgt, -1))
    elif is_causal:
        bias = bias + torch.full((tgt, k.shape[1]), float("-inf"), dtype=q.dtype).triu(1)
    if bias_k is not None:
        k = torch.cat([k, bias_k.reshape(1, 1, E).expand(n, 1, E)], dim=1)
        v = torch.cat([v, bias_v.reshape(1, 1, E).expand(n, 1, E)], dim=1)
        bias = torch.cat([bias, torch.zeros(n, H, tgt, 1, dtype=q.dtype)], dim=-1)
    heads = lambda t: t.reshape(n, t.shape[1], H, E // H).permute(0, 2, 1, 3)   # noqa: E731
    q, k, v = heads(q), heads(k), heads(v)
    if add_zero_attn:
        k = torch.cat([k, torch.zeros(n, H, 1, E // H, dtype=k.dtype)], dim=2)
        v = torch.cat([v, torch.zeros(n, H, 1, E // H, dtype=v.dtype)], dim=2)
        bias = torch.cat([bias, torch.zeros(n, H, tgt, 1, dtype=q.dtype)], dim=-1)
    if key_padding_mask is not None:
        kpm = additive(key_padding_mask.unsqueeze(1) if unbatched else key_padding_mask)
        bias = bias + torch.cat([kpm, torch.zeros(n, bias.shape[-1] - kpm.shape[-1], dtype=q.dtype)], -1)[:, None, None]
    weights = torch.softmax(torch.einsum("nhld,nhsd->nhls", q, k) / (E // H) ** 0.5 + bias, dim=-1)
    out = torch.einsum("nhls,nhsd->nhld", weights, v).permute(0, 2, 1, 3).reshape(n, tgt, E)
    out = F.linear(out, out_w, out_b).permute(1, 0, 2)
    if unbatched:
        out = out.squeeze(1)
    if not need_weights:
        return out, None
    weights = weights.mean(dim=1) if average_attn_weights else weights
    return out, (weights.squeeze(0) if unbatched else weights)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """softmax(q·kᵀ·scale + mask)·v with the mask added in a call of its own (a σ' node when the
    mask is parameter-derived, as T5's relative-position bias is)."""
    assert dropout_p == 0.0 and not is_causal and not enable_gqa
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(scores + attn_mask, dim=-1), value)


_COMPOSITES = {F.multi_head_attention_forward: _mha, F.scaled_dot_product_attention: _sdpa}


def plain_reference_r(grads_per_step, rho, batch):
    """the contract's closed form: r after k steps = (1-ρ) Σ_j ρ^{k-j} mean_τ(B·g_j[τ])²."""
    k = len(grads_per_step)
    return sum((1 - rho) * rho ** (k - 1 - j) * ((batch * g) ** 2).mean(0)
               for j, g in enumerate(grads_per_step))

