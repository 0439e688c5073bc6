"""What one model's SVGD holds besides its state: the pass log (what the pass found, per σ' node)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .passes.locate import SigmaNode


@dataclass
class SigmaRecord:
    """What the pass found for one σ' node (merged over all graphs that contain it)."""
    sigma: SigmaNode
    key: str | None                           # state key ("fc.linear.r"), or None if not routed
    r_shape: tuple[int, ...] | None
    t_graphs: int = 0                         # number of backward graphs with a T node for it
    state_keys: tuple[str, ...] = ()          # TSO-ALRA: the layer's factor, root and step keys


@dataclass
class PassLog:
    records: dict[str, SigmaRecord] = field(default_factory=dict)
    params_seen: set[str] = field(default_factory=set)
    graphs: int = 0
    backward_graphs: list[torch.fx.GraphModule] = field(default_factory=list)
    forward_graphs: list[torch.fx.GraphModule] = field(default_factory=list)
    key_locations: dict[str, str] = field(default_factory=dict)

    def name(self, sigma: SigmaNode) -> None:
        """Keep one name per σ' across graphs: the same name from another source line gets a suffix."""
        where = sigma.location.split("  ", 1)[0]
        known = self.key_locations.setdefault(sigma.name, where)
        if known != where:
            sigma.name = f"{sigma.name}@{where}"
            self.key_locations.setdefault(sigma.name, where)
