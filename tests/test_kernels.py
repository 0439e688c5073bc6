"""The T op: torch implementation against the contract's formula, the Triton kernel and the aten
spelling (the fused path's) against torch."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from svgd_fx.kernels import triton_available
from svgd_fx.kernels.t_aten import fused_t
from svgd_fx.passes.joint import emitter


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("shape", [(5, 3), (4, 2, 3, 3), (1, 7)])
def test_torch_t_follows_spec(shape, mean):
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    r = torch.rand(shape[1:], dtype=torch.float64)
    r0 = r.clone()
    s, rho, eps = 0.3, 0.7, 1e-4
    out = torch.ops.svgd_fx.virtual_grad(g, r, s, rho, eps, mean, [])
    b = shape[0] if mean else 1
    r_want = rho * r0 + (1 - rho) * ((b * g) ** 2).mean(0)
    torch.testing.assert_close(r, r_want, rtol=1e-14, atol=0)
    torch.testing.assert_close(out, s * g / torch.sqrt(r_want + eps), rtol=1e-14, atol=0)


@pytest.mark.parametrize("reduce", [[2], [1, 3], [1]])
def test_torch_t_averages_reduced_dims(reduce):
    """r over the kept dims: the statistic is a mean over the batch and the reduced dims."""
    torch.manual_seed(0)
    g = torch.randn(3, 4, 5, 2, dtype=torch.float64)
    kept = [d for d in (1, 2, 3) if d not in reduce]
    r = torch.zeros([g.shape[d] for d in kept], dtype=torch.float64)
    out = torch.ops.svgd_fx.virtual_grad(g, r, 0.1, 0.9, 1e-6, True, reduce)
    stat = ((3 * g) ** 2).mean(dim=[0] + reduce, keepdim=True)
    torch.testing.assert_close(r, 0.1 * stat.reshape(r.shape))
    torch.testing.assert_close(out, 0.1 * g / torch.sqrt(0.1 * stat + 1e-6))


def test_opcheck():
    g, r = torch.randn(4, 3), torch.zeros(3)
    torch.library.opcheck(torch.ops.svgd_fx.virtual_grad.default, (g, r, 0.1, 0.9, 1e-6, True, []))


def test_empty_batch_leaves_r():
    r = torch.ones(3)
    out = torch.ops.svgd_fx.virtual_grad(torch.randn(0, 3), r, 0.1, 0.9, 1e-6, True, [])
    assert out.shape == (0, 3) and torch.equal(r, torch.ones(3))


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed (pip install '.[triton]')")
def test_triton_kernel_matches_torch_in_interpreter():
    """TRITON_INTERPRET=1 must be set before Triton is imported: run in a fresh process."""
    code = textwrap.dedent("""
        import torch
        from svgd_fx.kernels._triton_impl import virtual_grad_triton
        from svgd_fx.kernels import virtual_grad_reference
        torch.manual_seed(0)
        for shape, mean, dtype in [((5, 3), True, torch.float32), ((33, 130), False, torch.float32),
                                   ((4, 3, 5, 5), True, torch.float32), ((7, 200), True, torch.float16)]:
            g = torch.randn(shape).to(dtype)
            if len(shape) == 4:
                g = g.transpose(2, 3)           # non-contiguous, like conv gradients
            r1 = torch.rand(shape[1:]); r2 = r1.clone()
            for _ in range(3):
                a = virtual_grad_triton(g, r1.view(-1), 0.1, 0.9, 1e-6, mean).view(g.shape)
                b = virtual_grad_reference(g.contiguous().view(shape[0], -1), r2.view(-1), 0.1, 0.9, 1e-6, mean, [])
                torch.testing.assert_close(r1, r2, rtol=1e-5, atol=1e-7)
                torch.testing.assert_close(a.reshape(shape[0], -1).float(), b.float(), rtol=2e-3 if dtype == torch.float16 else 1e-5, atol=1e-6)
                assert a.is_contiguous()
        print("TRITON-OK")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "TRITON-OK" in res.stdout, res.stdout + res.stderr


def test_package_works_without_triton():
    """With Triton unimportable, svgd_fx imports, trains, and the T op runs its torch path."""
    code = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None            # any `import triton` now raises ImportError
        import torch, svgd_fx
        from svgd_fx.kernels import triton_available
        assert not triton_available()
        m = torch.nn.Linear(4, 2)
        mt = svgd_fx.transform(m, s=0.1)
        torch.nn.functional.cross_entropy(mt(torch.randn(3, 4)), torch.tensor([0, 1, 0])).backward()
        assert m.weight.grad is not None and "weight.linear.r" in mt.svgd_state
        print("NO-TRITON-OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "NO-TRITON-OK" in res.stdout, res.stdout + res.stderr


@pytest.mark.parametrize("mean", [True, False])
@pytest.mark.parametrize("shape, reduce", [((5, 3), []), ((4, 2, 3, 3), []), ((4, 2, 3, 3), [2, 3])])
def test_aten_spelling_matches_the_op(shape, reduce, mean):
    """T emitted as aten nodes (the fused path's spelling of t_formula) updates r and scales g as
    the custom op does: the same formula, its own rounding."""
    torch.manual_seed(0)
    g = torch.randn(shape, dtype=torch.float64)
    r = torch.rand([shape[d] for d in range(1, len(shape)) if d not in reduce], dtype=torch.float64)
    graph = torch.fx.Graph()
    g_node, r_node = graph.placeholder("g"), graph.placeholder("r")
    with FakeTensorMode() as mode:
        g_node.meta["val"], r_node.meta["val"] = mode.from_tensor(g), mode.from_tensor(r)
    out = fused_t(emitter(graph, "svgd_T_x", {}, g_node.meta["val"]), g_node, r_node, s=0.3, rho=0.7, eps=1e-4,
                   mean_reduction=mean, reduce_dims=reduce)
    graph.output(out)
    r_fused, r_op = r.clone(), r.clone()
    got = torch.fx.GraphModule(torch.nn.Module(), graph)(g, r_fused)
    want = torch.ops.svgd_fx.virtual_grad(g, r_op, 0.3, 0.7, 1e-4, mean, reduce)
    torch.testing.assert_close(r_fused, r_op, rtol=1e-13, atol=0)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert all(n.name.startswith("svgd_T_x") for n in graph.nodes if n.op == "call_function")
