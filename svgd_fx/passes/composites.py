"""Composite torch functions that capture keeps as one node, opened where they hide σ' nodes.

TorchDynamo keeps ``F.multi_head_attention_forward`` (behind ``nn.MultiheadAttention`` and
``nn.Transformer*Layer``) as one node: its in- and out-projections, σ' nodes linear in their
weights, would be invisible to :mod:`.locate`. Likewise ``F.scaled_dot_product_attention`` with a
parameter-derived ``attn_mask`` (T5's relative-position bias) hides the σ' node
``scores + mask``. Such a node is replaced, in our copy of Dynamo's graph, by a decomposition
written here in torch calls as a model would write them::

    multi_head_attention_forward(q, k, v, ...)        F.linear(q_bf, W_in, b_in)    σ' (linear)
      (one node, parameters hidden)        ──►        ... F.scaled_dot_product_attention(...)
                                                      F.linear(o_bf, W_out, b_out)  σ' (linear)

Decompositions compute the same function (to rounding) and run **batch first**: torch's own
implementation works on ``[L, N, E]`` and flattens ``[L·N, E]`` for the out-projection, where
dim 0 would not be the batch; here every σ' node has the batch at dim 0, so its r is per
position and feature, as for a hand-written attention.

Each composite answers two questions: does a node hide a σ' node (a parameter-derived input
that the composite consumes in a linear op), and its decomposition. The decomposition is traced
with FX proxies (Python control flow runs on the arguments' constant values) and inlined before
the node; its nodes get ids, locations and example values like Dynamo's own.
"""

from __future__ import annotations

import math
import operator
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.fx import Graph, GraphModule, Node, Proxy
from torch.fx.node import map_arg
from torch.fx.proxy import GraphAppendingTracer

from .locate import NODE_ID, node_id


class Unsupported(Exception):
    """A composite call with options its decomposition does not cover (it stays one node)."""


# ---------------------------------------------------------------------------- decompositions

def _float_mask(mask, bool_mask: bool, dtype):
    """torch's canonical mask: True (masked) → -inf, as an additive float mask."""
    if mask is None or not bool_mask:
        return mask
    return torch.zeros_like(mask, dtype=dtype).masked_fill(mask, float("-inf"))


def multi_head_attention(query, key, value, embed_dim_to_check, num_heads, in_proj_weight, in_proj_bias,
                         bias_k, bias_v, add_zero_attn, dropout_p, out_proj_weight, out_proj_bias,
                         training=True, key_padding_mask=None, need_weights=True, attn_mask=None,
                         use_separate_proj_weight=False, q_proj_weight=None, k_proj_weight=None,
                         v_proj_weight=None, static_k=None, static_v=None, average_attn_weights=True,
                         is_causal=False, *, info):
    """``F.multi_head_attention_forward``, batch first inside; ``info`` holds what the proxies
    cannot say (which inputs are the same node, ranks, mask dtypes)."""
    if static_k is not None or static_v is not None:
        raise Unsupported("static_k/static_v")
    if is_causal and attn_mask is None:
        raise Unsupported("is_causal without attn_mask (torch raises)")
    batched = info["query_dim"] == 3
    E, H = embed_dim_to_check, num_heads
    D = E // H
    dtype = info["dtype"]
    # [L, N, E] → [N, L, E] (unbatched [L, E] → [1, L, E])
    q_in, k_in, v_in = ((x.unsqueeze(0) if not batched else x.transpose(0, 1)) for x in (query, key, value))
    if not use_separate_proj_weight:
        if info["q_is_k"] and info["k_is_v"]:          # self-attention: one packed projection
            q, k, v = F.linear(q_in, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
        elif info["k_is_v"]:                             # encoder-decoder: q, then packed k/v
            w_q, w_kv = in_proj_weight.split([E, 2 * E])
            b_q, b_kv = in_proj_bias.split([E, 2 * E]) if in_proj_bias is not None else (None, None)
            q = F.linear(q_in, w_q, b_q)
            k, v = F.linear(k_in, w_kv, b_kv).chunk(2, dim=-1)
        else:
            w_q, w_k, w_v = in_proj_weight.chunk(3)
            b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
            q, k, v = F.linear(q_in, w_q, b_q), F.linear(k_in, w_k, b_k), F.linear(v_in, w_v, b_v)
    else:
        b_q, b_k, b_v = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        q = F.linear(q_in, q_proj_weight, b_q)
        k = F.linear(k_in, k_proj_weight, b_k)
        v = F.linear(v_in, v_proj_weight, b_v)

    key_padding_mask = _float_mask(key_padding_mask, info["kpm_bool"], dtype)
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None                                 # SDPA's own causal mask
    else:
        attn_mask = _float_mask(attn_mask, info["mask_bool"], dtype)
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None:                            # [L, S] or [N·H, L, S] → broadcast to [N, H, L, S]
        attn_mask = attn_mask[None, None] if info["mask_dim"] == 2 else attn_mask.unflatten(0, (-1, H))
    if bias_k is not None and bias_v is not None:        # one more key/value position, learned
        k = torch.cat([k, bias_k.transpose(0, 1).expand(k.size(0), -1, -1)], dim=1)
        v = torch.cat([v, bias_v.transpose(0, 1).expand(v.size(0), -1, -1)], dim=1)
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    # heads: [N, L, E] → [N, H, L, D]
    q, k, v = (x.unflatten(-1, (H, D)).transpose(1, 2) for x in (q, k, v))
    if add_zero_attn:                                    # one more all-zero key/value position
        k, v = F.pad(k, (0, 0, 0, 1)), F.pad(v, (0, 0, 0, 1))
        attn_mask = F.pad(attn_mask, (0, 1)) if attn_mask is not None else None
        key_padding_mask = F.pad(key_padding_mask, (0, 1)) if key_padding_mask is not None else None
    if key_padding_mask is not None:                     # [N, S] → [N, 1, 1, S]
        kpm = key_padding_mask[:, None, None, :]
        attn_mask = kpm if attn_mask is None else attn_mask + kpm
    if not training:
        dropout_p = 0.0
    if need_weights:
        scores = torch.matmul(q * math.sqrt(1.0 / D), k.transpose(-2, -1))
        if attn_mask is not None:
            scores = scores + attn_mask
        weights = torch.softmax(scores, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.matmul(weights, v)
    else:
        weights = None
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p, is_causal)
    out = F.linear(out.transpose(1, 2).flatten(2), out_proj_weight, out_proj_bias)   # [N, L, E]
    out = out.transpose(0, 1) if batched else out.squeeze(0)
    if weights is not None:
        if average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            weights = weights.squeeze(0)
    return out, weights


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False, *, info):
    """``F.scaled_dot_product_attention`` with the mask added in a node of its own (torch's math
    reference: ``softmax(q·kᵀ·scale + mask)·v``), where the mask is parameter-derived."""
    if is_causal:
        raise Unsupported("is_causal with an attn_mask (torch raises)")
    if info["mask_bool"]:
        raise Unsupported("a boolean attn_mask (not linear in anything)")
    if enable_gqa:
        groups = info["query_heads"] // info["key_heads"]
        key, value = key.repeat_interleave(groups, dim=-3), value.repeat_interleave(groups, dim=-3)
    scale = 1.0 / math.sqrt(info["head_dim"]) if scale is None else scale
    scores = torch.matmul(query, key.transpose(-2, -1)) * scale
    scores = scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p)
    return torch.matmul(weights, value)


# ---------------------------------------------------------------------------- the table

def _example(value):
    if isinstance(value, Node):
        return value.meta.get("example_value", value.meta.get("val"))
    return value


def _mha_info(bound: dict[str, Any]) -> dict[str, Any]:
    query = _example(bound["query"])
    mask, kpm = _example(bound.get("attn_mask")), _example(bound.get("key_padding_mask"))
    return {
        "query_dim": query.dim(), "dtype": query.dtype,
        "q_is_k": bound["query"] is bound["key"], "k_is_v": bound["key"] is bound["value"],
        "mask_bool": mask is not None and mask.dtype == torch.bool, "mask_dim": mask.dim() if mask is not None else 0,
        "kpm_bool": kpm is not None and kpm.dtype == torch.bool,
    }


def _sdpa_info(bound: dict[str, Any]) -> dict[str, Any]:
    query, key, mask = (_example(bound.get(k)) for k in ("query", "key", "attn_mask"))
    head_dim = query.shape[-1]
    if not isinstance(head_dim, int):
        raise Unsupported("a symbolic head dimension")
    return {"head_dim": head_dim, "query_heads": query.shape[-3] if query.dim() >= 3 else 1,
            "key_heads": key.shape[-3] if key.dim() >= 3 else 1,
            "mask_bool": mask is not None and mask.dtype == torch.bool}


@dataclass(frozen=True)
class Composite:
    name: str
    args: tuple[str, ...]                     # the torch function's arguments, in order
    decompose: Callable[..., Any]
    info: Callable[[dict[str, Any]], dict[str, Any]]
    hiding: tuple[str, ...]                   # arguments a parameter may hide in (None: any tensor)


_MHA_ARGS = ("query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
             "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
             "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
             "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal")

COMPOSITES: dict[Any, Composite] = {
    F.multi_head_attention_forward: Composite(
        "multi_head_attention_forward", _MHA_ARGS, multi_head_attention, _mha_info,
        ("in_proj_weight", "in_proj_bias", "bias_k", "bias_v", "out_proj_weight", "out_proj_bias",
         "q_proj_weight", "k_proj_weight", "v_proj_weight")),
    F.scaled_dot_product_attention: Composite(
        "scaled_dot_product_attention",
        ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"),
        scaled_dot_product_attention, _sdpa_info, ("attn_mask",)),
}


def _bind(node: Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def hidden_params(node: Node, is_param: Callable[[Node], bool]) -> bool:
    """Whether ``node`` is a composite with a parameter-derived input where a σ' node hides."""
    composite = COMPOSITES.get(node.target) if node.op == "call_function" else None
    if composite is None:
        return False
    bound = _bind(node, composite.args)
    return any(isinstance(bound.get(a), Node) and is_param(bound[a]) for a in composite.hiding)


def expand(node: Node) -> list[Node]:
    """Replace the composite ``node`` by its decomposition (in place); return the new nodes, or
    ``[]`` when the decomposition does not cover this call (the node then stays as it is)."""
    composite = COMPOSITES[node.target]
    bound = _bind(node, composite.args)
    try:
        info = composite.info(bound)
        sub, inputs, outputs = _trace(composite, bound, info)
    except Unsupported:
        return []
    users = list(node.users)
    if isinstance(outputs, tuple):
        if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
            return []
        if any(outputs[u.args[1]] is None and u.users for u in users):
            return []
    graph = node.graph
    env: dict[Node, Any] = dict(zip(sub.find_nodes(op="placeholder"), inputs))
    new: list[Node] = []
    with graph.inserting_before(node):
        for n in sub.nodes:
            if n.op in ("placeholder", "output"):
                continue
            copy = graph.node_copy(n, lambda a: env[a])
            copy.meta = {k: node.meta[k] for k in ("stack_trace", "nn_module_stack") if k in node.meta}
            copy.meta["source_fn_stack"] = [(copy.name, copy.target)]
            copy.meta["custom"] = {**(node.meta.get("custom") or {}), NODE_ID: f"{node_id(node)}/{copy.name}"}
            env[n] = copy
            new.append(copy)
    _propagate_examples(new)
    mapped = map_arg(outputs, lambda a: env[a])
    if isinstance(mapped, tuple):
        for user in users:
            value = mapped[user.args[1]]
            if value is not None:
                user.replace_all_uses_with(value)
            graph.erase_node(user)
    else:
        node.replace_all_uses_with(mapped)
    graph.erase_node(node)
    return new


def _trace(composite: Composite, bound: dict[str, Any], info: dict[str, Any]):
    """The decomposition as an FX graph: one placeholder per node argument."""
    sub = Graph()
    tracer = GraphAppendingTracer(sub)
    inputs, args = [], {}
    for name, value in bound.items():
        if isinstance(value, Node):
            args[name] = Proxy(sub.placeholder(name), tracer)
            inputs.append(value)
        else:
            args[name] = value
    result = composite.decompose(**args, info=info)
    outputs = tuple(r.node if isinstance(r, Proxy) else r for r in result) if isinstance(result, tuple) \
        else result.node
    sub.output(outputs)
    return sub, inputs, outputs


def _propagate_examples(nodes: list[Node]) -> None:
    """Example values for the new nodes, computed on the fake values of their inputs."""
    inputs: list = []
    for n in nodes:
        map_arg((n.args, n.kwargs), lambda a: inputs.append(_example(a)) or a)
    # the mode of the graph's own example values (Dynamo hands its backend another one)
    mode = next((v.fake_mode for v in inputs if hasattr(v, "fake_mode")), None)
    with mode if mode is not None else nullcontext():
        for n in nodes:
            args, kwargs = map_arg((n.args, n.kwargs), _example)
            if n.op == "call_method":
                n.meta["example_value"] = getattr(args[0], n.target)(*args[1:], **kwargs)
            else:
                n.meta["example_value"] = n.target(*args, **kwargs)


def expand_composites(gm: GraphModule, sigmas, is_param: Callable[[Node], bool]) -> int:
    """Expand every composite σ' node (of ``gm`` or its checkpointed bodies) that hides another
    σ' node; return how many were expanded."""
    done = sum(1 for s in sigmas if hidden_params(s.node, is_param) and expand(s.node))
    if done:
        for module in gm.modules():
            if isinstance(module, GraphModule):
                module.recompile()
    return done
