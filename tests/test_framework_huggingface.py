"""SVGDTrainer (svgd_fx.integrations.huggingface): Trainer's steps are transform + SGD's steps,
accumulation is svgd_fx.accumulate's, checkpoints carry r and resume bit-identically."""

import os
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the 'frameworks' test extra is not installed")
pytest.importorskip("accelerate", reason="the 'frameworks' test extra is not installed")

import svgd_fx  # noqa: E402
from helpers import t_fired  # noqa: E402
from tiny_hf import assert_resume_is_bit_identical, gpt2, plain_loop, same_parameters, token_rows  # noqa: E402
from svgd_fx.integrations.huggingface import STATE_FILE, SVGDTrainer  # noqa: E402

def _gpt2(seed=0):
    return gpt2(seed)


def _data(n=16, seed=1):
    return [{"input_ids": x, "labels": x.clone()} for x in token_rows(n, seed)]


def _args(path, **kw):
    base = dict(output_dir=str(path), per_device_train_batch_size=4, max_steps=3, learning_rate=0.05,
                lr_scheduler_type="constant", max_grad_norm=0.0, report_to=[], use_cpu=True, save_strategy="no",
                logging_strategy="no", seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class Recording(SVGDTrainer):
    """Keeps the micro-batches Trainer fed, in order, with the token count Trainer divides each
    micro-batch's summed loss by (all label tokens of the optimizer step): the plain loop replays them."""

    def training_step(self, model, inputs, num_items_in_batch=None):
        assert num_items_in_batch is not None      # GPT-2 takes it: Trainer's loss is Σ loss / that count
        self.__dict__.setdefault("seen", []).append(({k: v.clone() for k, v in inputs.items()}, num_items_in_batch))
        return super().training_step(model, inputs, num_items_in_batch)


def _plain_loop(micro_batches, per_step):
    """Each micro-batch's loss as Trainer computes it: its summed token loss / the step's count."""
    return plain_loop(micro_batches, per_step, lambda m, item: m(**item[0], num_items_in_batch=item[1]).loss)


_assert_same_parameters = same_parameters


@pytest.mark.parametrize("accumulation", [1, 2])
def test_trainer_steps_are_transform_and_sgd(tmp_path, accumulation):
    """3 optimizer steps of SVGDTrainer equal transform + SGD in a plain loop on the batches
    Trainer fed; with gradient_accumulation_steps=2 the plain loop runs the two micro-batches of
    each step inside svgd_fx.accumulate (one pass), and no accumulation warning is raised."""
    model = _gpt2()
    with warnings.catch_warnings():
        warnings.simplefilter("error", svgd_fx.GradientAccumulationWarning)
        warnings.simplefilter("error", svgd_fx.FrameworkSettingWarning)
        trainer = Recording(model=model, args=_args(tmp_path, per_device_train_batch_size=4 // accumulation,
                                                    gradient_accumulation_steps=accumulation),
                            train_dataset=_data(), svgd={"s": 0.1})
        trainer.train()
    assert type(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer) \
        is torch.optim.SGD
    assert len(trainer.seen) == 3 * accumulation
    reference, reference_t = _plain_loop(trainer.seen, accumulation)
    _assert_same_parameters(model, reference)
    fired = t_fired(trainer.svgd_model)
    assert fired and fired == t_fired(reference_t)
    # every block's projections and norms, the embeddings, and the tied lm_head (named after wte)
    assert {"transformer.wte.linear", "transformer.wte.embedding", "transformer.wpe.add", "transformer.ln_f.layer_norm",
            "transformer.h.1.attn.c_attn.addmm", "transformer.h.1.mlp.c_proj.addmm"} <= fired and len(fired) == 16
    for key, r in trainer.svgd_model.svgd_state.tensors.items():
        torch.testing.assert_close(r, reference_t.svgd_state[key], rtol=1e-5, atol=1e-9)


def test_trainer_warns_about_settings_that_change_the_method(tmp_path):
    with pytest.warns(svgd_fx.FrameworkSettingWarning, match="max_grad_norm"):
        SVGDTrainer(model=_gpt2(), args=_args(tmp_path, max_grad_norm=1.0), train_dataset=_data(), svgd={"s": 0.1})
    model = _gpt2()
    adam = torch.optim.Adam(model.parameters())
    with pytest.warns(svgd_fx.FrameworkSettingWarning, match="Adam, not torch.optim.SGD"):
        SVGDTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), svgd={"s": 0.1},
                    optimizers=(adam, None))
    with pytest.raises(TypeError, match="unknown SVGD option"):
        SVGDTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=_data(), svgd={"s": 0.1, "sigma": 2})


def test_gradient_checkpointing_gives_the_same_steps(tmp_path):
    plain = Recording(model=_gpt2(), args=_args(tmp_path / "a"), train_dataset=_data(), svgd={"s": 0.1})
    plain.train()
    model = _gpt2()
    checkpointed = Recording(model=model, args=_args(tmp_path / "b", gradient_checkpointing=True),
                             train_dataset=_data(), svgd={"s": 0.1})
    checkpointed.train()
    assert model.is_gradient_checkpointing
    _assert_same_parameters(model, plain.model)
    assert len(t_fired(checkpointed.svgd_model)) == 16 and t_fired(checkpointed.svgd_model) == t_fired(plain.svgd_model)


def test_saved_model_is_the_hugging_face_model_with_tied_weights(tmp_path):
    model = _gpt2()
    trainer = SVGDTrainer(model=model, args=_args(tmp_path), train_dataset=_data(), svgd={"s": 0.1})
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    loaded = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / "final"))
    assert loaded.lm_head.weight.data_ptr() == loaded.transformer.wte.weight.data_ptr()
    _assert_same_parameters(model, loaded)


_RESUME = r"""
import sys, torch
sys.path.insert(0, {tests!r})
from test_framework_huggingface import _gpt2, _data, _args
from svgd_fx.integrations.huggingface import SVGDTrainer
out, phase = sys.argv[1:3]
model = _gpt2()
args = _args(out, max_steps=4, save_strategy="steps", save_steps=2, gradient_accumulation_steps={acc},
             per_device_train_batch_size={batch})
trainer = SVGDTrainer(model=model, args=args, train_dataset=_data(), svgd={{"s": 0.1}})
trainer.train(resume_from_checkpoint=out + "/checkpoint-2" if phase == "resume" else None)
torch.save({{"params": [p.detach().clone() for p in model.parameters()],
            "r": dict(trainer.svgd_model.svgd_state.tensors)}}, out + "/" + phase + ".pt")
"""


@pytest.mark.parametrize("accumulation", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_resume_in_a_fresh_process_is_bit_identical(tmp_path, accumulation):
    """Train 4 steps saving at step 2; a new process resumes from checkpoint-2 (its
    svgd_state.pt restores r) and ends bit-identical to the uninterrupted run."""
    script = tmp_path / "resume.py"
    script.write_text(_RESUME.format(tests=os.path.dirname(__file__), acc=accumulation, batch=4 // accumulation))
    out = str(tmp_path / "run")
    assert_resume_is_bit_identical(script, out)
    assert os.path.isfile(os.path.join(out, "checkpoint-2", STATE_FILE))


def test_resume_from_a_checkpoint_without_svgd_state_is_refused(tmp_path):
    trainer = transformers.Trainer(model=_gpt2(), args=_args(tmp_path, max_steps=2, save_strategy="steps",
                                                             save_steps=2), train_dataset=_data())
    trainer.train()
    resumed = SVGDTrainer(model=_gpt2(), args=_args(tmp_path, max_steps=4), train_dataset=_data(), svgd={"s": 0.1})
    with pytest.raises(svgd_fx.SVGDError, match=STATE_FILE):
        resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))


def test_transformed_model_passes_through_what_frameworks_read(tmp_path):
    """What svgd_fx.transform returns does not shadow the model's ``config`` and passes through
    what frameworks call on a model; its forward has the model's signature (Trainer reads it to
    keep the dataset's columns)."""
    import copy
    import inspect

    model = _gpt2()
    model_t = svgd_fx.transform(model, s=0.1)
    assert model_t.config is model.config and model_t.svgd_config.s == 0.1
    assert inspect.signature(model_t.forward) == inspect.signature(model.forward)
    model_t.gradient_checkpointing_enable()
    assert model.is_gradient_checkpointing
    model_t.gradient_checkpointing_disable()
    transformers.Trainer(model=model_t, args=_args(tmp_path), train_dataset=_data())   # sets config.use_cache
    twin = copy.deepcopy(model_t)
    assert twin.config is twin.model.config and twin.config is not model.config
    assert inspect.signature(twin.forward) == inspect.signature(model.forward)
    with pytest.raises(AttributeError):
        model_t.no_such_attribute


_RESUME_COMPILED = r"""
import sys, torch
sys.path.insert(0, {tests!r})
import svgd_fx, transformers
from test_framework_huggingface import _gpt2, _data, _args
out, phase = sys.argv[1:3]
model = _gpt2()
model_c = torch.compile(model, backend="svgd", options={{"s": 0.1}})
args = _args(out, max_steps=4, save_strategy="steps", save_steps=2, optim="sgd", remove_unused_columns=False)
trainer = transformers.Trainer(model=model_c, args=args, train_dataset=_data())
trainer.train(resume_from_checkpoint=out + "/checkpoint-2" if phase == "resume" else None)
torch.save({{"params": [p.detach().clone() for p in model.parameters()],
            "r": dict(svgd_fx.state_of(model_c).tensors)}}, out + "/" + phase + ".pt")
"""


@pytest.mark.slow        # inductor in two processes; the lenient load itself: tests/test_state.py
def test_plain_trainer_with_an_svgd_compiled_model_resumes_with_r(tmp_path):
    """Trainer(model=torch.compile(model, backend='svgd', ...)) saves r in model.safetensors
    (``_orig_mod.svgd_state.*``) and its lenient load on resume restores it without any
    svgd_fx call before: the resumed run ends bit-identical to the uninterrupted one."""
    script = tmp_path / "resume.py"
    script.write_text(_RESUME_COMPILED.format(tests=os.path.dirname(__file__)))
    out = str(tmp_path / "run")
    assert_resume_is_bit_identical(script, out)


def test_the_accelerators_grad_scaler_is_passed_to_svgd(tmp_path):
    """fp16 on a GPU: Trainer's accelerator holds a GradScaler, which svgd_fx must know (r from
    unscaled gradients). No CPU run creates one, so it is set by hand here."""
    trainer = SVGDTrainer(model=_gpt2(), args=_args(tmp_path), train_dataset=_data(), svgd={"s": 0.1})
    scaler = torch.amp.GradScaler("cpu")
    trainer.accelerator.scaler = scaler
    assert trainer._svgd_for(trainer.model).grad_scaler is scaler
