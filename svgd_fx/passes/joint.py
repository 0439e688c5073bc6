"""What the joint-graph passes (:mod:`.reroute`, :mod:`.kronecker`) share on AOTAutograd's joint graph.

A torch-level σ' node S reaches the joint graph as aten nodes carrying S's id
(``locate.node_id``): its forward nodes, and the nodes of its backward computed from a tangent,
``B_S``. :func:`joint_view` groups both by id. Exactly one backward value from outside ``B_S``
enters it, ∇σ'J (:func:`incoming_gradient`); each value ``B_S`` hands on is either a parameter
edge, reaching only parameter-gradient outputs (:func:`parameter_edge`), or an activation edge.
New nodes are added with :func:`emitter` (named after their σ' node, with fake values), and
:func:`finish` tidies the graph after a rewrite.
"""

from __future__ import annotations

import operator
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .._torch_internals import GradAOTOutput, PlainAOTInput, detect_fake_mode
from ..errors import RerouteError
from .locate import node_id


def is_tangent(node: Node) -> bool:
    return node.op == "placeholder" and "Tangent" in type(node.meta.get("desc")).__name__


def _tangent_fed(nodes: list[Node]) -> set[Node]:
    """The nodes computed from a tangent: the backward values (AOTAutograd tags most of them
    ``is_backward``, but not the backward of a custom ``autograd.Function``)."""
    fed: set[Node] = set()
    for n in nodes:
        if is_tangent(n) or any(a in fed for a in n.all_input_nodes):
            fed.add(n)
    return fed


def _is_tensor(node: Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def plain_index(desc) -> int | None:
    """Index of a PlainAOTInput (or a grad of one); None for anything else."""
    if isinstance(desc, GradAOTOutput):
        desc = desc.grad_of
    if isinstance(desc, PlainAOTInput):
        return desc.idx
    return None


def node_tag(prefix: str, sigma_name: str) -> str:
    """The name of the nodes a pass adds for σ' node ``sigma_name`` (they show in inductor's code)."""
    return prefix + "".join(c if c.isalnum() else "_" for c in sigma_name)


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
        placeholders={plain_index(n.meta.get("desc")): n for n in nodes if n.op == "placeholder"},
        backward=backward,
        forward=forward,
        tangent_fed=tangent_fed,
    )


def incoming_gradient(spec, group: list[Node], members: set[Node], tangent_fed: set[Node],
                      exclude_hint: str = "exclude=[...]") -> Node:
    """g = ∇σ'J: the one backward value from outside ``group`` that its nodes read."""
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


def parameter_edge(start, members, out_values, out_descs, param_derived_sources, param_inputs):
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
                        idx = plain_index(out_descs[slot])
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


def fake_mode_of(value):
    """The fake mode ``value`` belongs to (a context manager), or a null context for a real value."""
    mode = detect_fake_mode([value])
    return mode if mode is not None else nullcontext()


def emitter(graph, tag: str, meta: dict, like: torch.Tensor):
    """``emit(target, *args, **kwargs)``: a call_function node named after ``tag``, with ``meta`` and its
    fake value computed by running ``target`` on the arguments' fake values."""
    def emit(target, *args, **kwargs):
        node = graph.create_node("call_function", target, args, kwargs, name=tag)
        node.meta.update(meta)
        vals, kwvals = torch.fx.node.map_arg((args, kwargs), lambda a: a.meta["val"])
        with fake_mode_of(like):
            node.meta["val"] = target(*vals, **kwvals)
        return node

    return emit


def finish(gm: GraphModule) -> None:
    """After a rewrite: drop what no longer feeds an output, narrow fused backward nodes."""
    gm.graph.eliminate_dead_code()
    _narrow_output_masks(gm.graph)
    gm.graph.lint()
    gm.recompile()


def _narrow_output_masks(graph) -> None:
    """After the split, let each fused backward node compute only the outputs still used."""
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
