"""The paper's §3.2 on AOTAutograd's joint forward/backward graph.

For one σ' node S (found by :mod:`.locate` on the torch-level graph), the joint graph holds
the aten nodes of S's backward: the nodes computed from a tangent (the backward region) that
carry S's id (``locate.node_id``, which AOTAutograd copies from S to its aten forward nodes and
on to their backward nodes). Call that group ``B_S``. Exactly one backward value from outside
``B_S`` enters it: ``g = ∇_{σ'}J`` (an accumulated gradient or a tangent input).

The values ``B_S`` hands on are the gradients of S's inputs. Each is classified by where it
flows: a *parameter edge* reaches only the joint graph's outputs for parameter gradients,
passing only through the backward of parameter-derived chains (``t``, ``view``,
``sigmoid(θ)``...) and the untagged accumulation ``add``s; anything that enters the backward
of a batch-dependent node, or a non-parameter output, is an *activation edge*.

The rewrite::

    g ──► [B_S original] ──► activation edges          (unchanged: exact backprop)
    g ──► T(g, r) ──► [B_S copy] ──► parameter edges of the parameters S is linear in

Only the nodes of ``B_S`` that lie between g and a rerouted edge are copied; the rest is
shared. Fused multi-output backward ops (``convolution_backward``,
``native_batch_norm_backward``...) end up split in two: afterwards each node's
``output_mask`` is narrowed to the outputs still used, so the original computes the input
gradient from g and the copy the weight/bias gradients from T(g).

``T`` is ``torch.ops.svgd_fx.virtual_grad`` (mutates r, an extra graph input). It is placed
right before the first use of g inside ``B_S`` and tagged as backward, so the default
partitioner puts it in the backward graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..errors import RerouteError
from ..kernels import virtual_grad  # noqa: F401  (registers torch.ops.svgd_fx.virtual_grad)
from ..kernels.t_op import broadcast_shape
from .locate import node_id


@dataclass(frozen=True)
class RerouteSpec:
    source: str                  # source_fn name of the σ' node (key into the joint graph)
    name: str                    # stable σ' name, for messages
    r_input: int                 # index of r among the joint graph's plain (primal) inputs
    routed_inputs: frozenset[int]   # plain-input indices of the parameters that get T(g)
    s: float
    rho: float
    eps: float
    mean_reduction: bool
    reduce_dims: tuple[int, ...] = ()   # dims of g averaged into r's statistic besides the batch
    inline: bool = False         # T as aten ops (fused by inductor) instead of the custom op
    raise_nonfinite: bool = True   # inf/NaN in g raises (the op), or is counted (fused, flag_input)
    flag_input: int | None = None  # plain-input index of the fused T's non-finite counter
    scale_input: int | None = None  # plain-input index of a GradScaler's 1/S (op path only)
    sync: bool = False             # all-reduce T's batch statistic (torch.distributed; op path only)
    acc_input: int | None = None      # plain-input index of the accumulation buffer (svgd_fx.accumulate)
    collect_input: int | None = None  # plain-input index of the 0-dim "collect" mode (1: accumulate)
    # the routed parameter-derived operands, for a backward that is the identity: per operand its
    # chain down to the parameter, ("node", id) per chain node and ("input", plain index) for the
    # parameter; None if a step is also used elsewhere
    identity_operands: tuple[tuple[tuple[str, Any], ...], ...] | None = ()


def _is_tangent(node: Node) -> bool:
    return node.op == "placeholder" and "Tangent" in type(node.meta.get("desc")).__name__


def _tangent_fed(nodes: list[Node]) -> set[Node]:
    """The nodes computed from a tangent: the backward values (AOTAutograd tags most of them
    ``is_backward``, but not the backward of a custom ``autograd.Function``)."""
    fed: set[Node] = set()
    for n in nodes:
        if _is_tangent(n) or any(a in fed for a in n.all_input_nodes):
            fed.add(n)
    return fed


def _is_tensor(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _plain_index(desc) -> int | None:
    """Index of a PlainAOTInput (or a grad of one); None for anything else."""
    from torch._functorch._aot_autograd.descriptors import GradAOTOutput, PlainAOTInput

    if isinstance(desc, GradAOTOutput):
        desc = desc.grad_of
    if isinstance(desc, PlainAOTInput):
        return desc.idx
    return None


def reroute(
    gm: GraphModule,
    specs: list[RerouteSpec],
    param_derived_sources: set[str],
    param_inputs: set[int],
    exclude_hint: str = "exclude=[...]",
) -> dict[str, str]:
    """Insert T for every spec; return ``{σ' name: T node name}`` for the ones rewritten.
    ``exclude_hint`` spells the exclude option of the entry point, for error messages.

    ``param_derived_sources`` are the node ids of parameter-derived torch-level nodes
    (whose backward a parameter edge may pass through); ``param_inputs`` the plain-input
    indices of trainable parameters.
    """
    graph = gm.graph
    view = joint_view(gm)
    order, out_values, out_descs, placeholders, groups = (view.order, view.out_values, view.out_descs,
                                                          view.placeholders, view.backward)
    # the backward of parameter-derived chains, and the untagged accumulation adds between them
    chain_backward = {n for n in order if n in view.tangent_fed and n.op == "call_function"
                      and (node_id(n) is None or node_id(n) in param_derived_sources)}
    done: dict[str, str] = {}
    for spec in specs:
        group = groups.get(spec.source)
        if not group:   # an identity backward (or no gradient through S here): T on the operand's edge
            if (t_node := _reroute_identity(graph, spec, view, exclude_hint)) is not None:
                done[spec.name] = t_node.name
            continue
        members = set(group)
        g = _incoming_gradient(spec, group, members, view.tangent_fed, exclude_hint)
        group, members = _with_own_chain_backward(group, members, chain_backward, view)
        outs = [n for n in group if any(u not in members for u in n.users)]
        edges = [(o, reached) for o in outs
                 if (reached := _parameter_edge(o, members, out_values, out_descs, param_derived_sources,
                                                param_inputs))]
        reroute_outs = [o for o, reached in edges if reached <= spec.routed_inputs]
        mixed = sorted({i for _, reached in edges if reached & spec.routed_inputs and not reached <= spec.routed_inputs
                        for i in reached})
        if mixed:
            raise RerouteError(
                f"svgd_fx: at σ' node {spec.name!r} one gradient edge reaches parameters that get T and "
                f"parameters that must not (graph inputs {mixed}), and their chain cannot be split here "
                f"(its value is shared with other nodes). Pass {exclude_hint} with the parameters of this node "
                "to train them on plain gradients knowingly.")
        if not reroute_outs:
            raise RerouteError(
                f"svgd_fx: σ' node {spec.name!r} is linear in parameters that get T, but none of the gradient "
                "edges of its backward leads to them alone in the joint graph (they pass through the backward "
                "of a node the pass did not class as parameter-derived). Please report this model; pass "
                f"{exclude_hint} with its parameters to train them on plain gradients knowingly.")
        t_node = _insert_t(graph, spec, g, members, placeholders, order)
        _copy_between(graph, g, t_node, group, members, reroute_outs)
        if spec.inline and not spec.reduce_dims:
            _sum_batch_first(graph, t_node)
        done[spec.name] = t_node.name
    if done:
        finish(gm)
    return done


@dataclass
class JointView:
    """What both joint-graph passes look up: node order, the outputs and their descriptors,
    plain inputs by index, the values computed from tangents, and the backward (and forward)
    nodes of each torch-level node, by its id."""
    order: dict[Node, int]
    out_values: list
    out_descs: list
    placeholders: dict[int | None, Node]
    backward: dict[str, list[Node]]
    forward: dict[str, list[Node]]
    tangent_fed: set[Node]


def joint_view(gm: GraphModule) -> JointView:
    nodes = list(gm.graph.nodes)
    output = next(n for n in reversed(nodes) if n.op == "output")
    out_values = list(output.args[0])
    backward: dict[str, list[Node]] = {}
    forward: dict[str, list[Node]] = {}
    tangent_fed = _tangent_fed(nodes)
    for n in nodes:
        if (key := node_id(n)) is None:
            continue
        if n in tangent_fed or n.meta.get("partitioner_tag") == "is_backward":
            backward.setdefault(key, []).append(n)
        else:
            forward.setdefault(key, []).append(n)
    return JointView(
        order={n: i for i, n in enumerate(nodes)},
        out_values=out_values,
        out_descs=output.meta.get("desc") or [None] * len(out_values),
        placeholders={_plain_index(n.meta.get("desc")): n for n in nodes if n.op == "placeholder"},
        backward=backward,
        forward=forward,
        tangent_fed=tangent_fed,
    )


def finish(gm: GraphModule) -> None:
    """After a rewrite: drop what no longer feeds an output, narrow fused backward nodes."""
    gm.graph.eliminate_dead_code()
    _narrow_output_masks(gm.graph)
    gm.graph.lint()
    gm.recompile()


def _reroute_identity(graph, spec: RerouteSpec, view: JointView, exclude_hint: str) -> Node | None:
    """T for a σ' node whose backward is the identity: ``x + p`` where the parameter-derived
    operand already has the output's full shape (a position table at batch size 1, a bias
    expanded over the batch). Its backward emits no node, so ∇σ'J itself flows on to the
    operand's chain backward (or, for a parameter used directly, into its output slot): T goes
    on that edge. Each operand must feed only S (checked on the torch-level graph): then the
    gradient arriving there is ∇σ'J alone. Returns the T node, or None when no gradient reaches
    the operands through S in this graph."""
    if spec.identity_operands is None:
        raise RerouteError(
            f"svgd_fx: σ' node {spec.name!r} has an identity backward here (its parameter-derived operand has "
            "the output's full shape) and that operand is also used elsewhere, so the gradient arriving through "
            f"S alone cannot be told apart. Pass {exclude_hint} with its parameters to train them on plain "
            "gradients knowingly.")
    t_node = None
    for path in spec.identity_operands:
        for kind, ref in path:      # the first step down the chain that has a backward of its own
            if kind == "node" and (chain := view.backward.get(ref)):
                own = set(chain)
                g = _incoming_gradient(spec, chain, own, view.tangent_fed, exclude_hint)
                consumers = [u for u in g.users if u in own]
                break
            if kind == "input":
                slots = [i for i, d in enumerate(view.out_descs) if _plain_index(d) == ref]
                g = view.out_values[slots[0]] if slots else None
                consumers = [n for n in g.users if n.op == "output"] if isinstance(g, Node) else []
                break
        else:
            continue
        if not consumers:
            continue
        t_node = _insert_t(graph, spec, g, set(consumers), view.placeholders, view.order)
        for c in consumers:
            c.replace_input_with(g, t_node)
        if spec.inline and not spec.reduce_dims:
            _sum_batch_first(graph, t_node)
    return t_node


def _with_own_chain_backward(group, members, chain_backward, view):
    """``B_S`` plus the backward of the parameter-derived chains that only S's gradient feeds.

    A chain like weight norm's ``w = g·v/‖v‖`` may be linear in one of its parameters and not
    in another: the edge out of ``B_S`` (∇w) then reaches both. Taken into the group, the
    chain's backward hands on one edge per parameter (∇g, ∇v), each rerouted or not on its own.
    A chain node whose gradient also gets contributions from other σ' nodes (after an
    accumulation ``add``) stays outside; one from a tangent (the chain's value is also a graph
    output, e.g. a weight set by a forward pre-hook) may join: backward ops are linear in their
    incoming gradient, so the copy fed T(g) plus that tangent still adds the tangent plainly.
    """
    members, extra = set(members), []
    frontier = [u for n in group for u in n.users if u in chain_backward and u not in members]
    while frontier:
        n = frontier.pop()
        if n in members:
            continue
        fed = [a for a in n.all_input_nodes if a in view.tangent_fed]
        if all(a in members or _is_tangent(a) for a in fed):
            members.add(n)
            extra.append(n)
            frontier += [u for u in n.users if u in chain_backward and u not in members]
    if not extra:
        return group, members
    return sorted(group + extra, key=view.order.__getitem__), members


def _incoming_gradient(spec, group: list[Node], members: set[Node], tangent_fed: set[Node],
                       exclude_hint: str = "exclude=[...]") -> Node:
    incoming: list[Node] = []
    for n in group:
        for a in n.all_input_nodes:
            if a in members or a in incoming:
                continue
            if a in tangent_fed and _is_tensor(a):
                incoming.append(a)
    if len(incoming) != 1:
        raise RerouteError(
            f"svgd_fx: cannot identify the gradient arriving at σ' node {spec.name!r} in the joint "
            f"graph: expected one incoming backward value, found {[a.name for a in incoming]}. "
            f"Please report this model; exclude its parameters meanwhile ({exclude_hint})."
        )
    return incoming[0]


def _parameter_edge(start, members, out_values, out_descs, param_derived_sources, param_inputs):
    """The parameters a backward value of ``B_S`` flows to, or None if it is an activation edge."""
    reached: set[int] = set()
    seen = {start}
    frontier = [start]
    while frontier:
        value = frontier.pop()
        for user in value.users:
            if user.op == "output":
                for slot, v in enumerate(out_values):
                    if v is value:
                        idx = _plain_index(out_descs[slot])
                        if idx is None or idx not in param_inputs:
                            return None
                        reached.add(idx)
                continue
            if user in members or user in seen:
                continue
            src = node_id(user)
            if src is not None and src not in param_derived_sources:
                return None  # enters the backward of a batch-dependent node: an activation edge
            seen.add(user)
            frontier.append(user)
    return reached


def _insert_t(graph, spec, g, members, placeholders, order) -> Node:
    r = placeholders.get(spec.r_input)
    if r is None:
        raise RerouteError(f"svgd_fx: state input for σ' node {spec.name!r} is missing from the joint graph")
    first_use = min((u for u in g.users if u in members), key=order.__getitem__)
    meta = {k: v for k, v in (first_use if first_use.op != "output" else g).meta.items() if k not in ("val", "desc")}
    meta.update(partitioner_tag="is_backward", svgd_sigma=spec.name)
    with graph.inserting_before(first_use):
        optional = [placeholders.get(i) if i is not None else None
                    for i in (spec.flag_input, spec.scale_input, spec.acc_input, spec.collect_input)]
        flag, inv_scale, acc, collect = optional
        if spec.inline:
            return _inline_t(graph, spec, g, r, meta, flag, acc, collect)
        t_node = graph.call_function(
            torch.ops.svgd_fx.virtual_grad.default,
            (g, r, spec.s, spec.rho, spec.eps, spec.mean_reduction, list(spec.reduce_dims),
             spec.raise_nonfinite, spec.name, inv_scale, spec.sync, acc, collect),
        )
    t_node.meta.update(meta)
    g_val = g.meta.get("val")
    if isinstance(g_val, torch.Tensor):
        with _fake_mode_of(g_val):
            t_node.meta["val"] = torch.empty_like(g_val, memory_format=torch.contiguous_format)
    return t_node


def _inline_t(graph, spec, g, r, meta, flag=None, acc=None, collect=None) -> Node:
    """T spelled in aten ops, for inductor to fuse (the formula of ``virtual_grad_reference``):

    ``r ← ρ·r + (1-ρ)·mean_b (B·g)²`` written back into r with ``copy_``, then
    ``T(g) = s·g / sqrt(r + ε)``. T reads the functional ``r_new``, never r's buffer, so no
    kernel fusion can order a read before the write-back. B is read from g at run time.
    Elements whose statistic is not finite keep their old r; with a ``flag`` input, such a
    step also adds 1 to it (the caller raises at the next call: kernels cannot raise).
    With ``acc`` and ``collect`` inputs (gradient accumulation): where ``collect`` is 1, r is
    kept and Σ_b g² and B are added to ``acc`` instead (kernels cannot branch: both are
    computed, ``where`` picks; the extra work is r-sized).
    Node names start with ``svgd_T_`` (they show in inductor's generated code).
    """
    aten = torch.ops.aten
    g_val, r_val = g.meta["val"], r.meta["val"]
    tag = "svgd_T_" + "".join(c if c.isalnum() else "_" for c in spec.name)

    emit = _emitter(graph, tag, meta, g_val)
    batch = g_val.shape[0] if isinstance(g_val.shape[0], int) else emit(aten.sym_size.int, g, 0)
    gr = g if g_val.dtype == r_val.dtype else emit(torch.ops.prims.convert_element_type.default, g, r_val.dtype)
    sq = emit(aten.mul.Tensor, gr, gr)
    if spec.reduce_dims:         # r over the kept dims: mean over the reduced ones first
        sq = emit(aten.mean.dim, sq, list(spec.reduce_dims))
    sums = emit(aten.sum.dim_IntList, sq, [0])
    # mean_b (B·g)² = B·Σ_b g² for a mean loss; mean_b g² = Σ_b g² / B for a sum loss
    stat = emit(aten.mul.Tensor if spec.mean_reduction else aten.div.Tensor, sums, batch)
    r_new = emit(aten.add.Tensor, emit(aten.mul.Tensor, r, spec.rho), emit(aten.mul.Tensor, stat, 1.0 - spec.rho))
    finite = emit(aten.lt.Scalar, stat, float("inf"))     # stat ≥ 0: false for inf and NaN
    r_new = emit(aten.where.self, finite, r_new, r)
    if acc is not None:
        collecting = emit(aten.gt.Scalar, collect, 0.5)
        r_new = emit(aten.where.self, collecting, r, r_new)
        numel = r_val.numel()     # acc = [Σ_b g² (r's numel), N_all, N_here]
        pooled_before = emit(aten.view.default, emit(aten.slice.Tensor, acc, 0, 0, numel), [-1])
        keep = emit(aten.logical_and.default, finite, collecting)
        added = emit(aten.view.default, emit(aten.where.ScalarOther, keep, sums, 0.0), [-1])
        pooled = emit(aten.add.Tensor, pooled_before, added)
        counts = emit(aten.add.Tensor, emit(aten.slice.Tensor, acc, 0, numel, numel + 2),
                      emit(aten.mul.Tensor, collect, batch))
        acc_now = emit(aten.copy_.default, acc, emit(aten.cat.default, [pooled, counts]))
    writes = [emit(aten.copy_.default, r, r_new)]
    if acc is not None:
        writes.append(acc_now)
    if flag is not None:   # count a non-finite step
        bad = emit(aten.sum.default, emit(torch.ops.prims.convert_element_type.default,
                                          emit(aten.logical_not.default, finite), torch.float32))
        writes.append(emit(aten.copy_.default, flag, emit(aten.add.Tensor, flag, bad)))
    # Every read of the new r is a read of the functional r_new, never of r's buffer after the
    # copy_: inductor may fuse the write-back into the same loop as a read and load the buffer
    # before its store. The write-backs still need a user (else the partitioner drops them):
    # one element of each, times 0, added to r_new (finite, so the value is r_new's).
    alive = [emit(aten.select.int, emit(aten.view.default, w, [-1]), 0, 0) for w in writes]
    r_read = r_new
    for a in alive:
        r_read = emit(aten.add.Tensor, r_read, emit(aten.mul.Tensor, a, 0.0))
    denom = emit(aten.sqrt.default, emit(aten.add.Tensor, r_read, spec.eps))
    if spec.reduce_dims:
        denom = emit(aten.view.default, denom, broadcast_shape(g_val.shape, spec.reduce_dims))
    out = emit(aten.div.Tensor, emit(aten.mul.Tensor, gr, spec.s), denom)
    out.meta["svgd_t_parts"] = (gr, denom, spec.s, tag)
    if g_val.dtype != r_val.dtype:
        out = emit(torch.ops.prims.convert_element_type.default, out, g_val.dtype)
    return out


def _sum_batch_first(graph, out: Node) -> None:
    """Batch sums of T(g) taken before the scaling: ``Σ_b,... (g·X)·s/√(r+ε)`` becomes
    ``Σ_... (Σ_b g·X)·s/√(r+ε)`` (full-shape r has no batch dimension, so it factors out).

    BatchNorm's and the biases' virtual gradients are such sums (``sum(T(g))``,
    ``sum(T(g)·x̂)``); summed first over the batch they share one pass over g with r's own
    batch statistic instead of a second pass over T(g) — on the CPU ResNet-20 this is most of
    T's cost. Other users of T(g) (conv and matmul weight gradients) are left as they are.
    """
    parts = out.meta.get("svgd_t_parts")
    if parts is None:
        return
    gr, denom, s, tag = parts
    aten = torch.ops.aten
    ndim = out.meta["val"].dim()

    meta = {k: v for k, v in out.meta.items() if k not in ("val", "svgd_t_parts")}
    emit = _emitter(graph, tag, meta, out.meta["val"])

    def batch_sum(node):
        """(dims without the batch) if node is a keepdim=False sum over the batch, else None."""
        if node.target is not aten.sum.dim_IntList or node.kwargs or len(node.args) != 2:
            return None
        dims = sorted(d % ndim for d in node.args[1])
        return [d - 1 for d in dims if d != 0] if 0 in dims else None

    for user in list(out.users):
        factor, reduce = None, None
        if (rest := batch_sum(user)) is not None:
            factor, reduce = None, user
        elif user.target is aten.mul.Tensor and len(user.users) == 1 and len(user.args) == 2:
            other = user.args[1] if user.args[0] is out else user.args[0]
            only = next(iter(user.users))
            same_shape = user.meta["val"].shape == out.meta["val"].shape
            if other is not out and same_shape and (rest := batch_sum(only)) is not None:
                factor, reduce = other, only
        if reduce is None:
            continue
        with graph.inserting_before(reduce):
            summed = emit(aten.sum.dim_IntList, gr if factor is None else emit(aten.mul.Tensor, gr, factor), [0])
            scaled = emit(aten.div.Tensor, emit(aten.mul.Tensor, summed, s), denom)
            new = emit(aten.sum.dim_IntList, scaled, rest) if rest else scaled
        reduce.replace_all_uses_with(new)
        graph.erase_node(reduce)
        if factor is not None and not user.users:
            graph.erase_node(user)


def _emitter(graph, tag: str, meta: dict, like: torch.Tensor):
    """``emit(target, *args, **kwargs)``: a call_function node named after ``tag``, with ``meta`` and its
    fake value computed by running ``target`` on the arguments' fake values."""
    def emit(target, *args, **kwargs):
        node = graph.create_node("call_function", target, args, kwargs, name=tag)
        node.meta.update(meta)
        vals, kwvals = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with _fake_mode_of(like):
            node.meta["val"] = target(*vals, **kwvals)
        return node

    return emit


def _fake_mode_of(value):
    from contextlib import nullcontext

    from torch._guards import detect_fake_mode

    mode = detect_fake_mode([value])
    return mode if mode is not None else nullcontext()


def _copy_between(graph, g, t_node, group, members, reroute_outs) -> None:
    """Copy the nodes of B_S on a path g → rerouted output, fed T(g); rewire those outputs."""
    below_g = {g}
    for n in group:
        if any(a in below_g for a in n.all_input_nodes):
            below_g.add(n)
    above_out = set(reroute_outs)
    for n in reversed(group):
        if n in above_out:
            above_out.update(a for a in n.all_input_nodes if a in members)
    to_copy = [n for n in group if n in below_g and n in above_out]

    copies: dict[Node, Node] = {g: t_node}
    for n in to_copy:
        with graph.inserting_after(n):
            copy = graph.node_copy(n, lambda a: copies.get(a, a))
        copy.meta = dict(n.meta)
        copies[n] = copy
    copied = set(copies.values())
    for o in reroute_outs:
        o.replace_all_uses_with(copies[o], delete_user_cb=lambda u: u not in members and u not in copied)


def _narrow_output_masks(graph) -> None:
    """After the split, let each fused backward node compute only the outputs still used."""
    import operator

    for n in graph.nodes:
        target = n.target
        schema = getattr(target, "_schema", None)
        if schema is None:
            continue
        names = [a.name for a in schema.arguments]
        if "output_mask" not in names:
            continue
        pos = names.index("output_mask")
        mask = list(n.args[pos]) if pos < len(n.args) else list(n.kwargs["output_mask"])
        used = {u.args[1] for u in n.users if u.target is operator.getitem}
        new_mask = [bool(m) and i in used for i, m in enumerate(mask)]
        if new_mask != mask and any(new_mask):
            if pos < len(n.args):
                n.args = n.args[:pos] + (new_mask,) + n.args[pos + 1:]
            else:
                n.kwargs = {**n.kwargs, "output_mask": new_mask}
