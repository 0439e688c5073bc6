"""Gradient accumulation (svgd_fx.accumulate): the accumulated batch is the paper's minibatch."""

import copy

import pytest
import torch
from torch import nn

import svgd_fx
from cases import CASES, loss_fn
from helpers import assert_t_fired, cast_inputs, count_t_nodes, state, wrap
from reference import SVGDReference

# no batch-coupled layers (BatchNorm's statistics differ per micro-batch, whatever T does)
PER_SAMPLE = [c for c in CASES if c.name in ("grouped_conv", "group_norm_prelu", "tiny_transformer", "chains")]
KINDS = ["transform", "backend_fused", "backend_op"]


_state = state


def _wrap(model, kind):
    """transform accumulates as it is; the backend needs options={"accumulation": True}."""
    return wrap(model, kind) if kind == "transform" else wrap(model, kind, accumulation=True)


def _inputs(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.op == "placeholder")


def _micro_backward(case, wrapped, xs, y, sizes):
    """Backward of the batch's mean loss, one micro-batch at a time (sizes may differ)."""
    total, start = sum(sizes), 0
    for size in sizes:
        part = slice(start, start + size)
        start += size
        out = wrapped(*[x[part] for x in xs])
        (loss_fn(case.loss, out, y[part]) * (size / total)).backward()


# every case through transform; two of them (conv and sequence) through both backend T paths
# (each backend case is an inductor compile: CI time)
TWO_PASS = [(c, "transform") for c in PER_SAMPLE] + [
    (c, kind) for c in PER_SAMPLE if c.name in ("grouped_conv", "tiny_transformer") for kind in KINDS[1:]]


@pytest.mark.parametrize("case, kind", TWO_PASS, ids=lambda v: getattr(v, "name", v))
def test_two_pass_accumulation_equals_one_big_batch(case, kind):
    """phase="statistics" then phase="gradients" over micro-batches of 3 and 5 give, step after
    step, the reference's virtual gradients on the batch of 8 (float64)."""
    torch.manual_seed(0)
    model = case.make().double()
    ref_model = copy.deepcopy(model)
    wrapped, ref = _wrap(model, kind), SVGDReference(ref_model, s=0.1)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref_model))
    for step in range(3):
        xs, y = cast_inputs(case.inputs(8), torch.float64), case.target(8)
        y = y.double() if y.is_floating_point() else y
        opt.zero_grad()
        with svgd_fx.accumulate(wrapped, phase="statistics"):
            _micro_backward(case, wrapped, xs, y, (3, 5))
        assert all(p.grad is None for p in model.parameters()), "the statistics pass must leave no gradient"
        with svgd_fx.accumulate(wrapped, phase="gradients"):
            _micro_backward(case, wrapped, xs, y, (3, 5))
        opt_ref.zero_grad()
        loss_fn(case.loss, ref(*xs), y).backward()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=f"{case.name} step {step}: {name}")
        opt.step()
        opt_ref.step()
    assert_t_fired(wrapped, _state(wrapped, model), case.t_nodes)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@pytest.mark.parametrize("kind", KINDS)
def test_one_pass_accumulation_scales_rows_with_the_previous_r(kind):
    """phase="single": grad_W = d[:, None]·(plain accumulated grad_W) with d = s/sqrt(r_{t-1}+ε)
    (the contract's row-scaling invariant, r as the previous step left it); r_t is the two-pass r_t."""
    torch.manual_seed(1)
    model = _MLP().double()
    twin = copy.deepcopy(model)
    wrapped, wrapped_twin = _wrap(model, kind), _wrap(twin, kind)
    state, state_twin = _state(wrapped, model), _state(wrapped_twin, twin)
    plain = copy.deepcopy(model)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin, plain)]
    for step in range(4):
        x, y = torch.randn(9, 6, dtype=torch.float64), torch.randint(0, 3, (9,))
        r_prev = {k: r.clone() for k, r in state.tensors.items()}
        for opt in opts:
            opt.zero_grad()
        with svgd_fx.accumulate(wrapped):
            for part in (slice(0, 4), slice(4, 9)):
                (torch.nn.functional.cross_entropy(wrapped(x[part]), y[part]) * (x[part].shape[0] / 9)).backward()
        with svgd_fx.accumulate(wrapped_twin, phase="statistics"):
            for part in (slice(0, 4), slice(4, 9)):
                (torch.nn.functional.cross_entropy(wrapped_twin(x[part]), y[part]) * (x[part].shape[0] / 9)).backward()
        torch.nn.functional.cross_entropy(plain(x), y).backward()
        for layer in ("fc1", "fc2"):
            r = r_prev.get(f"{layer}.linear.r", torch.zeros(getattr(model, layer).out_features, dtype=torch.float64))
            d = 0.1 / (r + 1e-6).sqrt()
            for part in ("weight", "bias"):
                got = getattr(getattr(model, layer), part).grad
                plain_grad = getattr(getattr(plain, layer), part).grad
                want = d[:, None] * plain_grad if part == "weight" else d * plain_grad
                torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13, msg=f"step {step} {layer}.{part}")
        for key in state.tensors:
            torch.testing.assert_close(state.tensors[key], state_twin.tensors[key], rtol=1e-12, atol=0)
        opts[0].step()
        with torch.no_grad():     # the twin and the plain model follow the model's trajectory
            for p, q, t in zip(model.parameters(), plain.parameters(), twin.parameters()):
                q.copy_(p)
                t.copy_(p)
    assert_t_fired(wrapped, state, {"fc1.linear", "fc2.linear"})


def test_plain_steps_keep_graphs_without_accumulator_inputs():
    """transform: a plain step's graphs have no accumulator inputs; the first accumulated step
    compiles graphs that have them, later blocks reuse those (no recompile), and a plain step
    after a block is an ordinary SVGD step on the plain graphs (r updated in the backward)."""
    torch.manual_seed(2)
    model = _MLP()
    model_t = svgd_fx.transform(model, s=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model_t(x), y).backward()
    assert [_inputs(gm) for gm in model_t.log.forward_graphs] == [4 + 1 + 2], "4 parameters, x, 2 r"
    r_before = {k: r.clone() for k, r in model_t.svgd_state.tensors.items()}
    with svgd_fx.accumulate(model_t):
        torch.nn.functional.cross_entropy(model_t(x), y).backward()
        assert all(torch.equal(r_before[k], r) for k, r in model_t.svgd_state.tensors.items())
    assert [_inputs(gm) for gm in model_t.log.forward_graphs] == [7, 7 + 2 + 1], "+ 2 accumulators, collect"
    r_after = {k: r.clone() for k, r in model_t.svgd_state.tensors.items()}
    assert all(not torch.equal(r_before[k], r) for k, r in r_after.items()), "committed at exit"
    torch.nn.functional.cross_entropy(model_t(x), y).backward()
    assert all(not torch.equal(r_after[k], r) for k, r in model_t.svgd_state.tensors.items())
    for _ in range(2):
        with svgd_fx.accumulate(model_t):
            torch.nn.functional.cross_entropy(model_t(x), y).backward()
        torch.nn.functional.cross_entropy(model_t(x), y).backward()
    assert len(model_t.log.backward_graphs) == 2
    assert all(a.abs().sum() == 0 for a in model_t.svgd_state.accs.values())


def test_backend_accumulates_only_when_compiled_for_it():
    """Without options={"accumulation": True} the backend's graphs have no accumulator inputs
    and accumulate() says which option to set (before and after the first compile); with it,
    every graph has them and flipping the mode never recompiles."""
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.manual_seed(5)
    model = _MLP()
    model_c = wrap(model, "backend_fused")
    with pytest.raises(svgd_fx.SVGDError, match="'accumulation': True"):
        with svgd_fx.accumulate(model_c):
            model_c(x)
    torch.nn.functional.cross_entropy(model_c(x), y).backward()
    assert svgd_fx.state_of(model).accs == {}, "no accumulator was created for the graph"
    with pytest.raises(svgd_fx.SVGDError, match="'accumulation': True"):
        with svgd_fx.accumulate(model_c):
            pass
    assert not svgd_fx.state_of(model).accumulating

    model = _MLP()
    model_c = wrap(model, "backend_fused", accumulation=True)
    torch.nn.functional.cross_entropy(model_c(x), y).backward()
    assert sorted(svgd_fx.state_of(model).accs) == ["fc1.linear.r", "fc2.linear.r"]
    with svgd_fx.accumulate(model_c):
        torch.nn.functional.cross_entropy(model_c(x), y).backward()
    torch.nn.functional.cross_entropy(model_c(x), y).backward()
    assert svgd_fx.capture.backend.binding_of(model).log.graphs == 1
    assert_t_fired(model_c, svgd_fx.state_of(model), {"fc1.linear", "fc2.linear"})


def test_r_is_left_alone_while_collecting_and_on_error():
    torch.manual_seed(3)
    model_t = svgd_fx.transform(_MLP(), s=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model_t(x), y).backward()
    assert_t_fired(model_t, model_t.svgd_state, {"fc1.linear", "fc2.linear"})   # else "r unchanged" is empty
    before = {k: r.clone() for k, r in model_t.svgd_state.tensors.items()}
    with pytest.raises(KeyError):
        with svgd_fx.accumulate(model_t):
            torch.nn.functional.cross_entropy(model_t(x), y).backward()
            for k, r in model_t.svgd_state.tensors.items():
                assert torch.equal(r, before[k]), "r must not move while collecting"
            raise KeyError("interrupted")
    for k, r in model_t.svgd_state.tensors.items():
        assert torch.equal(r, before[k])
    assert not any(bool(f) for f in model_t.svgd_state.collecting.values())


def test_statistics_pass_restores_grads_and_batchnorm_buffers():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3))
    model_t = svgd_fx.transform(model, s=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    torch.nn.functional.cross_entropy(model_t(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    r0 = {k: r.clone() for k, r in model_t.svgd_state.tensors.items()}
    with svgd_fx.accumulate(model_t, phase="statistics"):
        torch.nn.functional.cross_entropy(model_t(x), y).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(b, c) for b, c in zip(model.buffers(), buffers))
    assert all(not torch.equal(r0[k], r) for k, r in model_t.svgd_state.tensors.items()), "r_t committed"


def test_accumulate_rejects_bad_use():
    model_t = svgd_fx.transform(_MLP(), s=0.1)
    with pytest.raises(ValueError, match="phase"):
        with svgd_fx.accumulate(model_t, phase="both"):
            pass
    with pytest.raises(svgd_fx.SVGDError, match="nest"):
        with svgd_fx.accumulate(model_t):
            with svgd_fx.accumulate(model_t):
                pass
    plain = torch.nn.Linear(3, 2)
    with pytest.raises(TypeError, match="not been compiled with the svgd backend"):
        with svgd_fx.accumulate(plain):             # nothing would collect: silently a no-op before
            pass
    given = torch.nn.Linear(3, 2)
    svgd_fx.transform(given, s=0.1)
    with pytest.raises(TypeError, match="the model given to svgd_fx.transform"):
        with svgd_fx.accumulate(given):             # the original, not what transform returned
            pass
    with pytest.raises(TypeError, match="accumulate"):
        with svgd_fx.accumulate(object()):
            pass


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_backward_passes_accumulated_outside_accumulate_warn_once(kind):
    """Two backward passes into the same .grad before an optimizer step (a training framework's
    gradient accumulation) update r once per micro-batch: not the accumulated batch. svgd_fx sees
    the .grad being accumulated into and warns once, naming svgd_fx.accumulate; zeroing between
    backward passes (either way) and svgd_fx.accumulate itself are quiet."""
    import warnings

    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    wrapped = svgd_fx.transform(model, s=0.1) if kind == "transform" else \
        torch.compile(model, backend="svgd", options={"s": 0.1, "accumulation": True})
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def backward():
        wrapped(torch.randn(4, 6)).pow(2).mean().backward()

    with warnings.catch_warnings():
        warnings.simplefilter("error", svgd_fx.GradientAccumulationWarning)
        for set_to_none in (True, False, True):
            opt.zero_grad(set_to_none=set_to_none)
            backward()
            opt.step()
        opt.zero_grad()
        with svgd_fx.accumulate(wrapped):
            backward()
            backward()
        opt.step()
        opt.zero_grad()
    with pytest.warns(svgd_fx.GradientAccumulationWarning, match=r"svgd_fx\.accumulate"):
        backward()
        backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error", svgd_fx.GradientAccumulationWarning)
        backward()                      # once only


def test_a_graph_without_routed_nodes_runs_inside_accumulate():
    """A graph built for accumulation whose σ' nodes are all plain (here: every parameter excluded)
    has no accumulator inputs, but is still an accumulation graph: the block runs, on plain gradients."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    plain = copy.deepcopy(model)
    model_t = svgd_fx.transform(model, s=0.1, exclude=["0.weight", "0.bias"])
    x = torch.randn(6, 4)
    with svgd_fx.accumulate(model_t):
        model_t(x).square().sum().backward()
    plain(x).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert count_t_nodes(model_t) == 0
