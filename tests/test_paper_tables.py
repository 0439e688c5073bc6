"""The paper tables' selection and report merging, on made-up runs (no training, torch alone)."""

from __future__ import annotations

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # plain `pytest` too
from benchmarks import paper_tables as pt  # noqa: E402


def _run(optimizer, lr, val_error, val_loss=0.5, **extra):
    return {"optimizer": optimizer, "lr": lr, "seed": 0, "val_error": val_error, "val_loss": val_loss,
            "test_final": val_error, "test_best": val_error, "train_loss_final": 0.1, "train_seconds": 1.0,
            "ms_per_step": 1.0, "diverged": False, "curve": [], **extra}


def test_best_on_val_picks_the_lowest_mean_error_then_the_lower_loss():
    runs = [_run("TSO-ALRA", 0.01, e, damping=d) for d, e in [(1e-3, 0.20), (1e-3, 0.22), (1e-2, 0.07),
                                                               (1e-2, 0.09), (1e-1, 0.08), (1e-1, 0.08)]]
    best, groups, score = pt.best_on_val(runs, [1e-3, 1e-2, 1e-1], "damping")
    assert best == 1e-2    # 1e-1 ties on error and loss: the first value listed wins
    assert score[1e-3][0] == pytest.approx(0.21) and len(groups[1e-2]) == 2
    runs[-1]["val_loss"] = 0.4        # 1e-1: same mean error, lower mean loss
    assert pt.best_on_val(runs, [1e-3, 1e-2, 1e-1], "damping")[0] == 1e-1
    assert pt.select([_run("SGD", lr, e) for lr, e in [(0.03, 0.1), (0.1, 0.05), (0.3, 0.2)]],
                     [0.03, 0.1, 0.3])["lr"] == 0.1


def _report(tasks: dict) -> dict:
    return {"meta": {"invocations": [{"command": "x", "tasks": list(tasks)}]}, "tasks": tasks}


def _task(steps: int, methods: list[str], tag: str) -> dict:
    return {"config": {"steps": steps, "methods": methods, "centres": {m: 0.1 for m in methods}},
            "summary": {m: {"tag": tag} for m in methods}, "paper_summary": {},
            "runs": [_run(m, 0.1, 0.1, tag=tag) for m in methods]}


def test_merge_adds_an_optimizer_to_a_task_run_before(tmp_path):
    first = _report({"mnist-mlp": _task(100, ["SVGD", "SGD", "TSO-ALRA"], "old"),
                     "digits-mlp": _task(50, ["SGD"], "old")})
    later = _report({"mnist-mlp": _task(100, ["TSO-ALRA"], "new")})
    paths = []
    for name, report in (("a", first), ("b", later)):
        paths.append(str(tmp_path / f"{name}.json"))
        with open(paths[-1], "w") as fh:
            json.dump(report, fh)
    merged = pt.merge(paths)
    task = merged["tasks"]["mnist-mlp"]
    assert task["config"]["methods"] == ["SVGD", "SGD", "TSO-ALRA"]
    assert task["summary"]["TSO-ALRA"]["tag"] == "new" and task["summary"]["SGD"]["tag"] == "old"
    assert sorted((r["optimizer"], r["tag"]) for r in task["runs"]) == [("SGD", "old"), ("SVGD", "old"),
                                                                          ("TSO-ALRA", "new")]
    assert merged["tasks"]["digits-mlp"]["summary"]["SGD"]["tag"] == "old"
    assert len(merged["meta"]["invocations"]) == 2

    other = _report({"mnist-mlp": _task(400, ["TSO-ALRA"], "new")})
    with open(tmp_path / "c.json", "w") as fh:
        json.dump(other, fh)
    with pytest.raises(SystemExit, match="steps"):
        pt.merge([paths[0], str(tmp_path / "c.json")])


def test_t_kernel_benchmark_times_the_real_t():
    """benchmarks/t_kernel.py's stand-in for the fused T computes T (the op's numbers, r too)."""
    import torch

    import svgd_fx  # noqa: F401
    from benchmarks import t_kernel

    torch.manual_seed(0)
    g = torch.randn(6, 4, 5, dtype=torch.float64)
    r1 = torch.rand(4, 5, dtype=torch.float64)
    r0, r2 = r1.clone(), r1.clone()
    got = t_kernel.fused_t(g, r1)
    want = torch.ops.svgd_fx.virtual_grad(g, r2, t_kernel.S, t_kernel.RHO, t_kernel.EPS, True, [], False)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    torch.testing.assert_close(r1, r2, rtol=1e-12, atol=0)
    assert not torch.equal(r1, r0), "both updated r"
    result = {"label": "x", "batch": 6, "shape": [4, 5], "bytes_t": 1,
              "rows": {"clone": {"us": 1.0, "gbs": 2.0, "of_clone": 1.0}, "op": {"us": 2.0, "gbs": 1.0, "of_clone": 0.5}}}
    text = t_kernel.markdown([result], {"device": "cpu", "threads": 1, "torch": "t", "kernel": "torch", "reps": 1}, 3.0)
    assert "| x | 6 × 20 | op | 2.0 | 1.0 | 50% | 33% |" in text


def test_overall_progress_counts_the_planned_runs():
    """The main job prints "run k of ~N, elapsed, ETA" per finished run; N is the plan before the
    grid's edge extensions: every optimizer's 3-point lr grid (TSO-ALRA: + 2 more damping probes)
    per seed, plus the paper's own hyperparameters."""
    from benchmarks import paper_tables as pt

    methods = [m for m, spec in pt.METHODS.items() if spec.make is not None]
    paper = sum(1 for pr in pt.TASKS["mnist-mlp"].paper_runs if pr.method in methods)
    tso = sum(1 for m in methods if pt.METHODS[m].tso)
    assert pt.planned_runs(["mnist-mlp"], methods, 2, True) == 2 * (3 * len(methods) + 2 * tso + paper)
    overall = pt.Overall(4)
    assert overall.tick().startswith("[run 1 of ~4, ") and "ETA" in overall.tick()
