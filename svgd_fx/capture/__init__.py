"""Capture: the two entry points. ``transform.py`` (``svgd_fx.transform``, ``SVGDModule``),
``backend.py`` (``torch.compile(model, backend="svgd")``), ``eager_layers.py`` (torch.nn layers a
model's call runs outside its graphs), ``common.py`` (what both share)."""
