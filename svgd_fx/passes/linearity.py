"""Where an op is linear in a parameter input: one table for σ' ops, one rule for chains.

docs/contract.md: σ' = f(inputs) is *linear in θ* when, with every other input held fixed, the
composite map θ → (parameter-derived chain) → f is linear. Affine counts as linear here
(a bias is affine in b; what SVGD needs is that σ' = f(θ) holds exactly after the step,
which an affine map keeps just as a linear one does).

Two questions are answered, in two places:

* ``SIGMA_OPS`` – for an op that can be a σ' node (it meets the batch), the names of its
  arguments in signature order and the subset in which the op is linear. An op missing
  from the table is *not linear* in any argument: its parameters get the plain gradient
  and ``explain()`` says why. This table never guesses in the other direction.
* ``chain_linearity`` – for a parameter-derived node (no batch input), in which of the
  parameters feeding it the node is linear. Structural ops (views, transposes, casts,
  indexing) pass linearity through; ``+``/``-`` keep it; ``*``/``/``/``@`` keep it for a
  parameter that appears in one factor only (in the numerator for ``/``); anything else
  (``sigmoid``, ``**``, ``norm``, ``exp``...) makes every parameter below it non-linear.

Ops are keyed by :func:`op_key`: the callable for ``call_function`` nodes and
``"method:<name>"`` for ``call_method`` nodes, so ``x.mul(w)``, ``torch.mul(x, w)`` and
``x * w`` all find their row.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Node
from torch.fx.node import map_arg


@dataclass(frozen=True)
class OpRule:
    name: str                     # short op name used in σ' names and reports ("linear")
    args: tuple[str, ...]         # argument names in positional order
    linear_in: frozenset[str]     # arguments in which the op is linear (affine)
    channel_dim: int = -1         # dim of the output that indexes channels (for r="channel")
    # (position or None for keyword-only, name) of arguments that, given and not None, make the
    # op linear in nothing: div's rounding_mode, embedding's max_norm (it renormalises rows)
    spoilers: tuple[tuple[int | None, str], ...] = ()

    def spoiled_by(self, args: tuple, kwargs: dict) -> str | None:
        """The argument of this call that makes the op non-linear, if one is given."""
        for position, name in self.spoilers:
            value = kwargs.get(name)
            if value is None and position is not None and position < len(args):
                value = args[position]
            if value is not None:
                return name
        return None


def op_key(node: Node) -> Any:
    if node.op == "call_method":
        return f"method:{node.target}"
    return node.target


SIGMA_OPS: dict[Any, OpRule] = {}


def _register(keys: list[Any], rule: OpRule) -> None:
    for key in keys:
        SIGMA_OPS[key] = rule


_BINARY = ("input", "other")
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")

_register([torch._C._nn.linear, F.linear],
          OpRule("linear", ("input", "weight", "bias"), frozenset({"weight", "bias"})))
_register([torch.matmul, operator.matmul, "method:matmul", "method:__matmul__"],
          OpRule("matmul", _BINARY, frozenset(_BINARY)))
_register([torch.mm, "method:mm"], OpRule("mm", ("input", "mat2"), frozenset({"input", "mat2"})))
_register([torch.bmm, "method:bmm"], OpRule("bmm", ("input", "mat2"), frozenset({"input", "mat2"})))
_register([torch.addmm, "method:addmm"],
          OpRule("addmm", ("input", "mat1", "mat2"), frozenset({"input", "mat1", "mat2"})))
for _dims in (1, 2, 3):
    _register([getattr(torch, f"conv{_dims}d"), getattr(F, f"conv{_dims}d")],
              OpRule(f"conv{_dims}d", _CONV, frozenset({"weight", "bias"}), channel_dim=1))
    _register([getattr(torch, f"conv_transpose{_dims}d"), getattr(F, f"conv_transpose{_dims}d")],
              OpRule(f"conv_transpose{_dims}d", _CONV_T, frozenset({"weight", "bias"}), channel_dim=1))
_register([F.embedding], OpRule("embedding", ("input", "weight"), frozenset({"weight"}),
                                spoilers=((3, "max_norm"),)))
_register([torch.embedding], OpRule("embedding", ("weight", "input"), frozenset({"weight"})))
_register([F.layer_norm, torch.layer_norm],
          OpRule("layer_norm", ("input", "normalized_shape", "weight", "bias"), frozenset({"weight", "bias"})))
_register([F.rms_norm, torch.rms_norm],
          OpRule("rms_norm", ("input", "normalized_shape", "weight"), frozenset({"weight"})))
_register([F.group_norm, torch.group_norm],
          OpRule("group_norm", ("input", "num_groups", "weight", "bias"), frozenset({"weight", "bias"}),
                 channel_dim=1))
# F.batch_norm / F.instance_norm take the running statistics before weight and bias; the
# torch.* functions take weight and bias first
_register([F.batch_norm],
          OpRule("batch_norm", ("input", "running_mean", "running_var", "weight", "bias"),
                 frozenset({"weight", "bias"}), channel_dim=1))
_register([torch.batch_norm],
          OpRule("batch_norm", ("input", "weight", "bias", "running_mean", "running_var"),
                 frozenset({"weight", "bias"}), channel_dim=1))
_register([F.instance_norm],
          OpRule("instance_norm", ("input", "running_mean", "running_var", "weight", "bias"),
                 frozenset({"weight", "bias"}), channel_dim=1))
_register([torch.instance_norm],
          OpRule("instance_norm", ("input", "weight", "bias", "running_mean", "running_var"),
                 frozenset({"weight", "bias"}), channel_dim=1))
_register([F.prelu, torch.prelu], OpRule("prelu", ("input", "weight"), frozenset({"weight"}), channel_dim=1))
# torch.cat([cls_token.expand(B, 1, C), x], dim=1): linear in every parameter-derived member
_register([torch.cat, torch.concat, torch.concatenate], OpRule("cat", ("tensors", "dim"), frozenset({"tensors"})))
_register([torch.stack], OpRule("stack", ("tensors", "dim"), frozenset({"tensors"})))
_register([torch.where], OpRule("where", ("condition", "input", "other"), frozenset({"input", "other"})))
# x.where(condition, y): the receiver is where(condition, x, y)'s `input`
_register(["method:where"], OpRule("where", ("input", "condition", "other"), frozenset({"input", "other"})))
_register([operator.mul, operator.imul, torch.mul, "method:mul", "method:mul_", "method:__mul__",
           "method:__rmul__"], OpRule("mul", _BINARY, frozenset(_BINARY)))
_register([operator.add, operator.iadd, torch.add, "method:add", "method:add_", "method:__add__",
           "method:__radd__"], OpRule("add", _BINARY, frozenset(_BINARY)))
_register([operator.sub, operator.isub, torch.sub, "method:sub", "method:sub_", "method:__sub__"],
          OpRule("sub", _BINARY, frozenset(_BINARY)))
_register([operator.truediv, operator.itruediv, torch.div, "method:div", "method:div_", "method:__truediv__"],
          OpRule("div", _BINARY, frozenset({"input"}), spoilers=((None, "rounding_mode"),)))


def bind_args(node: Node, names: tuple[str, ...]) -> dict[str, Any]:
    """Map a call's positional and keyword arguments onto ``names`` (extra positions are dropped)."""
    # For call_method nodes the receiver is args[0], which the tables name "input".
    bound = {name: value for name, value in zip(names, node.args)}
    for key, value in node.kwargs.items():
        if key in names:
            bound[key] = value
    return bound


# ---------------------------------------------------------------- parameter-derived chains

# Ops through which every parameter keeps its linearity (structure, casts, indexing, sign).
_STRUCTURAL_NAMES = {
    "view", "reshape", "t", "transpose", "permute", "contiguous", "to", "type", "float", "double",
    "half", "bfloat16", "clone", "expand", "expand_as", "squeeze", "unsqueeze", "flatten", "unflatten",
    "narrow", "select", "flip", "roll", "repeat", "neg", "__neg__", "__getitem__", "getitem",
    "chunk", "split", "unbind", "movedim", "swapaxes", "view_as", "reshape_as", "detach_copy",
    "cat", "concat", "stack", "sum", "mean", "tile", "diag", "tril", "triu", "real", "rot90",
}
# Tensor attributes that are transposes (``x @ W.T``: Dynamo records ``getattr(W, "T")``)
_STRUCTURAL_ATTRIBUTES = {"T", "mT", "H", "mH"}
_ADDITIVE_NAMES = {"add", "sub", "__add__", "__radd__", "__sub__", "__rsub__", "iadd", "isub"}
_MULTIPLICATIVE_NAMES = {"mul", "__mul__", "__rmul__", "matmul", "mm", "bmm", "__matmul__", "imul",
                         "outer", "einsum", "kron"}
_DIVISION_NAMES = {"div", "truediv", "__truediv__", "itruediv"}


def _callable_name(node: Node) -> str:
    target = node.target
    if isinstance(target, str):
        return target
    if target is getattr and len(node.args) == 2 and node.args[1] in _STRUCTURAL_ATTRIBUTES:
        return "t"                      # W.T, W.mT (and the conjugate H, mH: W.T for a real W)
    return getattr(target, "__name__", str(target))


# Parameter-derived ops linear in some arguments only, by target: (argument names in positional
# order, the ones the op is linear in). The others must not hold the same parameter: a row gather
# from a parameter table with constant indices (a position embedding, T5's bucketed relative
# positions) is linear in the table; weight norm w = g·v/‖v‖ is linear in g, not in v.
_CHAIN_SLOTS: dict[Any, tuple[tuple[str, ...], frozenset[str]]] = {
    F.embedding: (("input", "weight"), frozenset({"weight"})),
    torch.embedding: (("weight", "input"), frozenset({"weight"})),
    torch._weight_norm: (("v", "g", "dim"), frozenset({"g"})),
}
# where(c, a, b) picks a or b elementwise: linear in a and b together (like a sum), with a
# constant condition (T5's causal mask over its relative-position bias)
_SELECT_NAMES = {"where"}


def chain_linearity(node: Node, param_map: Callable[[Node], dict[str, bool]]) -> tuple[dict[str, bool], dict[str, str]]:
    """Linearity of a parameter-derived ``node`` in each parameter below it.

    ``param_map(n)`` gives, for an input node ``n``, its map parameter-name → linear (empty for
    constants). Every *occurrence* of an input counts (``θ * θ`` has θ in two factors), and for
    a division only the numerator (``args[0]``) may hold a parameter. Returns the map for
    ``node`` and, for each parameter that *this* op made non-linear (linear in every input),
    the reason; a parameter already non-linear below keeps the reason found there.
    """
    name = _callable_name(node)
    slots = _CHAIN_SLOTS.get(node.target)
    rule = sigma_rule(node)
    spoiler = rule.spoiled_by(node.args, node.kwargs) if rule is not None else None
    occurrences = [(position, n) for position, arg in enumerate(node.args) for n in nodes_in(arg)]
    occurrences += [(key, n) for key, arg in node.kwargs.items() for n in nodes_in(arg)]
    maps = [(position, param_map(n)) for position, n in occurrences]
    params = sorted({p for _, m in maps for p in m})
    below = {p: all(m[p] for _, m in maps if p in m) for p in params}   # linear in every input

    def slot_of(position) -> Any:
        if slots is not None and isinstance(position, int):
            return slots[0][position] if position < len(slots[0]) else None
        return position

    if spoiler is not None:
        return {p: False for p in params}, {p: f"`{name}` with `{spoiler}=` is not linear" for p in params if below[p]}
    if slots is None and (name in _STRUCTURAL_NAMES or name in _ADDITIVE_NAMES):
        return dict(below), {}
    if name in _SELECT_NAMES:
        out = {p: below[p] and not any(pos in (0, "condition") for pos, m in maps if p in m) for p in params}
        return out, {p: "`where`'s condition is not linear" for p in params if below[p] and not out[p]}
    if slots is not None or name in _MULTIPLICATIVE_NAMES or name in _DIVISION_NAMES:
        if slots is not None:
            linear_slots = slots[1]
        elif name in _DIVISION_NAMES:
            linear_slots = {0}             # the numerator only
        else:
            linear_slots = None            # every factor
        out, reasons = {}, {}
        for p in params:
            holders = [slot_of(position) for position, m in maps if p in m]
            here = len(holders) == 1 and (linear_slots is None or holders[0] in linear_slots)
            out[p] = here and below[p]
            if below[p] and not here:
                reasons[p] = (f"`{name}` is not linear in its `{holders[0]}` argument"
                              if len(holders) == 1 and slots is not None else
                              f"`{name}` of parameter-derived values is not linear in {p}")
        return out, reasons
    return {p: False for p in params}, {p: f"`{name}` is not linear in its parameter input"
                                        for p in params if below[p]}


def nodes_in(value: Any) -> list[Node]:
    found: list[Node] = []
    map_arg(value, lambda n: found.append(n) or n)
    return found


def sigma_rule(node: Node) -> OpRule | None:
    return SIGMA_OPS.get(op_key(node))


def describe_op(node: Node) -> str:
    rule = sigma_rule(node)
    return rule.name if rule is not None else _callable_name(node)

