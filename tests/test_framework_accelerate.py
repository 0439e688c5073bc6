"""svgd_fx.integrations.accelerate: an Accelerator loop's steps are transform + SGD's steps,
its gradient accumulation is svgd_fx.accumulate's, save_state/load_state carry r (tied weights)."""

import os
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the 'frameworks' test extra is not installed")
pytest.importorskip("accelerate", reason="the 'frameworks' test extra is not installed")

from accelerate import Accelerator  # noqa: E402

import svgd_fx  # noqa: E402
from helpers import t_fired  # noqa: E402
from svgd_fx.integrations import accelerate as svgd_accelerate  # noqa: E402
from tiny_hf import assert_resume_is_bit_identical, gpt2, plain_loop, same_parameters, token_rows  # noqa: E402

LR = 0.05


def _loader(batch):
    return torch.utils.data.DataLoader(token_rows(16), batch_size=batch, shuffle=False)


def _accelerate_run(accumulation, steps=3, accelerator=None):
    accelerator = accelerator or Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    model = gpt2()
    model_t = svgd_accelerate.transform(accelerator, model, s=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model_t, opt, loader = accelerator.prepare(model_t, opt, _loader(4 // accumulation))
    for i, ids in enumerate(loader):
        if i == steps * accumulation:
            break
        with svgd_accelerate.accumulate(accelerator, model_t):
            accelerator.backward(model_t(input_ids=ids, labels=ids).loss)
            opt.step()
            opt.zero_grad()
    return model, model_t


def _plain_loop(accumulation, steps=3):
    rows = list(_loader(4 // accumulation))[:steps * accumulation]
    return plain_loop(rows, accumulation, lambda m, ids: m(input_ids=ids, labels=ids).loss / accumulation, lr=LR)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_accelerate_loop_is_transform_and_sgd(accumulation):
    """3 optimizer steps through Accelerator (accumulation 2: two micro-batches per step inside
    svgd_accelerate.accumulate) equal the plain loop (svgd_fx.accumulate over the same two)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", svgd_fx.GradientAccumulationWarning)
        model, model_t = _accelerate_run(accumulation)
    reference, reference_t = _plain_loop(accumulation)
    same_parameters(model, reference)
    fired = t_fired(model_t)
    assert len(fired) == 16 and fired == t_fired(reference_t)
    for key, r in model_t.svgd_state.tensors.items():
        torch.testing.assert_close(r, reference_t.svgd_state[key], rtol=1e-5, atol=1e-9)


def test_without_the_helper_accumulation_is_warned_about():
    """accelerator.accumulate alone: each micro-batch's backward updates r; svgd_fx says so."""
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = gpt2()
    model_t = svgd_accelerate.transform(accelerator, model, s=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    model_t, opt, loader = accelerator.prepare(model_t, opt, _loader(2))
    with pytest.warns(svgd_fx.GradientAccumulationWarning, match="svgd_fx.accumulate"):
        for ids in list(loader)[:4]:
            with accelerator.accumulate(model_t):
                accelerator.backward(model_t(input_ids=ids, labels=ids).loss)
                opt.step()
                opt.zero_grad()


_RESUME = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from accelerate import Accelerator
from svgd_fx.integrations import accelerate as svgd_accelerate
from tiny_hf import gpt2, token_rows
out, phase = sys.argv[1:3]
accelerator = Accelerator(cpu=True, gradient_accumulation_steps={acc})
model = gpt2()
model_t = svgd_accelerate.transform(accelerator, model, s=0.1)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
loader = torch.utils.data.DataLoader(token_rows(16), batch_size={batch}, shuffle=False)
model_t, opt, loader = accelerator.prepare(model_t, opt, loader)
rows = list(loader)
start = 0
if phase == "resume":
    accelerator.load_state(out + "/state")
    start = 2 * {acc}
for i, ids in enumerate(rows[:4 * {acc}]):
    if i < start:
        continue
    if phase == "full" and i == 2 * {acc}:
        accelerator.save_state(out + "/state")
    with svgd_accelerate.accumulate(accelerator, model_t):
        accelerator.backward(model_t(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
torch.save({{"params": [p.detach().clone() for p in model.parameters()],
            "r": dict(model_t.svgd_state.tensors)}}, out + "/" + phase + ".pt")
"""


@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_save_state_and_load_state_resume_bit_identically(tmp_path, accumulation):
    """accelerator.save_state after 2 steps (GPT-2: tied weights), a new process load_state()s it
    and its last 2 steps end bit-identical to the uninterrupted run, r included."""
    script = tmp_path / "resume.py"
    script.write_text(_RESUME.format(tests=os.path.dirname(__file__), acc=accumulation, batch=4 // accumulation))
    assert_resume_is_bit_identical(script, str(tmp_path))


def test_the_accelerators_grad_scaler_is_passed_to_svgd():
    accelerator = Accelerator(cpu=True)
    scaler = accelerator.scaler = torch.amp.GradScaler("cpu")       # fp16 on a GPU creates one
    assert svgd_accelerate.transform(accelerator, gpt2(), s=0.1).grad_scaler is scaler
    with pytest.raises(TypeError, match="grad_scaler"):
        svgd_accelerate.transform(accelerator, gpt2(), s=0.1, grad_scaler=scaler)
