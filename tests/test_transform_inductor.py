"""transform's default code generation (inductor, the fused T) against the reference.

The rest of the suite runs transform's graphs without code generation (SVGD_FX_CODEGEN=fx, set
in conftest.py): the joint-graph rewrite is the same, and float64 comparisons there see the
rewritten graph itself. Here the same rewrite goes through inductor, as users get it.
"""

import pytest
import torch

import svgd_fx
from cases import CASES, PaperMLP
from helpers import run_against_reference, t_rows

CASE = {c.name: c for c in CASES}


@pytest.mark.parametrize("name", ["paper_mlp", "res_cnn", "tiny_transformer", "attention", "checkpointed"])
def test_float64_matches_reference(name):
    case = CASE[name]
    model_t, history = run_against_reference(case, torch.float64, steps=3, codegen="inductor")
    for step, grads in enumerate(history):
        for param, got, want in grads:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=lambda m: f"step {step}, {param}: {m}")
    assert {n for n, has_t in t_rows(model_t).items() if has_t} == case.t_nodes
    assert not model_t.log.backward_graphs, "inductor compiled the graphs: no FX backward graph is kept"


def test_codegen_option():
    fx = svgd_fx.transform(PaperMLP(), s=0.1, codegen="fx")
    fx(torch.randn(4, 784)).sum().backward()
    assert len(fx.log.backward_graphs) == 1 and "svgd_fx.virtual_grad" in fx.log.backward_graphs[0].code
    with pytest.raises(ValueError, match="codegen must be 'inductor'"):
        svgd_fx.transform(PaperMLP(), s=0.1, codegen="cuda")
