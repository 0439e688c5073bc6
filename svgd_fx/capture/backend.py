"""``torch.compile(model, backend="svgd")``: the same pass, then inductor.

The backend runs the Core pass (``locate`` on Dynamo's graph, ``reroute`` on AOTAutograd's
joint graph) as inductor's ``joint_custom_pre_pass``, so T is in the graph inductor lowers
and fuses. Three things differ from :func:`svgd_fx.transform`:

* **Where r lives.** A backend sees graphs, not the model. The first graph it compiles for
  a model finds the ``nn.Module`` that owns the graph's parameters (the module Dynamo is
  compiling) and binds one :class:`Binding` to it: the SVGD state, the pass log, the
  config. Later graphs of the same model (after a graph break, or a recompile) find that
  binding through their parameters. The model's ``state_dict()`` then carries
  ``svgd_state.<σ' name>.r`` (``_orig_mod.svgd_state...`` from the compiled wrapper) and
  ``load_state_dict`` fills it; :func:`state_of` returns the binding's state and creates
  the binding early, which a checkpoint loaded before the first forward needs.
* **Caches.** A custom joint pass has no cache key, so inductor's FX-graph cache and the
  AOTAutograd cache are turned off for the graphs this backend compiles (and only those):
  no compiled graph can come back from a cache without the rewrite.
* **Coverage.** A parameter that receives a gradient that did not come through an SVGD graph
  raises ``CoverageError`` at the end of that backward (see :mod:`svgd_fx.guard`).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import sys
import weakref
from typing import Any

import torch
from torch import nn

from . import eager_layers
from .._torch_internals import OptimizedModule, compiling_frame, counters, skip_code, wrap_inline
from ..state import SVGDState
from .common import TRANSFORMED, check_model, compile_inductor, compile_plain
from ..sharding import refuse_unsupported
from ..plan import build_plan
from ..session import Session, install_state_hooks
from ..config import BACKEND, ExcludeSpec, SVGDConfig, check_scaler, describe, make_config, names, options_doc, \
    resolve_exclude
from ..errors import SVGDError


class Binding(Session):
    """The compile backend's :class:`~svgd_fx.session.Session` of a model, in the model's ``__dict__``.

    There, ``copy.deepcopy`` and pickling of the model (or of what ``torch.compile`` returned,
    which copies and pickles its ``_orig_mod``) carry the options and the state along: the copy
    continues from the same r. The pass log, the gradient guard and the compiled graphs are not
    carried; the copy's first forward rebuilds them.
    """

    def __init__(self, model: nn.Module, svgd_state: SVGDState | None = None, **options) -> None:
        super().__init__(weakref.ref(model), BACKEND, svgd_state if svgd_state is not None else SVGDState(),
                         coverage_message=lambda names: _coverage_message(self, names), **options)

    def configure_with(self, config: SVGDConfig, exclude: ExcludeSpec, grad_scaler=None) -> None:
        self.configure(config, resolve_exclude(self.model, exclude), grad_scaler)

    def layer_graph(self, layer: nn.Module, call: int, compiled_with: "backend"):
        """A torch.nn layer the model's call ran outside its graphs (its ``call``-th call in that
        model call, from 0), compiled on its own."""
        return eager_layers.graph_of(self.layers, (layer, call), self.model, layer, lambda: compiled_with,
                                     self.excluded)

    def __deepcopy__(self, memo: dict) -> "Binding":
        """Copied with its model (found in ``memo``): options and state; the GradScaler is the
        user's object and stays shared unless it is being copied too."""
        model = copy.deepcopy(self.model, memo)
        scaler = memo.get(id(self.grad_scaler), self.grad_scaler)
        return _rebuilt_binding(model, self.config, self.excluded, scaler, copy.deepcopy(self.svgd_state, memo))

    def __reduce__(self):
        return _rebuilt_binding, (self.model, self.config, self.excluded, self.grad_scaler, self.svgd_state)


def _rebuilt_binding(model, config, excluded, grad_scaler, svgd_state) -> Binding:
    """A binding restored by deepcopy or unpickling (``model`` may still be filling in)."""
    binding = Binding(model, svgd_state, config=config, excluded=excluded, grad_scaler=grad_scaler)
    model.__dict__[_ATTR] = binding
    _BOUND.add(model)
    return binding


# the binding of a model is its __dict__[_ATTR]; _BOUND lists the bound models (for the owner search)
_ATTR = "_svgd_fx_binding"
_BOUND: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()
# a model torch.compile wrapped -> (a weakref to) its wrapper, whose backend says whether it is SVGD's
_WRAPPER: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()
# id(parameter) -> (weakref to it, weakref to its model's binding): the per-call owner lookup
_PARAM_OWNER: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def lookup_binding(model: Any, inner: Any, caller: str, create: bool = True) -> Binding:
    """The :class:`Binding` of ``inner`` (``model`` unwrapped from DDP), given itself or as
    ``torch.compile`` returned it. ``create=False``: only a binding that has compiled graphs (a
    model none of whose graphs reached the backend is a TypeError); otherwise one is made."""
    inner = getattr(inner, "_orig_mod", inner)
    if isinstance(inner, nn.Module) and inner in TRANSFORMED:
        raise TypeError(f"svgd_fx.{caller}: this {type(inner).__name__} is the model given to svgd_fx.transform, "
                        "whose SVGD state lives in what transform returned: pass that (model_t = "
                        "svgd_fx.transform(model, ...); svgd_fx." + caller + "(model_t)).")
    if isinstance(inner, nn.Module):
        binding = _binding_for(inner) if create else _bound(inner)
        if not create and binding is not None and binding.log.graphs == 0:
            binding = None           # bound at its first call, but no graph of it reached the backend
        if binding is not None:
            if binding.config is None and (b := _svgd_backend_of(model)) is not None:
                binding.configure_with(b.config, b.exclude, b.grad_scaler)   # the options torch.compile was given
            return binding
    if not create and isinstance(inner, nn.Module) and hasattr(model, "_orig_mod"):
        raise TypeError(
            f"svgd_fx.{caller}: no graph of this {type(inner).__name__} has been compiled by backend 'svgd'. Before its "
            "first forward that is expected; if forwards already ran, TorchDynamo ran them uncompiled and the model "
            "trained on plain gradients: it gave up on the whole forward (nn.LSTM/GRU without "
            "torch._dynamo.config.allow_rnn = True, a graph break it could not resume from, FSDP's hooks) or hit its "
            "recompile limit. TORCH_LOGS=graph_breaks,recompiles shows which; torch.compile(..., fullgraph=True) "
            "makes it an error; svgd_fx.transform(model, ...) checks this itself.")
    raise TypeError(f"svgd_fx.{caller} takes what svgd_fx.transform returned, or a model compiled with "
                    "torch.compile(..., backend='svgd')" + ("" if create else " after its first forward")
                    + f"; got {type(model).__name__}")


def binding_of(model: nn.Module) -> Binding | None:
    return _bound(_unwrap(model))


def _unwrap(model: Any) -> nn.Module:
    inner = getattr(model, "_orig_mod", model)     # torch.compile's OptimizedModule
    if not isinstance(inner, nn.Module):
        raise TypeError(f"svgd_fx: expected an nn.Module or what torch.compile returned, got {type(model).__name__}")
    return inner


def _bound(model: nn.Module) -> Binding | None:
    binding = model.__dict__.get(_ATTR)
    # a shallow copy (copy.copy) shares its original's __dict__ entries: not its binding
    return binding if binding is not None and binding.model_ref() is model else None


def _binding_for(model: nn.Module) -> Binding:
    binding = _bound(model)
    if binding is None:
        binding = Binding(model)
        model.__dict__[_ATTR] = binding
        _BOUND.add(model)
    install_state_hooks(model, _state_beside)
    eager_layers.install(model)
    for p in model.parameters():
        _PARAM_OWNER[id(p)] = (weakref.ref(p, lambda _, key=id(p): _PARAM_OWNER.pop(key, None)),
                               weakref.ref(binding))
    return binding


def _owner_of_call(plan, compiled_for: Binding):
    """Per call, the binding of the model whose parameters were passed (see ``Plan.wrap``).

    Dynamo reuses a compiled graph for another instance of the same model class when its
    guards pass (``torch.compile`` calls with equal options compare equal), so the state to
    read and update is chosen from the parameters of each call, never from the closure.
    """
    first = min(plan.param_inputs)
    compiled_for.plans.add(id(plan))

    def owner(args) -> Binding:
        param = args[first]
        entry = _PARAM_OWNER.get(id(param))
        if entry is not None and entry[0]() is param and (binding := entry[1]()) is not None \
                and binding.config is not None and id(plan) in binding.plans:
            return binding
        return _adopt(plan, compiled_for, [args[i] for i in sorted(plan.param_inputs)])

    return owner


def _adopt(plan, compiled_for: Binding, params: list[nn.Parameter]) -> Binding:
    """A model reached through a graph compiled for another (or a copy of it): bind it with the
    same options, and log the graph's σ' nodes as its own."""
    model = _find_model(params)
    if model is None:
        raise SVGDError("svgd_fx: a graph compiled by the svgd backend was called with parameters of an "
                        "nn.Module it cannot find; compile each model with torch.compile(model, ...).")
    binding = _binding_for(model)
    binding.configure_with(compiled_for.config, compiled_for.excluded, compiled_for.grad_scaler)
    for name in plan.sigma_names & compiled_for.log.records.keys():
        mine = binding.log.records.get(name)
        if mine is None:
            mine = binding.log.records[name] = dataclasses.replace(compiled_for.log.records[name], t_graphs=0)
        mine.t_graphs += name in plan.t_names
    binding.log.params_seen |= plan.params_seen
    binding.log.graphs += 1
    binding.plans.add(id(plan))
    return binding


def _state_beside(module: nn.Module, prefix: str, loading: bool) -> tuple[Binding | None, bool]:
    """Whose state goes with ``module``'s keys (see :func:`svgd_fx.session.save_state_hook`), and
    whether ``state_dict()`` writes it there: in the state_dict of what was compiled —
    ``model_c.state_dict()`` (prefix ``_orig_mod.``), or the model's own after
    ``model.compile(backend="svgd")``. The bare model's ``state_dict()`` stays its own, loadable
    into a fresh plain model; but ``svgd_state.`` keys loaded into it reach its state all the same,
    binding it first if it is compiled with backend 'svgd' and not yet bound (a lenient load never
    drops r)."""
    binding = _bound(module)
    if binding is None and loading and module not in TRANSFORMED:
        wrapper = _WRAPPER.get(module)
        if wrapper is not None and (wrapper := wrapper()) is not None and _svgd_backend_of(wrapper) is not None:
            binding = lookup_binding(wrapper, wrapper, "load_state_dict")
    written = prefix.endswith("_orig_mod.") or getattr(module, "_compiled_call_impl", None) is not None
    return binding, binding is not None and written


def _on_module_registered(module, name, submodule) -> None:
    """``torch.compile(model)`` wraps ``model`` in an ``OptimizedModule`` whose first act is to
    register it as ``_orig_mod`` (before the wrapper knows its backend): give the model the state
    hooks, so that a checkpoint with SVGD state loads into a freshly compiled model before its first
    forward, through the wrapper or into the model itself, with ``strict=False`` too (no
    ``state_of`` needed); and give the wrapper a one-time forward pre-hook that binds the model at
    its first call."""
    if name == "_orig_mod" and type(module).__name__ == "OptimizedModule":
        _WRAPPER[submodule] = weakref.ref(module)
        install_state_hooks(submodule, _state_beside)
        module.register_forward_pre_hook(_enter_call)
        module.register_forward_hook(_leave_call, always_call=True)
        module.register_forward_pre_hook(_bind_at_first_call)


def _bind_at_first_call(module, args) -> None:
    """The first call of a module compiled with backend 'svgd' (``torch.compile``\\ d, or
    ``model.compile`` in place): bind the model and arm its gradient guard before anything runs, so
    that a forward TorchDynamo never compiles (disabled, or given up on before any compile starts)
    raises at its backward instead of training on plain gradients. Removes itself."""
    if torch.compiler.is_compiling():      # traced inside the graph (a compiled torch.nn module)
        return
    for key, hook in list(module._forward_pre_hooks.items()):
        if hook is _bind_at_first_call:
            del module._forward_pre_hooks[key]
    if _svgd_backend_of(module) is not None and _unwrap(module) not in TRANSFORMED:
        lookup_binding(module, module, "torch.compile")


def _enter_call(module, args) -> None:
    """An svgd-compiled model's call starts: torch.nn layers that the call runs outside its graphs
    get graphs of their own (see :mod:`svgd_fx.capture.eager_layers`)."""
    if torch.compiler.is_compiling():
        return
    _refuse_shallow_copy(module)
    if _svgd_backend_of(module) is not None:
        eager_layers.enter(functools.partial(_layer_graph, module))


def _refuse_shallow_copy(module: nn.Module) -> None:
    """``copy.copy`` of a model compiled in place: torch drops the compiled call from it, and it
    shares its parameters with the original and the original's :class:`_InPlace` record (a deep
    copy is compiled again as it is made). Two SVGD states on one set of parameters cannot both
    be right: an error at the copy's first call, before any gradient."""
    entry = _in_place(module)
    if entry is not None and module._compiled_call_impl is None and entry.model_ref() is not module:
        raise SVGDError(
            f"svgd_fx: this {type(module).__name__} is a shallow copy (copy.copy) of a model compiled in place with "
            "backend 'svgd': it shares the original's parameters, and is not compiled. Use copy.deepcopy(model) "
            "(compiled again as it is made, with its own parameters and state), or the original itself.")


def _leave_call(module, args, output) -> None:
    if not torch.compiler.is_compiling() and _svgd_backend_of(module) is not None:
        eager_layers.leave()


def _layer_graph(compiled, layer: nn.Module, call: int):
    # bound by _bind_at_first_call; lookup_binding (which re-registers every parameter) only if not
    binding = _bound(_unwrap(compiled)) or lookup_binding(compiled, compiled, "torch.compile")
    return binding.layer_graph(layer, call, _svgd_backend_of(compiled))


# a call of ``model.compile`` in place runs the model's hooks under TorchDynamo: never as frames of their own
for _hook in (_bind_at_first_call, _enter_call, _leave_call):
    skip_code(_hook.__code__)

torch.nn.modules.module.register_module_module_registration_hook(_on_module_registered)


# ----------------------------------------------------------------------------- finding the model

def _graph_params(example_inputs: list[Any]) -> list[nn.Parameter]:
    return [v for v in example_inputs if isinstance(v, nn.Parameter)]


def _owns_all(module: nn.Module, params: list[nn.Parameter]) -> bool:
    mine = {id(p) for p in module.parameters()}
    return all(id(p) in mine for p in params)


def _frame_locals():
    """Locals of the frame Dynamo is compiling (and its parents), then, separately, of the stack."""
    tx = compiling_frame()
    traced = []
    while tx is not None:
        traced += list(getattr(tx, "f_locals", {}).values())
        tx = getattr(tx, "parent", None)
    yield traced
    stack, frame = [], sys._getframe(1)
    while frame is not None:
        stack += list(frame.f_locals.values())
        frame = frame.f_back
    yield stack


def _compiled_root(params: list[nn.Parameter]) -> nn.Module | None:
    """The module ``torch.compile`` was called on, if it owns ``params``: the outermost
    ``OptimizedModule`` on the Python stack. When Dynamo gives up on the outer frames (a hook
    installed under a lock, Hugging Face's output capturing) and compiles inner modules as frames
    of their own, their graphs still belong to the model the user compiled: one state, one pass
    log, one coverage check."""
    root, frame = None, sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, OptimizedModule) and isinstance(value._orig_mod, nn.Module) \
                    and _owns_all(value._orig_mod, params):
                root = value._orig_mod
        frame = frame.f_back
    return root


def _find_model(params: list[nn.Parameter]) -> nn.Module | None:
    """The module whose parameters include all of ``params``: the compiled model on the stack
    (:func:`_compiled_root`), else an already bound one, else the largest owning module among
    the compiled frame's locals (a submodule's frame may be the one compiled after a graph
    break), else among the Python stack's."""
    root = _compiled_root(params)
    if root is not None:
        return root
    for module in list(_BOUND):
        if _owns_all(module, params):
            return module
    for values in _frame_locals():
        best = None
        for value in values:
            try:
                value = getattr(value, "_orig_mod", value)
            except Exception:  # an object with an unusual __getattr__
                continue
            if isinstance(value, nn.Module) and _owns_all(value, params):
                if best is None or _count(value) > _count(best):
                    best = value
        if best is not None:
            return best
    return None


def _count(module: nn.Module) -> int:
    return sum(1 for _ in module.parameters())


# ----------------------------------------------------------------------------- the backend

class backend:
    """A configured SVGD compile backend: ``torch.compile(model, backend=svgd_fx.backend(s=0.1))``.

    ``torch.compile(model, backend="svgd", options={"s": 0.1, ...})`` builds one of these. After
    ``loss.backward()`` every ``p.grad`` holds the virtual gradient; step with ``torch.optim.SGD``.
    The options (``svgd_fx.config.OPTIONS``; the same as :func:`svgd_fx.transform`'s but
    ``codegen``, plus ``accumulation``):

"""

    def __init__(self, s: float | None = None, *, method: str = "svgd", rho: float | None = None,
                 eps: float | None = None, r_shape: str | None = None, variant: str | None = None,
                 reduction: str = "mean",
                 nonfinite: str | None = None, exclude: ExcludeSpec = None, grad_scaler=None,
                 distributed: bool | None = None, t_impl: str = "fused", gamma: float | None = None,
                 t_int: int | None = None, t_stat: int | None = None, damping: float | None = None,
                 switch_at_step: int | None = None, accumulation: bool = False) -> None:
        self.grad_scaler = check_scaler(grad_scaler)
        self.config = make_config(s=s, method=method, rho=rho, eps=eps, r_shape=r_shape, variant=variant,
                                  reduction=reduction,
                                  nonfinite=nonfinite, grad_scaler=self.grad_scaler, distributed=distributed,
                                  t_impl=t_impl, gamma=gamma, t_int=t_int, t_stat=t_stat,
                                  damping=damping, switch_at_step=switch_at_step, accumulation=accumulation)
        self.exclude = exclude

    def __repr__(self) -> str:
        return f"svgd_fx.backend({describe(self.config, frozenset())})"

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        params = _graph_params(example_inputs)
        if not params:   # nothing trainable in this piece: plain inductor
            return compile_inductor(gm, example_inputs, None)
        model = _find_model(params)
        if model is None:
            raise SVGDError(
                "svgd_fx: the svgd backend could not find the nn.Module that owns this graph's "
                f"parameters (shapes {[tuple(p.shape) for p in params[:4]]}...). Compile the model "
                "itself (torch.compile(model, backend='svgd', ...)), or use svgd_fx.transform(model, s)."
            )
        _refuse_transformed(model)
        binding = _binding_for(model)
        check_model(model)
        binding.configure_with(self.config, self.exclude, self.grad_scaler)
        return self._compiled(binding, gm, example_inputs)

    def _compiled(self, binding, gm, example_inputs):
        plan = build_plan(binding, gm, example_inputs, accumulating=self.config.accumulation)
        owner = _owner_of_call(plan, binding)
        return plan.wrap(lambda g, xs: compile_inductor(g, xs, plan), lambda args: self._compiled(binding, gm, args),
                         owner, plain_backend=lambda: compile_plain(gm, example_inputs))


def svgd(gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict | None = None, **kwargs):
    """The ``"svgd"`` backend registered under ``torch_dynamo_backends`` (see ``backend``)."""
    return _configured(options, kwargs.get("mode"))(gm, example_inputs)


def _configured(options: dict | None, mode: str | None = None) -> backend:
    """The backend ``torch.compile(..., backend="svgd", options=options, mode=mode)`` asks for."""
    if mode is not None:
        raise ValueError("svgd_fx: the svgd backend takes no mode=; pass options={'s': ...}")
    options = dict(options or {})
    unknown = sorted(set(options) - set(names(BACKEND)))
    if unknown:
        raise ValueError(f"svgd_fx: unknown svgd backend options {unknown}; known: {list(names(BACKEND))}")
    return backend(**options)


backend.__doc__ += options_doc(BACKEND)


def _coverage_message(binding: Binding, names: list[str]) -> str:
    """The coverage error under the backend, with the likeliest cause for what was seen."""
    model = type(binding.model).__name__
    head = ("svgd_fx: these trainable parameters received gradients that did not come through a graph of backend "
            f"'svgd', so they would train on plain gradients: {names}. ")
    knowingly = ("pass options={'exclude': [...]} with these names to train them on plain gradients knowingly.")
    if binding.log.graphs == 0:
        return head + (
            f"No graph of {model} has been compiled by backend 'svgd': either a torch.compile around the svgd-compiled "
            "model compiled it with its own backend (torch.compile(torch.compile(model, backend='svgd')): compile it "
            "once, with backend='svgd'), or TorchDynamo ran the whole forward uncompiled (TORCH_LOGS=graph_breaks "
            "shows why). Fix that, or " + knowingly)
    if _recompile_limit_hit():
        return head + (
            f"TorchDynamo hit its recompile limit (torch._dynamo.config.recompile_limit = "
            f"{torch._dynamo.config.recompile_limit}) in this process, and frames past it run uncompiled: "
            "TORCH_LOGS=recompiles shows what recompiles (an input shape under dynamic=False, a Python value that "
            "changes); torch._dynamo.reset() between models you are done with; or raise the limit.")
    breaks = _graph_breaks_seen()
    return head + (
        "Usually a graph break put their use outside the captured graphs ("
        + (f"graph breaks TorchDynamo reported in this process: {breaks}; " if breaks else "")
        + "TORCH_LOGS=graph_breaks shows where). Fix the graph break, or " + knowingly)


def _recompile_limit_hit() -> bool:
    return any(key.startswith("Dynamo recompile limit exceeded") for key in counters.get("unimplemented", {}))


def _graph_breaks_seen() -> list[str]:
    """The first line of each graph-break reason Dynamo counted in this process (at most 5)."""
    return [key.strip().splitlines()[0] for key in counters.get("graph_break", {})][:5]


# ----------------------------------------------------------------------------- before any graph

def _svgd_backend_of(compiled: Any) -> backend | None:
    """The configured svgd backend a ``torch.compile``\\ d module was compiled with, or None.

    Reads Dynamo's wrappers (``OptimizedModule.dynamo_ctx.callback`` → ``ConvertFrame`` →
    ``WrapBackendDebug`` → what ``torch.compile`` was given): private attributes, hence the
    defensive reads. ``backend="svgd"`` with ``options`` gives one ``backend(**options)``.
    A model compiled in place (``model.compile``) has its backend recorded at that call."""
    if (entry := _in_place(compiled)) is not None:
        return entry.backend if compiled._compiled_call_impl is not None else None
    try:
        given = compiled.dynamo_ctx.callback._torchdynamo_orig_backend._torchdynamo_orig_backend
        given = getattr(given, "_torchdynamo_orig_backend", given)
    except (AttributeError, KeyError):   # (a wrapper not fully built: its __getattr__ raises KeyError)
        return None
    if "_svgd_fx_backend" in getattr(given, "__dict__", {}):
        return given._svgd_fx_backend
    compiler = getattr(given, "compiler_fn", given)
    found = None
    if isinstance(compiler, backend):
        found = compiler
    elif compiler is svgd:
        try:
            found = _configured(getattr(given, "kwargs", {}).get("options"))
        except (TypeError, ValueError):
            found = None       # the real compile will say what is wrong with the options
    try:
        given._svgd_fx_backend = found          # once per torch.compile call
    except AttributeError:
        pass
    return found


def _svgd_models_on_stack() -> list[tuple[nn.Module, backend]]:
    """(model, its svgd backend) for every module compiled with backend 'svgd' that is running.
    (A ``torch.compile`` around an svgd-compiled module returns a plain function that the outer
    backend compiles: no graph reaches this backend, and the gradient guard says so.)"""
    found, frame = [], sys._getframe(1)
    while frame is not None:
        for value in frame.f_locals.values():
            if isinstance(value, OptimizedModule) and "_orig_mod" in value._modules \
                    or _in_place(value) is not None:
                b = _svgd_backend_of(value)
                inner = _unwrap(value)
                if b is not None and isinstance(inner, nn.Module) and not any(inner is m for m, _ in found):
                    found.append((inner, b))
        frame = frame.f_back
    return found


def _refuse_transformed(model: nn.Module) -> None:
    if model in TRANSFORMED:
        raise SVGDError(
            f"svgd_fx: this {type(model).__name__} was given to svgd_fx.transform, whose SVGD state and gradient "
            "checks it carries; compiling it with backend 'svgd' as well would put two SVGD states on one set of "
            "parameters. Use one entry point per model (what transform returned, or a fresh model for the backend).")


_ALLOW_RNN_BEFORE: list[bool] = []


def _on_compile_start(args) -> None:
    """Dynamo starts compiling a frame: for an svgd-compiled model on the stack, bind it and arm its
    gradient guard now (Dynamo may give up on the frame and never call the backend), refuse what
    cannot work (FSDP, a model given to transform), and let Dynamo trace nn.LSTM/GRU for
    this compile (``allow_rnn``), as ``transform`` does."""
    models = _svgd_models_on_stack()
    if not models:
        return
    for model, b in models:
        refuse_unsupported(model)
        _refuse_transformed(model)
        binding = _binding_for(model)
        if binding.config is None:      # a conflict of options is the backend's to report
            binding.configure_with(b.config, b.exclude, b.grad_scaler)
    _ALLOW_RNN_BEFORE.append(torch._dynamo.config.allow_rnn)
    torch._dynamo.config.allow_rnn = True


def _on_compile_end(args) -> None:
    if _ALLOW_RNN_BEFORE:
        torch._dynamo.config.allow_rnn = _ALLOW_RNN_BEFORE.pop()


class _Kept(list):
    """Dynamo's callback list, whose ``clear()`` (run by ``torch._dynamo.reset()``, which users call
    between models) keeps svgd_fx's own callbacks."""

    def clear(self) -> None:
        kept = [f for f in self if f in (_on_compile_start, _on_compile_end)]
        super().clear()
        self.extend(kept)


def _install_compile_callbacks() -> None:
    handler = torch._dynamo.callback_handler
    for attr, fn in (("start_callbacks", _on_compile_start), ("end_callbacks", _on_compile_end)):
        callbacks = getattr(handler, attr)
        if not isinstance(callbacks, _Kept):
            callbacks = _Kept(callbacks)
            setattr(handler, attr, callbacks)
        if fn not in callbacks:
            callbacks.append(fn)


_install_compile_callbacks()


# ----------------------------------------------------------------------------- model.compile(backend="svgd")

class _InPlace:
    """In the ``__dict__`` of a model compiled in place with backend 'svgd': that backend and the
    call's keyword arguments. torch drops the compiled call from a model's copies and pickles
    (``nn.Module.__getstate__``); this record comes along and compiles the copy again as it is
    made (:func:`_in_place_copy`), so a copy trains as its original does from its first call."""

    def __init__(self, model: nn.Module, found: backend, kwargs: dict) -> None:
        self.model_ref, self.backend, self.kwargs = weakref.ref(model), found, dict(kwargs)

    def __reduce__(self):
        return _in_place_copy, (self.model_ref(), self.kwargs)


def _in_place_copy(model: nn.Module, kwargs: dict) -> _InPlace:
    """The record of a copy (``model`` may still be filling in: only its class is read)."""
    _compile(model, kwargs)
    return _InPlace(model, _given_backend(kwargs), kwargs)


_IN_PLACE = "_svgd_fx_in_place"


def _in_place(module: Any) -> _InPlace | None:
    return module.__dict__.get(_IN_PLACE) if isinstance(module, nn.Module) else None


def _given_backend(kwargs: dict) -> backend | None:
    """The svgd backend that ``torch.compile`` keyword arguments ask for, or None for another one.
    Options it cannot take raise here, at the ``model.compile`` call."""
    given = kwargs.get("backend")
    if isinstance(given, backend):
        return given
    if given is svgd or isinstance(given, str) and given == "svgd":
        return _configured(kwargs.get("options"), kwargs.get("mode"))
    return None


def _watch_in_place(module: nn.Module, kwargs: dict) -> None:
    """``module.compile(**kwargs)`` was called: for backend 'svgd', the hooks ``torch.compile(model)``
    gives its wrapper go on the model itself, and a model whose forward is torch's own is compiled
    whole (:func:`_compile`)."""
    found = _given_backend(kwargs)
    if found is None:
        module.__dict__.pop(_IN_PLACE, None)
        return
    module.__dict__[_IN_PLACE] = _InPlace(module, found, kwargs)
    # nn.Module.compile's own compiled call serves any other model (and is not set yet in the call
    # that loads svgd_fx)
    if module._compiled_call_impl is not None and eager_layers.in_torch(module):
        _compile(module, kwargs)
    hooks = list(module._forward_pre_hooks.values())
    if _enter_call not in hooks:
        module.register_forward_pre_hook(_enter_call)
        module.register_forward_hook(_leave_call, always_call=True)
    if _bind_at_first_call not in hooks:
        module.register_forward_pre_hook(_bind_at_first_call)


def _compile(module: nn.Module, kwargs: dict) -> None:
    """``module.compile(**kwargs)``'s compiled call, set into ``__dict__`` (what ``nn.Module.compile``
    sets; a copy being made has no other attributes yet). ``model.compile`` compiles ``_call_impl``,
    whose frame TorchDynamo skips for the forward's frame below it; a forward in torch's files
    (``nn.Sequential``, ``nn.TransformerEncoder``, a torch.nn layer) is skipped too, and nothing
    would be compiled: the model would train on plain gradients (any other backend only runs
    slower). Such a model's ``_call_impl`` is compiled through a frame Dynamo traces, as
    ``torch.compile(model)`` does for it."""
    call = module._call_impl
    module.__dict__["_compiled_call_impl"] = torch.compile(
        wrap_inline(call) if eager_layers.in_torch(module) else call, **kwargs)


def _patch_module_compile() -> None:
    """Wrap ``nn.Module.compile`` (once) so that an in-place compile with backend 'svgd' is watched.
    This import may itself be the entry point's, run from inside a ``model.compile(backend="svgd")``
    in progress: that model is watched now. (That call sets ``_compiled_call_impl`` after this
    returns, so a torch.nn model is not compiled whole; with the hooks, TorchDynamo compiles the
    forward's frame below them instead, and what it does not compile goes through
    :mod:`~svgd_fx.capture.eager_layers`.)"""
    original = nn.Module.compile
    if getattr(original, "_svgd_fx", False):
        return

    @functools.wraps(original)
    def compile(self, *args, **kwargs):
        original(self, *args, **kwargs)
        _watch_in_place(self, kwargs)

    compile._svgd_fx = True
    nn.Module.compile = compile
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is original.__code__ and isinstance(frame.f_locals.get("self"), nn.Module):
            _watch_in_place(frame.f_locals["self"], frame.f_locals.get("kwargs") or {})
        frame = frame.f_back


_patch_module_compile()
