"""Find the σ' nodes (the set V_{θ→σ}) in a torch-level FX graph and decide their linearity.

The graph is the one TorchDynamo hands a backend: one node per torch call as written in the
model's source (``F.linear``, ``torch.conv2d``, ``F.batch_norm``, ``operator.mul``...), every
parameter and buffer a placeholder. Each value is classified as

* ``PARAM`` – parameter-derived: a trainable parameter, or computed from parameters and
  constants only (``W.t()``, ``sigmoid(g)``, weight-norm arithmetic);
* ``BATCH`` – depends on a model input;
* ``CONST`` – buffers, frozen parameters, constants.

A σ' node takes at least one ``PARAM`` and at least one ``BATCH`` value (SPEC). Because this
runs on the torch-level graph, ``F.linear`` on a ``[B, T, C]`` input is one σ' node whatever
aten ops it later decomposes into.

Example — for ``F.relu(bn(fc(x))) * torch.sigmoid(self.g)``::

    >>> [ (s.name, s.op, [(p.arg, p.params, p.linear) for p in s.param_inputs]) for s in locate(gm, ...) ]
    [('fc.linear', 'linear', [('weight', ('fc.weight',), True), ('bias', ('fc.bias',), True)]),
     ('bn.batch_norm', 'batch_norm', [('weight', ('bn.weight',), True), ('bias', ('bn.bias',), True)]),
     ('g.mul', 'mul', [('other', ('g',), False)])]        # sigmoid(g): not linear in g
"""

from __future__ import annotations

import enum
import re
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


@dataclass
class SigmaNode:
    node: Node                    # the torch-level node
    source: str                   # its source_fn name: the key shared with the joint graph
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
    kinds: dict[str, Kind] = field(default_factory=dict)       # source name -> kind
    params_seen: set[str] = field(default_factory=set)


def source_name(node: Node) -> str | None:
    stack = node.meta.get("source_fn_stack")
    return stack[-1][0] if stack else None


def _location(node: Node) -> str:
    trace = node.meta.get("stack_trace") or ""
    frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n(.*)', trace)
    if not frames:
        return "<unknown>"
    path, line, _, code = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line}  {code.strip()}"


def _module_prefix(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else param


def _example_value(node: Node) -> Any:
    return node.meta.get("example_value", node.meta.get("val"))


def locate(
    gm: GraphModule,
    param_names: dict[Node, str],
    const_nodes: Iterable[Node] = (),
    exclude: set[str] = frozenset(),
) -> Analysis:
    """Classify every node of ``gm`` and return its σ' nodes, in graph order.

    ``param_names`` maps the placeholders of trainable parameters to their qualified names;
    ``const_nodes`` are placeholders of buffers and frozen parameters; every other placeholder
    is a model input. Parameters named in ``exclude`` keep their plain gradient.
    """
    consts = set(const_nodes)
    kind: dict[Node, Kind] = {}
    chain: dict[Node, dict[str, bool]] = {}        # PARAM nodes: param -> linear
    chain_why: dict[Node, str] = {}                # PARAM nodes: why a param became non-linear
    analysis = Analysis(sigmas=[])
    used_names: dict[str, int] = {}

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if node in param_names:
                kind[node] = Kind.PARAM
                chain[node] = {param_names[node]: True}
                analysis.params_seen.add(param_names[node])
            elif node in consts:
                kind[node] = Kind.CONST
            else:
                kind[node] = Kind.BATCH
            continue
        if node.op == "get_attr":
            kind[node] = Kind.CONST
            continue
        if node.op == "output":
            continue
        inputs = node.all_input_nodes
        kinds = {kind.get(n, Kind.CONST) for n in inputs}
        src = source_name(node)
        if Kind.BATCH in kinds:
            kind[node] = Kind.BATCH
            if Kind.PARAM in kinds:
                analysis.sigmas.append(_make_sigma(node, kind, chain, chain_why, exclude, used_names))
        elif Kind.PARAM in kinds:
            kind[node] = Kind.PARAM
            chain[node], why = chain_linearity(node, lambda n: chain[n] if kind.get(n) is Kind.PARAM else {})
            below = [chain_why[n] for n in inputs if n in chain_why]
            if why or below:
                chain_why[node] = why or below[0]
        else:
            kind[node] = Kind.CONST
        if src is not None:
            analysis.kinds[src] = kind[node]
    return analysis


def _make_sigma(node, kind, chain, chain_why, exclude, used_names) -> SigmaNode:
    rule = sigma_rule(node)
    param_inputs: list[ParamInput] = []
    if rule is not None:
        bound = bind_args(node, rule.args)
        covered: set[Node] = set()
        for arg, value in bound.items():
            nodes = [n for n in nodes_in(value) if kind.get(n) is Kind.PARAM]
            if not nodes:
                continue
            covered.update(nodes)
            params = tuple(sorted({p for n in nodes for p in chain[n]}))
            if arg not in rule.linear_in:
                linear, reason = False, f"`{rule.name}` is not linear in its `{arg}` argument"
            elif any(p in exclude for p in params):
                linear, reason = False, "excluded by the user"
            elif not all(chain[n][p] for n in nodes for p in chain[n]):
                why = next((chain_why[n] for n in nodes if n in chain_why), "non-linear chain")
                linear, reason = False, why
            else:
                linear, reason = True, f"`{rule.name}` is linear in `{arg}`"
            param_inputs.append(ParamInput(arg, params, linear, reason))
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
    count = used_names.get(base, 0)
    used_names[base] = count + 1
    name = base if count == 0 else f"{base}#{count}"

    value = _example_value(node)
    sample_shape = tuple(value.shape[1:]) if isinstance(value, torch.Tensor) and value.dim() >= 1 else None
    return SigmaNode(
        node=node,
        source=source_name(node) or node.name,
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

