"""SVGD in PyTorch Lightning: :class:`SVGDCallback`.

>>> class LitModel(pl.LightningModule):
...     def __init__(self):
...         super().__init__()
...         self.model = Net()                     # the network the training step calls
...     def training_step(self, batch, batch_idx):
...         x, y = batch
...         return F.cross_entropy(self.model(x), y)
...     def configure_optimizers(self):
...         return torch.optim.SGD(self.parameters(), lr=0.1)
>>> trainer = pl.Trainer(callbacks=[SVGDCallback(s=0.1)], accumulate_grad_batches=2, gradient_clip_val=None)
>>> trainer.fit(LitModel(), loader)

At setup the callback replaces ``pl_module.model`` (``attribute=``) by
``svgd_fx.transform(pl_module.model, **options)``, with the precision plugin's fp16 GradScaler.
The module's parameters and state_dict keys stay what they were (``model.<name>``), plus
``model.svgd_state.<σ' name>.r``: Lightning's checkpoints carry r, and ``fit(ckpt_path=...)``
resumes bit-identically. With ``accumulate_grad_batches=K`` the K micro-batches of a step form one
SVGD step over the accumulated batch (one pass: T of each reads r as the last step left it; r is
updated once, before the optimizer step). An optimizer other than ``torch.optim.SGD`` and
``gradient_clip_val`` are warned about (both change SVGD's step).
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl

from .._accumulate import AccumulationWindow
from ..capture.transform import SVGDModule, transform
from ..errors import SVGDError
from ._common import check_options, warn_if_clipping, warn_if_not_sgd


class SVGDCallback(pl.Callback):
    """Train ``pl_module.<attribute>`` with SVGD. ``options``: those of :func:`svgd_fx.transform`
    (``s=0.1``, ...), given once."""

    def __init__(self, attribute: str = "model", **options: Any) -> None:
        self.attribute = attribute
        self.options = check_options(options, "SVGDCallback")
        self.window: AccumulationWindow | None = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        inner = getattr(pl_module, self.attribute, None)
        if isinstance(inner, SVGDModule):
            self.window = AccumulationWindow.of(inner)
            return
        if inner is None or not hasattr(inner, "parameters"):
            raise SVGDError(f"svgd_fx: SVGDCallback(attribute={self.attribute!r}): {type(pl_module).__name__} has "
                            f"no torch.nn.Module there; name the attribute holding the network the training step "
                            "calls (SVGDCallback(attribute='net', ...)).")
        if trainer.world_size > 1:
            self.options.setdefault("distributed", True)
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        wrapped = transform(inner, grad_scaler=scaler, **self.options)
        setattr(pl_module, self.attribute, wrapped)
        self.window = AccumulationWindow.of(wrapped)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            warn_if_not_sgd(optimizer, "configure_optimizers")
        warn_if_clipping(trainer.gradient_clip_val, "Trainer(gradient_clip_val)")

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if trainer.accumulate_grad_batches > 1:
            self.window.open()

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        self.window.close()          # after the last micro-batch's backward, before the step

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.window is not None:
            self.window.abandon()    # micro-batches no optimizer step followed: r as the last step left it

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.window is not None:
            self.window.abandon()
