"""SVGD under Hugging Face's ``Trainer``: :class:`SVGDTrainer`.

>>> from svgd_fx.integrations.huggingface import SVGDTrainer
>>> trainer = SVGDTrainer(model=model, args=TrainingArguments(..., max_grad_norm=0),
...                       train_dataset=data, svgd={"s": 0.1})
>>> trainer.train()                       # or trainer.train(resume_from_checkpoint=True)

``Trainer``'s model stays the Hugging Face model: saving, ``from_pretrained``, evaluation,
labels, ``gradient_checkpointing`` all work as usual. Only training steps run through
``svgd_fx.transform(model, **svgd)``, built at the first step with the accelerator's fp16
GradScaler. What differs from ``Trainer``:

* the optimizer is ``torch.optim.SGD`` (lr, weight decay and the schedule from ``args``) unless
  ``optimizers=`` or ``optimizer_cls_and_kwargs=`` says otherwise (another optimizer is warned
  about: it would rescale the virtual gradients again); ``max_grad_norm`` (1.0 by default in
  ``TrainingArguments``) is warned about when on, since clipping rescales SVGD's step;
* every checkpoint folder gets ``svgd_state.pt`` (r, one tensor per σ' node), and
  ``train(resume_from_checkpoint=...)`` loads it: resuming continues bit-identically;
* with ``gradient_accumulation_steps=K`` the K micro-batches of a step form one SVGD step over the
  accumulated batch (``svgd_fx.accumulate``, one pass: T of each micro-batch reads r as the last
  step left it, and r is updated once from all of them).

Not supported (refused, not ignored): distributed training (more than one process), Trainer's
own ``torch_compile`` (SVGD compiles the model itself), and ``label_smoothing_factor`` (put a
smoothed loss in ``compute_loss_func`` instead).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from transformers import Trainer

from .._accumulate import AccumulationWindow
from ..capture.transform import SVGDModule, transform
from ..errors import SVGDError
from ._common import check_options, warn_if_clipping, warn_if_not_sgd

STATE_FILE = "svgd_state.pt"


class SVGDTrainer(Trainer):
    """A ``transformers.Trainer`` that trains with SVGD. ``svgd``: the options of
    :func:`svgd_fx.transform` (``{"s": 0.1}``, ``{"s": 0.1, "rho": 0.99}``, ...), given once;
    every other argument is ``Trainer``'s."""

    def __init__(self, *args: Any, svgd: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.svgd_options = check_options(svgd or {}, "SVGDTrainer(svgd=...)")
        default_sgd = kwargs.get("optimizers", (None, None))[0] is None and \
            kwargs.get("optimizer_cls_and_kwargs") is None
        super().__init__(*args, **kwargs)
        if default_sgd:          # Trainer's param groups (no decay on biases and norms), SGD on them
            self.optimizer_cls_and_kwargs = (torch.optim.SGD, {"lr": self.args.learning_rate})
        self.svgd_model: SVGDModule | None = None
        self._window: AccumulationWindow | None = None
        self._svgd_step = False
        self._refuse_unsupported()
        if self.optimizer is not None:
            warn_if_not_sgd(self.optimizer, "Trainer(optimizers=...)")
        else:
            warn_if_not_sgd(self.optimizer_cls_and_kwargs[0], "Trainer(optimizer_cls_and_kwargs=...)")
        warn_if_clipping(self.args.max_grad_norm, "TrainingArguments(max_grad_norm)")

    def _refuse_unsupported(self) -> None:
        args = self.args
        if args.world_size > 1:
            raise SVGDError("svgd_fx: SVGDTrainer runs in one process; for several, wrap the model yourself: "
                            "DDP(svgd_fx.transform(model, s, distributed=True)) in your own loop, or "
                            "svgd_fx.integrations.accelerate.")
        if args.torch_compile:
            raise SVGDError("svgd_fx: SVGDTrainer compiles the model itself (svgd_fx.transform, with inductor): "
                            "set TrainingArguments(torch_compile=False).")
        if args.label_smoothing_factor:
            raise SVGDError("svgd_fx: SVGDTrainer does not support TrainingArguments(label_smoothing_factor) "
                            "yet; compute the smoothed loss in Trainer(compute_loss_func=...) instead.")

    # ------------------------------------------------------------------ the SVGD model
    def _svgd_for(self, model: torch.nn.Module) -> SVGDModule:
        if model is not self.model:
            raise SVGDError(f"svgd_fx: SVGDTrainer got the model wrapped as {type(model).__name__} by the "
                            "accelerator; it trains the model itself only (one process, no torch_compile).")
        if self.svgd_model is None:
            self.svgd_model = transform(self.model, grad_scaler=getattr(self.accelerator, "scaler", None),
                                        **self.svgd_options)
            self._window = AccumulationWindow.of(self.svgd_model)
        return self.svgd_model

    def training_step(self, model: torch.nn.Module, inputs: dict, num_items_in_batch=None) -> torch.Tensor:
        self._svgd_for(model)
        if self.args.gradient_accumulation_steps > 1:
            self._window.open()
        self._svgd_step = True
        try:
            loss = super().training_step(model, inputs, num_items_in_batch)
        except BaseException:
            self._window.abandon()
            raise
        finally:
            self._svgd_step = False
        if self.accelerator.sync_gradients:
            self._window.close()
        return loss

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch=None):
        if self._svgd_step and model is self.model:
            model = self.svgd_model          # the training forward: SVGD's graphs (evaluation stays plain)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)

    # ------------------------------------------------------------------ checkpoints
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save and self.svgd_model is not None:
            torch.save(self.svgd_model.svgd_state.state_dict(), os.path.join(output_dir, STATE_FILE))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise SVGDError(f"svgd_fx: the checkpoint {checkpoint} has no {STATE_FILE} (SVGD's r): it was not "
                            "written by SVGDTrainer. Resuming would restart r at zero; start a new training "
                            "from its weights instead (model.from_pretrained(checkpoint)).")
        svgd = self._svgd_for(self.model)
        svgd.svgd_state.load_state_dict(torch.load(path, weights_only=True))
