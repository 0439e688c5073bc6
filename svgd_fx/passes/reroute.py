"""The paper's §3.2 on AOTAutograd's joint forward/backward graph.

For one σ' node S (found by :mod:`.locate` on the torch-level graph), the joint graph holds
the aten nodes of S's backward: every node tagged ``partitioner_tag == "is_backward"`` whose
``fwd_source_fn_stack`` names S. Call that group ``B_S``. Exactly one backward value from
outside ``B_S`` enters it: ``g = ∇_{σ'}J`` (an accumulated gradient or a tangent input).

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

import torch
from torch.fx import GraphModule, Node

from ..errors import RerouteError
from ..kernels import virtual_grad  # noqa: F401  (registers torch.ops.svgd_fx.virtual_grad)


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
    channel_dim: int = -1


def _is_backward(node: Node) -> bool:
    return node.meta.get("partitioner_tag") == "is_backward"


def _fwd_source(node: Node) -> str | None:
    stack = node.meta.get("fwd_source_fn_stack")
    return stack[-1][0] if stack else None


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
) -> dict[str, str]:
    """Insert T for every spec; return ``{σ' name: T node name}`` for the ones rewritten.

    ``param_derived_sources`` are the source names of parameter-derived torch-level nodes
    (whose backward a parameter edge may pass through); ``param_inputs`` the plain-input
    indices of trainable parameters.
    """
    graph = gm.graph
    nodes = list(graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    output = next(n for n in reversed(nodes) if n.op == "output")
    out_values = list(output.args[0])
    out_descs = output.meta.get("desc") or [None] * len(out_values)
    placeholders = {_plain_index(n.meta.get("desc")): n for n in nodes if n.op == "placeholder"}

    groups: dict[str, list[Node]] = {}
    for n in nodes:
        if _is_backward(n) and (src := _fwd_source(n)) is not None:
            groups.setdefault(src, []).append(n)

    done: dict[str, str] = {}
    for spec in specs:
        group = groups.get(spec.source)
        if not group:
            continue  # no backward for this σ' in this graph (e.g. nothing below needs grad)
        members = set(group)
        g = _incoming_gradient(spec, group, members)
        outs = [n for n in group if any(u not in members for u in n.users)]
        reroute_outs = [
            o for o in outs
            if (reached := _parameter_edge(o, members, out_values, out_descs, param_derived_sources,
                                           param_inputs)) is not None
            and reached and reached <= spec.routed_inputs
        ]
        if not reroute_outs:
            continue
        t_node = _insert_t(graph, spec, g, members, placeholders, order)
        _copy_between(graph, g, t_node, group, members, reroute_outs)
        done[spec.name] = t_node.name
    if done:
        graph.eliminate_dead_code()
        _narrow_output_masks(graph)
        graph.lint()
        gm.recompile()
    return done


def _incoming_gradient(spec: RerouteSpec, group: list[Node], members: set[Node]) -> Node:
    incoming: list[Node] = []
    for n in group:
        for a in n.all_input_nodes:
            if a in members or a in incoming:
                continue
            is_tangent = a.op == "placeholder" and "Tangent" in type(a.meta.get("desc")).__name__
            if is_tangent or (_is_backward(a) and _is_tensor(a)):
                incoming.append(a)
    if len(incoming) != 1:
        raise RerouteError(
            f"svgd_fx: cannot identify the gradient arriving at σ' node {spec.name!r} in the joint "
            f"graph: expected one incoming backward value, found {[a.name for a in incoming]}. "
            "Please report this model; exclude its parameters meanwhile (transform(..., exclude=...))."
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
            src = _fwd_source(user)
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
    with graph.inserting_before(first_use):
        t_node = graph.call_function(
            torch.ops.svgd_fx.virtual_grad.default,
            (g, r, spec.s, spec.rho, spec.eps, spec.mean_reduction, spec.channel_dim),
        )
    t_node.meta.update({k: v for k, v in first_use.meta.items() if k != "val"})
    g_val = g.meta.get("val")
    if isinstance(g_val, torch.Tensor):
        with _fake_mode_of(g_val):
            t_node.meta["val"] = torch.empty_like(g_val, memory_format=torch.contiguous_format)
    t_node.meta["partitioner_tag"] = "is_backward"
    t_node.meta["svgd_sigma"] = spec.name
    return t_node


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
