"""FSDP2 on CPU processes: what each rank holds, and the step time against plain FSDP2.

    python -m benchmarks.fsdp                       # 2 ranks (gloo, 127.0.0.1)
    python -m benchmarks.fsdp --world 4 --json out.json

A TinyGPT (``benchmarks.models``: 4 pre-LN blocks, dim 256, seq 64, tied head) is sharded with
``fully_shard`` per block and at the root, as FSDP2 users do, and trained through
``svgd_fx.transform(model, s=0.1, distributed=True)`` and through plain ``torch.compile`` (SGD and
Adam on the sharded parameters). Per rank: the parameters' shard bytes, Adam's state bytes (its
shards), and SVGD's state bytes (r, one per σ' node: activation-shaped, the same on every rank);
and the step time of each, interleaved, as ratios to the compiled FSDP2 SGD step of the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time

RANK = r"""
import json, os, sys, time, torch, torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
import svgd_fx
from benchmarks.models import TinyGPT
rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
dist.init_process_group("gloo", rank=rank, world_size=world)
torch.set_num_threads(1)
args = json.loads(sys.argv[1])
def build():
    torch.manual_seed(0)
    model = TinyGPT(vocab=256, seq=args["seq"], dim=args["dim"], heads=4, layers=args["layers"])
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model
def local_bytes(tensors):
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total
runs = {}
SVGD = {"SVGD transform": {}, "SVGD transform, T op": {"t_impl": "op"},
        "SVGD transform, unbucketed": {}}
from svgd_fx.capture import common as svgd_compile
for name in ("SGD compiled", "Adam compiled", *SVGD):
    torch._dynamo.reset()
    model = build()
    if name in SVGD:
        run = svgd_fx.transform(model, s=0.1, distributed=True, **SVGD[name])
    else:
        run = torch.compile(model)
    opt = (torch.optim.Adam if name.startswith("Adam") else torch.optim.SGD)(model.parameters(), lr=1e-3)
    runs[name] = (model, run, opt)
gen = torch.Generator().manual_seed(rank)
batches = [torch.randint(0, 256, (args["batch"], args["seq"] + 1), generator=gen) for _ in range(4)]
def step(name, i):
    model, run, opt = runs[name]
    ids = batches[i % len(batches)]
    opt.zero_grad()
    # "unbucketed": buckets too small for two statistics, i.e. one all-reduce per σ' node (read at the compile)
    svgd_compile.STATISTICS_BUCKET_MB = 1e-9 if "unbucketed" in name else 4.0
    out = run(ids[:, :-1])
    F.cross_entropy(out.reshape(-1, out.shape[-1]), ids[:, 1:].reshape(-1)).backward()
    opt.step()
times = {name: [] for name in runs}
for name in runs:                       # warm-up: compiles
    for i in range(args["warmup"]):
        step(name, i)
for r in range(args["rounds"]):
    for name in runs:                   # interleaved
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(args["steps"]):
            step(name, i)
        dist.barrier()
        times[name].append((time.perf_counter() - t0) / args["steps"])
model, run, _ = runs["SVGD transform"]
adam_model, _, adam = runs["Adam compiled"]
out = {
    "rank": rank, "world": world,
    "params": sum(p.numel() for p in model.parameters()),
    "param_shard_bytes": local_bytes(model.parameters()),
    "adam_state_bytes": local_bytes([v for s in adam.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]),
    "r_bytes": sum(t.numel() * t.element_size() for t in run.svgd_state.tensors.values()),
    "r_tensors": len(run.svgd_state.tensors),
    "fired": sum(1 for row in svgd_fx.explain(run).rows if row["t_in_graph"]),
    "step_s": times,
}
print("RESULT " + json.dumps(out))
dist.destroy_process_group()
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(world: int, batch: int, seq: int, dim: int, layers: int, rounds: int, steps: int, warmup: int) -> list[dict]:
    args = json.dumps(dict(batch=batch, seq=seq, dim=dim, layers=layers, rounds=rounds, steps=steps, warmup=warmup))
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(world),
               OMP_NUM_THREADS="1", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(RANK)
    procs = [subprocess.Popen([sys.executable, f.name, args], env=dict(env, RANK=str(r)), cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    results = []
    for rank, proc in enumerate(procs):
        out, err = proc.communicate(timeout=3000)
        if proc.returncode != 0:
            raise RuntimeError(f"rank {rank} failed:\n{err[-3000:]}")
        results.append(json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[7:]))
    os.unlink(f.name)
    return results


def to_markdown(results: list[dict], meta: dict) -> str:
    r0 = results[0]
    base = statistics.median(r0["step_s"]["SGD compiled"])
    lines = [f"Command: `{meta['command']}`", "",
             f"TinyGPT (dim {meta['dim']}, {meta['layers']} blocks, seq {meta['seq']}, {r0['params']:,} parameters), "
             f"{meta['world']} CPU processes (gloo, 127.0.0.1, 1 thread each), batch {meta['batch']} per rank, "
             f"fully_shard per block and at the root; rank 0's figures (every rank holds the same amounts).", "",
             "| per rank | bytes |", "|---|---:|",
             f"| parameter shards | {r0['param_shard_bytes']:,} |",
             f"| Adam state (its shards: exp_avg, exp_avg_sq) | {r0['adam_state_bytes']:,} |",
             f"| SVGD state r ({r0['r_tensors']} σ' nodes, replicated) | {r0['r_bytes']:,} |", "",
             "| step (median of rounds) | ms | × compiled FSDP2 SGD |", "|---|---:|---:|"]
    for name, times in r0["step_s"].items():
        med = statistics.median(times)
        lines.append(f"| {name} | {med * 1e3:.1f} | {med / base:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    t0 = time.time()
    results = run(args.world, args.batch, args.seq, args.dim, args.layers, args.rounds, args.steps, args.warmup)
    meta = dict(vars(args), command=shlex.join(["python3", "-m", "benchmarks.fsdp", *(argv if argv is not None else sys.argv[1:])]),
                seconds=round(time.time() - t0, 1))
    assert results[0]["fired"] > 0, "no T node in the graphs"
    print(to_markdown(results, meta))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(meta=meta, results=results), f, indent=1)
    return dict(meta=meta, results=results)


if __name__ == "__main__":
    main()
