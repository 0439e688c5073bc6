"""SVGD vs SGD vs Adam on sklearn's digits (real 8×8 scans, ships with scikit-learn): a short run.

    python -m benchmarks.digits            # ~1-2 minutes on 2 cores, prints a Markdown table
    python -m benchmarks.digits --json out.json

Protocol (the same for every optimizer): a stratified 70/15/15 train/val/test split; the
paper's MLP shape (Linear→BN→ReLU) at this input size, 64-128-64-10; batch 32; the same
data order per seed; a 3-point learning-rate grid around each method's usual value, chosen
by mean final *validation* error over the seeds; test error reported for that choice
(final and best-seen), mean ± std over 3 seeds, and wall time. SVGD's s is held at the
paper's 0.1 (its lr grid is SGD's, as docs/contract.md says α_SVGD ≈ α_SGD).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx


def load_digits_split(seed: int = 0):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    idx = list(range(len(y)))
    train, rest = train_test_split(idx, test_size=0.3, stratify=data.target, random_state=seed)
    val, test = train_test_split(rest, test_size=0.5, stratify=data.target[rest], random_state=seed)
    pick = lambda ids: (x[ids], y[ids])  # noqa: E731
    return pick(train), pick(val), pick(test)


def make_mlp(widths=(64, 128, 64, 10)) -> nn.Module:
    layers = []
    for a, b in zip(widths[:-2], widths[1:-1]):
        layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
    layers.append(nn.Linear(widths[-2], widths[-1]))
    return nn.Sequential(*layers)


OPTIMIZERS = {
    # name: (lr grid, factory(params, lr), uses svgd)
    "SVGD (s=0.1)": ([0.03, 0.1, 0.3], lambda p, lr: torch.optim.SGD(p, lr=lr), True),
    "SGD": ([0.03, 0.1, 0.3], lambda p, lr: torch.optim.SGD(p, lr=lr), False),
    "Adam": ([3e-4, 1e-3, 3e-3], lambda p, lr: torch.optim.Adam(p, lr=lr), False),
}


def error_rate(model, x, y) -> float:
    model.eval()
    with torch.no_grad():
        wrong = (model(x).argmax(1) != y).float().mean().item()
    model.train()
    return wrong


def train_one(name, lr, seed, data, epochs, batch):
    (xtr, ytr), (xva, yva), (xte, yte) = data
    grid, factory, use_svgd = OPTIMIZERS[name]
    torch.manual_seed(seed)
    model = make_mlp()
    run = svgd_fx.transform(model, s=0.1) if use_svgd else model
    opt = factory(model.parameters(), lr)
    order = torch.Generator().manual_seed(seed)
    curve = []
    start = time.perf_counter()
    for _ in range(epochs):
        perm = torch.randperm(len(ytr), generator=order)
        for i in range(0, len(perm) - batch + 1, batch):   # drop the last partial batch (BN)
            ids = perm[i:i + batch]
            opt.zero_grad()
            F.cross_entropy(run(xtr[ids]), ytr[ids]).backward()
            opt.step()
        curve.append((error_rate(model, xva, yva), error_rate(model, xte, yte)))
    elapsed = time.perf_counter() - start
    return {"optimizer": name, "lr": lr, "seed": seed, "val_final": curve[-1][0], "test_final": curve[-1][1],
            "test_best": min(t for _, t in curve), "seconds": elapsed, "curve": curve}


def mean_std(values):
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--json", help="write every run (with curves) to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = load_digits_split()
    runs = []
    for name, (grid, _, _) in OPTIMIZERS.items():
        for lr in grid:
            for seed in range(args.seeds):
                torch._dynamo.reset()
                runs.append(train_one(name, lr, seed, data, args.epochs, args.batch))

    print(f"sklearn digits, MLP 64-128-64-10 (Linear→BN→ReLU), batch {args.batch}, {args.epochs} epochs, "
          f"{args.seeds} seeds, lr chosen by mean final validation error; CPU, {torch.get_num_threads()} thread\n")
    print("| optimizer | lr | test error final (%) | test error best-seen (%) | time / run (s) |")
    print("|---|---|---|---|---|")
    summary = []
    for name, (grid, _, _) in OPTIMIZERS.items():
        by_lr = {lr: [r for r in runs if r["optimizer"] == name and r["lr"] == lr] for lr in grid}
        best_lr = min(grid, key=lambda lr: statistics.mean(r["val_final"] for r in by_lr[lr]))
        chosen = by_lr[best_lr]
        fm, fs = mean_std([100 * r["test_final"] for r in chosen])
        bm, bs = mean_std([100 * r["test_best"] for r in chosen])
        tm, _ = mean_std([r["seconds"] for r in chosen])
        summary.append({"optimizer": name, "lr": best_lr, "test_final": (fm, fs), "test_best": (bm, bs),
                        "seconds": tm})
        print(f"| {name} | {best_lr:g} | {fm:.2f} ± {fs:.2f} | {bm:.2f} ± {bs:.2f} | {tm:.1f} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "runs": runs}, fh, indent=1)
    return summary


if __name__ == "__main__":
    main()
