"""torch.nn layers that a model's call runs outside the captured graphs.

TorchDynamo runs a frame it gave up on (a graph break inside a loop, a context manager it cannot
enter, a ``ContextVar`` it cannot read: Hugging Face's audio encoders) as plain Python. The
modules that frame calls start frames of their own, and Dynamo compiles them, except torch.nn's
own layers (``nn.Linear``, ``nn.LayerNorm``, ...): torch's files are traced when inlined, never as
frames of their own. Their parameters would train on plain gradients.

So, while an SVGD model's call runs, a torch.nn layer that holds parameters and is called
outside the graphs is sent through a graph of its own, compiled by the same backend: its σ'
nodes get T like every other one, under their usual names and state. The layer's own forward
still runs first (a forward hook can replace an output, not skip the call); its output is
dropped, and its buffers (BatchNorm's running statistics) are restored before the graph runs,
so they are updated once. A layer called again in the same model call (an embedding shared by an
encoder and a decoder) runs a graph of its own for each call, its σ' nodes named with
``@call2``, ``@call3``, ...: each call is a σ' node with its own r, as inside a graph; a layer
whose parameters are named after another module (tied weights) adds its own path
(``shared.embedding@decoder.embed_tokens``). Outside an
SVGD model's call (the bare model called directly) and inside the graphs the hooks do nothing.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import types
import warnings
from typing import Callable, Iterator

import torch
from torch import nn

from ..errors import EagerLayerWarning
from ..plan import named_call

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
# .running: [(compile_layer, {id(layer): calls so far})], one per model call in progress;
# .saved: {id(layer): buffers before the call}
_STATE = threading.local()


def in_torch(module: nn.Module) -> bool:
    """Whether ``module``'s forward lives in torch's files, which TorchDynamo does not compile as
    a frame of its own (it traces them only where a compiled frame calls them)."""
    forward = getattr(type(module).forward, "__code__", None)
    return forward is not None and forward.co_filename.startswith(_TORCH_DIR)


def outside_dynamo(module: nn.Module) -> bool:
    """Whether ``module`` is one of torch's layers (:func:`in_torch`) that holds trainable
    parameters itself."""
    return in_torch(module) and any(p.requires_grad for p in module.parameters(recurse=False))


def install(model: nn.Module) -> None:
    """Hook every torch.nn layer of ``model`` that holds parameters (once; copies keep them)."""
    for module in model.modules():
        if outside_dynamo(module) and _after_call not in module._forward_hooks.values():
            module.register_forward_pre_hook(_before_call)
            module.register_forward_hook(_after_call, with_kwargs=True, prepend=True)


@contextlib.contextmanager
def running(compile_layer: Callable[[nn.Module, int], Callable]) -> Iterator[None]:
    """An SVGD model's call: ``compile_layer(layer, call)`` gives the compiled graph of a layer that
    runs outside the model's graphs, for its ``call``-th call (from 0) in the model's call."""
    enter(compile_layer)
    try:
        yield
    finally:
        leave()


def enter(compile_layer: Callable[[nn.Module, int], Callable]) -> None:
    _stack().append((compile_layer, {}))


def leave() -> None:
    _stack().pop()


def graph_of(graphs: dict, key, model: nn.Module, layer: nn.Module, make_backend: Callable[[], Callable],
             excluded: frozenset[str]) -> Callable | None:
    """``layer``'s own graph, compiled with ``make_backend()`` at first use and kept in ``graphs[key]``
    (None for a layer whose parameters are all excluded: it runs as it is); the first one of a
    model warns that some of its layers run this way."""
    if key not in graphs:
        names = {id(p): n for n, p in model.named_parameters()}
        if all(names.get(id(p)) in excluded for p in layer.parameters(recurse=False) if p.requires_grad):
            graphs[key] = None
            return None
        path = next((n for n, m in model.named_modules() if m is layer), "")
        if not any(graphs.values()):
            warnings.warn(
                f"svgd_fx: {type(model).__name__}'s layer {path or '?'!r} ({type(layer).__name__}) ran outside the "
                "model's compiled graphs: TorchDynamo ran the code calling it uncompiled (a graph break it could not "
                "resume from, torch._dynamo.disable, its recompile limit). It and any other torch.nn layer there run through "
                "graphs of their own, with T as everywhere else: exact, but each such layer's forward runs twice. "
                "TORCH_LOGS=graph_breaks shows why.", EagerLayerWarning, stacklevel=2)
        compiled = torch.compile(layer_call(layer), backend=make_backend())
        own = [names.get(id(p), "") for p in layer.parameters(recurse=False)]
        if path and not all(n.startswith(path + ".") for n in own):
            # tied weights (a decoder's embedding holding the encoder's table): the σ' names come from
            # the parameters' first names, the same for both layers; the layer's own path tells them apart
            graphs[key] = _named(compiled, f"@{path}")
        else:
            graphs[key] = compiled
    return graphs[key]


def _named(compiled: Callable, suffix: str) -> Callable:
    def call(*args, **kwargs):
        with named_call(suffix):
            return compiled(*args, **kwargs)
    return call


def layer_call(module: nn.Module) -> Callable:
    """``module.forward`` (its hooks already ran) as a function with a code object of its own,
    so that TorchDynamo keeps one cache per layer: a shared code object would count every layer
    of a model toward one recompile limit. Its name is the layer's own too: Dynamo keeps what it
    learns about a frame's input sizes by (file, line, name), and with one name for all layers of a
    class, a layer whose input has another length than its sibling's (an encoder's and a decoder's
    linears) would be compiled with that dimension dynamic from its first call, which r takes for a
    dimension that varies."""
    def call(*args, **kwargs):
        return module.forward(*args, **kwargs)

    code = call.__code__.replace(co_name=f"svgd_fx_eager_{type(module).__name__}_{next(_LAYER_CALLS)}")
    return types.FunctionType(code, call.__globals__, code.co_name, None, call.__closure__)


_LAYER_CALLS = itertools.count()


def _stack() -> list:
    if not hasattr(_STATE, "running"):
        _STATE.running, _STATE.saved = [], {}
    return _STATE.running


def _redirect() -> bool:
    return bool(_stack()) and torch.is_grad_enabled()


def _before_call(module: nn.Module, args) -> None:
    if torch.compiler.is_compiling() or not _redirect():     # inside a graph: traced as usual
        return None
    buffers = [b for b in module.buffers(recurse=False)]
    if buffers and module.training:
        _STATE.saved[id(module)] = [b.detach().clone() for b in buffers]
    return None


def _after_call(module: nn.Module, args, kwargs, output):
    if torch.compiler.is_compiling() or not _redirect():
        return None
    compile_layer, calls = _stack()[-1]
    call = calls[id(module)] = calls.get(id(module), -1) + 1
    graph = compile_layer(module, call)
    saved = _STATE.saved.pop(id(module), None)
    if graph is None:
        return None
    if saved is not None:
        with torch.no_grad():
            for buffer, before in zip(module.buffers(recurse=False), saved):
                buffer.copy_(before)
    with named_call(f"@call{call + 1}" if call else ""):
        return graph(*args, **kwargs)
