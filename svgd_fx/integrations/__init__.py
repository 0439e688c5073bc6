"""SVGD inside training frameworks; each module imports its framework only when imported itself.

* :mod:`svgd_fx.integrations.huggingface` — ``SVGDTrainer``, a ``transformers.Trainer``.
* :mod:`svgd_fx.integrations.accelerate` — ``transform`` and ``accumulate`` for an ``Accelerator`` loop.
* :mod:`svgd_fx.integrations.lightning` — ``SVGDCallback``, a Lightning callback.

Each one trains with plain SGD on the virtual gradients, passes the framework's fp16 GradScaler
to svgd_fx, keeps r in the framework's checkpoints, and makes the framework's gradient
accumulation one SVGD step over the accumulated batch (:class:`svgd_fx.AccumulationWindow`).
"""
