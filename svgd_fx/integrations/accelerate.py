"""SVGD in an ``accelerate`` training loop: :func:`transform` and :func:`accumulate`.

>>> from svgd_fx.integrations import accelerate as svgd_accelerate
>>> accelerator = Accelerator(gradient_accumulation_steps=2)
>>> model_t = svgd_accelerate.transform(accelerator, model, s=0.1)
>>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
>>> model_t, opt, loader = accelerator.prepare(model_t, opt, loader)
>>> for x, y in loader:
...     with svgd_accelerate.accumulate(accelerator, model_t):    # instead of accelerator.accumulate
...         accelerator.backward(F.cross_entropy(model_t(x), y))
...         opt.step()
...         opt.zero_grad()

``transform`` is ``svgd_fx.transform`` with the accelerator's fp16 GradScaler (``mixed_precision=
"fp16"``) and ``distributed=True`` when the accelerator runs several processes. ``accumulate``
enters ``accelerator.accumulate(model)`` and makes its micro-batches one SVGD step over the
accumulated batch (one pass: T of each micro-batch reads r as the last step left it; r is updated
once, when accelerate syncs the gradients). r is part of ``model_t.state_dict()``, so
``accelerator.save_state`` / ``load_state`` carry it.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

from accelerate import Accelerator

from .._accumulate import AccumulationWindow
from ..capture.transform import SVGDModule, transform as _transform
from ._common import check_options


def transform(accelerator: Accelerator, model, **options: Any) -> SVGDModule:
    """``svgd_fx.transform(model, **options)`` wired to ``accelerator``: its GradScaler, and
    ``distributed=True`` (r's statistic over all processes) when it runs more than one."""
    options = check_options(options, "svgd_fx.integrations.accelerate.transform")
    if accelerator.num_processes > 1:
        options.setdefault("distributed", True)
    return _transform(model, grad_scaler=accelerator.scaler, **options)


@contextmanager
def accumulate(accelerator: Accelerator, model) -> Iterator[None]:
    """``accelerator.accumulate(model)``, with the micro-batches of one optimizer step inside one
    ``svgd_fx.accumulate`` window (committed at the micro-batch where accelerate syncs)."""
    with accelerator.accumulate(model):
        window = AccumulationWindow.of(model) if accelerator.gradient_accumulation_steps > 1 else None
        if window is not None:
            window.open()
        try:
            yield
        except BaseException:
            if window is not None:
                window.abandon()
            raise
        if window is not None and accelerator.sync_gradients:
            window.close()
