"""transform() against the independent reference, over several SGD steps, on the case table."""

import pytest
import torch

from cases import CASES
from helpers import count_t_nodes, run_against_reference, t_rows, train_changing_batches


def _check_t_placement(model_t, case):
    rows = t_rows(model_t)
    with_t = {name for name, has_t in rows.items() if has_t}
    assert with_t == case.t_nodes, f"T nodes at {sorted(with_t)}, expected {sorted(case.t_nodes)}"
    for name in case.plain:
        assert name in rows and not rows[name], f"{name} must be located but keep the plain gradient"
    assert count_t_nodes(model_t) == len(case.t_nodes)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float64_matches_reference(case):
    model_t, history = run_against_reference(case, torch.float64, steps=3)
    for step, grads in enumerate(history):
        for name, got, want in grads:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"step {step}, {name}: {m}")
    _check_t_placement(model_t, case)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_float32_matches_reference(case):
    model_t, history = run_against_reference(case, torch.float32, steps=3)
    for step, grads in enumerate(history):
        for name, got, want in grads:
            scale = want.abs().max().item()
            torch.testing.assert_close(got.double(), want, rtol=2e-3, atol=2e-4 * max(scale, 1e-3),
                                       msg=lambda m: f"step {step}, {name}: {m}")
    _check_t_placement(model_t, case)


@pytest.mark.parametrize("name", ["paper_mlp", "res_cnn", "tiny_transformer"])
def test_changing_batch_size_matches_reference(name):
    """Batch sizes that change between steps (a last partial batch; Dynamo's dynamic-shape
    recompile after the second size) keep matching the reference, with one r per σ'."""
    import svgd_fx

    case = next(c for c in CASES if c.name == name)
    model, model_t = train_changing_batches(case, lambda m: svgd_fx.transform(m, s=0.1), rtol=1e-9, atol=1e-12)
    with_t = {name for name, has_t in t_rows(model_t).items() if has_t}
    assert with_t == case.t_nodes
    # every backward graph (one per Dynamo recompile) carries all the T nodes
    assert count_t_nodes(model_t) == len(case.t_nodes) * len(model_t.log.backward_graphs)
    assert model_t.log.graphs <= 2, "batch-size changes must not recompile per size"


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("name", ["expanded_bias", "positional"])
def test_identity_backward_adds_get_t_at_any_batch_size(name, batch):
    """An add whose backward is the identity (the parameter-derived operand already has the
    output's shape) has no backward node of its own: T must still be on its operand's edge."""
    import dataclasses

    case = dataclasses.replace(next(c for c in CASES if c.name == name), batch=batch)
    model_t, history = run_against_reference(case, torch.float64, steps=3)
    for step, grads in enumerate(history):
        for pname, got, want in grads:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"step {step}, {pname}: {m}")
    _check_t_placement(model_t, case)
