"""Python memory over many training steps: it must stay flat.

    python -m benchmarks.memory                 # 10,000 steps per entry point
    python -m benchmarks.memory --steps 2000

A small MLP is trained through ``svgd_fx.transform`` and through ``torch.compile(...,
backend="svgd")`` (and plain ``torch.compile`` as the baseline) for ``--steps`` SGD steps after
a warm-up; ``tracemalloc`` compares the Python heap before and after. Growth that scales with
the number of steps is a leak (one was found this way: a Dynamo config patch object created at
every forward kept ~270 bytes of context variables alive). Fixed caches show up as a constant
that does not grow with ``--steps``: the run reports bytes per step at half and at all steps.
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

import torch
import torch.nn.functional as F

import svgd_fx


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.LayerNorm(64), torch.nn.ReLU(),
                               torch.nn.Linear(64, 10))


def _wrap(kind: str, model: torch.nn.Module):
    if kind == "transform":
        return svgd_fx.transform(model, s=0.1)
    if kind == "backend":
        return torch.compile(model, backend=svgd_fx.backend(s=0.1))
    return torch.compile(model)


def measure(kind: str, steps: int) -> dict:
    torch._dynamo.reset()
    model = _model()
    wrapped = _wrap(kind, model)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(16, 32), torch.randint(0, 10, (16,))

    def step():
        opt.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        opt.step()

    for _ in range(50):
        step()
    gc.collect()
    tracemalloc.start()
    start = tracemalloc.take_snapshot()
    half = None
    for i in range(steps):
        step()
        if i + 1 == steps // 2:
            gc.collect()
            half = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(start, "filename"))
    gc.collect()
    full = sum(s.size_diff for s in tracemalloc.take_snapshot().compare_to(start, "filename"))
    tracemalloc.stop()
    return {"kind": kind, "steps": steps, "bytes_at_half": half, "bytes_at_end": full,
            "per_step_half": half / (steps // 2), "per_step_end": full / steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"Python heap growth over {args.steps} steps (tracemalloc; after 50 warm-up steps)")
    print("| entry point | bytes at half | bytes at end | bytes/step (end) |")
    print("|---|---:|---:|---:|")
    for kind in ("inductor (plain torch.compile)", "transform", "backend"):
        row = measure(kind.split()[0], args.steps)
        print(f"| {kind} | {row['bytes_at_half']:,} | {row['bytes_at_end']:,} | {row['per_step_end']:.1f} |")


if __name__ == "__main__":
    main()
