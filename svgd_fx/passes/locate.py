"""Find the σ' nodes (the set V_{θ→σ}) in a torch-level FX graph and decide their linearity.

The graph is the one TorchDynamo hands a backend: one node per torch call as written in the
model's source (``F.linear``, ``torch.conv2d``, ``F.batch_norm``, ``operator.mul``...), every
parameter and buffer a placeholder. Each value is classified as

* ``PARAM`` – parameter-derived: a trainable parameter, or computed from parameters and
  constants only (``W.t()``, ``sigmoid(g)``, weight-norm arithmetic);
* ``BATCH`` – depends on a model input;
* ``CONST`` – buffers, frozen parameters, constants.

A σ' node takes at least one ``PARAM`` and at least one ``BATCH`` value. Because this runs on
the torch-level graph, ``F.linear`` on a ``[B, T, C]`` input is one σ' node whatever aten ops it
later decomposes into. Shape arithmetic (``x.size(0)``, SymInts) is ``CONST``: a shape carries
no gradient, so ``p.expand(x.size(0), -1)`` stays parameter-derived.

The bodies of activation-checkpointed regions (Dynamo's ``tag_activation_checkpoint`` and
``wrap`` higher-order ops) are walked as part of the graph: their σ' nodes are σ' nodes of the
model. Every call node, in the graph and in such bodies, gets an id in ``meta["custom"]``
(:func:`tag_nodes`); AOTAutograd copies it to the node's aten forward nodes and to their
backward nodes, so the joint-graph passes find each σ' node's backward by id, never by a
source name that a checkpointed region or a second graph could repeat.

Example — for ``F.relu(bn(fc(x))) * torch.sigmoid(self.g)``::

    >>> [ (s.name, s.op, [(p.arg, p.params, p.linear) for p in s.param_inputs]) for s in locate(gm, ...) ]
    [('fc.linear', 'linear', [('weight', ('fc.weight',), True), ('bias', ('fc.bias',), True)]),
     ('bn.batch_norm', 'batch_norm', [('weight', ('bn.weight',), True), ('bias', ('bn.bias',), True)]),
     ('g.mul', 'mul', [('other', ('g',), False)])]        # sigmoid(g): not linear in g
"""

from __future__ import annotations

import enum
import operator
import re
from copy import deepcopy
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch.fx import GraphModule, Node

from .linearity import bind_args, chain_linearity, describe_op, nodes_in, sigma_rule


class Kind(enum.Enum):
    CONST = 0
    PARAM = 1
    BATCH = 2


@dataclass
class ParamInput:
    arg: str                      # argument of the op ("weight", "other", "arg2")
    params: tuple[str, ...]       # qualified names of the parameters feeding it
    linear: bool                  # T is applied to the gradient of this input
    reason: str                   # why (not) linear, for explain()
    nodes: tuple[Node, ...] = ()  # the parameter-derived nodes passed in this argument


@dataclass
class SigmaNode:
    node: Node                    # the torch-level node
    source: str                   # its node id (``NODE_ID``): the key shared with the joint graph
    op: str                       # short op name ("linear", "conv2d", "mul")
    name: str                     # stable name ("fc.linear"), used for state and reports
    location: str                 # "model.py:12  h = self.fc(x)"
    param_inputs: list[ParamInput]
    sample_shape: tuple[Any, ...] | None   # output shape without dim 0 (SymInts if dynamic)
    channel_dim: int = -1
    dtype: torch.dtype | None = None
    device: torch.device | None = None

    @property
    def routed(self) -> bool:
        return any(p.linear for p in self.param_inputs)

    @property
    def routed_params(self) -> set[str]:
        return {q for p in self.param_inputs if p.linear for q in p.params}

    @property
    def plain_params(self) -> set[str]:
        return {q for p in self.param_inputs if not p.linear for q in p.params}


@dataclass
class Analysis:
    sigmas: list[SigmaNode]
    kinds: dict[str, Kind] = field(default_factory=dict)       # node id -> kind
    params_seen: set[str] = field(default_factory=set)
    node_kinds: dict[Node, Kind] = field(default_factory=dict)  # every node, placeholders included
    # per output of the graph: {param: linear} if it is parameter-derived (not batch-dependent), else None
    output_chains: list[dict[str, bool] | None] = field(default_factory=list)


NODE_ID = "svgd_fx_node"          # our key inside node.meta["custom"] (AOTAutograd carries "custom")
# higher-order ops whose body is part of the model's graph (activation checkpointing)
_BODY_OPS = {"tag_activation_checkpoint", "wrap"}


def node_id(node: Node) -> str | None:
    custom = node.meta.get("custom")
    return custom.get(NODE_ID) if isinstance(custom, dict) else None


def _body(gm: GraphModule, node: Node) -> GraphModule | None:
    """The subgraph of a checkpoint/wrap higher-order op node, else None."""
    if node.op != "call_function" or getattr(node.target, "__name__", None) not in _BODY_OPS:
        return None
    first = node.args[0] if node.args else None
    if isinstance(first, Node) and first.op == "get_attr":
        sub = getattr(gm, first.target, None)
        if isinstance(sub, GraphModule):
            return sub
    return None


def tag_nodes(gm: GraphModule, prefix: str = "") -> None:
    """Give every call node of ``gm`` and of its checkpointed bodies a unique id (``NODE_ID``).

    Bodies are replaced by copies first (their nodes' meta is shared with Dynamo's own graph).
    """
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        node.meta["custom"] = {**(node.meta.get("custom") or {}), NODE_ID: prefix + node.name}
        body = _body(gm, node)
        if body is not None:
            copy = GraphModule(body, deepcopy(body.graph))
            setattr(gm, node.args[0].target, copy)
            tag_nodes(copy, f"{prefix}{node.name}/")


def _location(node: Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n(.*)', trace)
    if not frames:
        return "<unknown>"
    path, line, _, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}  {code.strip()}"


def _module_prefix(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def example_value(node: Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


_SCALARS = (int, float, bool, torch.SymInt, torch.SymFloat, torch.SymBool)


def _is_shape_value(node: Node) -> bool:
    """A SymInt/SymFloat/number node (``x.size(0)``), or a whole size (``x.size()``, a ``torch.Size``
    of them under dynamic shapes): shape arithmetic, not a gradient path."""
    value = example_value(node)
    return isinstance(value, (*_SCALARS, torch.Size)) or (
        isinstance(value, (tuple, list)) and len(value) > 0 and all(isinstance(v, _SCALARS) for v in value))


def locate(
    gm: GraphModule,
    param_names: dict[Node, str],
    const_nodes: Iterable[Node] = (),
    exclude: set[str] = frozenset(),
    derived: dict[Node, dict[str, bool]] | None = None,
) -> Analysis:
    """Classify every node of ``gm`` (and of its checkpointed bodies) and return its σ' nodes,
    in graph order.

    ``param_names`` maps the placeholders of trainable parameters to their qualified names;
    ``const_nodes`` are placeholders of buffers and frozen parameters; ``derived`` maps
    placeholders that an earlier graph computed from parameters alone (a value passed across a
    graph break) to their ``{param: linear}``; every other placeholder is a model input.
    Parameters named in ``exclude`` keep their plain gradient. Nodes must carry ids
    (:func:`tag_nodes`); untagged ones are keyed by their name.
    """
    walk = _Walk(exclude)
    inputs = []
    consts = set(const_nodes)
    derived = derived or {}
    for node in gm.graph.find_nodes(op="placeholder"):
        if node in param_names:
            walk.analysis.params_seen.add(param_names[node])
            inputs.append((Kind.PARAM, {param_names[node]: True}, {}))
        elif node in derived:
            chain = derived[node]
            inputs.append((Kind.PARAM, dict(chain), {p: "non-linear chain (in the graph before a graph break)"
                                                    for p, linear in chain.items() if not linear}))
        elif node in consts or _is_shape_value(node):
            inputs.append((Kind.CONST, {}, {}))
        else:
            inputs.append((Kind.BATCH, {}, {}))
    outputs = walk.graph(gm, inputs)
    walk.analysis.node_kinds = walk.kind
    walk.analysis.output_chains = [chain if kind is Kind.PARAM and chain else None for kind, chain, _ in outputs]
    return walk.analysis


class _Walk:
    """One pass over a graph and, recursively, the bodies of its checkpointed regions."""

    def __init__(self, exclude: set[str]) -> None:
        self.exclude = exclude
        self.kind: dict[Node, Kind] = {}
        self.chain: dict[Node, dict[str, bool]] = {}      # PARAM nodes: param -> linear
        self.why: dict[Node, dict[str, str]] = {}         # PARAM nodes: param -> why it is not linear
        self.outputs: dict[Node, list[tuple]] = {}        # body op node -> its outputs' (kind, chain, why)
        self.analysis = Analysis(sigmas=[])
        self.used_names: dict[str, int] = {}

    def _set(self, node: Node, kind: Kind, chain=None, why=None) -> None:
        self.kind[node] = kind
        if chain:
            self.chain[node] = chain
        if why:
            self.why[node] = why

    def _triple(self, node: Node) -> tuple:
        return self.kind.get(node, Kind.CONST), self.chain.get(node, {}), self.why.get(node, {})

    def graph(self, gm: GraphModule, inputs: list[tuple]) -> list[tuple]:
        """Walk ``gm`` whose placeholders are ``inputs`` (kind, chain, why); return its outputs'."""
        placeholders = iter(inputs)
        result: list[tuple] = []
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                self._set(node, *next(placeholders, (Kind.BATCH, {}, {})))
            elif node.op == "get_attr":
                self._set(node, Kind.CONST)
            elif node.op == "output":
                result = [self._triple(n) if isinstance(n, Node) else (Kind.CONST, {}, {})
                          for n in (node.args[0] if isinstance(node.args[0], (tuple, list)) else [node.args[0]])]
            else:
                self.visit(gm, node)
        return result

    def visit(self, gm: GraphModule, node: Node) -> None:
        key = node_id(node) or node.name
        body = _body(gm, node)
        if body is not None:
            self.outputs[node] = self.graph(body, [self._triple(a) if isinstance(a, Node) else (Kind.CONST, {}, {})
                                                   for a in node.args[1:]])
            kinds = {k for k, _, _ in self.outputs[node]}
            self._set(node, Kind.BATCH if Kind.BATCH in kinds else Kind.PARAM if Kind.PARAM in kinds else Kind.CONST)
        elif node.target is operator.getitem and node.args[0] in self.outputs:
            outs = self.outputs[node.args[0]]
            index = node.args[1]
            self._set(node, *(outs[index] if isinstance(index, int) and index < len(outs) else (Kind.BATCH, {}, {})))
        elif _is_shape_value(node):
            self._set(node, Kind.CONST)
        else:
            inputs = node.all_input_nodes
            kinds = {self.kind.get(n, Kind.CONST) for n in inputs}
            if Kind.BATCH in kinds:
                self._set(node, Kind.BATCH)
                if Kind.PARAM in kinds:
                    self.analysis.sigmas.append(self._sigma(node, key))
            elif Kind.PARAM in kinds:
                chain, why = chain_linearity(node, lambda n: self.chain.get(n, {}) if self.kind.get(n) is Kind.PARAM else {})
                for n in inputs:        # a parameter non-linear below keeps the reason found there
                    for p, reason in self.why.get(n, {}).items():
                        why.setdefault(p, reason)
                self._set(node, Kind.PARAM, chain, why)
            else:
                self._set(node, Kind.CONST)
        self.analysis.kinds[key] = self.kind[node]

    def _sigma(self, node: Node, key: str) -> SigmaNode:
        kind, chain, chain_why = self.kind, self.chain, self.why
        rule = sigma_rule(node)
        param_inputs: list[ParamInput] = []
        if rule is not None:
            bound = bind_args(node, rule.args)
            spoiler = rule.spoiled_by(node.args, node.kwargs)
            covered: set[Node] = set()
            for arg, value in bound.items():
                nodes = [n for n in nodes_in(value) if kind.get(n) is Kind.PARAM]
                if not nodes:
                    continue
                covered.update(nodes)
                params = sorted({p for n in nodes for p in chain[n]})
                if arg not in rule.linear_in:
                    why_not = f"`{rule.name}` is not linear in its `{arg}` argument"
                elif spoiler is not None:
                    why_not = f"`{rule.name}` with `{spoiler}=` is not linear"
                else:
                    why_not = None
                if why_not is not None:
                    param_inputs.append(ParamInput(arg, tuple(params), False, why_not))
                    continue
                # per parameter: a chain can be linear in one parameter and not in another
                # (weight norm w = g·v/‖v‖): the reroute then splits the chain's backward too
                why = {p: chain_why[n].get(p, "non-linear chain") for n in nodes for p in chain[n]
                       if not chain[n][p]}
                excluded = [p for p in params if p in self.exclude]
                linear = [p for p in params if p not in why and p not in self.exclude]
                if linear:
                    param_inputs.append(ParamInput(arg, tuple(linear), True, f"`{rule.name}` is linear in `{arg}`",
                                                   tuple(nodes)))
                if excluded:
                    param_inputs.append(ParamInput(arg, tuple(excluded), False, "excluded by the user"))
                for reason in dict.fromkeys(why[p] for p in params if p in why and p not in self.exclude):
                    param_inputs.append(ParamInput(arg, tuple(p for p in params if why.get(p) == reason
                                                               and p not in self.exclude), False, reason))
            leftover = [n for n in node.all_input_nodes if kind.get(n) is Kind.PARAM and n not in covered]
            if leftover:
                params = tuple(sorted({p for n in leftover for p in chain[n]}))
                param_inputs.append(ParamInput("<other>", params, False,
                                               f"`{rule.name}` argument outside the linearity table"))
        else:
            nodes = [n for n in node.all_input_nodes if kind.get(n) is Kind.PARAM]
            params = tuple(sorted({p for n in nodes for p in chain[n]}))
            param_inputs.append(ParamInput("<all>", params, False,
                                           f"op `{describe_op(node)}` is not in svgd_fx's linearity table "
                                           "(unknown ops get the plain gradient)"))
        _reconcile_shared_params(param_inputs)

        op = describe_op(node)
        first_param = param_inputs[0].params[0]
        base = f"{_module_prefix(first_param)}.{op}"
        count = self.used_names.get(base, 0)
        self.used_names[base] = count + 1
        name = base if count == 0 else f"{base}#{count}"

        value = example_value(node)
        sample_shape = tuple(value.shape[1:]) if isinstance(value, torch.Tensor) and value.dim() >= 1 else None
        return SigmaNode(
            node=node,
            source=key,
            op=op,
            name=name,
            location=_location(node),
            param_inputs=param_inputs,
            sample_shape=sample_shape,
            channel_dim=rule.channel_dim if rule is not None else -1,
            dtype=value.dtype if isinstance(value, torch.Tensor) else None,
            device=value.device if isinstance(value, torch.Tensor) else None,
        )


def _reconcile_shared_params(param_inputs: list[ParamInput]) -> None:
    """A parameter feeding two arguments of one op, linear in one and not the other, cannot be
    split below the op: both arguments then keep the plain gradient (the conservative side)."""
    plain = {q for p in param_inputs if not p.linear for q in p.params}
    for p in param_inputs:
        shared = plain.intersection(p.params)
        if p.linear and shared:
            p.linear = False
            p.reason = f"{', '.join(sorted(shared))} also enters `{p.arg}`'s op non-linearly"
