"""TSO-ALRA (method="tso-alra") against the independent float64 reference of docs/tso-alra.md."""

import copy
import io
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from svgd_fx.kernels import kron_op
from reference_tso import TSOReference

KRON_CALL = "torch.ops.svgd_fx.kron_t.default("
KRON_CONV_CALL = "torch.ops.svgd_fx.kron_t_conv.default("


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.fc2, self.fc3 = nn.Linear(6, 7), nn.BatchNorm1d(7), nn.Linear(7, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.fc3(torch.tanh(self.fc2(F.relu(self.bn(self.fc1(x))))))


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 3, 3, stride=2, padding=1, bias=False)
        self.gn = nn.GroupNorm(1, 3)
        self.fc = nn.Linear(3 * 3 * 3, 4)

    def forward(self, x):
        h = F.relu(self.c1(x))
        return self.fc(F.relu(self.gn(self.c2(h))).flatten(1))


class Seq(nn.Module):
    """Linear on [B, T, C] (T locations per sample), LayerNorm (plain), a parameter used as x*θ (plain)."""

    def __init__(self):
        super().__init__()
        self.inp, self.ln, self.out = nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)
        self.gain = nn.Parameter(torch.ones(6))

    def forward(self, x):
        return self.out(self.ln(self.inp(x)) * self.gain).mean(1)


MODELS = {  # model, input shape, Kronecker layers (T), σ' nodes that keep the plain gradient
    "mlp": (MLP, (6,), {"fc1.linear", "fc2.linear", "fc3.linear"}, {"bn.batch_norm"}),
    "cnn": (CNN, (2, 6, 6), {"c1.conv2d", "c2.conv2d", "fc.linear"}, {"gn.group_norm"}),
    "seq": (Seq, (4, 5), {"inp.linear", "out.linear"}, {"ln.layer_norm", "gain.mul"}),
}
KINDS = ["transform", "backend"]
OPTS = dict(gamma=0.2, t_int=2, damping=1e-3, switch_at_step=4)


def _wrap(model, kind, **kw):
    kw = {**OPTS, **kw}
    if kind == "transform":
        return svgd_fx.transform(model, method="tso-alra", **kw)
    if kind == "in_place":
        model.compile(backend="svgd", options=dict(method="tso-alra", **kw))
        return model
    return torch.compile(model, backend=svgd_fx.backend(method="tso-alra", **kw))


def _state(wrapped, model):
    return wrapped.svgd_state if isinstance(wrapped, svgd_fx.SVGDModule) else svgd_fx.state_of(model)


def _fired(wrapped) -> set[str]:
    return {row["node"] for row in svgd_fx.explain(wrapped).rows if row["t_in_graph"]}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", MODELS)
def test_tso_matches_the_float64_reference(name, kind):
    """Six SGD steps: inverse roots refreshed at t = 1, 3 (t_int=2), plain SGD from step 5 on
    (switch_at_step=4); the loss is a mean at steps 1-6, batch sizes change (8, 8, 5, 8, 3, 8)."""
    _follows_the_reference(name, kind)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cnn", "seq"])
def test_factors_updated_every_t_stat_steps_match_the_reference(name, kind):
    """t_stat=3: the factors take this batch's statistics at t = 1 and 4 only, the roots are still
    refreshed at t = 1, 3 (from the factors as they stand)."""
    _follows_the_reference(name, kind, t_stat=3)


def _beside_the_reference(model, wrapped, ref_model, ref, batches, backward=None, count=False) -> list[int]:
    """SGD steps (lr 0.05) of ``wrapped`` and of the reference on ``batches`` of (x, y), the gradients
    equal at every step; with ``count``, the T custom ops' calls per step. ``backward(wrapped, x, y)`` runs the
    model's backward (default: one mean loss); the reference always takes the whole batch."""
    opt, opt_ref = (torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, ref_model))
    backward = backward or (lambda wrapped, x, y: F.cross_entropy(wrapped(x), y).backward())
    calls = []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        if count:
            calls.append(_kron_calls(lambda: backward(wrapped, x, y)))
        else:
            backward(wrapped, x, y)
        want = ref.grads(x, y, F.cross_entropy)
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, want[n], rtol=1e-9, atol=1e-11, msg=lambda m: f"step {step} {n}: {m}")
            q.grad = want[n]          # the reference returns its gradients; SGD steps on them
        opt.step()
        opt_ref.step()
    return calls


def _kron_calls(run) -> int:
    """How many times the T custom ops ran during ``run()``."""
    with torch.profiler.profile() as prof:
        run()
    return sum(e.count for e in prof.key_averages() if e.key in ("svgd_fx::kron_t", "svgd_fx::kron_t_conv"))


@pytest.mark.parametrize("kind", KINDS + ["transform-fx"])
@pytest.mark.parametrize("name", ["cnn", "seq"])
def test_steps_without_a_refresh_run_aten_graphs_and_match_the_reference(name, kind):
    """t_stat=3, t_int=4: the steps that refresh the roots (t = 1, 5, 9) run the T ops; the others run
    graphs of their own whose T is aten matmuls reading the roots ("steady": t = 2, 3, 6, 8), with the
    statistics folded into A and B by aten ops where the factors update ("fold": t = 4, 7). No custom
    op is called on those steps, and all follow the reference, step counters included."""
    make, shape, kron, _ = MODELS[name]
    opts = dict(gamma=0.2, t_int=4, t_stat=3, damping=1e-3)
    torch.manual_seed(0)
    model = make().double()
    ref_model = copy.deepcopy(model)
    wrapped = (svgd_fx.transform(model, method="tso-alra", codegen="fx", **opts) if kind == "transform-fx"
               else _wrap(model, kind, **opts, switch_at_step=None))
    ref = TSOReference(ref_model, **opts)
    state = _state(wrapped, model)
    batches = [(torch.randn(b, *shape, dtype=torch.float64), torch.randint(0, 3, (b,)))
               for b in (8, 8, 8, 8, 5, 3, 8, 6, 8)]                # dynamic from t = 5 (a refresh step)
    calls = _beside_the_reference(model, wrapped, ref_model, ref, batches, count=True)
    refresh = [t in (1, 5, 9) for t in range(1, 10)]
    assert [c != 0 for c in calls] == refresh, calls     # (a step that compiles counts fake calls too)
    assert all(c >= len(kron) for c, r in zip(calls, refresh) if r), calls
    for layer in kron:
        assert int(state[f"{layer}.steps"]) == ref.state[_module(layer)]["steps"] == 9
        for part in ("A", "B", "A_root", "B_root"):
            torch.testing.assert_close(state[f"{layer}.{part}"], ref.state[_module(layer)][part], rtol=1e-9, atol=1e-12)
    if kind == "transform-fx":    # the aten graphs: each layer's Δ from aten.mm nodes that read its roots
        graphs = [gm.graph for gm in wrapped.log.backward_graphs]
        ours = [g for g in graphs if not any(isinstance(n.target, torch._ops.OpOverload)
                                             and n.target.namespace == "svgd_fx" for n in g.nodes)]
        assert 3 * len(ours) == 2 * len(graphs) == 12    # (a static and a dynamic graph) × (ops, steady, fold)
        folds = 0
        for graph in ours:
            mms = [n for n in graph.nodes if n.target is torch.ops.aten.mm.default and n.name.startswith("tso_T_")]
            for layer in kron:       # every Kronecker layer has its matmuls (node names: tso_T_<σ'>...)
                assert any(n.name.startswith("tso_T_" + layer.replace(".", "_")) for n in mms), (layer, mms)
            copied = [n.args[0] for n in graph.nodes if n.target is torch.ops.aten.copy_.default]
            assert len(copied) in (0, 3 * len(kron))        # fold: A, B and the flag of every layer
            folds += bool(copied)
            read = {a for n in mms for a in n.args if a.op == "placeholder"}
            assert len(read) == 2 * len(kron) and not read & set(copied)    # the roots, only read
            if copied and name == "cnn":   # Σ ppᵀ: c1 (stride 1) from shifted products, c2 (stride 2) from patches
                def layer_nodes(layer, target):
                    return [n for n in graph.nodes if n.name.startswith("tso_T_" + layer) and n.target is target]
                patch_rows = [n for n in layer_nodes("c2_conv2d", torch.ops.aten.cat.default) if n.meta["val"].dim() == 5]
                assert len(patch_rows) == 1 and len(patch_rows[0].args[0]) == 9
                assert not any(n.meta["val"].dim() == 5 for n in layer_nodes("c1_conv2d", torch.ops.aten.cat.default))
                assert len(layer_nodes("c1_conv2d", torch.ops.aten.mm.default)) >= 13 + 3   # 13 shifts, Σ ĝĝᵀ, Δ
        assert folds == 2


def test_in_place_compile_of_a_torch_nn_model():
    """``nn.Sequential(...).compile(backend="svgd", options={"method": "tso-alra", ...})``: torch.nn's
    own model compiled whole, its T ops, fold and steady graphs as under ``torch.compile(model)``."""
    MODELS["sequential"] = (lambda: nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)), (6,),
                            {"0.linear", "2.linear"}, set())
    try:
        _follows_the_reference("sequential", "in_place")
        test_steps_without_a_refresh_run_aten_graphs_and_match_the_reference("sequential", "in_place")
    finally:
        del MODELS["sequential"]


@pytest.mark.parametrize("pattern", ["siamese", "forward without backward"])
def test_a_model_called_again_before_its_backward_runs_as_the_t_ops_do(monkeypatch, pattern):
    """A siamese loss from the first step (two calls, one backward), or a forward with grad that never
    gets a backward (at t = 4, a fold step): from the repeated call on, the graph with the T ops runs
    (they take their t at the backward), and gradients, factors and counters stay those of a model
    that runs the T ops at every step."""
    torch.manual_seed(0)
    model = Seq().double()
    plain_model = copy.deepcopy(model)
    opts = dict(method="tso-alra", gamma=0.2, t_int=4, t_stat=3, damping=1e-3)
    with monkeypatch.context() as patch:           # the T ops at every step: no variants compiled
        patch.setattr(svgd_fx.methods.tso.TSOMethod, "variants", lambda self, plan: None)
        ops = svgd_fx.transform(plain_model, **opts)
        ops(torch.randn(8, 4, 5, dtype=torch.float64))
    wrapped = svgd_fx.transform(model, **opts)
    gen = torch.Generator().manual_seed(1)
    calls = []
    for step in range(9):
        x1, x2 = (torch.randn(8, 4, 5, dtype=torch.float64, generator=gen) for _ in range(2))
        y = torch.randint(0, 3, (8,), generator=gen)
        grads = []
        for m, w in ((model, wrapped), (plain_model, ops)):
            m.zero_grad()

            def run():
                if pattern == "siamese":
                    (F.cross_entropy(w(x1), y) + F.cross_entropy(w(x2), y)).backward()
                    return
                if step == 3:
                    w(x2)
                F.cross_entropy(w(x1), y).backward()

            if w is wrapped:
                calls.append(_kron_calls(run))
            else:
                run()
            grads.append([p.grad.clone() for p in m.parameters()])
        for mine, want in zip(*grads):
            torch.testing.assert_close(mine, want, rtol=1e-10, atol=1e-12, msg=lambda m: f"step {step}: {m}")
    for key, value in ops.svgd_state.tensors.items():
        torch.testing.assert_close(wrapped.svgd_state[key], value, rtol=1e-10, atol=1e-12)
    assert int(wrapped.svgd_state["inp.linear.steps"]) == (18 if pattern == "siamese" else 9)
    if pattern == "forward without backward":     # the fold and steady graphs ran until then
        assert calls[1:3] == [0, 0] and all(c > 0 for c in calls[3:])


def test_a_call_whose_step_another_call_took_is_an_error():
    """A model called once per step and then twice before a backward: the first call ran the graph of
    t = 2 (fold), the second's T ops took t = 2 in the backward (they run first): an error."""
    wrapped = svgd_fx.transform(Seq(), method="tso-alra", t_int=4)
    x, y = torch.randn(8, 4, 5), torch.randint(0, 3, (8,))
    F.cross_entropy(wrapped(x), y).backward()                  # t = 1: the T ops
    with pytest.raises(svgd_fx.SVGDError, match="ran the 'fold' graph of step t = 2.*another call"):
        (F.cross_entropy(wrapped(x), y) + F.cross_entropy(wrapped(x), y)).backward()


class Pooled(nn.Module):
    """A conv net whose input may change size (global pooling before the head)."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(2, 4, 3, padding=1), nn.Conv2d(4, 3, 3, stride=2), nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c1(x)))).mean((2, 3)))


def test_the_fold_graph_takes_images_of_changing_size():
    """Images of changing height and width (symbolic in the graph from the third step): the fold
    graph's patches follow the sizes, and the factors follow the reference. (codegen="fx": torch
    2.13's inductor itself fails on this model once H and W are dynamic, without svgd_fx.)"""
    torch.manual_seed(0)
    model = Pooled().double()
    ref_model = copy.deepcopy(model)
    opts = dict(gamma=0.2, t_int=20, damping=1e-3)
    wrapped = svgd_fx.transform(model, method="tso-alra", codegen="fx", **opts)
    ref = TSOReference(ref_model, **opts)
    batches = [(torch.randn(4, 2, hw, hw, dtype=torch.float64), torch.randint(0, 3, (4,))) for hw in (6, 6, 8, 7, 9, 6)]
    calls = _beside_the_reference(model, wrapped, ref_model, ref, batches, count=True)
    assert calls[1] == 0 and calls[3:] == [0] * 3   # t = 2…6 fold (t = 3 compiles: fake calls count)
    state = wrapped.svgd_state
    for layer in ("c1.conv2d", "c2.conv2d", "fc.linear"):
        assert int(state[f"{layer}.steps"]) == 6
        torch.testing.assert_close(state[f"{layer}.A"], ref.state[_module(layer)]["A"], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(state[f"{layer}.B"], ref.state[_module(layer)]["B"], rtol=1e-9, atol=1e-12)


def _follows_the_reference(name, kind, backward=None, ref_kw=None, wrap_kw=None, **extra):
    """Six SGD steps against the reference; ``backward(wrapped, x, y)`` runs the model's backward
    (default: one mean loss), the reference always takes the whole batch."""
    make, shape, kron, plain = MODELS[name]
    torch.manual_seed(0)
    model = make().double()
    ref_model = copy.deepcopy(model)
    wrapped = _wrap(model, kind, **extra, **(wrap_kw or {}))
    ref = TSOReference(ref_model, **OPTS, **extra, **(ref_kw or {}))
    batches = [(torch.randn(b, *shape, dtype=torch.float64), torch.randint(0, 3, (b,))) for b in (8, 8, 5, 8, 3, 8)]
    _beside_the_reference(model, wrapped, ref_model, ref, batches, backward)
    state = _state(wrapped, model)
    assert _fired(wrapped) == kron
    rows = {row["node"]: row for row in svgd_fx.explain(wrapped).rows}
    assert plain <= set(rows) and not any(rows[p]["t_in_graph"] for p in plain)
    for layer in kron:       # the factors followed the reference's, and stopped at the switch
        ref_state = ref.state[_module(layer)]
        assert int(state[f"{layer}.steps"]) == ref_state["steps"] == 4
        for part in ("A", "B", "A_root", "B_root"):
            torch.testing.assert_close(state[f"{layer}.{part}"], ref_state[part], rtol=1e-9, atol=1e-12)
    assert svgd_fx.switched(wrapped)
    return wrapped, model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_grad_scaler_factors_come_from_the_unscaled_gradient(name, kind):
    """A GradScaler (float64, a scale that never overflows): B is built from ∇σ'J / S and the
    preconditioned gradient stays S× large for ``unscale_``; after it, the reference's."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12, growth_interval=2)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)])     # unscale_ needs one; the test steps itself

    def backward(wrapped, x, y):
        scaler.scale(F.cross_entropy(wrapped(x), y)).backward()
        opt.param_groups[0]["params"] = [p for p in wrapped.parameters()]
        scaler.unscale_(opt)
        scaler.update()

    _follows_the_reference(name, kind, backward, wrap_kw=dict(grad_scaler=scaler))
    assert scaler.get_scale() > 2.0 ** 12      # it grew: the scale changed between steps


@pytest.mark.parametrize("t_stat", [1, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_steps_the_scaler_skips_leave_the_factors_as_they_were(kind, t_stat):
    """fp16 autocast, a scale that overflows at first: the skipped steps do not count, and the
    factors and roots are those of an fp32 run on the kept steps' batches (to fp16's accuracy).
    With t_stat=3 some steps run the steady graph, chosen after the roll-back of a skipped step."""
    from cases import PaperMLP
    torch.manual_seed(0)
    model16 = PaperMLP(widths=(20, 16, 12, 5))
    model32 = copy.deepcopy(model16)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 20, growth_interval=4)
    kw = dict(gamma=0.2, t_int=2, damping=1e-3, switch_at_step=None, t_stat=t_stat)
    wrapped16, wrapped32 = _wrap(model16, kind, grad_scaler=scaler, **kw), _wrap(model32, kind, **kw)
    opt16 = torch.optim.SGD(model16.parameters(), lr=0.0)     # parameters fixed: only the factors evolve
    gen = torch.Generator().manual_seed(1)
    skipped, kept, first_skipped = 0, 0, None
    for step in range(20):
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt16.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = wrapped16(x)
        scale = scaler.get_scale()
        scaler.scale(F.cross_entropy(out.float(), y)).backward()
        scaler.step(opt16)
        scaler.update()
        if scaler.get_scale() < scale:          # inf found: the step was skipped
            first_skipped = first_skipped or kept + 1
            skipped += 1
            continue
        kept += 1
        model32.zero_grad()
        F.cross_entropy(wrapped32(x), y).backward()
    with torch.no_grad():                       # the forward that rolls back a last skipped step
        wrapped16(torch.randn(4, 20))
    assert skipped >= 1 and kept >= 4 and first_skipped == 1, (skipped, kept, first_skipped)
    svgd_fx.switch_to_sgd(wrapped16)            # after the switch: autocast's plain gradients
    x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
    grads = []
    for m, w in ((model16, wrapped16), (copy.deepcopy(model16), None)):
        m.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = (m if w is None else w)(x)
        F.cross_entropy(out.float(), y).backward()
        grads.append([p.grad for p in m.parameters()])
    top = max(g.abs().max().item() for g in grads[1])   # to fp16's rounding: inductor fuses differently
    for mine, plain in zip(*grads):                     # from eager (a bias before BatchNorm: ∇ ≈ 0)
        torch.testing.assert_close(mine, plain, rtol=1e-2, atol=1e-3 * top)
    s16, s32 = _state(wrapped16, model16), _state(wrapped32, model32)
    for layer in ("net.0.linear", "net.3.linear", "net.6.linear"):
        assert int(s16[f"{layer}.steps"]) == int(s32[f"{layer}.steps"]) == kept
        for part in ("A", "B", "A_root", "B_root"):
            want = s32[f"{layer}.{part}"]
            torch.testing.assert_close(s16[f"{layer}.{part}"], want, rtol=2e-2, atol=1e-2 * want.abs().max().item(),
                                       msg=lambda m: f"{layer}.{part}: {m}")
    assert _fired(wrapped16) == {"net.0.linear", "net.3.linear", "net.6.linear"}


def _micro_batches(wrapped, x, y, phases):
    """The batch as two micro-batches (about 1/3 and 2/3; mean loss over the batch) in each
    ``svgd_fx.accumulate`` phase given."""
    cut = max(1, x.shape[0] // 3)
    for phase in phases:
        with svgd_fx.accumulate(wrapped, phase=phase):
            for part in (slice(0, cut), slice(cut, None)):
                (F.cross_entropy(wrapped(x[part]), y[part]) * (x[part].shape[0] / x.shape[0])).backward()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cnn", "seq"])
def test_two_pass_accumulation_equals_one_big_batch(name, kind):
    """svgd_fx.accumulate(phase="statistics") then ("gradients"): the factors take the pooled
    statistics of both micro-batches, T their roots, and the step is the reference's on the whole
    batch (refresh steps included)."""
    _follows_the_reference(name, kind, lambda w, x, y: _micro_batches(w, x, y, ("statistics", "gradients")),
                           wrap_kw=dict(accumulation=True) if kind == "backend" else None)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", ["cnn", "seq"])
def test_one_pass_accumulation_uses_the_roots_of_the_previous_step(name, kind):
    """svgd_fx.accumulate() (one pass): T reads the roots as the previous step left them, the pooled
    statistics are folded in at the end of the block and the roots refreshed then: the reference
    with lagged roots — zero at t = 1 (no roots yet), the refresh of t = 3 used from t = 4."""
    zero_first = []

    def backward(wrapped, x, y):
        _micro_batches(wrapped, x, y, ("single",))
        if not zero_first:
            zero_first.append(all(float(p.grad.abs().max()) == 0 for n, p in wrapped.named_parameters()
                                  if n.split(".")[0] in {"c1", "c2", "fc", "inp", "out"}))

    _follows_the_reference(name, kind, backward, ref_kw=dict(lagged_roots=True),
                           wrap_kw=dict(accumulation=True) if kind == "backend" else None)
    assert zero_first == [True]


def _module(sigma_name: str) -> str:
    return sigma_name.rsplit(".", 1)[0]


def test_t_nodes_sit_on_both_edges_and_activation_gradients_stay_exact():
    """One T node per Kronecker layer in the backward graph: kron_t fed by the linear layer's rows,
    kron_t_conv by ∇σ'J, the conv's input and the graph's own weight (and bias) gradient; x.grad
    (through every layer) is autograd's, bitwise."""
    torch.manual_seed(1)
    model = CNN().double()
    plain = copy.deepcopy(model)
    model_t = svgd_fx.transform(model, method="tso-alra", damping=1e-3)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64, requires_grad=True)
    x_plain = x.detach().clone().requires_grad_()
    y = torch.randint(0, 4, (4,))
    F.cross_entropy(model_t(x), y).backward()
    F.cross_entropy(plain(x_plain), y).backward()
    torch.testing.assert_close(x.grad, x_plain.grad, rtol=1e-13, atol=0)
    ops = [gm for gm in model_t.log.backward_graphs if "svgd_fx.kron_t" in gm.code]   # (not the fold graph's)
    assert len(ops) == 1 and len(model_t.log.backward_graphs) == 2
    code = ops[0].code
    assert code.count(KRON_CALL) == 1 and code.count(KRON_CONV_CALL) == 2
    assert "im2col" not in code and "unfold" not in code               # patches only inside the op
    assert code.count("constant_pad_nd") == 1                          # fc's bias column; convs fold it inside
    nodes = list(ops[0].graph.nodes)
    conv_ts = [n for n in nodes if n.target is torch.ops.svgd_fx.kron_t_conv.default]
    for t in conv_ts:             # Ĝ comes from convolution_backward's weight (and bias) outputs
        sources, frontier = set(), [t.args[2]]
        while frontier:
            n = frontier.pop()
            if n.target is operator.getitem and n.args[0].target is torch.ops.aten.convolution_backward.default:
                sources.add(n.args[1])
            else:
                frontier.extend(n.all_input_nodes)
        has_bias = t.args[13]
        assert sources == ({1, 2} if has_bias else {1})
    assert sorted(t.args[13] for t in conv_ts) == [False, True]       # c2 has no bias, c1 has one
    gn = plain.gn.weight.grad
    torch.testing.assert_close(model.gn.weight.grad, gn, rtol=1e-12, atol=1e-14)   # plain: GroupNorm


def test_backend_has_the_t_node_in_inductors_code():
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(2)
    model = MLP()
    model_c = torch.compile(model, backend=svgd_fx.backend(method="tso-alra"))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    _, codes = run_and_get_code(lambda: F.cross_entropy(model_c(x), y).backward())
    assert sum(code.count("svgd_fx.kron_t") for code in codes) >= 3


def test_switch_to_sgd_by_call_and_on_plateau():
    torch.manual_seed(3)
    model = MLP().double()
    plain = copy.deepcopy(model)
    model_t = svgd_fx.transform(model, method="tso-alra")
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.randint(0, 3, (8,))
    F.cross_entropy(model_t(x), y).backward()
    assert not torch.allclose(model.fc1.weight.grad, _plain_grads(plain, x, y)["fc1.weight"])
    switch = svgd_fx.SwitchOnPlateau(model_t, patience=2)
    assert [switch.step(v) for v in (1.0, 0.9, 0.95, 0.92)] == [False, False, False, True]
    assert switch.switched_at_epoch == 4 and svgd_fx.switched(model_t)
    steps = int(model_t.svgd_state["fc1.linear.steps"])
    A = model_t.svgd_state["fc1.linear.A"].clone()
    model.zero_grad()
    F.cross_entropy(model_t(x), y).backward()
    for n, g in _plain_grads(plain, x, y).items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-12, atol=1e-14)
    assert int(model_t.svgd_state["fc1.linear.steps"]) == steps
    assert torch.equal(model_t.svgd_state["fc1.linear.A"], A)
    assert model_t.state_dict()["svgd_state.tso.switched"] == 1


@pytest.mark.parametrize("kind", KINDS)
def test_after_the_switch_the_step_runs_a_graph_without_t_nodes(kind):
    """Compiled by inductor, a switched model runs Dynamo's graph without the rewrite (compiled
    beside the TSO-ALRA graph): no T node is called, the gradients are autograd's, the factors
    stay; loading a state from before the switch runs the T nodes again."""
    torch.manual_seed(5)
    model = CNN()
    plain = copy.deepcopy(model)
    opts = dict(method="tso-alra", t_int=1)     # every step refreshes: the T ops run (not the aten graphs)
    wrapped = (svgd_fx.transform(model, codegen="inductor", **opts) if kind == "transform"
               else torch.compile(model, backend=svgd_fx.backend(**opts)))
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 4, (4,))

    def t_calls():
        model.zero_grad()
        with torch.profiler.profile() as prof:
            F.cross_entropy(wrapped(x), y).backward()
        return sum(e.count for e in prof.key_averages() if e.key in ("svgd_fx::kron_t", "svgd_fx::kron_t_conv"))

    F.cross_entropy(wrapped(x), y).backward()    # compiles (the fake calls of the T ops would count)
    assert t_calls() == 3                        # kron_t_conv ×2, kron_t ×1
    before = {k: v.clone() for k, v in wrapped.state_dict().items()}
    svgd_fx.switch_to_sgd(wrapped)
    assert t_calls() == 0
    for n, g in _plain_grads(plain, x, y).items():
        torch.testing.assert_close(dict(model.named_parameters())[n].grad, g, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(v, before[k]) for k, v in wrapped.state_dict().items() if "svgd_state" in k
               and not k.endswith("tso.switched"))
    wrapped.load_state_dict(before)
    assert not svgd_fx.switched(wrapped) and t_calls() == 3


def _plain_grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_resume_is_bit_identical(kind):
    torch.manual_seed(4)
    model = CNN()
    twin = copy.deepcopy(model)
    wrapped = _wrap(model, kind, switch_at_step=None)
    data = [(torch.randn(6, 2, 6, 6), torch.randint(0, 4, (6,))) for _ in range(5)]
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in data[:3]:
        opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()
    buffer = io.BytesIO()
    torch.save({"model": wrapped.state_dict(), "opt": opt.state_dict()}, buffer)
    keys = set(wrapped.state_dict())
    prefix = "" if kind == "transform" else "_orig_mod."
    for layer in ("c1.conv2d", "c2.conv2d", "fc.linear"):
        assert {f"{prefix}svgd_state.{layer}.{part}" for part in ("A", "A_root", "B", "B_root", "steps")} <= keys
    assert f"{prefix}svgd_state.tso.switched" in keys
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = _wrap(twin, kind, switch_at_step=None)
    if kind == "backend":
        svgd_fx.state_of(resumed)
    resumed.load_state_dict(saved["model"])
    opt_twin = torch.optim.SGD(twin.parameters(), lr=0.05)
    opt_twin.load_state_dict(saved["opt"])
    for x, y in data[3:]:       # step 4 refreshes nothing, step 5 does not either (t_int=2: t=5 does)
        for m, w, o in ((model, wrapped, opt), (twin, resumed, opt_twin)):
            o.zero_grad()
            F.cross_entropy(w(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad), n
        opt.step()
        opt_twin.step()
    kron = {"c1.conv2d", "c2.conv2d", "fc.linear"}
    assert _fired(wrapped) == _fired(resumed) == kron      # both runs preconditioned, not plain
    assert all(int(_state(w, m)[f"{k}.steps"]) == 5 for w, m in ((wrapped, model), (resumed, twin)) for k in kron)


@pytest.mark.parametrize("bad, match", [
    (dict(damping=0.0), "damping"), (dict(damping=-1e-3), "damping"), (dict(gamma=1.0), "gamma"),
    (dict(gamma=-0.1), "gamma"), (dict(t_int=0), "t_int"), (dict(t_int=2.5), "t_int"),
    (dict(switch_at_step=-1), "switch_at_step"), (dict(s=0.1), r"\['s'\] is not an option"),
    (dict(rho=0.9), "rho"),
])
def test_bad_options_are_value_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        svgd_fx.transform(MLP(), method="tso-alra", **bad)
    with pytest.raises(ValueError, match=match):
        svgd_fx.backend(method="tso-alra", **bad)


def test_other_misuse_is_refused():
    with pytest.raises(ValueError, match=r"\['gamma'\] is not an option of method='svgd'"):
        svgd_fx.transform(MLP(), s=0.1, gamma=0.1)
    with pytest.raises(ValueError, match="method must be one of"):
        svgd_fx.transform(MLP(), method="kfac")
    with pytest.raises(ValueError, match="tso-alra"):
        svgd_fx.switch_to_sgd(svgd_fx.transform(MLP(), s=0.1))


def test_a_nan_in_a_factor_is_an_error_naming_the_layer():
    model_t = svgd_fx.transform(MLP(), method="tso-alra")
    x = torch.randn(8, 6)
    x[0, 0] = float("nan")
    # the NaN spreads to every activation; the backward reaches the last layer first
    with pytest.raises(svgd_fx.FactorError, match=r"factor A of layer 'fc3\.linear'.*non-finite"):
        F.cross_entropy(model_t(x), torch.randint(0, 3, (8,))).backward()
    assert int(model_t.svgd_state["fc3.linear.steps"]) == 0
    assert model_t.svgd_state["fc3.linear.A"].abs().sum() == 0


@pytest.mark.parametrize("kind", KINDS)
def test_a_nan_at_a_step_that_folds_the_factors_in_the_graph_is_an_error_too(kind):
    """t = 2 folds the statistics in aten ops (no custom op): a NaN there raises the same error at the
    end of that backward, leaves every factor and counter as it was, and the next step trains."""
    model = MLP()
    wrapped = _wrap(model, kind, switch_at_step=None, t_int=20)
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    F.cross_entropy(wrapped(x), y).backward()
    state = _state(wrapped, model)
    before = {k: v.clone() for k, v in state.tensors.items()}
    bad = x.clone()
    bad[0, 0] = float("nan")

    def fails():
        with pytest.raises(svgd_fx.FactorError, match=r"factor A of layer 'fc3\.linear'.*non-finite"):
            F.cross_entropy(wrapped(bad), y).backward()

    assert _kron_calls(fails) == 0                  # the fold graph ran (it compiled at the first step)
    assert all(torch.equal(v, before[k]) for k, v in state.tensors.items())
    model.zero_grad()
    assert _kron_calls(lambda: F.cross_entropy(wrapped(x), y).backward()) == 0     # t = 2 again: the fold graph
    assert int(state["fc1.linear.steps"]) == 2 and not torch.equal(state["fc1.linear.A"], before["fc1.linear.A"])


def test_a_factor_not_positive_definite_after_damping_is_an_error():
    from svgd_fx.kernels import inverse_root

    with pytest.raises(svgd_fx.FactorError, match=r"layer 'fc'.*not positive definite.*-1\.000e\+00"):
        inverse_root(torch.diag(torch.tensor([2.0, -1.0])), 1e-3, "fc", "B")
    root = inverse_root(torch.diag(torch.tensor([4.0, 0.0])), 1e-6)
    torch.testing.assert_close(root, torch.diag(torch.tensor([0.5, 1e3])))


def test_float32_roots_come_from_float32_eigh_only_where_accurate(monkeypatch):
    """A float32 factor with λ_max ≤ 1e4·ε: eigh in float32, the root within 1e-3 of float64's;
    λ_max above that (or a float64 factor): eigh in float64."""
    from svgd_fx.kernels import inverse_root

    seen = []
    eigh = torch.linalg.eigh
    monkeypatch.setattr(torch.linalg, "eigh", lambda a: seen.append(a.dtype) or eigh(a))
    torch.manual_seed(6)
    x = torch.randn(64, 40, dtype=torch.float64)
    factor = x.mT @ x / 64                                       # λ_max ≈ 3.5
    want = inverse_root(factor, 1e-2)
    assert seen == [torch.float64]
    for damping, dtypes in ((1e-2, [torch.float32]), (1e-5, [torch.float64])):
        seen.clear()
        got = inverse_root(factor.float(), damping)
        assert seen == dtypes and got.dtype == torch.float32
        if damping == 1e-2:
            assert float((got.double() - want).norm() / want.norm()) < 1e-3
        else:                            # λ_max surely above the limit: no float32 eigh tried in vain
            torch.testing.assert_close(got, inverse_root(factor, damping).float())
    monkeypatch.setattr(kron_op, "_above", lambda factor, limit: False)   # bounds inconclusive:
    seen.clear()                                                          # float32 tried, then float64
    torch.testing.assert_close(inverse_root(factor.float(), 1e-5), inverse_root(factor, 1e-5).float())
    assert seen == [torch.float32, torch.float64, torch.float64]


def test_the_lower_bounds_on_the_largest_eigenvalue():
    ones = torch.ones(50, 50)                      # diagonal 1, λ_max = 50
    assert kron_op._above(ones, 40.0) and not kron_op._above(ones, 60.0)
    assert kron_op._above(torch.diag(torch.tensor([1.0, 20.0])), 10.0)     # from the diagonal
    assert not kron_op._above(torch.zeros(3, 3), 1e-9)


def test_the_paper_mlp_trains_at_damping_1e_3():
    """The MLP on which ASDL's K-FAC failed with a Cholesky error at damping 1e-3: the
    eigh-based roots stay finite and the loss goes down."""
    from cases import PaperMLP

    torch.manual_seed(5)
    model = PaperMLP()
    model_t = svgd_fx.transform(model, method="tso-alra", damping=1e-3, t_int=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = F.cross_entropy(model_t(x[:32]), y[:32])
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]
    linears = {f"net.{i}.linear" for i in (0, 3, 6, 9, 12)}
    assert _fired(model_t) == linears                       # BatchNorm keeps the plain gradient
    assert all(int(model_t.svgd_state[f"{k}.steps"]) == 12 for k in linears)


def test_repr_shows_the_method_options():
    """print(model_t) and the backend's repr describe the config of its method (one describe())."""
    text = repr(svgd_fx.transform(nn.Linear(3, 2), method="tso-alra", damping=1e-3))
    assert "method='tso-alra'" in text and "damping=0.001" in text and "s=None" not in text
    assert "s=0.1, rho=0.9" in repr(svgd_fx.transform(nn.Linear(3, 2), s=0.1))
    assert repr(svgd_fx.backend(method="tso-alra")).startswith("svgd_fx.backend(method='tso-alra', gamma=0.05")
