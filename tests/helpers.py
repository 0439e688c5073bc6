"""Shared test plumbing: run a case through transform() and the reference side by side."""

from __future__ import annotations

import io

import torch

import svgd_fx
from cases import Case, loss_fn
from reference import SVGDReference


def pickled(obj):
    """``obj`` through ``torch.save`` and ``torch.load`` of the whole object."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


def twin(model, case: Case):
    """A copy of ``model``: a fresh ``case.make()`` with its state (the hook-based weight norm
    cannot be deep-copied)."""
    copied = case.make().to(next(model.parameters()).dtype)
    copied.load_state_dict(model.state_dict())
    return copied


def reference_copy(model, case: Case):
    """A copy for the reference, without activation checkpointing (it changes no number, and the
    reference's recomputation would run outside its TorchFunctionMode)."""
    ref_model = twin(model, case)
    for m in ref_model.modules():
        if hasattr(m, "checkpointed"):
            m.checkpointed = False
    return ref_model


def cast_inputs(xs, dtype):
    return tuple(x.to(dtype) if x.is_floating_point() else x for x in xs)


def count_t_nodes(model_t) -> int:
    return sum(str(gm.code).count("svgd_fx.virtual_grad") for gm in model_t.log.backward_graphs)


def t_rows(model_t) -> dict[str, bool]:
    return {row["node"]: row["t_in_graph"] for row in svgd_fx.explain(model_t).rows}


def run_against_reference(case: Case, dtype, steps=3, s=0.1, lr=0.05, seed=0, **kw):
    """Train `steps` SGD steps on transform() and on the reference; yield per-step grad pairs."""
    torch.manual_seed(seed)
    model = case.make().to(dtype)
    ref_model = reference_copy(model, case).double()
    model_t = svgd_fx.transform(model, s=s, **kw)
    ref = SVGDReference(ref_model, s=s, **{k: v for k, v in kw.items() if k not in ("exclude", "codegen")},
                        exclude=kw.get("exclude") or ())
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    opt_ref = torch.optim.SGD(ref_model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    for step in range(steps):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        xs, y = case.inputs(case.batch), case.target(case.batch)
        reduction = kw.get("reduction", "mean")
        opt.zero_grad()
        loss_fn(case.loss, model_t(*cast_inputs(xs, dtype)), y.to(dtype) if y.is_floating_point() else y,
                reduction).backward()
        opt_ref.zero_grad()
        loss_fn(case.loss, ref(*cast_inputs(xs, torch.float64)), y.double() if y.is_floating_point() else y,
                reduction).backward()
        history.append([(n, p.grad.clone(), q.grad.clone())
                        for (n, p), (_, q) in zip(model.named_parameters(), ref_model.named_parameters())
                        if p.grad is not None or q.grad is not None])
        opt.step()
        opt_ref.step()
    return model_t, history


def t_fired(wrapped) -> set[str]:
    """σ' nodes that got a T, by explain(): for transform's result or a model under the backend."""
    return {row["node"] for row in svgd_fx.explain(wrapped).rows if row["t_in_graph"]}


def assert_t_fired(wrapped, state, expected) -> None:
    """T sits at exactly ``expected`` and has run there (its r moved off zero)."""
    assert t_fired(wrapped) == set(expected), f"T at {sorted(t_fired(wrapped))}, expected {sorted(expected)}"
    idle = [k for k, r in state.tensors.items() if not r.abs().sum() > 0]
    assert not idle, f"r never updated: {idle}"


def train_changing_batches(case: Case, wrap, rtol: float, atol: float, batches=(8, 5, 8, 3, 6), after_step=None):
    """float64 SGD with batch sizes that change between steps (a last partial batch), ``wrap(model)``
    against the reference, gradients compared every step; returns ``(model, wrapped)``."""
    torch.manual_seed(0)
    model = case.make().double()
    ref_model = reference_copy(model, case)
    wrapped = wrap(model)
    ref = SVGDReference(ref_model, s=0.1)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref_model))
    for batch in batches:
        xs, y = cast_inputs(case.inputs(batch), torch.float64), case.target(batch)
        y = y.double() if y.is_floating_point() else y
        opt.zero_grad()
        opt_ref.zero_grad()
        loss_fn(case.loss, wrapped(*xs), y).backward()
        loss_fn(case.loss, ref(*xs), y).backward()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=atol, msg=lambda m: f"B={batch} {n}: {m}")
        opt.step()
        opt_ref.step()
        if after_step is not None:
            after_step(model, wrapped)
    return model, wrapped


def wrap(model, kind: str, **kw):
    """SVGD (s=0.1) through ``transform``, or the backend with the fused T or the T op."""
    if kind == "transform":
        return svgd_fx.transform(model, s=0.1, **kw)
    if kind == "transform_inductor":
        return svgd_fx.transform(model, s=0.1, codegen="inductor", **kw)
    t_impl = "fused" if kind == "backend_fused" else "op"
    return torch.compile(model, backend=svgd_fx.backend(s=0.1, t_impl=t_impl, **kw))


def state(wrapped, model):
    return wrapped.svgd_state if isinstance(wrapped, svgd_fx.SVGDModule) else svgd_fx.state_of(model)
