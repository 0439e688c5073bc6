"""Time one full training step (forward, backward, optimizer step) for SVGD and its baselines.

    python -m benchmarks.step_time                       # all models, prints a Markdown table
    python -m benchmarks.step_time --models mlp128 --rounds 5 --json out.json

Every method trains its own copy of the same model on the same batch; methods run
interleaved (round-robin, in a shuffled order each round) on one thread after a warm-up that
includes every compile (the objects it leaves are then frozen out of Python's garbage
collector, whose full collections of them took 0.1-0.5 s inside single timed steps).
Reported: median step time and its spread (p10-p90) over all timed steps, and the ratio to compiled SGD, as the median over rounds of the per-round ratio (the
baseline is measured in the same round, so machine noise cancels). "state bytes" is what the
optimizer keeps besides the parameters: r for SVGD, exp_avg + exp_avg_sq for Adam.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import random
import statistics
import time

import torch
import torch.nn.functional as F

import svgd_fx
from benchmarks.models import PaperMLP, PreActResNet20, TinyGPT

MODELS = {
    # name: (constructor, batch -> (inputs, targets), batch size, lr)
    "mlp32": (PaperMLP, lambda b: (torch.randn(b, 784), torch.randint(0, 10, (b,))), 32),
    "mlp128": (PaperMLP, lambda b: (torch.randn(b, 784), torch.randint(0, 10, (b,))), 128),
    "resnet20": (PreActResNet20, lambda b: (torch.randn(b, 1, 28, 28), torch.randint(0, 10, (b,))), 32),
    "gpt": (TinyGPT, lambda b: (torch.randint(0, 256, (b, 64)), torch.randint(0, 256, (b, 64))), 16),
}


TSO_T_INT = 20     # TSO-ALRA's t_int, and the Shampoo / SOAP preconditioner refresh interval


def _loss(out, y):
    return F.cross_entropy(out.flatten(0, -2) if out.dim() > 2 else out, y.flatten())


def make_methods(base: torch.nn.Module, s: float = 0.1) -> dict:
    """name -> (callable model, its parameters' module, optimizer)."""
    def fresh():
        return copy.deepcopy(base)

    methods = {}
    m = fresh()
    methods["SGD eager"] = (m, m, torch.optim.SGD(m.parameters(), lr=0.01))
    for name, opt in [("SGD compiled", lambda p: torch.optim.SGD(p, lr=0.01)),
                      ("SGD+momentum", lambda p: torch.optim.SGD(p, lr=0.01, momentum=0.9)),
                      ("Adam foreach", lambda p: torch.optim.Adam(p, lr=1e-3, foreach=True)),
                      ("Adam fused", lambda p: torch.optim.Adam(p, lr=1e-3, fused=True)),
                      ("RMSProp", lambda p: torch.optim.RMSprop(p, lr=1e-3))]:
        m = fresh()
        methods[name] = (torch.compile(m), m, opt(m.parameters()))
    m = fresh()
    methods["SVGD transform"] = (svgd_fx.transform(m, s=s), m, torch.optim.SGD(m.parameters(), lr=0.01))
    m = fresh()
    methods["SVGD backend"] = (torch.compile(m, backend="svgd", options={"s": s}), m,
                               torch.optim.SGD(m.parameters(), lr=0.01))
    m = fresh()     # graphs that can also accumulate (svgd_fx.accumulate), used outside a block
    methods["SVGD backend, accumulation"] = (torch.compile(m, backend="svgd", options={"s": s, "accumulation": True}),
                                             m, torch.optim.SGD(m.parameters(), lr=0.01))
    # TSO-ALRA: inverse roots (eigh) every 20 steps (t_int); the factors' statistics every step (the
    # paper), or every 10th (t_stat=10, as K-FAC implementations do); and after the switch to SGD
    for name, extra in [("TSO-ALRA backend", {}), ("TSO-ALRA backend, t_stat=10", {"t_stat": 10}),
                        ("TSO-ALRA backend, after the switch", {"switch_at_step": 0})]:
        m = fresh()
        methods[name] = (torch.compile(m, backend="svgd", options={"method": "tso-alra", "damping": 1e-3,
                                                                   "t_int": TSO_T_INT, **extra}),
                         m, torch.optim.SGD(m.parameters(), lr=0.01))
    # Kronecker-factored optimizers in common use, their roots refreshed every 20 steps as TSO-ALRA's
    # (pytorch-optimizer, a benchmark dependency: rows left out where it is not installed)
    try:
        import pytorch_optimizer
    except ImportError:
        return methods
    for name, opt in [("Shampoo (pytorch-optimizer)",
                       lambda p: pytorch_optimizer.Shampoo(p, lr=1e-3, preconditioning_compute_steps=TSO_T_INT)),
                      ("SOAP (pytorch-optimizer)",
                       lambda p: pytorch_optimizer.SOAP(p, lr=3e-3, precondition_frequency=TSO_T_INT))]:
        m = fresh()
        methods[name] = (torch.compile(m), m, opt(m.parameters()))
    return methods


def refreshes_now(name: str, module) -> bool:
    """Whether the next step of a TSO-ALRA row refreshes its inverse roots (t ≡ 1 mod t_int)."""
    if not name.startswith("TSO") or "switch" in name:
        return False
    steps = [int(t) for key, t in svgd_fx.state_of(module).tensors.items() if key.endswith(".steps")]
    return bool(steps) and steps[0] % TSO_T_INT == 0


def state_bytes(name: str, model, module, opt) -> int:
    if name.startswith(("SVGD", "TSO")):
        state = model.svgd_state if name == "SVGD transform" else svgd_fx.state_of(module)
        kept = [*state.tensors.values(), *state.accs.values()]   # accs: only with accumulation
        return sum(t.numel() * t.element_size() for t in kept)
    def tensors(value):     # SOAP / Shampoo keep their preconditioners in lists
        if isinstance(value, torch.Tensor):
            return [value] if value.dim() > 0 else []
        if isinstance(value, (list, tuple)):
            return [t for v in value for t in tensors(v)]
        return []

    return sum(t.numel() * t.element_size() for st in opt.state.values() for v in st.values() for t in tensors(v))


def step(model, module, opt, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    _loss(model(x), y).backward()
    opt.step()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_model(key: str, rounds: int, steps: int, warmup: int, seed: int = 0, device: str = "cpu") -> dict:
    make, data, batch = MODELS[key]
    # one model class's compiled graphs count against Dynamo's recompile limit (8) together: without
    # a reset, the second model of a class (mlp32, then mlp128) ran its last methods uncompiled
    torch._dynamo.reset()
    torch._dynamo.config.fail_on_recompile_limit_hit = True    # never time an uncompiled frame
    torch.manual_seed(seed)
    base = make().to(device)
    x, y = (t.to(device) for t in data(batch))
    methods = make_methods(base)
    compile_s = {}
    for name, (model, module, opt) in methods.items():
        t0 = time.perf_counter()
        for _ in range(warmup):
            step(model, module, opt, x, y)
        compile_s[name] = time.perf_counter() - t0
    # the compiles leave ~10^5 Python objects: a full collection of them (0.1-0.5 s here) would
    # land inside one timed step of a random method; freeze them out of the collector's view
    gc.collect()
    gc.freeze()
    times = {name: [] for name in methods}
    refresh_times = {name: [] for name in methods}
    per_round = {name: [] for name in methods}
    order = list(methods)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        for name in order:
            model, module, opt = methods[name]
            got = []
            for _ in range(steps):
                refresh = refreshes_now(name, module)
                _sync(device)
                t0 = time.perf_counter()
                step(model, module, opt, x, y)
                _sync(device)
                got.append(time.perf_counter() - t0)
                if refresh:
                    refresh_times[name].append(got[-1])
            times[name] += got
            per_round[name].append(statistics.median(got))
    base_rounds = per_round["SGD compiled"]
    base_mean = statistics.fmean(times["SGD compiled"])
    rows = []
    for name in methods:
        ts = sorted(times[name])
        ratio = statistics.median(a / b for a, b in zip(per_round[name], base_rounds))
        refresh = refresh_times[name]
        rows.append({
            "method": name, "median_ms": 1e3 * statistics.median(ts), "mean_ms": 1e3 * statistics.fmean(ts),
            "p10_ms": 1e3 * ts[len(ts) // 10], "p90_ms": 1e3 * ts[(9 * len(ts)) // 10],
            "ratio_to_compiled_sgd": ratio, "mean_ratio_to_compiled_sgd": statistics.fmean(ts) / base_mean,
            "refresh_ms": 1e3 * statistics.median(refresh) if refresh else None,
            "state_bytes": state_bytes(name, *methods[name]), "warmup_s": compile_s[name],
        })
    return {"model": key, "batch": batch, "params": sum(p.numel() for p in base.parameters()), "rows": rows}


def epoch_recompiles(epochs: int = 3, n_train: int = 1000, n_val: int = 300, batch: int = 128) -> dict:
    """Compiles in a normal training loop under backend="svgd": the paper MLP, 1000 samples in
    batches of 128 (the last one 104), and a validation pass (eval(), no_grad, batches of 256,
    the last one 44) after every epoch."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = PaperMLP()
    model_c = torch.compile(model, backend="svgd", options={"s": 0.1})
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(n_train, 784), torch.randint(0, 10, (n_train,))
    xv = torch.randn(n_val, 784)
    per_epoch = []
    for _ in range(epochs):
        model.train()
        for i in range(0, n_train, batch):
            step(model_c, model, opt, x[i:i + batch], y[i:i + batch])
        model.eval()
        with torch.no_grad():
            for i in range(0, n_val, 2 * batch):
                model_c(xv[i:i + 2 * batch])
        per_epoch.append(int(counters["stats"]["unique_graphs"]))
    return {"setup": " ".join(epoch_recompiles.__doc__.split(":", 1)[1].split()),
            "graphs_compiled_after_each_epoch": per_epoch,
            "graphs_through_the_svgd_pass": svgd_fx.capture.backend.binding_of(model).log.graphs}


def to_markdown(results: list[dict], meta: dict) -> str:
    lines = [f"Step time (forward + backward + optimizer step), {meta['device']}, {meta['threads']} thread(s), "
             f"torch {meta['torch']}; median of {meta['rounds']}×{meta['steps']} interleaved steps.", ""]
    for res in results:
        lines += [f"### {res['model']} (batch {res['batch']}, {res['params']:,} parameters)", "",
                  "| method | median ms | mean ms | p10–p90 ms | × compiled SGD | × (means) | root refresh ms "
                  "| optimizer state bytes | warm-up s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in res["rows"]:
            refresh = f"{r['refresh_ms']:.1f}" if r.get("refresh_ms") is not None else ""
            lines.append(f"| {r['method']} | {r['median_ms']:.2f} | {r['mean_ms']:.2f} | {r['p10_ms']:.2f}–{r['p90_ms']:.2f} | "
                         f"{r['ratio_to_compiled_sgd']:.3f} | {r['mean_ratio_to_compiled_sgd']:.3f} | {refresh} | "
                         f"{r['state_bytes']:,} | {r['warmup_s']:.1f} |")
        lines += ["", "× compiled SGD: median over rounds of the ratio of round medians; × (means): mean step over "
                  "mean step, every timed step counted (TSO-ALRA's, Shampoo's and SOAP's root refreshes included, "
                  f"one step in {TSO_T_INT}); root refresh ms: TSO-ALRA's steps that refresh the inverse roots, "
                  "alone. warm-up s: the untimed warm-up steps, compiles included (the SVGD graphs never come "
                  "from inductor's caches; the plain ones may)."]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, from {list(MODELS)}")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per method (compiles happen here)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--json", help="write all figures to this path")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"CPU ({platform.processor() or platform.machine()})"
    meta = {"device": name, "threads": args.threads,
            "torch": torch.__version__, "rounds": args.rounds, "steps": args.steps}
    results = []
    for key in args.models.split(","):
        results.append(time_model(key, args.rounds, args.steps, args.warmup, device=args.device))
        print(to_markdown(results[-1:], meta), flush=True)
    recompiles = epoch_recompiles()
    print(f"Compiles in a normal loop ({recompiles['setup']}): after each epoch "
          f"{recompiles['graphs_compiled_after_each_epoch']} graphs in all, "
          f"{recompiles['graphs_through_the_svgd_pass']} through the SVGD pass.")
    out = {"meta": meta, "results": results, "recompiles": recompiles}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
