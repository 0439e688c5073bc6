"""Shared test plumbing: run a case through transform() and the reference side by side."""

from __future__ import annotations

import copy

import torch

import svgd_fx
from cases import Case, loss_fn
from reference import SVGDReference


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
    ref_model = copy.deepcopy(model).double()
    model_t = svgd_fx.transform(model, s=s, **kw)
    ref = SVGDReference(ref_model, s=s, **{k: v for k, v in kw.items() if k != "exclude"},
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
