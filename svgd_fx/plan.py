"""One Dynamo graph, planned: σ' nodes located, their state created, the rewrite specified.

Both entry points call :func:`build_plan` from their Dynamo backend and compile
:meth:`Plan.wrap`'s result; the plan's :meth:`Plan.rewrite` is the joint-graph pass (inductor's
``joint_custom_pre_pass``, or AOTAutograd's partitioner hook with ``codegen="fx"``). The steps:

1. placeholders: which of Dynamo's inputs are trainable parameters (by name) or constants;
2. :func:`~svgd_fx.passes.locate.locate` (and the composites it expands) finds the σ' nodes;
3. the method (:mod:`svgd_fx.methods`) names them in the pass log, creates their state, lays out
   the graph's extra inputs (:class:`~svgd_fx.runtime.StateLayout`) and writes the rewrite's specs;
4. the graph gets one placeholder per extra input, fed at every call (:func:`~svgd_fx.runtime.feeder`).

The ``owner`` is the model's :class:`~svgd_fx.session.Session` (state, pass log, config, excluded
parameters, GradScaler, gradient guard), the same type under both entry points; its ``entry``
("transform" / "backend") says how the user spells an option in messages.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist

from ._torch_internals import default_partition, functorch_config
from .errors import StaleLayoutError, SVGDError, option_spelling
from .guard import _backward_node
from .methods import Method, MethodPlan, PlanContext, method_for
from .passes.composites import expand_composites
from .passes.locate import Kind, locate, tag_nodes
from .runtime import Feed, StateLayout, feeder
from .session import Session
from .sharding import refuse_pipelining


# A tensor a graph returns that it computed from parameters alone (Kind.PARAM: a position-bias table,
# a normalised weight) carries its {param: linear} in this attribute. A graph after a graph break that
# takes it as an input (TorchDynamo passes the value on) treats it as parameter-derived, as it would
# have had the two graphs been one: a σ' node that combines it with the batch gets T on the gradient it
# sends back to that input, and the earlier graph's backward carries that on to the parameters.
DERIVED = "_svgd_fx_derived"


_NAMING = threading.local()     # .suffix: appended to the σ' names of the graphs planned meanwhile


@contextlib.contextmanager
def named_call(suffix: str) -> Iterator[None]:
    """Graphs planned inside this block name their σ' nodes ``<name><suffix>`` (torch.nn layers that
    run outside the model's graphs: :mod:`svgd_fx.capture.eager_layers`). Blocks nest: suffixes add."""
    before = getattr(_NAMING, "suffix", "")
    _NAMING.suffix = before + suffix
    try:
        yield
    finally:
        _NAMING.suffix = before


def derived_chain(value: Any) -> dict[str, bool] | None:
    """The ``{param: linear}`` a graph marked ``value`` with (see ``DERIVED``), or None."""
    return getattr(value, DERIVED, None) if isinstance(value, torch.Tensor) else None


@dataclass
class Plan:
    """Everything the joint-graph pass needs for one Dynamo graph, and how to call the result."""
    owner: Session
    method: Method
    gm: torch.fx.GraphModule            # Dynamo's graph + one placeholder per extra input
    example_inputs: list[Any]
    planned: MethodPlan
    feed: Feed
    param_derived_sources: set[str]
    param_inputs: set[int]
    params_seen: set[str] = field(default_factory=set)  # parameter names this graph uses
    sigma_names: frozenset[str] = frozenset()            # the σ' nodes of this graph (routed or not)
    t_names: set[str] = field(default_factory=set)       # those its backward got a T for (rewrite)
    param_names: tuple[str, ...] = ()                    # the parameter inputs' names, in input order
    # inputs an earlier graph computed from parameters alone: index -> {param: linear} (see DERIVED)
    derived_inputs: dict[int, dict[str, bool]] = field(default_factory=dict)
    # this graph's outputs of that kind: index -> {param: linear}, marked on the tensors it returns
    derived_outputs: dict[int, dict[str, bool]] = field(default_factory=dict)
    variant: str | None = None                           # compiling one of the method's variants (wrap)

    def rewrite(self, joint: torch.fx.GraphModule) -> None:
        """The method's pass on AOTAutograd's joint graph (in place), logged per σ'."""
        args = (joint, self.planned, self.param_derived_sources, self.param_inputs | set(self.derived_inputs),
                self.owner.entry)
        if self.variant is not None:
            self.method.rewrite(*args, variant=self.variant)
            return
        changed = self.method.rewrite(*args)
        for spec in self.planned.specs:
            if spec.name in changed:
                self.owner.log.records[spec.name].t_graphs += 1
                self.t_names.add(spec.name)

    def partition(self, joint, joint_inputs, **kwargs):
        self.rewrite(joint)
        return default_partition(joint, joint_inputs, **kwargs)

    def wrap(self, aot_backend, rebuild: Callable[[list], Callable], owner_of_call: Callable | None = None,
             plain_backend: Callable[[], Callable] | None = None) -> Callable:
        """Compile, and feed the current state tensors at every call.

        ``owner_of_call(args)`` picks whose state to use per call: a compiled graph is shared by
        every model whose code and guards match (Dynamo's cache), so the compile backend looks
        the owner up from the parameters actually passed. ``transform`` owns its graphs alone.
        ``plain_backend()`` compiles Dynamo's graph without the rewrite: a method whose T nodes can
        all be off for the owner's state (TSO-ALRA after the switch to SGD) runs that graph then, and
        costs what a plain step costs. It is compiled here, with the other: Dynamo's context (the
        symbolic sizes of a dynamic graph) is gone by the first call after a switch.
        A method's ``variants`` (TSO-ALRA's graphs for the steps that do less) are compiled here too,
        with the method's rewrite for each, and run for the calls whose state they are chosen for.

        ``rebuild(args)`` plans and compiles Dynamo's graph again for the inputs of one call. A call
        that finds r averaged over a dimension this graph kept (``StaleLayoutError``: the dimension
        started to vary in another graph, and TorchDynamo came back to this one, whose guards still
        pass) runs such a graph instead, planned for the current r and compiled for that call's
        shapes (one per input signature, kept).
        """
        compiled = aot_backend(self.gm, self.example_inputs)
        variants = getattr(self.method, "variants", None)
        variants = variants(self.planned) if variants is not None else None
        by_name = {}
        for name in variants.names if variants is not None else ():
            self.variant = name
            try:     # backward too, now: not at the first step that runs it (one in t_stat, maybe)
                with functorch_config.patch(force_non_lazy_backward_lowering=True):
                    by_name[name] = aot_backend(self.gm, self.example_inputs)
            finally:
                self.variant = None
        state_tensors = feeder(self.feed)
        param_idx = sorted(self.param_inputs)
        plain_inputs = [i for i in range(self.feed.layout.first)      # Dynamo's own inputs, but those
                        if i not in self.derived_inputs and i not in self.param_inputs]
        planned_ids = [None]          # the parameters this graph was planned for (their ids, at the first call)
        plan_key = object()
        off_check = getattr(self.method, "off_check", None)
        off = off_check(self.planned) if off_check and plain_backend is not None and self.planned.specs else None
        plain = plain_backend() if off is not None else None
        others = {}                   # ids of other parameters -> (plan key, feeder) for them
        rebuilt = {}                  # input signature -> graph planned for the current r (see rebuild)

        def run(owner, args):
            try:
                return mark_derived(run_planned(owner, args))
            except StaleLayoutError:
                pass
            signature = tuple((tuple(a.shape), a.dtype, a.device, tuple(sorted((derived_chain(a) or {}).items())))
                              if isinstance(a, torch.Tensor) else a for a in args)
            if signature not in rebuilt:
                rebuilt[signature] = rebuild(list(args))
            return rebuilt[signature](*args)

        def mark_derived(outputs):
            for i, chain in self.derived_outputs.items():
                setattr(outputs[i], DERIVED, chain)
            return outputs

        def run_planned(owner, args):
            if any(derived_chain(args[i]) != chain for i, chain in self.derived_inputs.items()) \
                    or any(derived_chain(args[i]) is not None for i in plain_inputs):
                raise StaleLayoutError("an input's parameter-derived mark differs from the planned one")
            ids = tuple(id(args[i]) for i in param_idx)
            if planned_ids[0] is None:
                planned_ids[0] = ids
            if ids == planned_ids[0]:
                key, feed = plan_key, state_tensors
                state = owner.svgd_state
                if off is not None and off(state):
                    outputs = plain(*args)
                else:
                    extra = feed(owner)      # (first: it rolls the state back after a step the scaler skipped)
                    name = variants.choose(state) if variants is not None else None
                    outputs = compiled(*args, *extra) if name is None else by_name[name](*args, *extra)
                    if variants is not None and torch.is_grad_enabled() \
                            and (node := _backward_node(outputs)) is not None:
                        variants.ran(state, name, node)
            else:                     # Dynamo reuses this graph for another module of the same class
                if ids not in others:
                    others[ids] = (object(), self._feeder_for(owner, [args[i] for i in param_idx]))
                key, feed = others[ids]
                outputs = compiled(*args, *feed(owner))
            if torch.is_grad_enabled():     # a backward through this graph covers its parameters
                owner.guard.watch(key, lambda: frozenset(id(args[i]) for i in param_idx), outputs)
            return outputs

        if owner_of_call is None:
            return lambda *args: run(self.owner, args)
        return lambda *args: run(owner_of_call(args), args)


    def _feeder_for(self, owner: Session, params: list) -> Callable:
        """The extra inputs of this graph for other parameters than it was planned for: TorchDynamo
        compiles a module class's forward once and reuses the graph for every instance whose
        guards pass (identical blocks, each compiled as a frame of its own after a graph break:
        FSDP2's hooks make one per block). The σ' names, and so the state keys, are the planned
        ones with the parameters' common module prefix replaced (``blocks.0.`` → ``blocks.3.``), in the
        qualifier of a σ' node named after a value an earlier graph computed from parameters too
        (``pos.add@blocks.0.fc`` → ``pos.add@blocks.3.fc``, see :func:`build_plan`)."""
        names = {id(p): n for n, p in owner.model.named_parameters()}
        new = [names.get(id(p)) for p in params]

        def unnamed(why: str) -> SVGDError:
            return SVGDError(
                f"svgd_fx: a graph planned for the parameters {list(self.param_names)[:4]} was called with "
                f"{new[:4]}, {why}, so the σ' nodes have no names for their state. Please report this model; "
                "exclude these parameters meanwhile (" + option_spelling(owner.entry, "exclude", "[...]") + ").")

        rename = _prefix_map(self.param_names, new)
        if rename is None:
            raise unnamed("which do not differ from them by one module prefix")
        old, fresh = rename
        sigmas = sorted(self.sigma_names, key=len, reverse=True)

        def moved(key: str) -> str:
            """A key of one of this graph's σ' nodes (its name, or its name and a part), renamed."""
            for name in sigmas:
                if key == name or key.startswith(name + "."):
                    if name.startswith(old):
                        return fresh + key[len(old):]
                    # named after a value an earlier graph computed, qualified by this graph's module
                    parts = name.split("@")
                    at = [i for i, part in enumerate(parts) if i and (part + ".").startswith(old)]
                    if not at:
                        raise unnamed(f"and its σ' node {name!r} is not named after them")
                    parts[at[0]] = (fresh + (parts[at[0]] + ".")[len(old):]).rstrip(".")
                    return "@".join(parts) + key[len(name):]
            return key                       # the model's own keys (a GradScaler's, TSO-ALRA's switch)

        layout = StateLayout(self.feed.layout.first)
        for kind, keys in self.feed.layout.entries.items():
            for key in keys:
                layout.add(kind, moved(key))
        specs = [(moved(spec[0]), *spec[1:]) for spec in self.feed.state_specs]
        acc_specs = [(moved(k), moved(like), numel) for k, like, numel in self.feed.acc_specs]
        feed = dataclasses.replace(self.feed, layout=layout, state_specs=specs, acc_specs=acc_specs)
        for name in self.sigma_names:        # their rows in explain(), as the planned ones'
            record = owner.log.records.get(name)
            if record is None or (record.key is None and not name.startswith(old)) \
                    or moved(name) in owner.log.records:
                continue
            sigma = copy.copy(record.sigma)
            sigma.name = moved(name)
            owner.log.records[sigma.name] = dataclasses.replace(
                record, sigma=sigma, key=moved(record.key) if record.key else None,
                state_keys=tuple(moved(k) for k in record.state_keys))
        owner.log.params_seen |= {n for n in new if n is not None}
        return feeder(feed)


def _prefix_map(old: tuple[str, ...], new: list) -> tuple[str, str] | None:
    """(old prefix, new prefix) with ``new[i] == new prefix + old[i][len(old prefix):]`` for all i, or None."""
    if not old or len(old) != len(new) or any(n is None for n in new):
        return None
    o, n = old[0].split("."), new[0].split(".")
    k = 0                                  # common trailing components of the first pair
    while k < min(len(o), len(n)) and o[-1 - k] == n[-1 - k]:
        k += 1
    if k == 0:
        return None
    po, pn = (".".join(parts[:len(parts) - k]) + "." if len(parts) > k else "" for parts in (o, n))
    if all(a.startswith(po) and b == pn + a[len(po):] for a, b in zip(old, new)):
        return po, pn
    return None


def build_plan(owner: Session, gm: torch.fx.GraphModule, example_inputs: list[Any], accumulating: bool = False) -> Plan:
    """Locate the σ' nodes of Dynamo's graph, let the owner's method plan them, add the extra inputs."""
    model, config, log = owner.model, owner.config, owner.log
    owner.guard.arm(model)
    if config.distributed is None and _world_size() > 1:
        raise SVGDError(
            f"svgd_fx: torch.distributed runs {_world_size()} processes, and distributed was not given. With DDP or FSDP2 each "
            "rank sees part of the batch: pass " + option_spelling(owner.entry, "distributed", "True") + " so that r "
            "is built from the joined batch (what one process would build), or distributed=False to keep each rank's "
            "r from its own samples knowingly.")
    refuse_pipelining()
    gm = _own_copy(gm)
    params = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    consts = {id(t) for t in model.buffers()} | {id(p) for p in model.parameters() if not p.requires_grad}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    param_nodes, const_nodes, param_inputs, derived = {}, [], set(), {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and id(value) in params:
            param_nodes[node] = params[id(value)]
            param_inputs.add(i)
        elif isinstance(value, torch.Tensor) and id(value) in consts:
            const_nodes.append(node)
        elif (chain := derived_chain(value)) is not None:
            derived[node] = chain

    analysis = locate(gm, param_nodes, const_nodes, set(owner.excluded), derived)
    if expand_composites(gm, analysis.sigmas, lambda n: analysis.node_kinds.get(n) is Kind.PARAM):
        analysis = locate(gm, param_nodes, const_nodes, set(owner.excluded), derived)   # σ' nodes they hid
    own = _module_path(param_nodes.values())
    for sigma in analysis.sigmas:
        if own and derived and not (sigma.routed_params | sigma.plain_params) & set(param_nodes.values()):
            # named after a value from an earlier graph (one position-bias table for every block):
            # qualified by this graph's own module, as the blocks' graphs are otherwise one σ' node
            sigma.name += f"@{own}"
        sigma.name += getattr(_NAMING, "suffix", "")
    log.graphs += 1
    log.params_seen |= analysis.params_seen
    name_to_input = {param_nodes[n]: i for i, n in enumerate(placeholders) if n in param_nodes}
    derived_inputs = {i: derived[n] for i, n in enumerate(placeholders) if n in derived}

    method = method_for(config)
    layout = StateLayout(first=len(placeholders))
    planned = method.plan(PlanContext(owner, analysis, param_nodes, name_to_input, placeholders, layout,
                                      accumulating, derived_inputs, _call_sizes(placeholders, example_inputs)))
    state = planned.examples[:len(layout.keys("state"))]
    feed = Feed(layout, planned.state_specs, [(tuple(t.shape), t.dtype, t.device) for t in state],
                device=planned.state_specs[0][3] if planned.state_specs else None,
                collect_device=planned.collect_device, accumulating=accumulating, acc_specs=planned.acc_specs,
                raise_flags=planned.flags_raised_at_next_call)
    return Plan(owner, method, _with_state_inputs(gm, layout), _with_state_examples(example_inputs, planned.examples),
                planned, feed, _param_sources(analysis), param_inputs, analysis.params_seen,
                sigma_names=frozenset(sigma.name for sigma in analysis.sigmas),
                param_names=tuple(param_nodes[placeholders[i]] for i in sorted(param_inputs)),
                derived_inputs=derived_inputs,
                derived_outputs={i: chain for i, chain in enumerate(analysis.output_chains) if chain is not None})


def _call_sizes(placeholders, example_inputs) -> dict:
    """For a rebuild (real inputs of one call, not Dynamo's fakes): each symbol of Dynamo's graph
    that is an input's dimension -> that call's size. The symbols' hints are the sizes of the call
    Dynamo compiled for, which may be another instance's (the ``others`` path of ``Plan.wrap``)."""
    if torch._guards.detect_fake_mode(example_inputs) is not None:
        return {}
    sizes = {}
    for node, real in zip(placeholders, example_inputs):
        fake = node.meta.get("example_value")
        if isinstance(fake, torch.Tensor) and isinstance(real, torch.Tensor) and fake.dim() == real.dim():
            pairs = zip(fake.shape, real.shape)
        else:                                          # a size passed as an input (x.size(1) under dynamic shapes)
            pairs = [(fake, real)] if isinstance(fake, torch.SymInt) and isinstance(real, int) else []
        for size, now in pairs:
            if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                sizes[size.node.expr] = int(now)
    return sizes


def _module_path(params) -> str:
    """The longest module path that holds every parameter named in ``params`` ("" if none)."""
    paths = [name.split(".")[:-1] for name in params]
    return ".".join(os.path.commonprefix(paths)) if paths else ""


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _with_state_examples(example_inputs: list[Any], state: list[torch.Tensor]) -> list[Any]:
    """Dynamo's example inputs + the state tensors, fake (static shapes) where Dynamo's are."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    return list(example_inputs) + [fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t for t in state]


def _param_sources(analysis) -> set[str]:
    """Source names of the parameter-derived torch-level nodes (a parameter edge may pass them)."""
    return {src for src, kind in analysis.kinds.items() if kind is Kind.PARAM}


def _own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph (its own module stays untouched) whose nodes carry ids."""
    own = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    tag_nodes(own)
    return own


def _with_state_inputs(gm: torch.fx.GraphModule, layout: StateLayout) -> torch.fx.GraphModule:
    """``gm`` (our copy) with one placeholder per extra input after its own placeholders."""
    own = list(gm.graph.find_nodes(op="placeholder"))
    names = layout.placeholder_names()
    if own:              # each inserted right after the last of its own: in reverse, they end up in order
        where, names = gm.graph.inserting_after(own[-1]), list(reversed(names))
    else:                # a graph without inputs (a tensor made from constants before a graph break)
        where = gm.graph.inserting_before(next(iter(gm.graph.nodes)))
    with where:
        for name in names:
            ph = gm.graph.placeholder(name)
            ph._dynamo_source = None
    gm.recompile()
    return gm

