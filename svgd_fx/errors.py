"""Errors svgd_fx raises on purpose; each message names the node or parameter and what to do."""


class SVGDError(Exception):
    """Base class of svgd_fx's own errors."""


class StateShapeError(SVGDError, ValueError):
    """An r whose shape does not fit its σ' node (varying per-sample shape, wrong checkpoint)."""


class StaleLayoutError(StateShapeError):
    """A graph compiled for an r that has since been averaged over a dimension that started to
    vary: the signal for ``Plan.wrap``'s ``rebuild`` (the call recompiles for the current r)."""


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


class FrameworkSettingWarning(UserWarning):
    """A training framework's setting changes what SVGD computes (an optimizer other than SGD,
    gradient clipping): named, with the setting that turns it off."""


class EagerLayerWarning(UserWarning):
    """A torch.nn layer ran outside the model's compiled graphs (TorchDynamo ran the code calling
    it uncompiled) and runs through a graph of its own: exact, but its forward runs twice."""


# ----------------------------------------------------------------------------- message builders
# (the messages raised from more than one place, or from the runtime: each names what to do)

def option_spelling(entry: str, name: str, value: str) -> str:
    """How the user passes option ``name`` on ``entry`` ("transform" or "backend")."""
    if entry == "transform":
        return f"svgd_fx.transform(model, ..., {name}={value})"
    return f"torch.compile(model, backend='svgd', options={{..., {name!r}: {value}}})"


def nonfinite_error(name: str, deferred: bool = False) -> NonFiniteGradientError:
    """inf/NaN in ∇σ'J; ``deferred``: found by the fused T, raised at the next forward."""
    which = "the previous backward's gradient" if deferred else "the gradient"
    late = (" (Under the compile backend's fused T the error comes at the next forward: the optimizer "
            "may already have stepped on those gradients; t_impl='op' raises inside the backward instead.)"
            if deferred else "")
    return NonFiniteGradientError(
        f"svgd_fx: inf/NaN in {which} arriving at σ' node {name!r} (∇σ'J); its r was left as it "
        "was. The loss or an activation overflowed (in fp16, use torch.amp.GradScaler). Pass "
        "nonfinite='skip' to carry on: r then keeps its old values wherever the batch statistic is "
        "not finite, and the (non-finite) gradient is left for you to skip." + late
    )


def fp16_without_scaler(entry: str) -> SVGDError:
    return SVGDError(
        "svgd_fx: a forward under fp16 autocast with grad enabled, and no grad_scaler given. With "
        "torch.amp.GradScaler the loss is S times larger, so r would be built from S·g and the virtual gradients "
        f"would come out S times too small. Pass the scaler ({option_spelling(entry, 'grad_scaler', 'scaler')}), "
        f"or {option_spelling(entry, 'grad_scaler', 'False')} if this fp16 training uses no scaler.")


def without_accumulation() -> SVGDError:
    return SVGDError(
        "svgd_fx.accumulate: this model was compiled without accumulation, so its graphs have no "
        "accumulator inputs (a plain step would pay for them). Compile it with "
        "torch.compile(model, backend='svgd', options={..., 'accumulation': True}) or "
        "svgd_fx.backend(..., accumulation=True) to use svgd_fx.accumulate.")


def factor_error(name: str, side: str, detail: str) -> FactorError:
    return FactorError(
        f"svgd_fx: TSO-ALRA's factor {side} of layer {name!r} {detail}. The factor's damped inverse root "
        "U(Λ+εI)^-½Uᵀ is undefined, and a NaN would spread through every later step. Raise the damping "
        "(transform(..., damping=...)), lower the learning rate, or look for an overflow in the loss.")
