"""DDP with 2 CPU processes (gloo, loopback): each rank sees half the batch; with
distributed=True every rank's r and its virtual gradients after DDP's all-reduce equal one
process on the joined batch — also with gradient accumulation (two passes, micro-batches)."""


import pytest
import torch

from ranks import run_ranks

RANK_SCRIPT = r"""
import os, sys, copy, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
import svgd_fx
from torch.nn.parallel import DistributedDataParallel as DDP
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
codegen = sys.argv[1]
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.ReLU(),
                            torch.nn.Conv1d(1, 3, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(24, 4)).double()
class Net(torch.nn.Module):        # Linear -> LayerNorm -> ReLU -> Conv1d -> Linear
    def __init__(self, m):
        super().__init__()
        self.m = m
    def forward(self, x):
        h = self.m[2](self.m[1](self.m[0](x)))
        return self.m[5](self.m[4](self.m[3](h.unsqueeze(1))))
single = Net(copy.deepcopy(model))
local = Net(model)
ddp = DDP(svgd_fx.transform(local, s=0.1, distributed=True, codegen=codegen))
single_t = svgd_fx.transform(single, s=0.1, distributed=False, codegen=codegen)   # one process's r, on purpose
unsaid = svgd_fx.transform(Net(copy.deepcopy(model)), s=0.1)       # several ranks: must choose
try:
    unsaid(torch.randn(4, 6).double())
    raise AssertionError("no error without distributed= in a process group of 2")
except svgd_fx.SVGDError as e:
    assert "distributed=True" in str(e) and "distributed=False" in str(e), e
unsaid_c = torch.compile(Net(copy.deepcopy(model)), backend=svgd_fx.backend(s=0.1))
try:
    unsaid_c(torch.randn(4, 6).double())
    raise AssertionError("no error under the backend without distributed= in a process group of 2")
except Exception as e:          # Dynamo wraps what a backend raises
    assert "'distributed': True" in str(e), e
opt, opt_single = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (local, single))
gen = torch.Generator().manual_seed(1)
def check(what):                # this rank's virtual gradients and r = one process on the joined batch
    for (n, p), q in zip(local.named_parameters(), single.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13, msg=lambda m: f"rank {rank} {what} {n}: {m}")
    for key, r in ddp.module.svgd_state.tensors.items():
        torch.testing.assert_close(r, single_t.svgd_state.tensors[key], rtol=1e-10, atol=0, msg=lambda m: f"rank {rank} {what} {key}: {m}")
def train():
    for step in range(3):
        x, y = torch.randn(8 * world, 6, generator=gen).double(), torch.randint(0, 4, (8 * world,), generator=gen)
        mine = slice(8 * rank, 8 * (rank + 1))
        opt.zero_grad(); opt_single.zero_grad()
        torch.nn.functional.cross_entropy(ddp(x[mine]), y[mine]).backward()
        torch.nn.functional.cross_entropy(single_t(x), y).backward()
        check(f"step {step}")
        opt.step(); opt_single.step()
    def micro(wrapped, xs, ys):     # this rank's 8 samples as micro-batches of 3 and 5 (mean loss over 8)
        for part in (slice(0, 3), slice(3, 8)):
            (torch.nn.functional.cross_entropy(wrapped(xs[part]), ys[part]) * (xs[part].shape[0] / 8)).backward()
    for step in range(3, 5):        # gradient accumulation, exact two passes: = one step on the joined batch
        x, y = torch.randn(8 * world, 6, generator=gen).double(), torch.randint(0, 4, (8 * world,), generator=gen)
        mine = slice(8 * rank, 8 * (rank + 1))
        opt.zero_grad(); opt_single.zero_grad()
        with svgd_fx.accumulate(ddp, phase="statistics"):
            micro(ddp, x[mine], y[mine])
        with svgd_fx.accumulate(ddp, phase="gradients"):
            micro(ddp, x[mine], y[mine])
        torch.nn.functional.cross_entropy(single_t(x), y).backward()
        check(f"accumulated step {step}")
        opt.step(); opt_single.step()
if codegen == "inductor":      # the generated code of every graph compiled meanwhile
    from torch._inductor.utils import run_and_get_code
    codes = run_and_get_code(train)[1]
else:
    train()
    codes = [gm.code for gm in ddp.module.log.backward_graphs]
fired = {row["node"] for row in svgd_fx.explain(ddp.module).rows if row["t_in_graph"]}
assert fired == {"m.0.linear", "m.1.layer_norm", "m.3.conv1d", "m.5.linear"}, fired
assert all(r.abs().sum() > 0 for r in ddp.module.svgd_state.tensors.values())
# inductor: T in aten ops, the four statistics' all-reduces bucketed into one in each backward graph
# (the plain one and the accumulation's); fx: the T op, which all-reduces eagerly, per σ' node
counts = [(c.count("_c10d_functional.all_reduce"), c.count("svgd_fx.virtual_grad")) for c in codes]
want = (1, 0) if codegen == "inductor" else (0, len(fired))
assert [c for c in counts if c != (0, 0)] == [want, want], counts
print("ok", rank, len(ddp.module.svgd_state.tensors))
dist.destroy_process_group()
"""


TSO_RANK_SCRIPT = r"""
import os, sys, copy, torch, torch.distributed as dist
sys.path.insert(0, os.environ["TESTS_DIR"])
import svgd_fx
from torch.nn.parallel import DistributedDataParallel as DDP
from test_tso import CNN, Seq, OPTS
F = torch.nn.functional
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
for make, shape, kron_layers in ((CNN, (2, 6, 6), {"c1.conv2d", "c2.conv2d", "fc.linear"}),
                                 (Seq, (4, 5), {"inp.linear", "out.linear"})):
    torch.manual_seed(0)
    local = make().double()
    single = copy.deepcopy(local)
    ddp = DDP(svgd_fx.transform(local, method="tso-alra", distributed=True, **OPTS))
    single_t = svgd_fx.transform(single, method="tso-alra", distributed=False, **OPTS)
    opt, opt_single = (torch.optim.SGD(m.parameters(), lr=0.1) for m in (local, single))
    gen = torch.Generator().manual_seed(1)
    def check(what):            # this rank's gradients and factors = one process on the joined batch
        for (n, p), q in zip(local.named_parameters(), single.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-8, atol=1e-11, msg=lambda m: f"rank {rank} {what} {n}: {m}")
        for key, t in ddp.module.svgd_state.tensors.items():
            torch.testing.assert_close(t, single_t.svgd_state.tensors[key], rtol=1e-8, atol=1e-11,
                                       msg=lambda m: f"rank {rank} {what} {key}: {m}")
    def micro(xs, ys):          # this rank's 4 samples as micro-batches of 1 and 3 (mean loss over 4)
        for part in (slice(0, 1), slice(1, 4)):
            (F.cross_entropy(ddp(xs[part]), ys[part]) * (xs[part].shape[0] / 4)).backward()
    # steps 1-2 plain, 3 in two passes (a refresh step: t_int=2), 4 in one pass (roots of step 3 on both
    # sides: the single process runs its whole batch as one micro-batch), 5-6 after the switch
    for step in range(1, 7):
        x, y = torch.randn(4 * world, *shape, generator=gen).double(), torch.randint(0, 3, (4 * world,), generator=gen)
        mine = slice(4 * rank, 4 * (rank + 1))
        opt.zero_grad(); opt_single.zero_grad()
        if step == 3:
            with svgd_fx.accumulate(ddp, phase="statistics"):
                micro(x[mine], y[mine])
            with svgd_fx.accumulate(ddp, phase="gradients"):
                micro(x[mine], y[mine])
            F.cross_entropy(single_t(x), y).backward()
        elif step == 4:
            with svgd_fx.accumulate(ddp):
                micro(x[mine], y[mine])
            with svgd_fx.accumulate(single_t):
                F.cross_entropy(single_t(x), y).backward()
        else:
            with torch.profiler.profile() as prof:
                F.cross_entropy(ddp(x[mine]), y[mine]).backward()
            ops = {e.key: e.count for e in prof.key_averages()}
            kron = ops.get("svgd_fx::kron_t", 0) + ops.get("svgd_fx::kron_t_conv", 0)
            # step 2 updates the factors without a refresh: the fold graph, which all-reduces the
            # statistics itself (one collective per layer; inductor buckets them into one), no T op
            reduces = ops.get("_c10d_functional::all_reduce", 0) + ops.get("_c10d_functional::all_reduce_", 0)
            per_graph = 1 if os.environ.get("SVGD_FX_CODEGEN") == "inductor" else len(kron_layers)
            assert step != 2 or (kron == 0 and reduces == per_graph), ops
            F.cross_entropy(single_t(x), y).backward()
        check(f"{make.__name__} step {step}")
        opt.step(); opt_single.step()
    fired = {row["node"] for row in svgd_fx.explain(ddp.module).rows if row["t_in_graph"]}
    assert fired == kron_layers, fired
    assert all(int(ddp.module.svgd_state[f"{k}.steps"]) == 4 for k in kron_layers)
print("ok", rank, "tso")
dist.destroy_process_group()
"""


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.parametrize("codegen", ["fx", "inductor"])
def test_ddp_two_ranks_match_one_process_on_the_joined_batch(tmp_path, codegen):
    """The T op (codegen="fx") all-reduces T's statistic eagerly; under inductor the fused T holds
    a functional all-reduce in the backward graph."""
    assert not any(out.strip().endswith(" 0") for out in run_ranks(tmp_path, RANK_SCRIPT, codegen))


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
def test_tso_ddp_two_ranks_match_one_process_on_the_joined_batch(tmp_path):
    """TSO-ALRA with distributed=True: the factors' statistics are all-reduced, so every rank's
    factors, roots and (after DDP's all-reduce) gradients are one process's on the joined batch;
    also through svgd_fx.accumulate (two passes, and one pass against one process's one pass)."""
    run_ranks(tmp_path, TSO_RANK_SCRIPT)


def test_distributed_without_a_process_group_is_a_clear_error():
    import svgd_fx
    from cases import PaperMLP

    model_t = svgd_fx.transform(PaperMLP(widths=(6, 5, 3)), s=0.1, distributed=True)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        torch.nn.functional.cross_entropy(model_t(torch.randn(4, 6)), torch.randint(0, 3, (4,))).backward()
