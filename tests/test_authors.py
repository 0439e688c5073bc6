"""variant="authors": the authors' TensorFlow code's T (no B factor, T on linear/matmul/conv weights
only, T from r before the step's update) against the independent reference in reference_authors.py."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from reference_authors import AuthorsReference


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = nn.Linear(6, 7), nn.LayerNorm(7), nn.Linear(7, 3)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn = nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.c2, self.fc = nn.Conv2d(4, 3, 3, stride=2, padding=1), nn.Linear(27, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.bn(self.c1(x))))).flatten(1))


MODELS = {  # model, input shape, σ' nodes with T (weights only), σ' nodes without
    "mlp": (MLP, (6,), {"fc1.linear", "fc2.linear"}, {"ln.layer_norm"}),
    "cnn": (CNN, (2, 6, 6), {"c1.conv2d", "c2.conv2d", "fc.linear"}, {"bn.batch_norm"}),
}


def _wrap(model, kind, **kw):
    if kind == "transform":
        return svgd_fx.transform(model, s=0.1, **kw)
    return torch.compile(model, backend=svgd_fx.backend(s=0.1, **kw))


@pytest.mark.parametrize("kind", ["transform", "backend"])
@pytest.mark.parametrize("name", MODELS)
def test_authors_variant_matches_its_reference(name, kind):
    make, shape, with_t, without_t = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    ref_model, paper_model = copy.deepcopy(model), copy.deepcopy(model)
    wrapped, ref = _wrap(model, kind, variant="authors"), AuthorsReference(ref_model, s=0.1)
    paper = _wrap(paper_model, kind)
    opts = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref_model)]
    for step, batch in enumerate((8, 8, 5, 8)):
        x, y = torch.randn(batch, *shape, dtype=torch.float64), torch.randint(0, 3, (batch,))
        for opt in opts:
            opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        want = ref.grads(x, y, F.cross_entropy)
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-11, msg=lambda m: f"step {step} {n}: {m}")
        if step == 0:        # not the paper's step (B factor, T after the update, T on biases and norms)
            paper_model.zero_grad()
            F.cross_entropy(paper(x), y).backward()
            assert all(not torch.allclose(p.grad, q.grad) for (n, p), q in zip(model.named_parameters(),
                                                                                paper_model.parameters())
                       if n.endswith("weight") and n.split(".")[0] in {s.split(".")[0] for s in with_t})
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            q.grad = want[n]
        for opt in opts:
            opt.step()
    report = svgd_fx.explain(wrapped)
    rows = {row["node"]: row for row in report.rows}
    assert {n for n, row in rows.items() if row["t_in_graph"]} == with_t
    assert all(not rows[n]["t_in_graph"] for n in without_t)
    state = wrapped.svgd_state if kind == "transform" else svgd_fx.state_of(model)
    assert sorted(state.tensors) == sorted(f"{n}.r" for n in with_t)
    for n in with_t:
        torch.testing.assert_close(state[f"{n}.r"], ref.r[n.rsplit(".", 1)[0]], rtol=1e-9, atol=1e-14)


def test_bad_variant_is_a_value_error():
    with pytest.raises(ValueError, match="variant must be 'paper'"):
        svgd_fx.transform(MLP(), s=0.1, variant="tf")
    with pytest.raises(ValueError, match=r"\['variant'\] is not an option of method='tso-alra'"):
        svgd_fx.transform(MLP(), method="tso-alra", variant="authors")
