"""T alone: time and achieved memory bandwidth of SVGD's T on one σ' gradient.

    python -m benchmarks.t_kernel                        # CPU: the torch T and inductor's fused T
    python -m benchmarks.t_kernel --device cuda --json benchmarks/results/t_kernel_cuda.json

T reads g ``[B, N]`` and r ``[N]``, writes r and ``T(g)``: at least ``(2·B·N + 2·N)·4`` bytes
(float32) cross memory, whatever the implementation. "GB/s" is those bytes over the median
time. The reference point is ``g.clone()`` (``2·B·N·4`` bytes) timed in the same run: the
bandwidth this machine actually reaches for a read-and-write stream *into a new tensor*, as
every T output is (on CPU, a large new tensor costs page faults: glibc maps allocations above
its mmap threshold fresh each time; a copy into a kept buffer can be several times faster).
A nominal peak can be given with ``--peak-gbs`` (an H100 SXM's HBM3: 3350). Implementations:

* ``op``: ``torch.ops.svgd_fx.virtual_grad``, what ``t_impl="op"`` calls — the Triton kernel
  on CUDA (one program per column block: a batch reduction, then the scaled write), the torch
  implementation elsewhere. With ``nonfinite="skip"`` (no extra pass over g to raise).
* ``op+raise``: the same with ``nonfinite="raise"``: on CUDA an isfinite pass over g and one
  device sync before the kernel.
* ``inductor``: T as the compile backend's fused T writes it (aten ops: Σ_b g², the r
  update with its finite guard, the scaling), compiled by inductor on its own — in a real
  graph inductor also fuses it with the neighbouring ops.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import svgd_fx  # noqa: F401  (registers torch.ops.svgd_fx.virtual_grad)

SIZES = [  # (label, B, per-sample shape)
    ("MLP layer, B=128", 128, (256,)),
    ("conv 16×28×28, B=32", 32, (16, 28, 28)),
    ("conv 64×7×7, B=128", 128, (64, 7, 7)),
    ("GPT linear 64×512, B=16", 16, (64, 512)),
    ("wide, B=256", 256, (1 << 16,)),
]
S, RHO, EPS = 0.1, 0.9, 1e-6


def fused_t(g: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """The fused T of ``kernels.t_aten.fused_t`` (mean loss), in eager aten ops for inductor."""
    sums = (g * g).sum(0)
    stat = sums * g.shape[0]
    r_new = torch.where(stat < float("inf"), r * RHO + stat * (1.0 - RHO), r)
    r.copy_(r_new)
    return g * S / torch.sqrt(r + EPS)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_seconds(fn, device: str, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(label: str, batch: int, shape: tuple[int, ...], device: str, reps: int) -> dict:
    g = torch.randn(batch, *shape, device=device)
    r = torch.rand(shape, device=device)
    n = r.numel()
    t_bytes = (2 * batch * n + 2 * n) * 4
    copy_bytes = 2 * batch * n * 4
    op = torch.ops.svgd_fx.virtual_grad
    compiled = torch.compile(fused_t, fullgraph=True, dynamic=False)
    impls = {
        "clone": (lambda: g.clone(), copy_bytes),
        "op": (lambda: op(g, r, S, RHO, EPS, True, [], False), t_bytes),
        "op+raise": (lambda: op(g, r, S, RHO, EPS, True, [], True, "bench"), t_bytes),
        "inductor": (lambda: compiled(g, r), t_bytes),
    }
    times = {name: _median_seconds(fn, device, reps) for name, (fn, _) in impls.items()}
    copy_gbs = copy_bytes / times["clone"] / 1e9
    rows = {}
    for name, (_, nbytes) in impls.items():
        gbs = nbytes / times[name] / 1e9
        rows[name] = {"us": times[name] * 1e6, "gbs": gbs, "of_clone": gbs / copy_gbs}
    return {"label": label, "batch": batch, "shape": list(shape), "bytes_t": t_bytes, "rows": rows}


def markdown(results: list[dict], meta: dict, peak: float | None) -> str:
    lines = [f"T alone on {meta['device']} ({meta['threads']} thread(s), torch {meta['torch']}, "
             f"kernel on this device: {meta['kernel']}); median of {meta['reps']} calls; GB/s = "
             "T's minimal traffic (2·B·N + 2·N floats) / time; 'of clone' = against g.clone() in the same run"
             + (f"; 'of peak' against {peak:g} GB/s" if peak else "") + ".", ""]
    head = "| σ' gradient | B × N | impl | µs | GB/s | of clone |" + (" of peak |" if peak else "")
    lines += [head, "|---|---|---|---:|---:|---:|" + ("---:|" if peak else "")]
    for res in results:
        n = 1
        for d in res["shape"]:
            n *= d
        for name, row in res["rows"].items():
            cells = [res["label"], f"{res['batch']} × {n:,}", name, f"{row['us']:.1f}", f"{row['gbs']:.1f}",
                     f"{row['of_clone']:.0%}"] + ([f"{row['gbs'] / peak:.0%}"] if peak else [])
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine")
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch threads on CPU")
    parser.add_argument("--peak-gbs", type=float, help="the device's nominal memory bandwidth, GB/s")
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from svgd_fx.kernels.t_op import _kernel_choice

    probe = torch.zeros(2, 3, device=args.device)
    meta = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda")
            else f"CPU ({platform.machine()})", "threads": args.threads, "torch": torch.__version__,
            "kernel": _kernel_choice(probe, -1), "reps": args.reps}
    results = [measure(label, b, shape, args.device, args.reps) for label, b, shape in SIZES]
    text = markdown(results, meta, args.peak_gbs)
    print(text)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"meta": meta, "peak_gbs": args.peak_gbs, "results": results}, fh, indent=1)


if __name__ == "__main__":
    main()
