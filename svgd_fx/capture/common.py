"""What both entry points share: the model checks, the registry of transformed models, and
inductor with the plan's rewrite as its joint-graph pass."""

from __future__ import annotations

import contextlib
import weakref

import torch
from torch import nn

from .._torch_internals import compile_fx, functorch_config
from ..sharding import refuse_unsupported


def check_model(model: nn.Module) -> dict[str, nn.Parameter]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"svgd_fx.transform takes an nn.Module (or a torch.fx.GraphModule), "
                        f"got {type(model).__name__}")
    refuse_unsupported(model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError("svgd_fx: the model has no trainable parameters (none with requires_grad=True): "
                         "there is nothing for SVGD to train.")
    bad = [f"{n} ({p.dtype})" for n, p in trainable.items() if not p.dtype.is_floating_point]
    if bad:
        raise ValueError(f"svgd_fx: SVGD needs floating-point parameters; these are not: {bad}. "
                         "Freeze them (requires_grad=False) or cast the model to a float dtype.")
    return trainable


# models given to svgd_fx.transform -> (a weakref to) what it returned, where their SVGD state lives
TRANSFORMED: "weakref.WeakKeyDictionary[nn.Module, weakref.ref]" = weakref.WeakKeyDictionary()


class JointPass:
    """Inductor's ``joint_custom_pre_pass``: the reroute on the joint graph, before partitioning."""

    def __init__(self, plan) -> None:
        self.plan = plan

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.plan.rewrite(graph.owning_module)

    def uuid(self) -> None:  # no cache key: the caches that would need one are off (see below)
        return None


def compile_plain(gm, example_inputs):
    """inductor on Dynamo's graph as it is (no rewrite, so inductor's caches may serve it)."""
    with lstm_without_onednn(gm):
        return compile_fx(gm, example_inputs, config_patches={})


STATISTICS_BUCKET_MB = 4.0
"""With ``distributed=True``: the T statistics' all-reduces of one backward graph are merged into
buckets of up to this many MB (inductor's ``bucket_all_reduces_fx`` pass), so that small σ' nodes
share a collective. A bucket's T and parameter gradients wait for all of its statistics, which
keeps their incoming gradients (B× a statistic's bytes) alive until then: a small cap merges the
many small statistics where a collective's latency dominates, and leaves large ones alone."""


def _statistics_bucket_mb(bucket: int) -> float:
    return STATISTICS_BUCKET_MB


def compile_inductor(gm, example_inputs, plan):
    """inductor, with the plan's rewrite as its joint-graph pass. A custom joint pass has no cache
    key, so inductor's FX-graph cache and the AOTAutograd cache are off for these graphs (only
    these): no compiled graph can come back from a cache without the rewrite. A plan whose T
    all-reduces its statistics has them bucketed (:data:`STATISTICS_BUCKET_MB`)."""
    patches = {"fx_graph_cache": False}
    if plan is not None:
        patches["joint_custom_pre_pass"] = JointPass(plan)
        if any(getattr(spec, "sync", False) for spec in plan.planned.specs):
            patches.update(bucket_all_reduces_fx="all",
                           bucket_all_reduces_fx_bucket_size_determinator=_statistics_bucket_mb)
    with functorch_config.patch(enable_autograd_cache=False), lstm_without_onednn(gm):
        return compile_fx(gm, example_inputs, config_patches=patches)


@contextlib.contextmanager
def lstm_without_onednn(gm):
    """On CPU, a float32 ``torch.lstm`` whose input needs no gradient (an LSTM that reads the data)
    decomposes into oneDNN's ``aten.mkldnn_rnn_layer``, which torch 2.13 cannot train compiled:
    inductor lowers it into code that fails at its first call ("expected Tensor() for op:
    aten.mkldnn_rnn_layer", with inductor's own backend too), AOTAutograd's FX graphs save a None
    for its backward. A graph holding an LSTM is compiled with oneDNN off, so the LSTM decomposes
    into aten ops as it does when its input needs a gradient; other graphs keep oneDNN (inductor
    also reads it to lay out convolutions)."""
    if not any(node.op == "call_function" and node.target is torch.lstm for node in gm.graph.nodes):
        yield
        return
    before = torch._C._get_mkldnn_enabled()
    torch._C._set_mkldnn_enabled(False)
    try:
        yield
    finally:
        torch._C._set_mkldnn_enabled(before)
