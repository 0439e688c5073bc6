"""SVGD (Li & Shu): one r per σ' node, T(g) = s·g/sqrt(r + eps) on the parameter edges.

Planning: every routed σ' node gets its r (the σ' output's per-sample shape, less the dims
averaged besides the batch), created in the owner's state, and a :class:`RerouteSpec`; the
extra inputs are r (state), with the fused T and ``nonfinite="raise"`` a non-finite counter
(flag), for ``svgd_fx.accumulate`` an accumulator (acc) and the mode input (collect), and with
a GradScaler its 1/S (inv_scale). The rewrite is :func:`svgd_fx.passes.reroute.reroute`.
"""

from __future__ import annotations

import torch

from ..config import SVGDConfig
from ..errors import StateShapeError, option_spelling
from ..passes.linearity import nodes_in
from ..passes.locate import Kind, ParamInput, SigmaNode, node_id
from ..passes.reroute import RerouteSpec, reroute
from ..session import SigmaRecord
from .base import MethodPlan, PlanContext


class SVGDMethod:
    supports = frozenset({"accumulate", "grad_scaler", "distributed"})

    def __init__(self, config: SVGDConfig) -> None:
        self.config = config

    def plan(self, ctx: PlanContext) -> MethodPlan:
        config, owner, layout = self.config, ctx.owner, ctx.layout
        state, log = owner.svgd_state, owner.log
        routed, r_specs, r_values = [], [], []
        authors = config.variant == "authors"
        declared = _declared_symbols(ctx.placeholders)
        for sigma in ctx.analysis.sigmas:
            log.name(sigma)
            if authors:
                sigma.param_inputs = [_authors_input(sigma, p) for p in sigma.param_inputs]
            key = f"{sigma.name}.r" if sigma.routed else None
            record = log.records.setdefault(sigma.name, SigmaRecord(sigma, key, None))
            if not sigma.routed:
                continue
            r_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
            _specialize_unvaried(sigma, key, state, declared, ctx.call_sizes)
            r_specs.append((key, _sample_shape(sigma), r_dtype, sigma.device, f"{sigma.name!r} ({sigma.location})",
                            _reduce_dims(sigma, config)))
            r_values.append(state.get_or_create(*r_specs[-1]))
            record.r_shape = tuple(r_values[-1].shape)
            routed.append((sigma, key, state.layouts[key]))

        scaled = isinstance(owner.grad_scaler, torch.amp.GradScaler)
        # the fused T has no GradScaler 1/S: that uses the T op
        fused = config.t_impl == "fused" and not scaled and not authors
        raising = config.nonfinite == "raise"
        collecting = ctx.accumulating and bool(routed)
        for sigma, key, _ in routed:
            layout.add("state", key)
            if fused and raising:
                layout.add("flag", f"{sigma.name}.nonfinite")
            if ctx.accumulating:
                layout.add("acc", key + ".acc")
        if scaled:
            layout.add("inv_scale", "grad_scaler.inv_scale")
        if collecting:
            layout.add("collect", "collect")

        device = r_specs[0][3] if r_specs else "cpu"
        # the op reads "collect" on the host (a CPU scalar: no device sync); the fused T on the device
        collect_device = torch.device(device if fused else "cpu")
        examples = list(r_values)
        examples += [state.flag(k, sigma.device) for k, (sigma, _, _) in zip(layout.keys("flag"), routed)]
        if ctx.accumulating:
            examples += [state.acc(k, r.numel(), r.dtype, r.device) for k, r in zip(layout.keys("state"), r_values)]
        if scaled:
            examples.append(torch.ones((), device=device))
        if collecting:
            examples.append(state.collect_flag(collect_device))
        specs = [
            RerouteSpec(
                source=sigma.source, name=sigma.name, r_input=layout.index("state", key),
                routed_inputs=_routed_inputs(ctx, sigma.routed_params),
                s=config.s, rho=config.rho, eps=config.eps,
                mean_reduction=config.reduction == "mean" and not authors, reduce_dims=reduce, fused=fused,
                lagged=authors,
                raise_nonfinite=raising,
                flag_input=layout.optional_index("flag", f"{sigma.name}.nonfinite"),
                scale_input=layout.optional_index("inv_scale", "grad_scaler.inv_scale"),
                sync=bool(config.distributed),
                acc_input=layout.optional_index("acc", key + ".acc"),
                collect_input=layout.optional_index("collect", "collect"),
                identity_operands=_identity_operands(sigma, ctx.placeholders, ctx.analysis.node_kinds),
            )
            for sigma, key, reduce in routed
        ]
        acc_specs = [(key, key, None) for key in layout.keys("state")] if ctx.accumulating else []
        return MethodPlan(specs, r_specs, examples, collect_device, acc_specs=acc_specs)

    def commit(self, state, phase: str) -> None:
        if phase != "gradients":      # the gradients pass leaves r as the statistics pass made it
            state.commit_accumulated(self.config.rho, self.config.reduction == "mean")

    def rewrite(self, joint, plan: MethodPlan, param_sources, param_inputs, entry: str) -> set[str]:
        return reroute(joint, plan.specs, param_sources, param_inputs, option_spelling(entry, "exclude", "[...]"))


# the authors' code applies T to the weights of MatMul and Conv2D nodes: these arguments of these ops
_AUTHORS_WEIGHTS = {"linear": {"weight"}, "conv1d": {"weight"}, "conv2d": {"weight"}, "conv3d": {"weight"},
                    "matmul": {"input", "other"}, "mm": {"input", "mat2"}, "bmm": {"input", "mat2"},
                    "addmm": {"mat1", "mat2"}}


def _authors_input(sigma: SigmaNode, p: ParamInput) -> ParamInput:
    """``p`` under ``variant="authors"``: T only on a linear/matmul/conv node's weight."""
    if p.linear and p.arg not in _AUTHORS_WEIGHTS.get(sigma.op, ()):
        return ParamInput(p.arg, p.params, False, "variant='authors': T on linear, matmul and conv weights only "
                          "(the authors' code); plain gradient", p.nodes)
    return p


def _sample_shape(sigma: SigmaNode) -> tuple:
    if sigma.sample_shape is None:
        raise StateShapeError(f"svgd_fx: σ' node {sigma.name!r} ({sigma.location}) does not return a "
                              "tensor with a batch dimension; exclude its parameters.")
    return sigma.sample_shape


def _specialize_unvaried(sigma: SigmaNode, key: str, state, declared: set, call_sizes: dict | None = None) -> None:
    """r averages a dimension only once its size has changed (``docs/contract.md``, "Dims that vary
    between calls"), but a graph may hold a dimension symbolic that this σ' node never saw change:
    every dimension under ``torch.compile(..., dynamic=True)``; one whose size changed for another
    frame Dynamo files under the same code (the graph after a graph break in ``nn.Transformer``'s
    decoder, after its encoder's). Such a dimension is specialised to its size: a guard, and a
    recompile (with r averaged over it from then on) at the first call where it differs. A dimension
    the user marked (``torch._dynamo.mark_dynamic``: ``declared``, its symbols) is declared varying
    and stays averaged from the first call.

    A graph planned again for one call (``Plan.wrap``'s rebuild, ``call_sizes``: that call's size of
    each symbol) is compared and specialised at that call's sizes, not at the hints: those are the
    sizes of the call Dynamo compiled for (another instance's, for a graph Dynamo reuses), and the
    rebuilt graph, compiled for its call's exact shapes, has no Dynamo guard to add."""
    if sigma.sample_shape is None:
        return
    from torch.fx.experimental.symbolic_shapes import guard_int

    shape = list(sigma.sample_shape)
    for d, size in enumerate(shape, 1):
        if not isinstance(size, torch.SymInt) or size.node.expr.free_symbols & declared:
            continue
        expr = size.node.expr
        if call_sizes and expr.free_symbols <= call_sizes.keys():
            now = int(expr.xreplace(call_sizes))
            if not state.varied(key, d, now):
                shape[d - 1] = now
        elif size.node.hint is not None and not state.varied(key, d, size.node.hint):
            shape[d - 1] = guard_int(size)
    sigma.sample_shape = tuple(shape)


def _declared_symbols(placeholders) -> set:
    """The symbols of the graph inputs' dimensions the user marked dynamic (``mark_dynamic`` keeps
    them on the real tensor, which Dynamo's graph argument refers to)."""
    declared = set()
    for node in placeholders:
        arg = node.meta.get("grapharg")
        fake = node.meta.get("example_value")
        try:
            real = arg.example if arg is not None else None
        except Exception:            # (a collected weak reference: nothing to learn from it)
            real = None
        for d in getattr(real, "_dynamo_dynamic_indices", ()) if isinstance(fake, torch.Tensor) else ():
            size = fake.shape[d] if d < fake.dim() else None
            if isinstance(size, torch.SymInt):
                declared |= size.node.expr.free_symbols
    return declared


def _reduce_dims(sigma: SigmaNode, config: SVGDConfig) -> tuple[int, ...]:
    """Dims of the σ' output averaged into r's statistic besides the batch: those whose size
    varies between calls (symbolic in this graph; the state adds those it saw vary), and with
    ``r_shape="channel"`` all but the channel dim."""
    shape = _sample_shape(sigma)
    reduce = {d for d, size in enumerate(shape, 1) if not isinstance(size, int)}
    if config.r_shape == "channel" and len(shape) >= 2:
        channel = sigma.channel_dim if sigma.channel_dim >= 1 else len(shape)  # dim of the output
        if channel in reduce:
            raise StateShapeError(f"svgd_fx: σ' node {sigma.name!r} ({sigma.location}): its channel dimension "
                                  f"varies between calls ({tuple(str(d) for d in shape)}), so r cannot keep it.")
        reduce |= {d for d in range(1, len(shape) + 1) if d != channel}
    return tuple(sorted(reduce))


def _routed_inputs(ctx: PlanContext, params: set[str]) -> frozenset[int]:
    """The graph inputs that the parameter edges of a σ' node linear in ``params`` lead to: those
    parameters' own inputs, and inputs an earlier graph computed from them linearly."""
    own = {ctx.name_to_input[p] for p in params if p in ctx.name_to_input}
    return frozenset(own | {i for i, chain in ctx.derived_inputs.items() if any(chain.get(p) for p in params)})


def _identity_operands(sigma: SigmaNode, placeholders: list[torch.fx.Node], kinds: dict):
    """Where the joint graph carries the gradient of each routed operand of ``sigma`` (see
    ``RerouteSpec.identity_operands``): per operand, its chain down to the parameter, each
    step used once, as ("node", id) or ("input", index); None when one also feeds another node."""
    operands = []
    for p in sigma.param_inputs:
        for n in p.nodes if p.linear else ():
            user, path = sigma.node, []
            while True:
                uses = [a for a in nodes_in((user.args, user.kwargs)) if a is n]
                if len(n.users) != 1 or len(uses) != 1:
                    return None
                if n.op == "placeholder":
                    if n in placeholders:          # else a checkpointed body's input: stop here
                        path.append(("input", placeholders.index(n)))
                    break
                path.append(("node", node_id(n)))
                below = [a for a in n.all_input_nodes if kinds.get(a) is Kind.PARAM]
                if len(below) != 1:
                    break
                user, n = n, below[0]
            operands.append(tuple(path))
    return tuple(operands)
