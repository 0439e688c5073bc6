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
``CoverageError`` naming it (see :mod:`svgd_fx.guard`).
"""

from __future__ import annotations

import copy
import functools
import weakref
from typing import Any

import torch
from torch import nn

from . import eager_layers
from . import backend as compile_backend
from .common import TRANSFORMED, check_model, compile_inductor, compile_plain, lstm_without_onednn
from .._torch_internals import aot_autograd, make_boxed_func
from ..guard import GradientGuard
from ..state import SVGDState
from ..config import TRANSFORM, ExcludeSpec, SVGDConfig, check_scaler, make_config, options_doc, resolve_codegen, \
    resolve_exclude
from ..errors import SVGDError
from ..plan import build_plan
from ..session import STATE_PREFIX, PassLog, Session, install_state_hooks


class SVGDModule(nn.Module):
    """The model with SVGD's backward. Shares the model's parameters and buffers.

    ``state_dict()`` holds the model's own entries under their original keys (they load into
    the original model) plus ``svgd_state.<σ' name>.r`` for every r.

    What frameworks look up on a model passes through to the wrapped one: a public attribute
    this module does not have (``model_t.config``, ``model_t.gradient_checkpointing_enable()``,
    ``model_t.save_pretrained(...)``) is the model's, and ``inspect.signature(model_t.forward)``
    is the model's forward's. The SVGD options are ``svgd_config``.
    """

    def __init__(self, model: nn.Module, config: SVGDConfig, exclude: set[str], grad_scaler=None,
                 codegen: str = "inductor") -> None:
        super().__init__()
        self.model = model
        self.codegen = codegen
        self.grad_scaler = grad_scaler
        self.__dict__["svgd_state"] = SVGDState()   # not a submodule: its keys come from the state hooks
        self.svgd_config = config
        self.excluded = frozenset(exclude)
        self.register_state_dict_post_hook(_strip_model_prefix)
        self.register_load_state_dict_pre_hook(_add_model_prefix)
        self.register_load_state_dict_post_hook(_report_written_names)
        install_state_hooks(self, _own_session)
        self._start()

    def _start(self) -> None:
        """What is rebuilt rather than copied or pickled: the session around the options and the
        state (its pass log, its gradient guard) and the compiled graphs (hidden from nn: [plain
        graphs] + [graphs with accumulate's inputs], compiled at first use)."""
        self.session = Session(weakref.ref(self.model), TRANSFORM, self.svgd_state, config=self.svgd_config,
                               excluded=self.excluded, grad_scaler=self.grad_scaler,
                               coverage_message=self._coverage_message)
        self._first_inputs: tuple | None = None     # for the guard's message, until its first check passes
        self.session.guard.on_first_check.append(self._forget_first_inputs)
        self._compiled = [torch.compile(self.model, backend=_Backend(self), dynamic=None)]
        self._layers: dict = {}     # (torch.nn layer, call, accumulating) -> its own graph (see capture.eager_layers)
        eager_layers.install(self.model)
        self._superseded = False
        # the model's forward signature on this module's forward (frameworks read it to pick inputs)
        self.__dict__["forward"] = functools.update_wrapper(functools.partial(type(self).forward, self),
                                                            self.model.forward, updated=())
        earlier = TRANSFORMED.get(self.model)
        if earlier is not None and earlier() is not None and earlier() is not self:
            earlier()._supersede()
        TRANSFORMED[self.model] = weakref.ref(self)

    @property
    def log(self) -> PassLog:
        return self.session.log

    @property
    def guard(self) -> GradientGuard:
        return self.session.guard

    def _supersede(self) -> None:
        """A later ``transform`` of the same model takes over (re-running a notebook cell): this
        one's gradient checks stop, and calling it raises."""
        self._superseded = True
        self.guard.disarm()

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            model = self.__dict__.get("_modules", {}).get("model")
            if model is None or name.startswith("_"):
                raise
            return getattr(model, name)

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
            with _STRICT_PATCH, eager_layers.running(self._layer_graph):
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

    def _layer_graph(self, layer: nn.Module, call: int):
        """A torch.nn layer the model's call ran outside its graphs (its ``call``-th call in that
        model call, from 0), compiled on its own."""
        accumulating = self.svgd_state.accumulating
        return eager_layers.graph_of(self._layers, (layer, call, accumulating), self.model, layer,
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

    def _forget_first_inputs(self) -> None:
        self._first_inputs = None

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.svgd_state._apply(fn)          # .to(device / dtype) moves r with the parameters
        return self

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        with self.svgd_state.loading(strict):
            return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def extra_repr(self) -> str:
        return self.svgd_config.describe() + (", codegen='fx'" if self.codegen == "fx" else "")


_REBUILT = ("session", "_first_inputs", "_compiled", "_layers", "_superseded", "forward")

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


def _own_session(module: SVGDModule, prefix: str, loading: bool) -> tuple[Session, bool]:
    return module.session, True


def _strip_model_prefix(module, state_dict, prefix, local_metadata) -> None:
    inner = prefix + "model."
    for key in list(state_dict):
        value = state_dict.pop(key)
        state_dict[prefix + key[len(inner):] if key.startswith(inner) else key] = value


def _add_model_prefix(module, state_dict, prefix, local_metadata, strict, missing_keys,
                      unexpected_keys, error_msgs) -> None:
    module.__dict__["_loading_at"] = prefix
    own = (prefix + STATE_PREFIX, prefix + "model.")
    for key in list(state_dict):
        if key.startswith(prefix) and not key.startswith(own):
            state_dict[prefix + "model." + key[len(prefix):]] = state_dict.pop(key)


def _report_written_names(module, incompatible_keys) -> None:
    """Missing and unexpected keys under the names ``state_dict()`` writes (without ``model.``)."""
    prefix = module.__dict__.pop("_loading_at", "")
    inner = prefix + "model."
    for keys in incompatible_keys:
        keys[:] = [prefix + key[len(inner):] if key.startswith(inner) else key for key in keys]


# ----------------------------------------------------------------------------- the backend

def _nop_compiler(log_list: list):
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

    def __deepcopy__(self, memo: dict) -> "_Backend":
        # its owner's graphs' backend, not a value: Lightning's torch.compile patch deep-copies the
        # keyword arguments of every torch.compile call (a copy would copy the owner, which compiles again)
        return self

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        if self.owner.codegen == "inductor":
            plan = build_plan(self.owner.session, gm, example_inputs, accumulating=self.accumulating)
            return plan.wrap(lambda g, xs: compile_inductor(g, xs, plan), lambda args: self(gm, args),
                             plain_backend=lambda: compile_plain(gm, example_inputs))
        plan = build_plan(self.owner.session, gm, example_inputs, accumulating=self.accumulating)
        trace = aot_autograd(
            fw_compiler=_nop_compiler(self.owner.log.forward_graphs),
            bw_compiler=_nop_compiler(self.owner.log.backward_graphs),
            partition_fn=plan.partition,
        )

        def compile_fx_graphs(g, xs):
            with lstm_without_onednn(g):
                return trace(g, xs)

        return plan.wrap(compile_fx_graphs, lambda args: self(gm, args))


# ----------------------------------------------------------------------------- the entry point

def transform(
    model: nn.Module,
    s: float | None = None,
    *,
    method: str = "svgd",
    rho: float | None = None,
    eps: float | None = None,
    r_shape: str | None = None,
    variant: str | None = None,
    reduction: str = "mean",
    nonfinite: str | None = None,
    exclude: ExcludeSpec = None,
    grad_scaler=None,
    distributed: bool | None = None,
    t_impl: str = "fused",
    gamma: float | None = None,
    t_int: int | None = None,
    t_stat: int | None = None,
    damping: float | None = None,
    switch_at_step: int | None = None,
    codegen: str | None = None,
) -> SVGDModule:
    """Return ``model`` with SVGD's backward: after ``loss.backward()`` every ``p.grad`` holds
    the virtual gradient (docs/contract.md), to be used by plain SGD (``torch.optim.SGD``).

    ``model`` is any ``nn.Module`` (or ``torch.fx.GraphModule``); it is not modified, and the
    result shares its parameters and buffers. The options (``svgd_fx.config.OPTIONS``):

"""
    codegen = resolve_codegen(codegen)
    config = make_config(s=s, method=method, rho=rho, eps=eps, r_shape=r_shape, variant=variant, reduction=reduction,
                         nonfinite=nonfinite, grad_scaler=grad_scaler, distributed=distributed,
                         t_impl=t_impl if codegen == "inductor" else "op", gamma=gamma, t_int=t_int,
                         t_stat=t_stat, damping=damping, switch_at_step=switch_at_step)
    if isinstance(model, SVGDModule):
        raise TypeError("svgd_fx.transform: this is already what svgd_fx.transform returned (for "
                        f"{type(model.model).__name__}); train it as it is. For other options, transform a fresh "
                        "model (fresh.load_state_dict(model_t.model.state_dict())).")
    check_model(model)
    if compile_backend.binding_of(model) is not None and compile_backend.binding_of(model).config is not None:
        raise TypeError("svgd_fx.transform: this model is compiled with backend 'svgd', which gives it SVGD "
                        "already (one model, one SVGD state): use one entry point per model.")
    if getattr(model, "_orig_mod", None) is not None:
        raise TypeError("svgd_fx.transform: this is what torch.compile returned; pass the model itself "
                        "(transform compiles it): svgd_fx.transform(model_c._orig_mod, ...).")
    return SVGDModule(model, config, resolve_exclude(model, exclude), check_scaler(grad_scaler), codegen)


transform.__doc__ += options_doc("transform")
