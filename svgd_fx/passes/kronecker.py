"""TSO-ALRA on the joint graph: the two-sided Kronecker T of a Linear or Conv2d layer.

Which σ' nodes qualify (``kronecker_layer``, on Dynamo's torch-level graph): ``F.linear`` and
``F.conv2d`` (``groups=1``, symmetric padding) whose weight argument is a trainable parameter
itself. Everything else keeps the plain gradient (``docs/tso-alra.md`` says why).

The rewrite (``precondition``, on AOTAutograd's joint graph), for layer S with incoming
gradient g = ∇σ'J (found as in :mod:`.reroute`, with :mod:`.joint`) and forward input x::

    rows:  G = g as [N, m]        X = x as [N, n]  (linear: leading dims flattened;
                                                    conv2d: unfolded patches; bias: a column of 1s)
    T:     Δ = svgd_fx::kron_t(G, X, A, A_root, B, B_root, steps, switched, ...) = R_B·GᵀX·R_A
    grads: ∇W = Δ[:, :n-1]      ∇b = Δ[:, n-1]

The backward group's outputs that carry S's weight and bias gradients (its *parameter
edges*, as in :mod:`.reroute`) are replaced by these; its activation edges are left alone,
so back-propagation through x stays exact. Unused outputs of fused backward ops are then
narrowed away (``convolution_backward`` computes only the input gradient).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from ..errors import RerouteError
from ..kernels import kron_t  # noqa: F401  (registers torch.ops.svgd_fx.kron_t)
from ..kernels import applier, patch_gram
from .joint import emitter, finish, incoming_gradient, joint_view, node_tag, parameter_edge
from .linearity import bind_args, sigma_rule
from .locate import example_value

STATE_PARTS = ("A", "A_root", "B", "B_root", "steps")


@dataclass(frozen=True)
class KronLayer:
    """What ``kronecker_layer`` found on the torch-level graph."""
    kind: str                             # "linear" | "conv2d"
    weight: str                           # parameter names
    bias: str | None                      # trainable bias folded into A (None: no bias column)
    weight_shape: tuple[int, ...]
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)

    @property
    def sizes(self) -> tuple[int, int]:
        """(n, m): the sides of A (input rows, + 1 with a bias) and of B (output channels)."""
        n = 1
        for d in self.weight_shape[1:]:
            n *= d
        return n + (self.bias is not None), self.weight_shape[0]


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else tuple(int(v) for v in value)


def kronecker_layer(sigma, param_names: dict[Node, str], trainable: set[str]) -> tuple[KronLayer | None, str]:
    """The Kronecker layer σ' is, or None and why its parameters keep the plain gradient."""
    plain = ("TSO-ALRA preconditions Linear and Conv2d weights only (Kronecker factors of s = Wᵀa); "
             f"`{sigma.op}` keeps the plain gradient")
    if sigma.op not in ("linear", "conv2d"):
        return None, plain
    bound = bind_args(sigma.node, sigma_rule(sigma.node).args)
    weight, bias = bound.get("weight"), bound.get("bias")
    if not isinstance(weight, Node) or param_names.get(weight) not in trainable:
        return None, "its weight is not a trainable parameter itself (a parameter-derived value or frozen)"
    bias_name = param_names.get(bias) if isinstance(bias, Node) else None
    if isinstance(bias, Node) and bias_name is None and bias.op != "placeholder":
        return None, "its bias is a parameter-derived value: A's bias column needs the parameter itself"
    shape = tuple(int(d) for d in example_value(weight).shape)
    if sigma.op == "linear":
        return KronLayer("linear", param_names[weight], bias_name if bias_name in trainable else None, shape), ""
    if int(bound.get("groups", 1)) != 1:
        return None, "a grouped convolution (groups > 1): one Kronecker factor pair per group is not implemented"
    dilation = _pair(bound.get("dilation", 1))
    padding = bound.get("padding", 0)
    if padding == "valid":
        padding = (0, 0)
    elif padding == "same":
        total = [d * (k - 1) for d, k in zip(dilation, shape[2:])]
        if any(t % 2 for t in total):
            return None, "padding='same' with an even kernel pads unevenly; im2col pads symmetrically"
        padding = tuple(t // 2 for t in total)
    return KronLayer("conv2d", param_names[weight], bias_name if bias_name in trainable else None, shape,
                     _pair(bound.get("stride", 1)), _pair(padding), dilation), ""


@dataclass(frozen=True)
class KronSpec:
    source: str                   # source_fn name of the σ' node (key into the joint graph)
    name: str
    layer: KronLayer
    weight_input: int             # plain-input indices of W and b
    bias_input: int | None
    state_inputs: tuple[int, ...]  # plain-input indices of A, A_root, B, B_root, steps
    switched_input: int
    gamma: float
    t_int: int
    t_stat: int
    damping: float
    mean_reduction: bool
    switch_at_step: int           # -1: no switch by step count
    scale_input: int | None = None   # plain-input index of a GradScaler's 1/S
    sync: bool = False               # all-reduce the factors' statistics (distributed=True)
    skip_nonfinite: bool = False     # a non-finite statistic leaves the state alone (nonfinite="skip")
    acc_input: int | None = None     # svgd_fx.accumulate: the layer's accumulator ...
    collect_input: int | None = None  # ... and the "collect" mode input
    flag_input: int | None = None    # the fold graph's non-finite marker (+1: stat_A, +2: stat_B)


def precondition(gm: GraphModule, specs: list[KronSpec], param_derived_sources: set[str],
                 param_inputs: set[int], exclude_hint: str = "exclude=[...]",
                 variant: str | None = None) -> dict[str, str]:
    """Insert the two-sided T for every spec; return ``{σ' name: T node name}`` for those rewritten.

    ``variant`` (graphs for some steps only, chosen per call by ``TSOMethod.variants``; the caller
    counts their steps): ``"steady"``, for the steps that neither update the factors nor refresh
    the roots: T is ``R_B·Ĝ·R_A`` in aten matmuls that read the roots, which inductor schedules
    with the rest of the backward; ``"fold"``, for the steps that update the factors without a
    refresh: the same, and the statistics folded into A and B by aten ops (``copy_`` into the
    state inputs), a non-finite statistic leaving both as they were and marking the layer's flag.
    None: the custom ops, which do every step's work."""
    graph = gm.graph
    view = joint_view(gm)
    done: dict[str, str] = {}
    for spec in specs:
        group = view.backward.get(spec.source)
        if not group:
            continue
        members = set(group)
        g = incoming_gradient(spec, group, members, view.tangent_fed, exclude_hint)
        targets = {spec.weight_input: "weight"} | ({spec.bias_input: "bias"} if spec.bias_input is not None else {})
        edges = {}
        for o in (n for n in group if any(u not in members for u in n.users)):
            reached = parameter_edge(o, members, view.out_values, view.out_descs, param_derived_sources,
                                     param_inputs)
            if reached and len(reached) == 1 and (idx := next(iter(reached))) in targets:
                edges[o] = targets[idx]
        if not edges:
            continue
        x = _layer_input(spec, view.forward.get(spec.source, []), view.placeholders, exclude_hint)
        plain = {part: o for o, part in edges.items()}
        if spec.layer.kind == "conv2d" and set(plain) != set(targets.values()):
            raise RerouteError(f"svgd_fx: found the {sorted(plain)} gradient of conv layer {spec.name!r} in the "
                               f"joint graph but not its {sorted(set(targets.values()) - set(plain))} gradient. "
                               f"Please report this model; exclude the layer's parameters meanwhile ({exclude_hint}).")
        users_before = {o: set(o.users) for o in edges}
        first = min((u for u in g.users if u in members), key=view.order.__getitem__)
        meta = {k: v for k, v in first.meta.items() if k != "val"}
        meta.update(partitioner_tag="is_backward", svgd_sigma=spec.name)
        anchor = first if spec.layer.kind == "linear" else max(edges, key=view.order.__getitem__).next
        with graph.inserting_before(anchor):
            grads, t_node = _emit(graph, spec, g, x, plain, view.placeholders, meta, variant)
        for o, part in edges.items():
            new = grads[part]
            if tuple(new.meta["val"].shape) != tuple(o.meta["val"].shape):
                raise RerouteError(f"svgd_fx: TSO-ALRA's {part} gradient for layer {spec.name!r} has shape "
                                   f"{tuple(new.meta['val'].shape)}, the graph expects {tuple(o.meta['val'].shape)}")
            ours = set(o.users) - users_before[o]          # the T node's own reads of the plain gradient
            o.replace_all_uses_with(new, delete_user_cb=lambda u: u not in members and u not in ours)
        done[spec.name] = t_node.name
    if done:
        finish(gm)
    return done


def _layer_input(spec: KronSpec, forward_group: list[Node], placeholders: dict, exclude_hint: str) -> Node:
    """x: the one value entering the layer's forward nodes that is neither its weight nor its bias."""
    group = set(forward_group)
    own = {placeholders.get(spec.weight_input), placeholders.get(spec.bias_input)}
    outside = []
    for n in forward_group:
        for a in n.all_input_nodes:
            if a not in group and a not in own and a not in outside and isinstance(a.meta.get("val"), torch.Tensor):
                outside.append(a)
    batchy = [a for a in outside if a.meta["val"].dim() >= 2]   # not a (frozen) bias
    if len(batchy) != 1:
        raise RerouteError(f"svgd_fx: cannot identify the input of layer {spec.name!r} in the joint graph "
                           f"(candidates {[a.name for a in batchy]}). Please report this model; exclude the "
                           f"layer's parameters meanwhile ({exclude_hint}).")
    return batchy[0]


def _emit(graph, spec: KronSpec, g: Node, x: Node, plain: dict[str, Node], placeholders: dict, meta: dict,
          variant: str | None = None):
    """The T node and the weight/bias gradients (see the module docstring)."""
    aten = torch.ops.aten
    layer = spec.layer
    tag = node_tag("tso_T_", spec.name)
    g_val = g.meta["val"]
    emit = emitter(graph, tag, meta, g_val)
    batch = applier.size(emit, g, 0)

    def contiguous(node):
        """``node`` itself, or a contiguous copy (``view`` needs one; inductor lowers clone/view directly,
        reshape/t/transpose are decompositions there)."""
        if node.meta["val"].is_contiguous():
            return node
        return emit(aten.clone.default, node, memory_format=torch.contiguous_format)

    state = [placeholders[i] for i in spec.state_inputs] + [placeholders[spec.switched_input]]
    if variant is not None:
        dtype = state[0].meta["val"].dtype           # the factors' (float32, or float64)
        rows = _linear_rows(emit, layer, g, x, contiguous, dtype) if layer.kind == "linear" else None
        if variant == "fold":
            scale = placeholders[spec.scale_input] if spec.scale_input is not None else None
            _fold(emit, spec, g, x, rows, batch, state, placeholders[spec.flag_input], scale)
        t_node = _steady_delta(emit, layer, rows, plain, state[1], state[3], g_val.dtype, contiguous)
        return _split(emit, layer, t_node), t_node
    common = (spec.gamma, spec.t_int, spec.t_stat, spec.damping)
    inv_scale, acc, collect = (None if i is None else placeholders[i]
                               for i in (spec.scale_input, spec.acc_input, spec.collect_input))
    extra = dict(inv_scale=inv_scale, sync=spec.sync, skip_nonfinite=spec.skip_nonfinite, acc=acc, collect=collect)
    if layer.kind == "linear":
        t_node = emit(torch.ops.svgd_fx.kron_t.default, *_linear_rows(emit, layer, g, x, contiguous), *state, *common,
                      batch, spec.mean_reduction, spec.switch_at_step, spec.name, **extra)
    else:
        t_node = emit(torch.ops.svgd_fx.kron_t_conv.default, g, x, _plain_grad(emit, layer, plain, contiguous), *state,
                      list(layer.weight_shape[2:]), list(layer.dilation), list(layer.padding), list(layer.stride),
                      layer.bias is not None,
                      *common, spec.mean_reduction, spec.switch_at_step, spec.name, **extra)
    return _split(emit, layer, t_node), t_node


def _cast(emit, node: Node, dtype: torch.dtype) -> Node:
    return node if node.meta["val"].dtype == dtype else emit(torch.ops.prims.convert_element_type.default, node, dtype)


def _linear_rows(emit, layer: KronLayer, g: Node, x: Node, contiguous, dtype: torch.dtype | None = None):
    """A linear layer's rows: ∇σ'J as ``[N, m]`` and its input as ``[N, n]`` (ā = [a, 1] with a bias),
    cast to ``dtype`` if given (the T ops cast inside)."""
    aten = torch.ops.aten
    rows_g = emit(aten.view.default, contiguous(g), [-1, layer.sizes[1]])
    rows_x = emit(aten.view.default, contiguous(x), [-1, layer.weight_shape[1]])
    if dtype is not None:
        rows_g, rows_x = _cast(emit, rows_g, dtype), _cast(emit, rows_x, dtype)
    if layer.bias is not None:
        rows_x = emit(aten.constant_pad_nd.default, rows_x, [0, 1], 1.0)
    return rows_g, rows_x


def _plain_grad(emit, layer: KronLayer, plain: dict[str, Node], contiguous) -> Node:
    """Ĝ from the graph's own gradients: ``[∇W as [m, n-1] | ∇b]``."""
    aten = torch.ops.aten
    m = layer.sizes[1]
    grad = emit(aten.view.default, contiguous(plain["weight"]), [m, -1])
    if layer.bias is not None:
        grad = emit(aten.cat.default, [grad, emit(aten.view.default, plain["bias"], [m, 1])], 1)
    return grad


def _steady_delta(emit, layer: KronLayer, rows, plain: dict[str, Node], a_root: Node, b_root: Node,
                  out_dtype: torch.dtype, contiguous) -> Node:
    """``R_B·Ĝ·R_A`` ``[m, n]`` in aten ops, as the custom ops form it (``svgd_fx.kernels.kron_op``):
    a linear layer from its ``rows`` (:func:`_linear_rows`, in the roots' dtype) in the cheaper
    association for the traced row count, a conv layer from the graph's own weight (and bias) gradient."""
    aten = torch.ops.aten
    n, m = layer.sizes
    if layer.kind == "linear":
        rows_g, rows_x = rows
        count = rows_g.meta["val"].shape[0]
        count = count if isinstance(count, int) else count.node.hint
        if count is not None and count * (m * m + n * n) <= m * n * (m + n):
            delta = emit(aten.mm.default, emit(aten.permute.default, emit(aten.mm.default, rows_g, b_root), [1, 0]),
                         emit(aten.mm.default, rows_x, a_root))
        else:
            grad = emit(aten.mm.default, emit(aten.permute.default, rows_g, [1, 0]), rows_x)
            delta = emit(aten.mm.default, emit(aten.mm.default, b_root, grad), a_root)
    else:
        grad = _cast(emit, _plain_grad(emit, layer, plain, contiguous), a_root.meta["val"].dtype)
        delta = emit(aten.mm.default, emit(aten.mm.default, b_root, grad), a_root)
    return _cast(emit, delta, out_dtype)


def _fold(emit, spec: KronSpec, g: Node, x: Node, rows, batch, state: list[Node], flag: Node,
          inv_scale: Node | None) -> None:
    """A ← (1−γ)·A + γ·stat_A, B likewise (Eqs. 17–18, t > 1), in aten ops on the state inputs, with
    the statistics of ``docs/tso-alra.md`` (the custom ops' ``Sums`` and ``_pooled``): Σ āāᵀ over the
    rows (a linear layer's ``rows``; a conv input's patches, by :mod:`..kernels.patch_gram` for a stride-1
    conv, else as ``kron_op.patches`` forms them),
    Σ ĝĝᵀ, divided by the row and sample counts. A non-finite statistic leaves A and B as they were and
    adds 1 (A) and/or 2 (B) to ``flag`` (the caller raises at the end of the backward)."""
    aten = torch.ops.aten
    layer = spec.layer
    A, B = state[0], state[2]
    dtype = A.meta["val"].dtype

    def gram(rows_first):                      # [N, k] -> Σ rows rowsᵀ, [k, k]
        return emit(aten.mm.default, emit(aten.permute.default, rows_first, [1, 0]), rows_first)

    if layer.kind == "linear":
        rows_g, rows_x = rows
    else:
        rows_g = emit(aten.view.default, emit(aten.clone.default, emit(aten.permute.default, _cast(emit, g, dtype),
                                                                       [0, 2, 3, 1]),
                                              memory_format=torch.contiguous_format), [-1, layer.sizes[1]])
    gg = gram(rows_g)
    if inv_scale is not None:                                                      # Σ ĝĝᵀ, ĝ = g/S
        gg = emit(aten.mul.Tensor, gg, _cast(emit, emit(aten.mul.Tensor, inv_scale, inv_scale), dtype))
    geometry = (layer.weight_shape[2:], layer.dilation, layer.padding) if layer.kind == "conv2d" else None
    if geometry is not None and patch_gram.applies(x.meta["val"].shape, layer.stride):
        aa, count = patch_gram.patch_statistic(emit, _cast(emit, x, dtype), *geometry, layer.bias is not None)
    else:
        if geometry is not None:
            rows_x = _patch_rows(emit, _cast(emit, x, dtype), layer)
            if layer.bias is not None:
                rows_x = emit(aten.constant_pad_nd.default, rows_x, [0, 1], 1.0)      # ā = [a, 1]
        count, aa = applier.size(emit, rows_x, 0), gram(rows_x)
    if spec.sync:
        stat_a, stat_b = _synced_statistics(emit, aa, count, gg, batch, spec.mean_reduction)
    else:
        stat_a = emit(aten.div.Tensor, aa, count)
        # stat_B = Σ ββᵀ / samples: β = B·ĝ for a mean loss (so Σ ĝĝᵀ·B), ĝ for a sum (Σ ĝĝᵀ / B)
        stat_b = emit(aten.mul.Tensor if spec.mean_reduction else aten.div.Tensor, gg, batch)
    # all finite ⇔ Σ 0·x = 0 (0·inf and 0·NaN are NaN): one reduction inductor lowers
    finite = [emit(aten.eq.Scalar, emit(aten.sum.default, emit(aten.mul.Tensor, stat, 0.0)), 0.0)
              for stat in (stat_a, stat_b)]
    both = emit(aten.logical_and.default, *finite)
    for factor, stat in ((A, stat_a), (B, stat_b)):
        folded = emit(aten.add.Tensor, emit(aten.mul.Tensor, factor, 1.0 - spec.gamma),
                      emit(aten.mul.Tensor, stat, spec.gamma))
        emit(aten.copy_.default, factor, emit(aten.where.self, both, folded, factor))
    marks = [emit(aten.add.Tensor, emit(aten.mul.Tensor, _cast(emit, ok, torch.float32), -float(code)), float(code))
             for ok, code in zip(finite, (1, 2))]                                   # code·(1 − ok)
    emit(aten.copy_.default, flag, emit(aten.add.Tensor, flag, emit(aten.add.Tensor, *marks)))


def _synced_statistics(emit, aa: Node, rows, gg: Node, batch, mean_reduction: bool) -> tuple[Node, Node]:
    """stat_A and stat_B of the joined batch of every rank (``distributed=True``; the custom ops'
    ``_pooled``): one all-reduce of [Σ āāᵀ, Σ ββᵀ, rows, samples], β = B·ĝ for a mean loss (each rank's
    own B), then the sums over the counts. A functional collective: every rank runs the same graph."""
    aten = torch.ops.aten
    n, m = aa.meta["val"].shape[0], gg.meta["val"].shape[0]
    samples = applier.size_tensor(emit, batch, aa)
    bb = emit(aten.mul.Tensor, gg, emit(aten.mul.Tensor, samples, samples)) if mean_reduction else gg
    buffer = emit(aten.cat.default, [emit(aten.view.default, aa, [-1]), emit(aten.view.default, bb, [-1]),
                                     applier.size_tensor(emit, rows, aa), samples])
    total = applier.all_reduce_in_graph(emit, buffer)
    aa_all = emit(aten.view.default, emit(aten.slice.Tensor, total, 0, 0, n * n), [n, n])
    bb_all = emit(aten.view.default, emit(aten.slice.Tensor, total, 0, n * n, n * n + m * m), [m, m])
    return (emit(aten.div.Tensor, aa_all, emit(aten.select.int, total, 0, n * n + m * m)),
            emit(aten.div.Tensor, bb_all, emit(aten.select.int, total, 0, n * n + m * m + 1)))


def _patch_rows(emit, x: Node, layer: KronLayer) -> Node:
    """The conv input's patches as rows ``[B·L, C_in·kh·kw]`` (W's flattening; ``kron_op.patches``,
    transposed) from kh·kw strided slices of the padded input: ops inductor lowers and fuses."""
    aten = torch.ops.aten
    (kh, kw), (dh, dw), (ph, pw), (sh, sw) = layer.weight_shape[2:], layer.dilation, layer.padding, layer.stride
    shape = x.meta["val"].shape

    def arith(fn, a, b):
        return applier.arith(emit, fn, a, b)

    def out_size(d, k, dil, pad, stride):                   # (in + 2·pad − dil·(k−1) − 1) // stride + 1
        return arith(operator.add, arith(operator.floordiv, arith(operator.add, applier.size(emit, x, d),
                                                                  2 * pad - dil * (k - 1) - 1), stride), 1)

    def end(offset, stride, out):                           # offset + stride·(out − 1) + 1
        return arith(operator.add, arith(operator.mul, arith(operator.sub, out, 1), stride), offset + 1)

    ho, wo = out_size(2, kh, dh, ph, sh), out_size(3, kw, dw, pw, sw)
    xp = emit(aten.constant_pad_nd.default, x, [pw, pw, ph, ph], 0.0) if ph or pw else x
    xp = emit(aten.permute.default, xp, [0, 2, 3, 1])                               # [B, H, W, C]
    cols = []
    for i in range(kh):
        for j in range(kw):
            rows = emit(aten.slice.Tensor, xp, 1, i * dh, end(i * dh, sh, ho), sh)
            cols.append(emit(aten.unsqueeze.default,
                             emit(aten.slice.Tensor, rows, 2, j * dw, end(j * dw, sw, wo), sw), 4))
    stacked = emit(aten.cat.default, cols, 4)                                         # [B, Ho, Wo, C, kh·kw]
    return emit(aten.view.default, stacked, [-1, shape[1] * kh * kw])


def _split(emit, layer: KronLayer, delta: Node) -> dict[str, Node]:
    """The weight and bias gradients from Δ ``[m, n]`` (bias: its last column)."""
    aten = torch.ops.aten
    n = layer.sizes[0]
    grads = {}
    if layer.bias is not None:
        grads["bias"] = emit(aten.clone.default, emit(aten.select.int, delta, 1, n - 1),
                             memory_format=torch.contiguous_format)
        delta = emit(aten.slice.Tensor, delta, 1, 0, n - 1)
    grads["weight"] = emit(aten.view.default, emit(aten.clone.default, delta, memory_format=torch.contiguous_format),
                           list(layer.weight_shape))
    return grads
