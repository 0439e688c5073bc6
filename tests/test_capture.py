"""Capture routes, explain(), and the passes on their own."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from cases import PaperMLP
from helpers import count_t_nodes


def test_user_graph_module_is_accepted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    gm = torch.fx.symbolic_trace(model)
    eager = copy.deepcopy(model)
    gm_t = svgd_fx.transform(gm, s=0.1)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    out = gm_t(x)
    assert torch.equal(out, eager(x))
    F.cross_entropy(out, y).backward()
    assert count_t_nodes(gm_t) == 2
    assert {r["node"] for r in svgd_fx.explain(gm_t).rows} == {"0.linear", "2.linear"}


def test_explain_report():
    model_t = svgd_fx.transform(PaperMLP((12, 8, 4)), s=0.1)
    assert svgd_fx.explain(model_t).rows == []
    F.cross_entropy(model_t(torch.randn(4, 12)), torch.tensor([0, 1, 2, 3])).backward()
    report = svgd_fx.explain(model_t)
    row = report.rows[0]
    for key in ("node", "op", "source", "params", "linear", "r_shape", "r_bytes"):
        assert key in row
    assert row["node"] == "net.0.linear" and row["op"] == "linear"
    assert row["linear"] == {"net.0.weight": True, "net.0.bias": True}
    assert row["r_shape"] == (8,) and row["r_bytes"] == 32
    assert "cases.py" in row["source"]
    params = sum(p.numel() for p in model_t.parameters())
    assert report.adam_bytes == 2 * 4 * params
    assert report.r_bytes == 4 * (8 + 8 + 4)
    text = str(report)
    assert "net.1.batch_norm" in text and "Adam" in text


def test_no_grad_and_eval_forwards_leave_r_untouched():
    torch.manual_seed(0)
    model_t = svgd_fx.transform(PaperMLP((12, 8, 4)), s=0.1)
    x = torch.randn(4, 12)
    F.cross_entropy(model_t(x), torch.tensor([0, 1, 2, 3])).backward()
    before = {k: v.clone() for k, v in model_t.svgd_state.tensors.items()}
    with torch.no_grad():
        model_t(x)
    model_t.eval()
    model_t(x)
    for k, v in model_t.svgd_state.tensors.items():
        assert torch.equal(v, before[k])


def test_locate_on_its_own():
    from svgd_fx.passes import locate

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.g = nn.Parameter(torch.ones(3))

        def forward(self, x):
            return self.fc(x) * torch.sigmoid(self.g) + self.g

    seen = {}

    def backend(gm, example_inputs):
        names = {id(p): n for n, p in Gate_model.named_parameters()}
        phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
        param_nodes = {n: names[id(v)] for n, v in zip(phs, example_inputs) if id(v) in names}
        seen["analysis"] = locate(gm, param_nodes)
        return gm.forward

    Gate_model = Gate()
    torch.compile(Gate_model, backend=backend)(torch.randn(2, 3))
    sigmas = seen["analysis"].sigmas
    assert [(s.op, [(p.arg, p.params, p.linear) for p in s.param_inputs]) for s in sigmas] == [
        ("linear", [("weight", ("fc.weight",), True), ("bias", ("fc.bias",), True)]),
        ("mul", [("other", ("g",), False)]),
        ("add", [("other", ("g",), True)]),
    ]


class ChainRules(nn.Module):
    def __init__(self):
        super().__init__()
        self.p, self.a, self.b, self.c, self.d = (nn.Parameter(torch.rand(3) + 0.5) for _ in range(5))
        self.e = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, x):
        h = x * (1 / self.p)            # reciprocal: not linear in p
        h = h * (self.a * self.a)       # a squared: not linear
        h = h * (self.b * self.c)       # bilinear: linear in b and in c, each with the other fixed
        h = h + (self.d + 1.0)          # affine: linear
        return h / self.e.t()           # divisor: not linear in e


def test_chain_linearity_rules_in_explain():
    model_t = svgd_fx.transform(ChainRules(), s=0.1)
    model_t(torch.randn(4, 3)).sum().backward()
    linear = {}
    for row in svgd_fx.explain(model_t).rows:
        linear.update(row["linear"])
    assert linear == {"p": False, "a": False, "b": True, "c": True, "d": True, "e": False}
    assert count_t_nodes(model_t) == 2   # the b*c and the d+1 σ' nodes


def test_reason_names_the_op_that_broke_linearity():
    """``x * (2 * sigmoid(g))``: the multiplication keeps linearity, sigmoid broke it."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.g = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            return x * (2.0 * torch.sigmoid(self.g))

    model_t = svgd_fx.transform(Gate(), s=0.1)
    model_t(torch.randn(4, 3)).sum().backward()
    (row,) = svgd_fx.explain(model_t).rows
    assert row["linear"] == {"g": False} and "sigmoid" in row["reasons"]["g"]


def test_transformer_fast_paths_in_eval():
    """torch.nn's Transformer layers in eval: under no_grad they take torch's fused fast path (one
    node; no backward, nothing to do) and give eager's output; with grad they take the path whose
    projections are σ' nodes, and train."""
    from cases import AttentionNet

    torch.manual_seed(0)
    model = AttentionNet().eval()
    eager = copy.deepcopy(model)
    model_t = svgd_fx.transform(model, s=0.1)
    x = torch.randn(3, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(model_t(x), eager(x))
    F.cross_entropy(model_t(x), torch.tensor([0, 1, 2])).backward()
    with_t = {row["node"] for row in svgd_fx.explain(model_t).rows if row["t_in_graph"]}
    assert {"enc.layers.0.self_attn.linear", "enc.layers.1.self_attn.out_proj.linear", "attn.linear"} <= with_t
    assert all(p.grad is not None for p in model.parameters())


class _ConstantsFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        w = torch.linspace(0.5, 1.5, 4, dtype=x.dtype)      # the first graph has no inputs ...
        torch._dynamo.graph_break()                         # ... and ends here
        return self.fc(x * w)


@pytest.mark.parametrize("entry", ["transform", "transform_inductor", "backend"])
def test_a_graph_without_inputs_before_a_graph_break(entry):
    """A forward whose first Dynamo graph takes no inputs (a tensor made from constants before a
    graph break) compiles on every entry point, and the layer after it trains on T against the
    reference."""
    from helpers import t_fired
    from reference import SVGDReference

    torch.manual_seed(0)
    model = _ConstantsFirst().double()
    ref_model = copy.deepcopy(model)
    if entry == "backend":
        wrapped = torch.compile(model, backend="svgd", options={"s": 0.1})
    else:
        wrapped = svgd_fx.transform(model, s=0.1, codegen="inductor" if entry == "transform_inductor" else None)
    ref = SVGDReference(ref_model, s=0.1)
    opt, opt_ref = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref_model.parameters(), lr=0.1)
    for _ in range(3):
        x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
        opt.zero_grad()
        opt_ref.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        for p, q in zip(model.parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
        opt.step()
        opt_ref.step()
    assert t_fired(wrapped) == {"fc.linear"}
