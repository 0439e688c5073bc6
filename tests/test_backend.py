"""``torch.compile(model, backend="svgd")``: inductor after the rewrite, the same numbers as transform()."""

import copy
import os
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import svgd_fx
from cases import CASES, PaperMLP, loss_fn
from helpers import assert_t_fired, cast_inputs, train_changing_batches, twin
from reference import SVGDReference
from svgd_fx.kernels import triton_available

T_CALL = "= torch.ops.svgd_fx.virtual_grad.default("


def _code_of(fn):
    """Run fn; return inductor's generated code, with kernels named after all their FX nodes."""
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.descriptive_names": "inductor_node", "kernel_name_max_ops": 10**6}):
        _, codes = run_and_get_code(fn)
    return "\n".join(codes)


def _t_tag(sigma: str) -> str:
    """How the fused T of σ' node ``sigma`` is named in the graph (kernels.t_aten.fused_t)."""
    return "svgd_T_" + "".join(c if c.isalnum() else "_" for c in sigma)


def _check_t_in_code(code: str, with_t, without_t=()) -> None:
    """Every σ' in ``with_t`` has its T in the generated code: its r (one of the last graph
    inputs, ``primals_<n>``) is passed to a kernel built from T nodes. (Kernel names alone do
    not prove it: inductor reuses one kernel for identical code, e.g. two same-shape BNs.)"""
    import re

    unpacked = re.findall(r"^\s*(.*tangents_\d+.*) = args$", code, flags=re.M)
    assert unpacked, "no backward graph in the generated code"
    primals = sorted({int(n) for line in unpacked for n in re.findall(r"\bprimals_(\d+)\b", line)})
    r_inputs = [f"primals_{n}" for n in primals[-len(with_t):]] if with_t else []
    t_calls = re.findall(r"\n\s*(cpp_fused\w*svgd_T_\w*|\w*triton\w*svgd_T_\w*)\(([^)]*)\)", code)
    fed = {a.strip() for _, args in t_calls for a in args.split(",")}
    assert t_calls and set(r_inputs) <= fed, f"r inputs {r_inputs} not all written by a T kernel; T kernels got {sorted(fed)}"
    named = {n for n in with_t if _t_tag(n) in code}
    assert named, f"no T-named kernel in the code for {sorted(with_t)}"
    extra = [n for n in without_t if _t_tag(n) in code]
    assert not extra, f"T in inductor's code for {extra}, which must keep the plain gradient"


def _step(module, params, case, xs, y, dtype):
    for p in params:
        p.grad = None
    y = y.to(dtype) if y.is_floating_point() else y
    loss_fn(case.loss, module(*cast_inputs(xs, dtype)), y).backward()
    return [p.grad.clone() if p.grad is not None else None for p in params]


def _compiled_and_transformed(case, dtype, s=0.1, seed=0):
    torch.manual_seed(seed)
    model = case.make().to(dtype)
    copied = twin(model, case)
    return model, torch.compile(model, backend="svgd", options={"s": s}), copied, svgd_fx.transform(copied, s=s)


# mechanisms the default run checks on the backend elsewhere (identity adds and class tokens on
# BERT/ViT/GPT-2, attention on the batch-first case): opt-in with -m slow, to keep CI's cold-cache run short
_ALSO_ELSEWHERE = {"positional", "expanded_bias", "seq_first_attention"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c.name in _ALSO_ELSEWHERE else c
                                  for c in CASES if c.name != "lstm"], ids=lambda c: getattr(c, "name", c))
def test_case_table_matches_transform(case):
    """float32, 3 SGD steps: compiled virtual gradients equal transform()'s; T is in inductor's code
    exactly once per σ' that must get one."""
    model, model_c, twin, model_t = _compiled_and_transformed(case, torch.float32)
    params, twin_params = list(model.parameters()), list(twin.parameters())
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
        xs, y = case.inputs(case.batch), case.target(case.batch)
        if step == 0:
            got = []
            code = _code_of(lambda: got.extend(_step(model_c, params, case, xs, y, torch.float32)))
            _check_t_in_code(code, case.t_nodes, case.plain)
            assert T_CALL not in code     # the default T is fused, not the custom op
        else:
            got = _step(model_c, params, case, xs, y, torch.float32)
        want = _step(model_t, twin_params, case, xs, y, torch.float32)
        for (name, _), a, b in zip(model.named_parameters(), got, want):
            assert (a is None) == (b is None), name
            if a is not None:
                scale = b.abs().max().item()
                torch.testing.assert_close(a, b, rtol=1e-4, atol=max(1e-5 * scale, 1e-7),
                                           msg=lambda m: f"step {step}, {name}: {m}")
        with torch.no_grad():
            for p, q in zip(params, twin_params):
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    q -= 0.05 * q.grad
    rows = {row["node"]: row["t_in_graph"] for row in svgd_fx.explain(model_c).rows}
    assert {n for n, t in rows.items() if t} == case.t_nodes
    assert all(not rows[n] for n in case.plain)


@pytest.mark.parametrize("name", ["paper_mlp", "res_cnn", "tiny_transformer", "split_qkv"])
def test_float64_changing_batch_matches_reference(name):
    """float64 against the independent reference while the batch size changes (a last partial
    batch): at most two compiles (static, then dynamic batch), r's shape never follows B."""
    case = next(c for c in CASES if c.name == name)
    shapes = []

    def r_shapes(model, model_c):
        now = {k: tuple(v.shape) for k, v in svgd_fx.state_of(model_c).tensors.items()}
        assert not shapes or now == shapes[-1], "r's shape must not depend on the batch size"
        shapes.append(now)

    model, model_c = train_changing_batches(case, lambda m: torch.compile(m, backend=svgd_fx.backend(s=0.1)),
                                            rtol=1e-8, atol=1e-11, after_step=r_shapes)
    assert_t_fired(model_c, svgd_fx.state_of(model_c), case.t_nodes)
    assert svgd_fx.capture.backend.binding_of(model).log.graphs <= 2


def test_fused_t_reads_r_after_its_update():
    """A LayerNorm read by separate q, k and v linears: its bias gradient is a batch sum of T(g)
    that inductor fuses into the loop computing r's statistic. T must see r_t, not r_{t-1} (at
    step 0, r_{t-1} = 0 inflated the bias step by up to sqrt(r_t/ε)); at B=4 inductor's fusion
    used to load r's buffer before the same kernel stored the update."""
    case = next(c for c in CASES if c.name == "split_qkv")
    model, model_c = train_changing_batches(case, lambda m: torch.compile(m, backend=svgd_fx.backend(s=0.1)),
                                            rtol=1e-8, atol=1e-11, batches=(4, 4, 4))
    assert_t_fired(model_c, svgd_fx.state_of(model_c), case.t_nodes)


def test_backend_forms_and_options():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    # a backend named by string is first called at the first forward; Dynamo wraps what it raises
    failed = torch._dynamo.exc.BackendCompilerFailed
    with pytest.raises(failed, match="needs T's scale s"):
        torch.compile(model, backend="svgd")(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(failed, match="unknown svgd backend options"):
        torch.compile(model, backend="svgd", options={"s": 0.1, "lr": 1})(torch.randn(2, 4))
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="rho must lie"):
        svgd_fx.backend(s=0.1, rho=1.5)
    from torch._dynamo import list_backends
    assert "svgd" in list_backends(exclude_tags=())


def test_one_model_one_config():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    torch.compile(model, backend=svgd_fx.backend(s=0.1))(torch.randn(2, 4)).sum().backward()
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="already compiled with SVGD options"):
        torch.compile(model, backend=svgd_fx.backend(s=0.2))(torch.randn(2, 4))


def test_state_dict_round_trip_and_load_before_first_forward():
    torch.manual_seed(0)
    model = PaperMLP()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(model_c(x), y).backward()
    saved = copy.deepcopy(model_c.state_dict())
    assert "_orig_mod.svgd_state.net.0.linear.r" in saved and saved["_orig_mod.svgd_state.net.0.linear.r"].abs().sum() > 0
    assert set(svgd_fx.state_of(model_c).state_dict()) == {k[len("_orig_mod.svgd_state."):] for k in saved
                                                         if k.startswith("_orig_mod.svgd_state.")}

    fresh = PaperMLP()
    fresh_c = torch.compile(fresh, backend="svgd", options={"s": 0.1})
    fresh_c.load_state_dict(saved)              # strict, before its first forward: every key is known
    for m in (model, fresh):
        for p in m.parameters():
            p.grad = None
    x2, y2 = torch.randn(16, 784), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(model_c(x2), y2).backward()
    torch.nn.functional.cross_entropy(fresh_c(x2), y2).backward()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(p.grad, q.grad)

    bad = {k: (v[:3] if k.endswith("net.0.linear.r") else v) for k, v in saved.items()}
    with pytest.raises(RuntimeError, match="net.0.linear"):
        fresh_c.load_state_dict(bad)


class _Hidden(torch.nn.Module):
    """Parameters used outside every captured graph: ``mid``'s, in code Dynamo does not trace."""

    def __init__(self):
        super().__init__()
        self.fc1, self.mid, self.fc2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    @torch._dynamo.disable
    def _eager(self, h):
        return torch.nn.functional.linear(h, self.mid.weight, self.mid.bias)

    def forward(self, x):
        return self.fc2(torch.relu(self._eager(torch.relu(self.fc1(x)))))


def test_graph_break_hiding_parameters_is_loud():
    """Parameters used only outside the captured graphs would train on plain gradients: the first
    backward raises, naming them, before any optimizer step; exclude= makes it a choice."""
    model = _Hidden()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    with pytest.raises(svgd_fx.CoverageError, match=r"\['mid.weight', 'mid.bias'\].*graph breaks TorchDynamo reported.*disable"):
        torch.nn.functional.cross_entropy(model_c(x), y).backward()
    torch._dynamo.reset()
    model = _Hidden()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1, "exclude": ["mid.weight", "mid.bias"]})
    torch.nn.functional.cross_entropy(model_c(x), y).backward()
    report = svgd_fx.explain(model_c)
    assert {row["node"] for row in report.rows if row["t_in_graph"]} == {"fc1.linear", "fc2.linear"}
    assert report.params_plain == {"mid.weight": "excluded by the user", "mid.bias": "excluded by the user"}


def test_lstm_with_allow_rnn():
    """Dynamo traces nn.LSTM only with allow_rnn (without it, it falls back to eager for the whole
    forward and never calls the backend: see the README)."""
    case = next(c for c in CASES if c.name == "lstm")
    torch.manual_seed(0)
    model = case.make()
    xs, y = case.inputs(4), case.target(4)
    with torch._dynamo.config.patch(allow_rnn=True):
        model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
        loss_fn(case.loss, model_c(*xs), y).backward()
    rows = {row["node"]: row["t_in_graph"] for row in svgd_fx.explain(model_c).rows}
    assert {n for n, t in rows.items() if t} == case.t_nodes and rows["lstm.lstm"] is False


class _Functional(torch.nn.Module):
    """Its parameters are used by functional calls in its own forward (no torch.nn layer)."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = torch.nn.Parameter(torch.randn(5, 6)), torch.nn.Parameter(torch.randn(3, 5))

    def forward(self, x):
        return torch.nn.functional.linear(torch.tanh(torch.nn.functional.linear(x, self.w1)), self.w2)


def test_explain_when_the_backend_compiled_nothing_says_what_happened():
    """A forward TorchDynamo never compiles (here: disabled outright) runs uncompiled: explain()
    says so, and why that happens."""
    model = _Functional()
    model.forward = torch._dynamo.disable(model.forward)
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    loss = torch.nn.functional.cross_entropy(model_c(torch.randn(4, 6)), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(svgd_fx.CoverageError, match="No graph of _Functional has been compiled by backend 'svgd'"):
        loss.backward()            # the model was bound at its first call: plain gradients are an error
    with pytest.raises(TypeError, match="no graph of this _Functional has been compiled by backend 'svgd'"):
        svgd_fx.explain(model_c)


def test_rnns_train_under_the_backend_without_allow_rnn():
    """Dynamo skips nn.LSTM/GRU unless allow_rnn is on; the backend turns it on for the compiles
    of its models (as transform does), so the recurrent model trains with T around the LSTM."""
    case = next(c for c in CASES if c.name == "lstm")
    torch.manual_seed(0)
    model = case.make()
    twin = copy.deepcopy(model)
    assert not torch._dynamo.config.allow_rnn
    model_c, model_t = torch.compile(model, backend="svgd", options={"s": 0.1}), svgd_fx.transform(twin, s=0.1)
    for _ in range(2):
        xs, y = case.inputs(4), case.target(4)
        for m, wrapped in ((model, model_c), (twin, model_t)):
            m.zero_grad()
            loss_fn(case.loss, wrapped(*xs), y).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert not torch._dynamo.config.allow_rnn          # only during the backend's compiles
    rows = {row["node"]: row["t_in_graph"] for row in svgd_fx.explain(model_c).rows}
    assert {n for n, t in rows.items() if t} == case.t_nodes and rows["lstm.lstm"] is False


class _LSTMFirst(torch.nn.Module):
    """An LSTM that reads the data (its input needs no gradient): on CPU in float32 its
    decomposition picks oneDNN's LSTM layer, which inductor's own lowering cannot run."""

    def __init__(self):
        super().__init__()
        self.lstm = torch.nn.LSTM(4, 6, batch_first=True)
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):
        h, _ = self.lstm(x)
        return self.head(h[:, -1])


@pytest.mark.parametrize("entry", ["transform-fx", "transform-inductor", "backend"])
def test_an_lstm_reading_the_data_compiles_in_float32(entry):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _LSTMFirst()
    twin = copy.deepcopy(model)
    ref = SVGDReference(twin, s=0.1)
    wrapped = svgd_fx.transform(model, s=0.1, codegen=entry.split("-")[1]) if entry != "backend" else \
        torch.compile(model, backend="svgd", options={"s": 0.1})
    gen = torch.Generator().manual_seed(1)
    for step in range(2):
        x, y = torch.randn(3, 5, 4, generator=gen), torch.randint(0, 3, (3,), generator=gen)
        model.zero_grad()
        twin.zero_grad()
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):    # decomposed vs fused LSTM: rounding
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{step} {n}: {m}")
    rows = {row["node"]: row["t_in_graph"] for row in svgd_fx.explain(wrapped).rows}
    assert {n for n, t in rows.items() if t} == {"head.linear"} and rows["lstm.lstm"] is False
    assert torch._C._get_mkldnn_enabled() == torch.backends.mkldnn.is_available()   # restored after the compile


def test_no_cache_returns_a_graph_without_the_rewrite(tmp_path, monkeypatch):
    """With inductor's caches on, compiling the same model first with plain inductor, then with
    svgd (twice, after a reset) must give T every time and the same gradients."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    with inductor_config.patch(fx_graph_cache=True), functorch_config.patch(enable_autograd_cache=True):
        plain = copy.deepcopy(model)
        torch.nn.functional.cross_entropy(torch.compile(plain)(x), y).backward()
        grads = []
        for attempt in range(2):
            torch._dynamo.reset()
            m = copy.deepcopy(model)
            model_c = torch.compile(m, backend="svgd", options={"s": 0.1})
            code = _code_of(lambda: torch.nn.functional.cross_entropy(model_c(x), y).backward())
            _check_t_in_code(code, ["0.linear", "2.linear"])
            grads.append([p.grad for p in m.parameters()])
    for a, b in zip(*grads):
        assert torch.equal(a, b)
    assert not torch.equal(grads[0][0], plain[0].weight.grad)


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install '.[triton]')")
def test_triton_t_under_inductor_with_changing_batch():
    """The hazard of TORCH-NOTES: interpreter-mode Triton T + inductor + a batch size that changes
    between steps. Two instances share one compiled graph (Dynamo's cache), one calling the Triton
    T, one the torch T; both must agree every step, and stay near transform()'s float32 run."""
    code = textwrap.dedent("""
        import copy, os, sys
        import torch, svgd_fx
        sys.path.insert(0, os.environ["TESTS_DIR"])
        from cases import PaperMLP, ResCNN
        import svgd_fx.kernels._triton_impl as impl
        calls = [0]
        real = impl.virtual_grad_triton
        def counted(*a):
            calls[0] += 1
            return real(*a)
        impl.virtual_grad_triton = counted
        for make, shape in ((PaperMLP, (784,)), (ResCNN, (1, 8, 8))):
            torch.manual_seed(0)
            models = [make() for _ in range(3)]
            models[1].load_state_dict(models[0].state_dict()); models[2].load_state_dict(models[0].state_dict())
            runs = [("triton", torch.compile(models[0], backend="svgd", options={"s": 0.1, "t_impl": "op"})),
                    ("torch", torch.compile(models[1], backend="svgd", options={"s": 0.1, "t_impl": "op"})),
                    ("torch", svgd_fx.transform(models[2], s=0.1))]
            for step, b in enumerate((16, 16, 5, 16, 3, 11)):
                x, y = torch.randn(b, *shape), torch.randint(0, 10, (b,))
                for (kernel, m), src in zip(runs, models):
                    os.environ["SVGD_FX_KERNEL"] = kernel
                    for p in src.parameters():
                        p.grad = None
                    torch.nn.functional.cross_entropy(m(x), y).backward()
                scale = max(q.grad.abs().max().item() for q in models[1].parameters())
                for (n, p), q, t in zip(models[0].named_parameters(), models[1].parameters(), models[2].parameters()):
                    where = f"{make.__name__} step {step} B={b} {n}"
                    torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"{where} triton vs torch: {m}")
                    torch.testing.assert_close(q.grad, t.grad, rtol=1e-3, atol=2e-5 * scale, msg=lambda m: f"{where} compiled vs transform: {m}")
                with torch.no_grad():
                    for p in models[1].parameters():
                        p -= 0.1 * p.grad
                # every run starts the next step from the same parameters, statistics and r, so each
                # comparison measures one step (float32 differences otherwise grow through BN at B=3)
                synced = runs[1][1].state_dict()                  # weights, statistics and r
                runs[0][1].load_state_dict(synced)
                runs[2][1].load_state_dict({k.removeprefix("_orig_mod."): v for k, v in synced.items()})
        assert calls[0] > 0, "the Triton kernel never ran"
        print("ok", calls[0])
    """)
    env = dict(os.environ, TRITON_INTERPRET="1", TESTS_DIR=os.path.dirname(__file__))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok" in done.stdout


def test_models_sharing_a_compiled_graph_keep_their_own_r():
    """Two instances of one class compiled with equal options: Dynamo serves both from one
    compiled graph; each must still read and update its own r (and match its own transform())."""
    torch.manual_seed(0)
    a, b = PaperMLP(), PaperMLP()
    twins = [copy.deepcopy(a), copy.deepcopy(b)]
    compiled = [torch.compile(m, backend="svgd", options={"s": 0.1}) for m in (a, b)]
    transformed = [svgd_fx.transform(t, s=0.1) for t in twins]
    for step in range(2):
        for model, model_c, copied, model_t in zip((a, b), compiled, twins, transformed):
            x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
            for p in list(model.parameters()) + list(copied.parameters()):
                p.grad = None
            torch.nn.functional.cross_entropy(model_c(x), y).backward()
            torch.nn.functional.cross_entropy(model_t(x), y).backward()
            for (n, p), q in zip(model.named_parameters(), copied.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"step {step} {n}: {m}")
    for model, model_t in zip((a, b), transformed):
        for key, r in svgd_fx.state_of(model).tensors.items():
            torch.testing.assert_close(r, model_t.svgd_state.tensors[key], rtol=1e-4, atol=1e-9)
    mlp_t = next(c for c in CASES if c.name == "paper_mlp").t_nodes
    for model, model_c in zip((a, b), compiled):    # explain() of the second shows the shared graph's σ'
        assert_t_fired(model_c, svgd_fx.state_of(model), mlp_t)


@pytest.mark.parametrize("name", ["paper_mlp", "res_cnn"])
def test_custom_op_t_matches_fused(name):
    """t_impl="op" (the svgd_fx::virtual_grad call, Triton on CUDA) gives the fused T's numbers,
    and its code calls the op once per σ' with a T."""
    case = next(c for c in CASES if c.name == name)
    torch.manual_seed(0)
    a = case.make()
    b = copy.deepcopy(a)
    fused = torch.compile(a, backend=svgd_fx.backend(s=0.1))
    op = torch.compile(b, backend=svgd_fx.backend(s=0.1, t_impl="op"))
    for step in range(3):
        xs, y = case.inputs(case.batch), case.target(case.batch)
        got = _step(fused, list(a.parameters()), case, xs, y, torch.float32)
        if step == 0:
            want = []
            code = _code_of(lambda: want.extend(_step(op, list(b.parameters()), case, xs, y, torch.float32)))
            assert code.count(T_CALL) == len(case.t_nodes)
        else:
            want = _step(op, list(b.parameters()), case, xs, y, torch.float32)
        scale = max(w.abs().max().item() for w in want if w is not None)
        for (n, _), u, v in zip(a.named_parameters(), got, want):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-6 * scale, msg=lambda m: f"step {step} {n}: {m}")
        with torch.no_grad():
            for p, q in zip(a.parameters(), b.parameters()):
                p -= 0.05 * p.grad
                q -= 0.05 * q.grad


def test_channel_mode_and_sum_reduction_fused():
    """The fused T's r_shape="channel" and reduction="sum" branches against transform()."""
    case = next(c for c in CASES if c.name == "res_cnn")
    for kw in ({"r_shape": "channel"}, {"reduction": "sum"}):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = case.make().double()
        twin = copy.deepcopy(model)
        model_c = torch.compile(model, backend=svgd_fx.backend(s=0.1, **kw))
        model_t = svgd_fx.transform(twin, s=0.1, **kw)
        reduction = kw.get("reduction", "mean")
        for batch in (8, 5, 8):
            xs, y = cast_inputs(case.inputs(batch), torch.float64), case.target(batch)
            for m, src in ((model_c, model), (model_t, twin)):
                for p in src.parameters():
                    p.grad = None
                loss_fn(case.loss, m(*xs), y, reduction=reduction).backward()
            for (n, p), q in zip(model.named_parameters(), twin.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{kw} B={batch} {n}: {m}")
        for key, r in svgd_fx.state_of(model).tensors.items():
            torch.testing.assert_close(r, model_t.svgd_state.tensors[key], rtol=1e-10, atol=0)


def test_no_grad_and_eval_forwards_leave_r_alone():
    """Forwards without a backward (no_grad, or eval() for validation) neither touch r nor add
    a T to the graphs they compile."""
    torch.manual_seed(0)
    for kind in ("transform", "backend"):
        torch._dynamo.reset()
        model = PaperMLP()
        wrapped = svgd_fx.transform(model, s=0.1) if kind == "transform" else \
            torch.compile(model, backend="svgd", options={"s": 0.1})
        x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
        torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        state = wrapped.svgd_state if kind == "transform" else svgd_fx.state_of(model)
        assert_t_fired(wrapped, state, next(c for c in CASES if c.name == "paper_mlp").t_nodes)
        before = {k: v.clone() for k, v in state.tensors.items()}
        with torch.no_grad():
            wrapped(torch.randn(16, 784))
        model.eval()
        with torch.no_grad():
            wrapped(torch.randn(7, 784))
        wrapped(torch.randn(7, 784)).sum()        # eval forward with grad enabled, no backward
        for k, v in state.tensors.items():
            assert torch.equal(v, before[k]), f"{kind}: {k} changed without a backward"


def test_model_cast_after_compiling_moves_r():
    """Under the backend r is not a submodule of the model: after model.double() the recompiled
    graph gets r converted (same values), and the virtual gradients stay finite."""
    torch.manual_seed(0)
    model = PaperMLP()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    x, y = torch.randn(16, 784), torch.randint(0, 10, (16,))
    torch.nn.functional.cross_entropy(model_c(x), y).backward()
    assert_t_fired(model_c, svgd_fx.state_of(model), next(c for c in CASES if c.name == "paper_mlp").t_nodes)
    r = {k: v.clone() for k, v in svgd_fx.state_of(model).tensors.items()}
    model.double()
    model.zero_grad()
    torch.nn.functional.cross_entropy(model_c(x.double()), y).backward()
    for key, value in svgd_fx.state_of(model).tensors.items():
        assert value.dtype == torch.float64, key
        assert (value >= 0.9 * r[key].double() - 1e-12).all(), key   # updated from the old values
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_cast_back_and_forth_feeds_each_graph_its_own_dtype():
    """float32 → float64 → float32: Dynamo runs the cached float32 graph again, while r was moved to
    float64 for the float64 graph. r must follow the graph that reads it (before, the float32 graph
    read the float64 r's bytes as float32). Against transform doing the same casts."""
    torch.manual_seed(0)
    model = PaperMLP((20, 12, 5))
    twin = copy.deepcopy(model)
    model_c, model_t = torch.compile(model, backend=svgd_fx.backend(s=0.1)), svgd_fx.transform(twin, s=0.1)
    gen = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.float64, torch.float32, torch.float64):
        model.to(dtype)
        model_t.to(dtype)
        x, y = torch.randn(8, 20, generator=gen).to(dtype), torch.randint(0, 5, (8,), generator=gen)
        for m, wrapped in ((model, model_c), (twin, model_t)):
            m.zero_grad()
            torch.nn.functional.cross_entropy(wrapped(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{dtype} {n}: {m}")
    assert {v.dtype for v in svgd_fx.state_of(model).tensors.values()} == {torch.float64}


class _Inner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(5, 5), torch.nn.Linear(5, 5)

    def forward(self, h):
        h = torch.tanh(self.a(h))
        torch._dynamo.graph_break()          # the rest compiles from this frame (self = _Inner)
        return self.b(h)


class _Outer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.inner, self.out = torch.nn.Linear(4, 5), _Inner(), torch.nn.Linear(5, 3)

    def forward(self, x):
        return self.out(self.inner(torch.relu(self.inp(x))))


def test_graph_break_inside_a_submodule_keeps_one_state_with_root_names():
    torch.manual_seed(0)
    model = _Outer()
    twin = copy.deepcopy(model)
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    model_t = svgd_fx.transform(twin, s=0.1)
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    for _ in range(2):
        for m, src in ((model_c, model), (model_t, twin)):
            src.zero_grad()
            torch.nn.functional.cross_entropy(m(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert set(svgd_fx.state_of(model).tensors) == set(model_t.svgd_state.tensors) == \
        {"inp.linear.r", "inner.a.linear.r", "inner.b.linear.r", "out.linear.r"}
    assert svgd_fx.capture.backend.binding_of(model.inner) is None   # bound once, at the root


class _Body(torch.nn.Module):
    def __init__(self, n_in, n_out):
        super().__init__()
        self.fc, self.ln = torch.nn.Linear(n_in, n_out), torch.nn.LayerNorm(n_out)

    def forward(self, h):
        return torch.tanh(self.ln(self.fc(h)))


class _HooksUnderALock(torch.nn.Module):
    """Installs a forward hook under a lock on its first call (as Hugging Face's output capturing
    does): TorchDynamo gives up on this frame and compiles ``body`` and ``head`` as frames of their
    own, with ``self`` the submodule."""

    def __init__(self):
        super().__init__()
        self.body, self.head = _Body(4, 6), _Body(6, 3)
        self._lock, self._hooked = threading.Lock(), False

    def forward(self, x):
        with self._lock:
            if not self._hooked:
                self.body.register_forward_hook(lambda module, inputs, output: None)
                self._hooked = True
        return self.head(self.body(x))


def test_frames_compiled_inside_an_eager_root_share_one_binding():
    """One model, one state, one pass log, one coverage check, whichever frames Dynamo compiles:
    the graphs of body and head bind to the module torch.compile was called on."""
    torch.manual_seed(0)
    model, ref_model = _HooksUnderALock().double(), _HooksUnderALock().double()
    ref_model.load_state_dict(model.state_dict())
    model_c = torch.compile(model, backend=svgd_fx.backend(s=0.1))
    ref = SVGDReference(ref_model, s=0.1)
    for step in range(3):
        x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
        model.zero_grad()
        ref_model.zero_grad()
        torch.nn.functional.cross_entropy(model_c(x), y).backward()
        torch.nn.functional.cross_entropy(ref(x), y).backward()
        for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"step {step} {n}: {m}")
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
    assert svgd_fx.capture.backend.binding_of(model.body) is None and svgd_fx.capture.backend.binding_of(model.head) is None
    binding = svgd_fx.capture.backend.binding_of(model)
    assert binding.log.graphs >= 2 and binding.guard.checks >= 1
    assert_t_fired(model_c, svgd_fx.state_of(model_c),
                   {"body.fc.linear", "body.ln.layer_norm", "head.fc.linear", "head.ln.layer_norm"})
