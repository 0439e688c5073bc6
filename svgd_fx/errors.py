"""Errors svgd_fx raises on purpose; each message names the node or parameter and what to do."""


class SVGDError(Exception):
    """Base class of svgd_fx's own errors."""


class StateShapeError(SVGDError, ValueError):
    """An r whose shape does not fit its σ' node (varying per-sample shape, wrong checkpoint)."""


class RerouteError(SVGDError, RuntimeError):
    """The joint graph of a σ' node has a shape the reroute pass does not understand."""


class CoverageError(SVGDError, RuntimeError):
    """A trainable parameter was never seen by the pass (it would train on plain gradients)."""


class NonFiniteGradientError(SVGDError, FloatingPointError):
    """inf/NaN in ∇σ'J at a σ' node (r keeps its old values there); see ``nonfinite=``."""


class FactorError(SVGDError, FloatingPointError):
    """TSO-ALRA: a Kronecker factor that is non-finite or not positive definite after damping."""


class GradientAccumulationWarning(UserWarning):
    """Several backward passes accumulated into ``.grad`` outside ``svgd_fx.accumulate``: r was
    updated per micro-batch, not from the accumulated batch."""


class EagerLayerWarning(UserWarning):
    """A torch.nn layer ran outside the model's compiled graphs (TorchDynamo ran the code calling
    it uncompiled) and runs through a graph of its own: exact, but its forward runs twice."""
