"""``reroute`` on one captured joint graph: T sits on the edges into the parameter-gradient
computations of its own σ' node and nowhere else; activation gradients never pass a T.

The joint graph is the one AOTAutograd hands to the partitioner (captured by wrapping
``reroute`` as ``transform(..., codegen="fx")`` calls it); the checks walk its data flow.
"""

import torch
from torch import nn

import svgd_fx
import svgd_fx.methods.svgd as svgd_method


def _ancestors(node: torch.fx.Node) -> set[torch.fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _captured_joint(monkeypatch, model, x):
    joints = []
    real = svgd_method.reroute

    def spy(joint, specs, *args, **kwargs):
        untouched = [n for n in joint.graph.nodes if n.target is torch.ops.svgd_fx.virtual_grad.default]
        assert not untouched, "the joint graph has a T before the pass"
        changed = real(joint, specs, *args, **kwargs)
        joints.append((joint, changed, {spec.r_input for spec in specs}))
        return changed

    monkeypatch.setattr(svgd_method, "reroute", spy)
    svgd_fx.transform(model, s=0.1, codegen="fx")(x).sum().backward()
    assert len(joints) == 1
    return joints[0]


def test_t_on_parameter_edges_only(monkeypatch):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    x = torch.randn(6, 4, requires_grad=True)
    joint, changed, r_inputs = _captured_joint(monkeypatch, model, x)
    assert set(changed) == {"0.linear", "2.linear"}

    graph = joint.graph
    t_nodes = {n.args[8]: n for n in graph.nodes if n.target is torch.ops.svgd_fx.virtual_grad.default}
    assert set(t_nodes) == {"0.linear", "2.linear"}, "one T per σ' node"
    primals = [n for n in graph.nodes if n.op == "placeholder" and n.name.startswith("primals")]
    outputs = next(n for n in graph.nodes if n.op == "output").args[0]
    grads = dict(zip(primals, outputs[len(outputs) - len(primals):]))   # forward outputs first
    by_shape = {tuple(p.meta["val"].shape): p for i, p in enumerate(primals) if i not in r_inputs}
    owner = {(5, 4): "0.linear", (5,): "0.linear", (3, 5): "2.linear", (3,): "2.linear"}
    for shape, sigma in owner.items():
        feeding = _ancestors(grads[by_shape[shape]])
        assert t_nodes[sigma] in feeding, f"the gradient of the {shape} parameter does not pass {sigma}'s T"
        other = next(t for name, t in t_nodes.items() if name != sigma)
        assert other not in feeding, f"the gradient of the {shape} parameter passes another σ' node's T"
    x_grad = grads[by_shape[(6, 4)]]
    assert not (set(t_nodes.values()) & _ancestors(x_grad)), "an activation gradient passed a T"
    # and the activation edge out of the last layer (into tanh's backward) reads g, not T(g)
    first_t_input = t_nodes["0.linear"].args[0]
    assert t_nodes["2.linear"] not in _ancestors(first_t_input) | {first_t_input}


def test_a_parameter_that_enters_nonlinearly_gets_no_t(monkeypatch):
    """x * sigmoid(w): not linear in w, so the pass leaves the joint graph without a T."""

    class Gate(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4))

        def forward(self, x):
            return x * torch.sigmoid(self.w)

    x = torch.randn(3, 4, requires_grad=True)
    joints = []
    real = svgd_method.reroute
    monkeypatch.setattr(svgd_method, "reroute", lambda joint, specs, *a, **k: joints.append(specs)
                        or real(joint, specs, *a, **k))
    model_t = svgd_fx.transform(Gate(), s=0.1, codegen="fx")
    model_t(x).sum().backward()
    assert joints == [[]], "no σ' node is routed, so reroute has nothing to place"
    assert "virtual_grad" not in model_t.log.backward_graphs[0].code
