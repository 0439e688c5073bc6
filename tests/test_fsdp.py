"""FSDP2 (fully_shard, per block and the root) on 2 CPU processes (gloo, loopback): with
distributed=True each rank's full gradients (DTensor.full_tensor()) and r equal one process on
the joined batch, for both entry points, in float32 and float64; a parameter whose use escapes
the graphs is still a CoverageError; DCP checkpoints resume bit-identically. FSDP1 and tensor
parallelism are refused by name."""

import os
import subprocess
import sys

import pytest
import torch

import svgd_fx
from ranks import free_port, run_ranks

COMMON = r"""
import os, sys, copy, torch, torch.distributed as dist
import svgd_fx
from torch import nn
from torch.distributed.fsdp import fully_shard
F = nn.functional
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)

class Block(nn.Module):
    def __init__(self, i, o):
        super().__init__()
        self.lin, self.norm = nn.Linear(i, o), nn.LayerNorm(o)
    def forward(self, x):
        return torch.tanh(self.norm(self.lin(x)))

@torch.compiler.disable
def outside_the_graphs(x, weight, bias):       # a functional use no graph sees (not a layer call)
    return F.linear(x, weight, bias)

class Net(nn.Module):               # the usual layout: identical blocks in a ModuleList, a head at the root
    def __init__(self, hide_head=False):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.blocks = nn.ModuleList([Block(6, 6), Block(6, 6)])   # one graph, reused for both (per call: r)
        self.head = nn.Linear(6, 3)
        self.hide_head = hide_head
    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            x = b(x)
        if self.hide_head:
            return outside_the_graphs(x, self.head.weight, self.head.bias)
        return self.head(x)

def sharded(m):
    for b in m.blocks:
        fully_shard(b)
    fully_shard(m)
    return m

def wrap(m, kind, distributed):
    if kind == "transform":
        return svgd_fx.transform(m, s=0.1, distributed=distributed)
    return torch.compile(m, backend=svgd_fx.backend(s=0.1, distributed=distributed))

def state(run, model):
    return run.svgd_state if isinstance(run, svgd_fx.SVGDModule) else svgd_fx.state_of(model)

gen = torch.Generator().manual_seed(1)
mine = slice(8 * rank, 8 * (rank + 1))
"""

EXACT_SCRIPT = COMMON + r"""
T_NODES = ["inp.linear", "blocks.0.lin.linear", "blocks.0.norm.layer_norm", "blocks.1.lin.linear", "blocks.1.norm.layer_norm",
           "head.linear"]
for kind in ("transform", "backend"):
    for dtype in (torch.float64, torch.float32):
        torch._dynamo.reset()                          # (each model compiles its own graphs of Net/Block)
        torch.manual_seed(0)
        single = Net().to(dtype)
        model = sharded(copy.deepcopy(single))
        plain = copy.deepcopy(single)
        run, run_s = wrap(model, kind, True), wrap(single, kind, False)   # one process's r on the joined batch
        opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, single, plain)]
        tol = dict(rtol=1e-10, atol=1e-13) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
        for step in range(3):
            x, y = torch.randn(8 * world, 4, generator=gen).to(dtype), torch.randint(0, 3, (8 * world,), generator=gen)
            for opt in opts:
                opt.zero_grad()
            F.cross_entropy(run(x[mine]), y[mine]).backward()
            F.cross_entropy(run_s(x), y).backward()
            F.cross_entropy(plain(x), y).backward()
            differs = False
            for (n, p), q, o in zip(model.named_parameters(), single.parameters(), plain.parameters()):
                assert type(p).__name__ == "DTensor" and type(p.grad).__name__ == "DTensor", n
                full = p.grad.full_tensor()
                torch.testing.assert_close(full, q.grad, **tol, msg=lambda m: f"rank {rank} {kind} {dtype} step {step} {n}: {m}")
                differs |= not torch.allclose(full, o.grad)
            assert differs, "the virtual gradients equal the plain ones: T did nothing"
            for opt in opts:
                opt.step()
        st, st_s = state(run, model), state(run_s, single)
        assert sorted(st.tensors) == sorted(st_s.tensors) == [k + ".r" for k in sorted(T_NODES)], sorted(st.tensors)
        for key, r in st_s.tensors.items():
            assert r.abs().sum() > 0, key
            torch.testing.assert_close(st.tensors[key], r, **tol, msg=lambda m: f"rank {rank} {kind} {key}: {m}")
        report = svgd_fx.explain(run if kind == "transform" else model)
        assert sorted(row["node"] for row in report.rows if row["t_in_graph"]) == sorted(T_NODES), report
    torch._dynamo.reset()
    hidden = sharded(Net(hide_head=True))              # the head runs outside the graphs: loud, as unsharded
    try:
        F.cross_entropy(wrap(hidden, kind, True)(torch.randn(8, 4)), torch.randint(0, 3, (8,))).backward()
        raise AssertionError(f"{kind}: no CoverageError for a head outside the graphs")
    except svgd_fx.CoverageError as e:
        assert "'head.weight', 'head.bias'" in str(e), e
print("ok", rank)
dist.destroy_process_group()
"""

DCP_SCRIPT = COMMON + r"""
import torch.distributed.checkpoint as dcp
ckpt = sys.argv[1]
data = [(torch.randn(8 * world, 4, generator=gen), torch.randint(0, 3, (8 * world,), generator=gen)) for _ in range(5)]

def build():
    torch.manual_seed(0)
    model = sharded(Net())
    return model, svgd_fx.transform(model, s=0.1, distributed=True), torch.optim.SGD(model.parameters(), lr=0.1)

def step(model, run, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(run(x[mine]), y[mine]).backward()
    opt.step()
    return [p.full_tensor().clone() for p in model.parameters()]

model, run, opt = build()
for x, y in data[:3]:
    step(model, run, opt, x, y)
saved = run.state_dict()
dcp.save(saved, checkpoint_id=ckpt)
after = [step(model, run, opt, x, y) for x, y in data[3:]]
r_after = {k: v.clone() for k, v in run.svgd_state.tensors.items()}

model2, run2, opt2 = build()
with torch.no_grad():
    for p in model2.parameters():
        p.zero_()                                   # nothing of the fresh model's own values may survive
loaded = svgd_fx.with_saved_state(run2.state_dict(), checkpoint_id=ckpt)
dcp.load(loaded, checkpoint_id=ckpt)
run2.load_state_dict(loaded)
again = [step(model2, run2, opt2, x, y) for x, y in data[3:]]
for a, b in zip(after, again):                      # bit-identical
    assert all(torch.equal(p, q) for p, q in zip(a, b))
assert r_after.keys() == run2.svgd_state.tensors.keys()
assert all(torch.equal(r, run2.svgd_state.tensors[k]) for k, r in r_after.items())
one = svgd_fx.transform(Net(), s=0.1, distributed=False)   # the keys one process's transform writes
F.cross_entropy(one(data[0][0]), data[0][1]).backward()
assert sorted(saved) == sorted(one.state_dict()), (sorted(saved), sorted(one.state_dict()))
print("ok", rank)
dist.destroy_process_group()
"""


needs_dist = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")


@needs_dist
def test_fsdp2_two_ranks_match_one_process_on_the_joined_batch(tmp_path):
    run_ranks(tmp_path, EXACT_SCRIPT)


@needs_dist
def test_fsdp2_dcp_checkpoint_resumes_bit_identically(tmp_path):
    run_ranks(tmp_path, DCP_SCRIPT, str(tmp_path / "checkpoint"))


def test_fsdp1_is_refused_by_name():
    class FullyShardedDataParallel(torch.nn.Module):     # stands in for FSDP1's wrapper
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), FullyShardedDataParallel(torch.nn.Linear(4, 2)))
    with pytest.raises(svgd_fx.SVGDError, match=r"FSDP1 \(FullyShardedDataParallel\) is not supported \(wrapped "
                                                r"modules: \['1'\]\).*fully_shard"):
        svgd_fx.transform(model, s=0.1)


TP_SCRIPT = r"""
import torch, torch.distributed as dist, svgd_fx
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import distribute_tensor, Shard
dist.init_process_group("gloo", rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
model[0].weight = torch.nn.Parameter(distribute_tensor(model[0].weight.detach(), mesh, [Shard(0)]))
for entry in ("transform", "backend"):
    try:
        if entry == "transform":
            svgd_fx.transform(model, s=0.1, distributed=True)
        else:
            torch.compile(model, backend=svgd_fx.backend(s=0.1, distributed=True))(torch.randn(5, 4)).sum().backward()
        print("ACCEPTED", entry)
    except Exception as e:
        print("REFUSED" if "tensor-parallel parameters" in str(e) and "'0.weight'" in str(e) else "OTHER " + str(e)[:300])
dist.destroy_process_group()
"""


@needs_dist
def test_tensor_parallel_parameters_are_refused(tmp_path):
    script = tmp_path / "tp.py"
    script.write_text(TP_SCRIPT)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    res = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.split() == ["REFUSED", "REFUSED"], res.stdout + res.stderr[-3000:]


def test_a_graph_compiled_under_a_pipelining_schedule_is_refused():
    """A stand-in for torch.distributed.pipelining's schedule: the model called from code in that
    package's files (the check reads the stack at the graph's compile)."""
    namespace = {}
    code = compile("def schedule_step(stage, x):\n    return stage(x)\n",
                   os.path.join("site-packages", "torch", "distributed", "pipelining", "schedules.py"), "exec")
    exec(code, namespace)
    model_t = svgd_fx.transform(torch.nn.Sequential(torch.nn.Linear(4, 3)), s=0.1)
    with pytest.raises(svgd_fx.SVGDError, match=r"pipeline parallelism \(torch.distributed.pipelining\) is not "
                                                r"supported"):
        namespace["schedule_step"](model_t, torch.randn(2, 4))


def test_a_reused_graph_renames_state_by_the_parameters_module_prefix():
    """The names a graph reused for another block gets: its parameters' common module prefix swapped;
    parameters that do not differ by one prefix have none (the call is then an error, not shared state)."""
    from svgd_fx.plan import _prefix_map

    assert _prefix_map(("blocks.0.ln1.weight", "blocks.0.qkv.weight"),
                       ["blocks.1.ln1.weight", "blocks.1.qkv.weight"]) == ("blocks.0.", "blocks.1.")
    assert _prefix_map(("lin.weight",), ["blocks.2.lin.weight"]) == ("", "blocks.2.")
    assert _prefix_map(("a.weight", "b.weight"), ["c.weight", "d.weight"]) is None
    assert _prefix_map(("a.weight",), [None]) is None
    assert _prefix_map(("a.weight",), ["a.bias"]) is None
