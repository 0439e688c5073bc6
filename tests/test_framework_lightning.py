"""SVGDCallback (svgd_fx.integrations.lightning): Lightning's steps are transform + SGD's steps,
accumulate_grad_batches is svgd_fx.accumulate's, checkpoints carry r and resume bit-identically."""

import os
import warnings

import pytest
import torch

pytest.importorskip("transformers", reason="the 'frameworks' test extra is not installed")
pl = pytest.importorskip("pytorch_lightning", reason="the 'frameworks' test extra is not installed")

import svgd_fx  # noqa: E402
from helpers import t_fired  # noqa: E402
from svgd_fx.integrations.lightning import SVGDCallback  # noqa: E402
from tiny_hf import assert_resume_is_bit_identical, gpt2, plain_loop, same_parameters, token_rows  # noqa: E402

LR = 0.05


class LitGPT(pl.LightningModule):
    def __init__(self, optimizer=torch.optim.SGD):
        super().__init__()
        self.model = gpt2()
        self.optimizer = optimizer

    def training_step(self, ids, batch_idx):
        return self.model(input_ids=ids, labels=ids).loss

    def configure_optimizers(self):
        return self.optimizer(self.parameters(), lr=LR)


def _loader(batch, rows=16):
    return torch.utils.data.DataLoader(token_rows(rows), batch_size=batch, shuffle=False)


def _trainer(accumulation, steps=3, **kw):
    base = dict(max_steps=steps, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulation,
                callbacks=[SVGDCallback(s=0.1)])
    base.update(kw)
    return pl.Trainer(**base)


def _plain_loop(accumulation, steps=3):
    rows = list(_loader(4 // accumulation))[:steps * accumulation]
    return plain_loop(rows, accumulation, lambda m, ids: m(input_ids=ids, labels=ids).loss / accumulation, lr=LR)


@pytest.mark.parametrize("accumulation", [1, 2])
def test_lightning_steps_are_transform_and_sgd(accumulation):
    """3 optimizer steps of Lightning with SVGDCallback (accumulate_grad_batches=2: two
    micro-batches per step) equal the plain loop (svgd_fx.accumulate over the same two)."""
    module = LitGPT()
    with warnings.catch_warnings():
        warnings.simplefilter("error", svgd_fx.GradientAccumulationWarning)
        warnings.simplefilter("error", svgd_fx.FrameworkSettingWarning)
        _trainer(accumulation).fit(module, _loader(4 // accumulation))
    assert isinstance(module.model, svgd_fx.SVGDModule)
    reference, reference_t = _plain_loop(accumulation)
    same_parameters(module.model.model, reference)
    fired = t_fired(module.model)
    assert len(fired) == 16 and fired == t_fired(reference_t)
    for key, r in module.model.svgd_state.tensors.items():
        torch.testing.assert_close(r, reference_t.svgd_state[key], rtol=1e-5, atol=1e-9)
    keys = module.state_dict().keys()
    assert "model.transformer.wte.weight" in keys and "model.svgd_state.transformer.wte.linear.r" in keys


def test_lightning_settings_that_change_the_method_are_warned_about():
    with pytest.warns(svgd_fx.FrameworkSettingWarning, match="Adam, not torch.optim.SGD"):
        _trainer(1, steps=1).fit(LitGPT(torch.optim.Adam), _loader(4))
    with pytest.warns(svgd_fx.FrameworkSettingWarning, match="gradient_clip_val"):
        _trainer(1, steps=1, gradient_clip_val=1.0).fit(LitGPT(), _loader(4))
    with pytest.raises(svgd_fx.SVGDError, match="attribute='net'"):
        _trainer(1, steps=1, callbacks=[SVGDCallback(attribute="net", s=0.1)]).fit(LitGPT(), _loader(4))


_RESUME = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import pytorch_lightning as pl
from test_framework_lightning import LitGPT, _loader, _trainer
out, phase = sys.argv[1:3]
module = LitGPT()
checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out, every_n_epochs=1, save_top_k=-1)
from svgd_fx.integrations.lightning import SVGDCallback


class Loaded(pl.Callback):
    def on_train_start(self, trainer, module):
        if phase == "resume":
            saved = torch.load(out + "/epoch=1-step=2.ckpt", weights_only=True)["state_dict"]
            state = module.model.svgd_state
            assert len(state._pending) == 16
            for key, r in state._pending.items():
                assert torch.equal(r, saved["model.svgd_state." + key]), key


trainer = _trainer({acc}, steps=4, enable_checkpointing=True, callbacks=[SVGDCallback(s=0.1), checkpoints, Loaded()])
trainer.fit(module, _loader({batch}, rows=4), ckpt_path=(out + "/epoch=1-step=2.ckpt") if phase == "resume" else None)
torch.save({{"params": [p.detach().clone() for p in module.parameters()],
            "r": dict(module.model.svgd_state.tensors)}}, out + "/" + phase + ".pt")
"""


@pytest.mark.parametrize("accumulation", [1])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, accumulation):
    """Lightning checkpoints after every epoch (its state_dict carries r); a new process fits from
    the one after step 2 and ends bit-identical to the uninterrupted 4-step run. One optimizer step
    per epoch: resumed from an epoch-end checkpoint, Lightning 2.6 finishes that epoch with a fresh
    iterator of a plain DataLoader (its first batch again), so only then are the batches the same;
    with accumulate_grad_batches that extra batch makes a step of its own (Lightning's data position,
    not r: the r a resumed fit starts from is checked against the checkpoint's in any case)."""
    script = tmp_path / "resume.py"
    script.write_text(_RESUME.format(tests=os.path.dirname(__file__), acc=accumulation, batch=4 // accumulation))
    out = str(tmp_path)
    assert_resume_is_bit_identical(script, out)
    saved = torch.load(out + "/epoch=1-step=2.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.svgd_state.") for k in saved)


def test_the_precision_plugins_grad_scaler_is_passed_to_svgd():
    trainer = _trainer(1, steps=1)
    scaler = trainer.precision_plugin.scaler = torch.amp.GradScaler("cpu")   # "16-mixed" on a GPU creates one
    module, callback = LitGPT(), SVGDCallback(s=0.1)
    callback.setup(trainer, module, "fit")
    assert isinstance(module.model, svgd_fx.SVGDModule) and module.model.grad_scaler is scaler
