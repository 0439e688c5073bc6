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

``T`` is ``torch.ops.svgd_fx.virtual_grad`` (mutates r, an extra graph input), or with
``fused`` the same formula as aten nodes (:func:`svgd_fx.kernels.t_aten.fused_t`) for inductor
to fuse. It is placed right before the first use of g inside ``B_S`` and tagged as backward, so
the default partitioner puts it in the backward graph. Its nodes are named ``svgd_T_<σ' name>``
on either path (they show in inductor's generated code).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.fx import GraphModule, Node

from ..errors import RerouteError
from ..kernels import virtual_grad  # noqa: F401  (registers torch.ops.svgd_fx.virtual_grad)
from ..kernels.t_aten import fused_t
from ..kernels.t_formula import scaled
from .joint import (JointView, emitter, fake_mode_of, finish, incoming_gradient, is_tangent, joint_view, node_tag,
                    parameter_edge, plain_index)
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
    fused: bool = False          # T as aten ops (fused by inductor: t_impl="fused") instead of the custom op
    raise_nonfinite: bool = True   # inf/NaN in g raises (the op), or is counted (fused, flag_input)
    flag_input: int | None = None  # plain-input index of the fused T's non-finite counter
    scale_input: int | None = None  # plain-input index of a GradScaler's 1/S (op path only)
    sync: bool = False             # all-reduce T's batch statistic over torch.distributed's default group
    lagged: bool = False           # T reads r before this step's update (variant="authors"; op path only)
    acc_input: int | None = None      # plain-input index of the accumulation buffer (svgd_fx.accumulate)
    collect_input: int | None = None  # plain-input index of the 0-dim "collect" mode (1: accumulate)
    # the routed parameter-derived operands, for a backward that is the identity: per operand its
    # chain down to the parameter, ("node", id) per chain node and ("input", plain index) for the
    # parameter; None if a step is also used elsewhere
    identity_operands: tuple[tuple[tuple[str, Any], ...], ...] | None = ()


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
        g = incoming_gradient(spec, group, members, view.tangent_fed, exclude_hint)
        group, members = _with_own_chain_backward(group, members, chain_backward, view)
        outs = [n for n in group if any(u not in members for u in n.users)]
        edges = [(o, reached) for o in outs
                 if (reached := parameter_edge(o, members, out_values, out_descs, param_derived_sources,
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
        if spec.fused and not spec.reduce_dims:
            _sum_batch_first(graph, t_node, node_tag("svgd_T_", spec.name))
        done[spec.name] = t_node.name
    if done:
        finish(gm)
    return done


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
                g = incoming_gradient(spec, chain, own, view.tangent_fed, exclude_hint)
                consumers = [u for u in g.users if u in own]
                break
            if kind == "input":
                slots = [i for i, d in enumerate(view.out_descs) if plain_index(d) == ref]
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
        if spec.fused and not spec.reduce_dims:
            _sum_batch_first(graph, t_node, node_tag("svgd_T_", spec.name))
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
        if all(a in members or is_tangent(a) for a in fed):
            members.add(n)
            extra.append(n)
            frontier += [u for u in n.users if u in chain_backward and u not in members]
    if not extra:
        return group, members
    return sorted(group + extra, key=view.order.__getitem__), members


def _insert_t(graph, spec, g, members, placeholders, order) -> Node:
    r = placeholders.get(spec.r_input)
    if r is None:
        raise RerouteError(f"svgd_fx: state input for σ' node {spec.name!r} is missing from the joint graph")
    first_use = min((u for u in g.users if u in members), key=order.__getitem__)
    meta = {k: v for k, v in (first_use if first_use.op != "output" else g).meta.items() if k not in ("val", "desc")}
    meta.update(partitioner_tag="is_backward", svgd_sigma=spec.name)
    tag = node_tag("svgd_T_", spec.name)
    with graph.inserting_before(first_use):
        optional = [placeholders.get(i) if i is not None else None
                    for i in (spec.flag_input, spec.scale_input, spec.acc_input, spec.collect_input)]
        flag, inv_scale, acc, collect = optional
        if spec.fused:
            return fused_t(emitter(graph, tag, meta, g.meta["val"]), g, r, s=spec.s, rho=spec.rho, eps=spec.eps,
                            mean_reduction=spec.mean_reduction, reduce_dims=list(spec.reduce_dims), flag=flag,
                            acc=acc, collect=collect, sync=spec.sync)
        t_node = graph.create_node(
            "call_function", torch.ops.svgd_fx.virtual_grad.default,
            (g, r, spec.s, spec.rho, spec.eps, spec.mean_reduction, list(spec.reduce_dims),
             spec.raise_nonfinite, spec.name, inv_scale, spec.sync, acc, collect, spec.lagged),
            name=tag,
        )
    t_node.meta.update(meta)
    g_val = g.meta.get("val")
    if isinstance(g_val, torch.Tensor):
        with fake_mode_of(g_val):
            t_node.meta["val"] = torch.empty_like(g_val, memory_format=torch.contiguous_format)
    return t_node


def _sum_batch_first(graph, out: Node, tag: str) -> None:
    """Batch sums of T(g) taken before the scaling: ``Σ_b,... (g·X)·s/√(r+ε)`` becomes
    ``Σ_... (Σ_b g·X)·s/√(r+ε)`` (full-shape r has no batch dimension, so it factors out).

    BatchNorm's and the biases' virtual gradients are such sums (``sum(T(g))``,
    ``sum(T(g)·x̂)``); summed first over the batch they share one pass over g with r's own
    batch statistic instead of a second pass over T(g) — on the CPU ResNet-20 this is most of
    T's cost. Other users of T(g) (conv and matmul weight gradients) are left as they are.
    The new nodes are named ``tag``, like T's own.
    """
    parts = out.meta.get("svgd_t_parts")
    if parts is None:
        return
    gr, denom, s = parts
    aten = torch.ops.aten
    ndim = out.meta["val"].dim()

    meta = {k: v for k, v in out.meta.items() if k not in ("val", "svgd_t_parts")}
    emit = emitter(graph, tag, meta, out.meta["val"])

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
            summed = scaled(emit, summed, s, denom)
            new = emit(aten.sum.dim_IntList, summed, rest) if rest else summed
        reduce.replace_all_uses_with(new)
        graph.erase_node(reduce)
        if factor is not None and not user.users:
            graph.erase_node(user)


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
