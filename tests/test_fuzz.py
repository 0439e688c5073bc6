"""Property-based: random MLPs and CNNs (depth, widths, bias, BN/LN/GN, activations, batch
sizes down to 1 where the model allows it) against the independent reference, float64, over
two SGD steps, for transform(); T must sit at every Linear/Conv/norm σ' node."""

import copy

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import svgd_fx
from reference import SVGDReference

ACTS = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}


@st.composite
def models(draw):
    kind = draw(st.sampled_from(["mlp", "cnn"]))
    norm = draw(st.sampled_from(["none", "bn", "ln", "gn"] if kind == "cnn" else ["none", "bn", "ln"]))
    act = ACTS[draw(st.sampled_from(sorted(ACTS)))]
    bias = draw(st.booleans())
    depth = draw(st.integers(1, 3))
    batch = draw(st.integers(2 if norm == "bn" else 1, 6))   # train-mode BN needs two samples
    layers, expect = [], []
    if kind == "mlp":
        width = draw(st.integers(2, 9))
        c = width
        for i in range(depth):
            out = draw(st.integers(2, 9))
            layers.append(nn.Linear(c, out, bias=bias))
            expect.append(f"{len(layers) - 1}.linear")
            if norm == "bn":
                layers.append(nn.BatchNorm1d(out))
                expect.append(f"{len(layers) - 1}.batch_norm")
            elif norm == "ln":
                layers.append(nn.LayerNorm(out))
                expect.append(f"{len(layers) - 1}.layer_norm")
            layers.append(act())
            c = out
        shape = (width,)
    else:
        channels, size = draw(st.integers(1, 3)), draw(st.integers(3, 6))
        c = channels
        for i in range(depth):
            out = 2 * draw(st.integers(1, 3))
            layers.append(nn.Conv2d(c, out, 3, padding=1, bias=bias))
            expect.append(f"{len(layers) - 1}.conv2d")
            if norm == "bn":
                layers.append(nn.BatchNorm2d(out))
                expect.append(f"{len(layers) - 1}.batch_norm")
            elif norm == "gn":
                layers.append(nn.GroupNorm(2, out))
                expect.append(f"{len(layers) - 1}.group_norm")
            elif norm == "ln":
                layers.append(nn.LayerNorm([out, size, size]))
                expect.append(f"{len(layers) - 1}.layer_norm")
            layers.append(act())
            c = out
        layers.append(nn.Flatten())
        c = c * size * size
        shape = (channels, size, size)
    layers.append(nn.Linear(c, 3))
    expect.append(f"{len(layers) - 1}.linear")
    seed = draw(st.integers(0, 2**16))
    return nn.Sequential(*layers), shape, batch, set(expect), seed


@settings(max_examples=20, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(models())
def test_random_models_match_the_reference(spec):
    model, shape, batch, expect, seed = spec
    torch._dynamo.reset()
    torch.manual_seed(seed)
    model = model.double()
    ref_model = copy.deepcopy(model)
    model_t = svgd_fx.transform(model, s=0.1)
    ref = SVGDReference(ref_model, s=0.1)
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref_model))
    for step in range(2):
        x, y = torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))
        opt.zero_grad()
        opt_ref.zero_grad()
        F.cross_entropy(model_t(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-12,
                                       msg=lambda m: f"{model} B={batch} step {step} {n}: {m}")
        opt.step()
        opt_ref.step()
    with_t = {row["node"] for row in svgd_fx.explain(model_t).rows if row["t_in_graph"]}
    assert with_t == expect, f"{model}: T at {sorted(with_t)}, expected {sorted(expect)}"
