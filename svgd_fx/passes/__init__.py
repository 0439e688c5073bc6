"""The three passes: ``locate`` (σ' nodes on the torch-level graph), ``linearity`` (the table and
the chain rule), ``reroute`` (T nodes on AOTAutograd's joint graph)."""

from .linearity import SIGMA_OPS, OpRule, chain_linearity, op_key
from .locate import Analysis, Kind, ParamInput, SigmaNode, locate
from ..errors import RerouteError
from .reroute import RerouteSpec, reroute

__all__ = ["SIGMA_OPS", "OpRule", "chain_linearity", "op_key", "Analysis", "Kind", "ParamInput",
           "SigmaNode", "locate", "RerouteError", "RerouteSpec", "reroute"]
