"""``transform(model, s)``: capture with TorchDynamo, rewrite AOTAutograd's joint graph, run it.

Capture route (and why):

* ``torch.fx.symbolic_trace`` hides parameters inside ``call_module`` nodes and, with modules
  inlined, fails on BatchNorm's ``input.dim()`` check; it also never yields a backward graph.
* TorchDynamo gives a torch-function-level graph with every parameter a placeholder
  (``locate`` runs there: σ' nodes are torch calls as written in the model's source), and
  AOTAutograd traces the joint forward/backward graph of it (``reroute`` runs there, inside
  the partitioner hook, before the joint graph is split into forward and backward).
* By default (``codegen="inductor"``) the rewrite runs as inductor's joint-graph pass and
  inductor generates the code, as under the ``svgd`` compile backend; with ``codegen="fx"``
  the rewrite runs in AOTAutograd's partitioner hook and both halves run as FX graphs without
  a code generator (like ``aot_eager``).

Limits: what Dynamo cannot trace runs outside the graphs (a graph break). A parameter that
receives a gradient there would train on its plain gradient, so that backward raises
``CoverageError`` naming it (see :mod:`svgd_fx._guard`).
"""

from __future__ import annotations

import copy
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from . import _eager_layers
from ._guard import GradientGuard
from ._state import SVGDState
from .config import SVGDConfig
from .errors import StateShapeError, SVGDError
from .passes.composites import expand_composites
from .passes.linearity import nodes_in
from .passes.locate import Kind, SigmaNode, locate, node_id, tag_nodes
from .passes.reroute import RerouteSpec, reroute

@dataclass
class SigmaRecord:
    """What the pass found for one σ' node (merged over all graphs that contain it)."""
    sigma: SigmaNode
    key: str | None                           # state key ("fc.linear.r"), or None if not routed
    r_shape: tuple[int, ...] | None
    t_graphs: int = 0                         # number of backward graphs with a T node for it
    state_keys: tuple[str, ...] = ()          # TSO-ALRA: the layer's factor, root and step keys


@dataclass
class PassLog:
    records: dict[str, SigmaRecord] = field(default_factory=dict)
    params_seen: set[str] = field(default_factory=set)
    graphs: int = 0
    backward_graphs: list[torch.fx.GraphModule] = field(default_factory=list)
    forward_graphs: list[torch.fx.GraphModule] = field(default_factory=list)
    key_locations: dict[str, str] = field(default_factory=dict)


def refuse_sharded(model: nn.Module) -> None:
    """FSDP (1 or 2) replaces the parameters by flat or sharded ones and gathers them inside its own
    hooks, so the pass cannot see which parameter enters which σ' node: refuse it by name."""
    sharded = [name or "<root>" for name, m in model.named_modules()
               if any(c.__name__ in ("FullyShardedDataParallel", "FSDPModule") for c in type(m).__mro__)]
    if sharded:
        raise SVGDError(
            f"svgd_fx: FSDP is not supported (sharded modules: {sharded[:4]}). FSDP replaces the "
            "parameters by flat or sharded ones and gathers them inside its own hooks, so the pass "
            "cannot see which parameter enters which σ' node. Use DDP with distributed=True, or keep "
            "the model unsharded."
        )


def _check_model(model: nn.Module) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"svgd_fx.transform takes an nn.Module (or a torch.fx.GraphModule), "
                        f"got {type(model).__name__}")
    refuse_sharded(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("svgd_fx: the model has no trainable parameters (none with requires_grad=True): "
                         "there is nothing for SVGD to train.")
    bad = [f"{n} ({p.dtype})" for n, p in trainable.items() if not p.dtype.is_floating_point]
    if bad:
        raise ValueError(f"svgd_fx: SVGD needs floating-point parameters; these are not: {bad}. "
                         "Freeze them (requires_grad=False) or cast the model to a float dtype.")
    return trainable


class SVGDModule(nn.Module):
    """The model with SVGD's backward. Shares the model's parameters and buffers.

    ``state_dict()`` holds the model's own entries under their original keys (they load into
    the original model) plus ``svgd_state.<σ' name>.r`` for every r.
    """

    def __init__(self, model: nn.Module, config: SVGDConfig, exclude: set[str], grad_scaler=None,
                 codegen: str = "inductor") -> None:
        super().__init__()
        self.model = model
        self.codegen = codegen
        self.grad_scaler = grad_scaler
        self.svgd_state = SVGDState()
        self.config = config
        self.excluded = frozenset(exclude)
        self.register_state_dict_post_hook(_strip_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)
        self._start()

    def _start(self) -> None:
        """What is rebuilt rather than copied or pickled: the pass log, the gradient guard and the
        compiled graphs (hidden from nn: [plain graphs] + [graphs with accumulate's inputs],
        compiled at first use)."""
        from ._backend import _TRANSFORMED

        self.log = PassLog()
        self._first_inputs: tuple | None = None     # for the guard's message, until its first check passes
        self.guard = GradientGuard(self.model, self.excluded, self._coverage_message)
        self.guard.on_first_check.append(self._first_check_passed)
        self.guard.quiet = lambda: self.svgd_state.accumulating
        self._compiled = [torch.compile(self.model, backend=_Backend(self), dynamic=None)]
        self._layers: dict = {}     # (torch.nn layer, accumulating) -> its own graph (see _eager_layers)
        _eager_layers.install(self.model)
        self._superseded = False
        earlier = _TRANSFORMED.get(self.model)
        if earlier is not None and earlier() is not None and earlier() is not self:
            earlier()._supersede()
        _TRANSFORMED[self.model] = weakref.ref(self)

    def _supersede(self) -> None:
        """A later ``transform`` of the same model takes over (re-running a notebook cell): this
        one's gradient checks stop, and calling it raises."""
        self._superseded = True
        self.guard.disarm()

    def __getstate__(self) -> dict:
        """Pickled and deep-copied: the model, the options and the SVGD state (the copy continues
        from the same r); the log, guard and graphs are rebuilt (see ``_start``)."""
        state = dict(self.__dict__)
        for key in _REBUILT:
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._start()

    def __deepcopy__(self, memo: dict) -> "SVGDModule":
        if self.grad_scaler is not None:     # the user's scaler steps the copy too: shared, not copied
            memo.setdefault(id(self.grad_scaler), self.grad_scaler)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied
        copied.__setstate__(copy.deepcopy(self.__getstate__(), memo))
        return copied

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if self._superseded:
            raise SVGDError(
                f"svgd_fx: this transform of {type(self.model).__name__} was superseded by a later "
                "svgd_fx.transform of the same model, which holds the SVGD state now: use what that call returned.")
        try:
            # a frame Dynamo gives up on would run uncompiled, training on plain gradients: make
            # the recompile limit and suppressed errors fail loudly instead (see _DYNAMO_STRICT)
            with _STRICT_PATCH, _eager_layers.running(self._layer_graph):
                out = self._compiled_for(self.svgd_state.accumulating)(*args, **kwargs)
        except _RecompileLimit as failure:
            raise _recompile_limit_error(self.model) from failure
        except torch._dynamo.exc.BackendCompilerFailed as failure:
            inner = getattr(failure, "inner_exception", None) or failure.__cause__
            if isinstance(inner, SVGDError):  # our own message, without Dynamo's wrapping
                raise inner.with_traceback(None) from None
            raise
        if self.guard.checks == 0:
            self._first_inputs = (args, kwargs)
        return out

    def _compiled_for(self, accumulating: bool):
        """Inside ``svgd_fx.accumulate``, a second set of graphs that also take the accumulator
        inputs (compiled at the first accumulated step); outside, graphs without them, so a
        plain step pays nothing for accumulation."""
        if not accumulating:
            return self._compiled[0]
        if len(self._compiled) == 1:
            self._compiled.append(torch.compile(self.model, backend=_Backend(self, accumulating=True), dynamic=None))
        return self._compiled[1]

    def _layer_graph(self, layer: nn.Module):
        """A torch.nn layer the model's call ran outside its graphs, compiled on its own."""
        accumulating = self.svgd_state.accumulating
        return _eager_layers.graph_of(self._layers, (layer, accumulating), self.model, layer,
                                      lambda: _Backend(self, accumulating=accumulating), self.excluded)

    def _coverage_message(self, names: list[str]) -> str:
        inputs, self._first_inputs = self._first_inputs, None
        breaks = _graph_break_locations(self.model, *inputs) if inputs is not None else []
        return (
            "svgd_fx: these trainable parameters received gradients that did not come through an SVGD graph, "
            f"so they would train on plain gradients: {names}. Usually a graph break (code TorchDynamo cannot "
            "trace) put their use outside the captured graphs"
            + (f"; graph breaks seen: {breaks}" if breaks else " (TORCH_LOGS=graph_breaks shows where)")
            + ". Fix the graph break, or pass exclude=[...] with these names to train them on plain gradients "
            "knowingly.")

    def _first_check_passed(self) -> None:
        self._first_inputs = None
        self.svgd_state.check_claimed(self.log.records)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        with self.svgd_state.loading(strict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return self.config.describe() + (", codegen='fx'" if self.codegen == "fx" else "")


_REBUILT = ("log", "_first_inputs", "guard", "_compiled", "_layers", "_superseded")

_DYNAMO_STRICT = {"allow_rnn": True, "suppress_errors": False}
if hasattr(torch._dynamo.config, "fail_on_recompile_limit_hit"):
    _DYNAMO_STRICT["fail_on_recompile_limit_hit"] = True
# one patch object, entered at every forward: each new one allocates context variables that are
# never freed (~270 bytes per forward)
_STRICT_PATCH = torch._dynamo.config.patch(_DYNAMO_STRICT)
_RecompileLimit = getattr(torch._dynamo.exc, "FailOnRecompileLimitHit", ())


def _recompile_limit_error(model: nn.Module) -> SVGDError:
    limit = torch._dynamo.config.recompile_limit
    return SVGDError(
        f"svgd_fx: TorchDynamo hit its recompile limit (torch._dynamo.config.recompile_limit = {limit}) "
        f"while running {type(model).__name__}: the frame would run uncompiled and its parameters would "
        "train on plain gradients, not SVGD's. The limit counts the compiled graphs of every model of this "
        "class in the process (each transform() compiles its own): call torch._dynamo.reset() between models "
        "you are done with. Otherwise find what recompiles with TORCH_LOGS=recompiles (a Python value or an "
        "input dtype/rank that changes between calls), or raise the limit."
    )


def _graph_break_locations(model: nn.Module, args, kwargs) -> list[str]:
    """``file:line  code: reason`` for each graph break, from a side-effect-free re-trace."""
    buffers = {name: b.clone() for name, b in model.named_buffers()}
    try:
        with torch.no_grad():
            found = torch._dynamo.explain(model)(*args, **kwargs)
        places = []
        for brk in found.break_reasons:
            frame = brk.user_stack[-1] if brk.user_stack else None
            where = f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}  {(frame.line or '').strip()}: " \
                if frame else ""
            places.append(where + brk.reason.strip().splitlines()[0])
        return list(dict.fromkeys(places))[:5]
    except Exception:  # the explanation is a courtesy: never mask the coverage error itself
        return []
    finally:
        with torch.no_grad():
            for name, b in model.named_buffers():
                b.copy_(buffers[name])


def _strip_model_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "model."
    for key in list(state_dict):
        value = state_dict.pop(key)
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _add_model_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    own = (prefix + "svgd_state.", prefix + "model.")
    for key in list(state_dict):
        if key.startswith(prefix) and not key.startswith(own):
            state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


# ----------------------------------------------------------------------------- the backend

def _nop_compiler(log_list: list):
    from functorch.compile import make_boxed_func

    def compile_graph(gm: torch.fx.GraphModule, example_inputs):
        log_list.append(gm)
        return make_boxed_func(gm.forward)

    return compile_graph


class _Backend:
    """The Dynamo backend behind ``transform``: locate + state + joint-graph reroute, then
    inductor (``codegen="inductor"``, the fused T, as the compile backend does) or the rewritten
    FX graphs as they are (``codegen="fx"``: the T op, no code generation)."""

    def __init__(self, owner: SVGDModule, accumulating: bool = False) -> None:
        self.owner = owner
        self.accumulating = accumulating

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        from torch._dynamo.backends.common import aot_autograd

        if self.owner.codegen == "inductor":
            plan = build_plan(self.owner, gm, example_inputs, accumulating=self.accumulating)
            return plan.wrap(lambda g, xs: compile_inductor(g, xs, plan))
        plan = build_plan(self.owner, gm, example_inputs, accumulating=self.accumulating)
        return plan.wrap(aot_autograd(
            fw_compiler=_nop_compiler(self.owner.log.forward_graphs),
            bw_compiler=_nop_compiler(self.owner.log.backward_graphs),
            partition_fn=plan.partition,
        ))


class _JointPass:
    """Inductor's ``joint_custom_pre_pass``: the reroute on the joint graph, before partitioning."""

    def __init__(self, plan) -> None:
        self.plan = plan

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.plan.rewrite(graph.owning_module)

    def uuid(self) -> None:  # no cache key: the caches that would need one are off (see below)
        return None


def compile_inductor(gm, example_inputs, plan):
    """inductor, with the plan's rewrite as its joint-graph pass. A custom joint pass has no cache
    key, so inductor's FX-graph cache and the AOTAutograd cache are off for these graphs (only
    these): no compiled graph can come back from a cache without the rewrite."""
    from torch._functorch import config as functorch_config
    from torch._inductor.compile_fx import compile_fx

    patches = {"fx_graph_cache": False}
    if plan is not None:
        patches["joint_custom_pre_pass"] = _JointPass(plan)
    with functorch_config.patch(enable_autograd_cache=False):
        return compile_fx(gm, example_inputs, config_patches=patches)


@dataclass
class Plan:
    """Everything the joint-graph pass needs for one Dynamo graph, and how to call the result."""
    owner: Any                          # SVGDModule, or the compile backend's Binding
    gm: torch.fx.GraphModule            # Dynamo's graph + one placeholder per r
    example_inputs: list[Any]
    specs: list[RerouteSpec]
    state_keys: list[str]
    param_derived_sources: set[str]
    param_inputs: set[int]
    r_specs: list[tuple] = field(default_factory=list)   # get_or_create arguments, per state key
    params_seen: set[str] = field(default_factory=set)  # parameter names this graph uses
    flag_keys: list[str] = field(default_factory=list)  # non-finite counters (fused T, "raise")
    scaled: bool = False                                # a GradScaler's 1/S follows the accumulators
    accumulating: bool = False                          # accumulator inputs + "collect" (last)
    collect_device: Any = None                          # where the "collect" mode input lives
    method: str = "svgd"                                # "tso-alra": specs are KronSpecs
    r_shapes: list[tuple] = field(default_factory=list)  # (shape, dtype, device) of each state tensor
    sigma_names: frozenset[str] = frozenset()            # the σ' nodes of this graph (routed or not)
    t_names: set[str] = field(default_factory=set)       # those its backward got a T for (rewrite)

    def rewrite(self, joint: torch.fx.GraphModule) -> None:
        """The reroute pass on AOTAutograd's joint graph (in place), logged per σ'."""
        hint = option_spelling(self.owner, "exclude", "[...]")
        if self.method == "tso-alra":
            from .passes.kronecker import precondition

            changed = precondition(joint, self.specs, self.param_derived_sources, self.param_inputs, hint)
        else:
            changed = reroute(joint, self.specs, self.param_derived_sources, self.param_inputs, hint)
        for spec in self.specs:
            if spec.name in changed:
                self.owner.log.records[spec.name].t_graphs += 1
                self.t_names.add(spec.name)

    def partition(self, joint, joint_inputs, **kwargs):
        from torch._functorch.partitioners import default_partition

        self.rewrite(joint)
        return default_partition(joint, joint_inputs, **kwargs)

    def wrap(self, aot_backend, owner_of_call: Callable | None = None) -> Callable:
        """Compile, and feed the current r tensors at every call.

        ``owner_of_call(args)`` picks whose state to use per call: a compiled graph is shared by
        every model whose code and guards match (Dynamo's cache), so the compile backend looks
        the owner up from the parameters actually passed. ``transform`` owns its graphs alone.
        """
        compiled = aot_backend(self.gm, self.example_inputs)
        keys, r_specs, flag_keys, scaled = self.state_keys, self.r_specs, self.flag_keys, self.scaled
        compiled_for = list(self.r_shapes)
        checked = [None]     # the state's version the tensors were last fitted at
        device, collect_device, accumulating = (r_specs[0][3] if r_specs else None), self.collect_device, \
            self.accumulating

        autocast_device = torch.device(device).type if device is not None else None

        param_idx = sorted(self.param_inputs)
        plan_key = object()

        def state_tensors(owner) -> list[torch.Tensor]:
            state = owner.svgd_state
            if owner.grad_scaler is None and autocast_device is not None and torch.is_grad_enabled() \
                    and torch.is_autocast_enabled(autocast_device) \
                    and torch.get_autocast_dtype(autocast_device) == torch.float16:
                raise _fp16_without_scaler(owner)
            if state.accumulating and not accumulating:
                raise _without_accumulation(owner)
            try:
                rs = [state.tensors[k] for k in keys]
            except KeyError:  # a model first seen through a graph compiled for another one
                rs = [state.get_or_create(*spec) for spec in r_specs]
            if state.version != checked[0]:
                rs = state.fit(keys, rs, compiled_for)
                checked[0] = state.version
            tensors = [_own_version(r) for r in rs]
            if flag_keys:
                flags = [state.flag(k, device) for k in flag_keys]
                _raise_if_flagged(state, flag_keys, flags)
                tensors += flags
            if accumulating:
                tensors += [_own_version(state.acc(k, r.numel(), r.dtype, r.device)) for k, r in zip(keys, rs)]
            if scaled:
                tensors.append(_scaler_step_boundary(owner, device))
            if accumulating and keys:
                tensors.append(state.collect_flag(collect_device))
            return tensors

        def watched(owner, args, outputs):
            if torch.is_grad_enabled():     # a backward through this graph covers its parameters
                owner.guard.watch(plan_key, lambda: frozenset(id(args[i]) for i in param_idx), outputs)
            return outputs

        if owner_of_call is None:
            owner = self.owner

            def run(*args):
                return watched(owner, args, compiled(*args, *state_tensors(owner)))
        else:
            def run(*args):
                owner = owner_of_call(args)
                return watched(owner, args, compiled(*args, *state_tensors(owner)))

        return run


def option_spelling(owner, name: str, value: str) -> str:
    """How the user passes option ``name`` on the entry point ``owner`` belongs to."""
    if isinstance(owner, SVGDModule):
        return f"svgd_fx.transform(model, ..., {name}={value})"
    return f"torch.compile(model, backend='svgd', options={{..., {name!r}: {value}}})"


def _fp16_without_scaler(owner) -> SVGDError:
    return SVGDError(
        "svgd_fx: a forward under fp16 autocast with grad enabled, and no grad_scaler given. With "
        "torch.amp.GradScaler the loss is S times larger, so r would be built from S·g and the virtual gradients "
        f"would come out S times too small. Pass the scaler ({option_spelling(owner, 'grad_scaler', 'scaler')}), "
        f"or {option_spelling(owner, 'grad_scaler', 'False')} if this fp16 training uses no scaler.")


def _without_accumulation(owner) -> SVGDError:
    return SVGDError(
        "svgd_fx.accumulate: this model was compiled without accumulation, so its graphs have no "
        "accumulator inputs (a plain step would pay for them). Compile it with "
        "torch.compile(model, backend='svgd', options={..., 'accumulation': True}) or "
        "svgd_fx.backend(..., accumulation=True) to use svgd_fx.accumulate.")


def _own_version(r: torch.Tensor) -> torch.Tensor:
    """r as this call's graph sees it: the same storage, its own autograd version counter.

    Autograd saves r for the backward, where T updates it in place (bumping the version of the
    tensor it was given). With one alias per call, two forwards before one backward (a model
    called twice, e.g. a siamese loss) each find their saved r unchanged, and update r in turn.
    """
    return r.data    # shares r's storage; a fresh version counter (0.2 µs, against 2 µs for set_())


def _scaler_step_boundary(owner, device) -> torch.Tensor:
    """With a GradScaler: 1/S for T's statistic, and r rolled back after a skipped step.

    Called at every forward. GradScaler lowers its scale exactly when it found inf/NaN and
    skipped ``optimizer.step()`` (its backoff factor is < 1), so a scale below the one of the
    previous forward means that step's r update must be discarded: r goes back to its copy
    from the start of that step. (Call ``scaler.update()`` once per step, as torch documents.)
    """
    scaler, state = owner.grad_scaler, owner.svgd_state
    if scaler._scale is None:
        scaler._lazy_init_scale_growth_tracker(torch.device(device))
    now = float(scaler._scale.item())
    if state.scale_used is not None and now < state.scale_used and state.prev:
        with torch.no_grad():
            for key, r in state.tensors.items():
                if key in state.prev:
                    r.copy_(state.prev[key])
    state.scale_used = now
    if torch.is_grad_enabled():
        with torch.no_grad():
            for key, r in state.tensors.items():
                kept = state.prev.get(key)
                if kept is None or kept.shape != r.shape or kept.dtype != r.dtype or kept.device != r.device:
                    state.prev[key] = r.clone()
                else:
                    kept.copy_(r)
    return torch.reciprocal(scaler._scale.to(device)).reshape(())


def _raise_if_flagged(state, flag_keys: list[str], flags: list[torch.Tensor]) -> None:
    """The fused T cannot raise inside inductor's kernels: it counts, and the next call raises."""
    if flags[0].device.type == "cpu":
        if not any(f.item() for f in flags):   # a few µs per flag
            return
    elif not bool(torch.stack(flags).any()):   # one device sync per forward, not one per flag
        return
    from .kernels.t_op import _nonfinite

    names = [k.rsplit(".", 1)[0] for k, f in zip(flag_keys, flags) if bool(f)]
    for f in flags:
        f.zero_()
    raise _nonfinite(", ".join(names), deferred=True)


def build_plan(owner: Any, gm: torch.fx.GraphModule, example_inputs: list[Any], accumulating: bool = False) -> Plan:
    """Locate the σ' nodes of Dynamo's graph, create their state, and plan the joint-graph pass.

    The graph gains inputs, in this order: one r per routed σ'; with the fused T and
    ``nonfinite="raise"``, one non-finite counter per σ'; when ``accumulating``, one
    accumulator per σ'; with a GradScaler, 1/S; when ``accumulating``, the 0-dim "collect".
    """
    model, config, log = owner.model, owner.config, owner.log
    owner.guard.arm(model)
    if config.distributed is None and _world_size() > 1:
        raise SVGDError(
            f"svgd_fx: torch.distributed runs {_world_size()} processes, and distributed was not given. With DDP each "
            "rank sees part of the batch: pass " + option_spelling(owner, "distributed", "True") + " so that r is "
            "built from the joined batch (what one process would build), or distributed=False to keep each rank's r "
            "from its own samples knowingly.")
    gm = _own_copy(gm)
    params = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    consts = {id(t) for t in model.buffers()} | {id(p) for p in model.parameters() if not p.requires_grad}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    param_nodes, const_nodes, param_inputs = {}, [], set()
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.Tensor) and id(value) in params:
            param_nodes[node] = params[id(value)]
            param_inputs.add(i)
        elif isinstance(value, torch.Tensor) and id(value) in consts:
            const_nodes.append(node)

    analysis = locate(gm, param_nodes, const_nodes, set(owner.excluded))
    if expand_composites(gm, analysis.sigmas, lambda n: analysis.node_kinds.get(n) is Kind.PARAM):
        analysis = locate(gm, param_nodes, const_nodes, set(owner.excluded))   # σ' nodes they hid
    log.graphs += 1
    log.params_seen |= analysis.params_seen
    name_to_input = {param_nodes[n]: i for i, n in enumerate(placeholders) if n in param_nodes}
    if config.method == "tso-alra":
        return _tso_plan(owner, gm, example_inputs, analysis, param_nodes, name_to_input, param_inputs)

    routed, keys, r_values, r_specs = [], [], [], []
    for sigma in analysis.sigmas:
        _disambiguate(log, sigma)
        key = f"{sigma.name}.r" if sigma.routed else None
        record = log.records.setdefault(sigma.name, SigmaRecord(sigma, key, None))
        if not sigma.routed:
            continue
        r_dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
        r_specs.append((key, _sample_shape(sigma), r_dtype, sigma.device, f"{sigma.name!r} ({sigma.location})",
                        _reduce_dims(sigma, config)))
        r_values.append(owner.svgd_state.get_or_create(*r_specs[-1]))
        reduce = owner.svgd_state.layouts[key]
        record.r_shape = tuple(r_values[-1].shape)
        routed.append((sigma, reduce))
        keys.append(key)

    raising = config.nonfinite == "raise"
    scaled = isinstance(getattr(owner, "grad_scaler", None), torch.amp.GradScaler)
    # the fused T has no GradScaler 1/S and no all-reduce: those use the T op
    inline_t = config.t_impl == "fused" and not scaled and not config.distributed
    flag_keys = [f"{sigma.name}.nonfinite" for sigma, _ in routed] if inline_t and raising else []
    flags = [owner.svgd_state.flag(k, sigma.device) for k, (sigma, _) in zip(flag_keys, routed)]
    accs = [owner.svgd_state.acc(k, r.numel(), r.dtype, r.device) for k, r in zip(keys, r_values)] \
        if accumulating else []
    # the op reads "collect" on the host (a CPU scalar: no device sync); the fused T on the device
    collect_device = torch.device(r_specs[0][3] if r_specs and inline_t else "cpu")
    first_acc = len(placeholders) + len(keys) + len(flag_keys)
    after_accs = first_acc + len(accs)
    specs = [
        RerouteSpec(
            source=sigma.source, name=sigma.name, r_input=len(placeholders) + i,
            routed_inputs=frozenset(name_to_input[p] for p in sigma.routed_params),
            s=config.s, rho=config.rho, eps=config.eps,
            mean_reduction=config.reduction == "mean", reduce_dims=reduce, inline=inline_t,
            raise_nonfinite=raising,
            flag_input=len(placeholders) + len(keys) + i if flag_keys else None,
            scale_input=after_accs if scaled else None,
            sync=bool(config.distributed),
            acc_input=first_acc + i if accumulating else None,
            collect_input=after_accs + int(scaled) if accumulating else None,
            identity_operands=_identity_operands(sigma, placeholders, analysis.node_kinds),
        )
        for i, (sigma, reduce) in enumerate(routed)
    ]
    collecting = accumulating and bool(keys)
    acc_names = [k + ".acc" for k in keys] if accumulating else []
    names = keys + flag_keys + acc_names + (["grad_scaler.inv_scale"] if scaled else []) + \
        (["collect"] if collecting else [])
    new_gm = _with_state_inputs(gm, names)
    scale = [torch.ones((), device=r_specs[0][3] if r_specs else "cpu")] if scaled else []
    collect = [owner.svgd_state.collect_flag(collect_device)] if collecting else []
    return Plan(owner, new_gm, _with_state_examples(example_inputs, r_values + flags + accs + scale + collect),
                specs, keys, _param_sources(analysis), param_inputs, r_specs, analysis.params_seen, flag_keys,
                scaled, accumulating, collect_device, r_shapes=[_signature(r) for r in r_values],
                sigma_names=frozenset(sigma.name for sigma in analysis.sigmas))


def _tso_plan(owner, gm, example_inputs, analysis, param_nodes, name_to_input, param_inputs) -> Plan:
    from ._tso import plan_layers

    for sigma in analysis.sigmas:
        _disambiguate(owner.log, sigma)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    specs, r_specs = plan_layers(owner, analysis, param_nodes, name_to_input, len(placeholders))
    keys = [spec[0] for spec in r_specs]
    values = [owner.svgd_state.get_or_create(*spec) for spec in r_specs]
    return Plan(owner, _with_state_inputs(gm, keys), _with_state_examples(example_inputs, values), specs, keys,
                _param_sources(analysis), param_inputs, r_specs, analysis.params_seen, method="tso-alra",
                r_shapes=[_signature(v) for v in values], sigma_names=frozenset(s.name for s in analysis.sigmas))


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _signature(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


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


def _with_state_examples(example_inputs: list[Any], state: list[torch.Tensor]) -> list[Any]:
    """Dynamo's example inputs + the state tensors, fake (static shapes) where Dynamo's are."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    return list(example_inputs) + [fake_mode.from_tensor(t, static_shapes=True) if fake_mode else t for t in state]


def _param_sources(analysis) -> set[str]:
    """Source names of the parameter-derived torch-level nodes (a parameter edge may pass them)."""
    return {src for src, kind in analysis.kinds.items() if kind is Kind.PARAM}


def _disambiguate(log: PassLog, sigma: SigmaNode) -> None:
    """Keep one name per σ' across graphs: the same name from another source line gets a suffix."""
    where = sigma.location.split("  ", 1)[0]
    known = log.key_locations.setdefault(sigma.name, where)
    if known != where:
        sigma.name = f"{sigma.name}@{where}"
        log.key_locations.setdefault(sigma.name, where)


def _sample_shape(sigma: SigmaNode) -> tuple:
    if sigma.sample_shape is None:
        raise StateShapeError(f"svgd_fx: σ' node {sigma.name!r} ({sigma.location}) does not return a "
                              "tensor with a batch dimension; exclude its parameters.")
    return sigma.sample_shape


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


def _own_copy(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A copy of Dynamo's graph (its own module stays untouched) whose nodes carry ids."""
    own = torch.fx.GraphModule(gm, copy.deepcopy(gm.graph))
    tag_nodes(own)
    return own


def _with_state_inputs(gm: torch.fx.GraphModule, keys: list[str]) -> torch.fx.GraphModule:
    """``gm`` (our copy) with one placeholder per state tensor after its own placeholders."""
    last = list(gm.graph.find_nodes(op="placeholder"))[-1]
    with gm.graph.inserting_after(last):
        for key in reversed(keys):
            ph = gm.graph.placeholder(re.sub(r"\W", "_", f"svgd_{key}"))
            ph._dynamo_source = None
    gm.recompile()
    return gm
