"""The options of svgd_fx, listed once.

:data:`OPTIONS` is the one list: ``svgd_fx.transform``'s and ``svgd_fx.backend``'s signatures
follow it (a test compares them), the ``"svgd"`` backend's ``options={...}`` accepts its names,
and the option sections of both docstrings are written from it. Each option says which method
takes it (SVGD's ``s``/``rho``/..., TSO-ALRA's ``gamma``/...) and which entry point (only
``transform`` compiles by itself, ``codegen``; only the backend builds its graphs for
accumulation up front, ``accumulation``).

:class:`SVGDConfig` is what the pipeline reads: the options of one model with every default
filled in and checked. ``exclude`` and ``grad_scaler`` are not in it (they are resolved against
one model, and a scaler is the user's object): see :func:`resolve_exclude`, :func:`check_scaler`.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn

ExcludeSpec = None | str | Iterable[str] | Callable[[str, nn.Parameter], bool]

SVGD, TSO_ALRA = "svgd", "tso-alra"
METHODS = (SVGD, TSO_ALRA)
TRANSFORM, BACKEND = "transform", "backend"


@dataclass(frozen=True)
class Option:
    name: str
    default: Any                  # in the signatures (None: not given; ``filled`` is then used)
    doc: str
    method: str | None = None     # only this method takes it
    entry: str | None = None      # only this entry point takes it
    filled: Any = None            # the value used when not given (the method's default)


OPTIONS: tuple[Option, ...] = (
    Option("s", None, "T's scale (> 0), required for SVGD. The paper used 0.1, 0.01 and 0.001.", SVGD),
    Option("method", SVGD, '"svgd" (default) or "tso-alra" (Ida & Fujiwara: two-sided Kronecker T on Linear '
           "and Conv2d layers, then a switch to SGD; docs/tso-alra.md)."),
    Option("rho", None, "r's decay, in [0, 1) (default 0.9).", SVGD, filled=0.9),
    Option("eps", None, "the floor under sqrt(r + eps), > 0 (default 1e-6).", SVGD, filled=1e-6),
    Option("r_shape", None, '"full" (default: r has the σ\' output\'s per-sample shape; a dimension whose size '
           'changes between calls is averaged like the batch) or "channel" (r over the channel dimension only).',
           SVGD, filled="full"),
    Option("variant", None, '"paper" (default: Algorithm 1 as the paper writes it) or "authors" (the authors\' '
           "TensorFlow code: r from the batch mean of g² without the B factor, T only on the weights of linear, "
           "matmul and conv nodes, T from r before the step's update; docs/contract.md).", SVGD, filled="paper"),
    Option("reduction", "mean", 'how the loss combines the batch: "mean" (torch\'s default; the per-sample '
           'gradient is B·g) or "sum" (it is g).'),
    Option("nonfinite", None, '"raise" (default without a scaler): an inf/NaN in ∇σ\'J raises '
           "NonFiniteGradientError naming the σ' node (inside the backward through the T op, at the next "
           'forward under the fused T); "skip" (default with a scaler): training goes on. Either way r is '
           "never updated from a non-finite statistic."),
    Option("exclude", None, "parameter names, or a predicate (name, param) -> bool, kept on plain gradients."),
    Option("grad_scaler", None, "the torch.amp.GradScaler of fp16 training: r is built from the unscaled "
           "gradient and a step the scaler skips leaves r as it was (call scaler.update() once per step). An "
           "fp16 autocast forward with grad enabled raises unless a scaler is given, or grad_scaler=False says "
           "that this training has none. TSO-ALRA: its factors likewise."),
    Option("distributed", None, "with DDP, True all-reduces T's batch statistic over torch.distributed's "
           "default group (every rank's r is what one process would build on the joined batch; TSO-ALRA: its "
           "factors' statistics); False keeps each rank's own. Not given with several processes: an error."),
    Option("t_impl", "fused", '"fused" (default): T as aten ops in the joint graph, fused by inductor into '
           'its kernels (a GradScaler uses the op); "op": the svgd_fx::virtual_grad custom '
           "op (the Triton kernel on CUDA, torch elsewhere), which raises a non-finite ∇σ'J inside the backward."),
    Option("gamma", None, "TSO-ALRA: the new observation's weight in the factors' averages, in [0, 1) "
           "(default 0.05).", TSO_ALRA, filled=0.05),
    Option("t_int", None, "TSO-ALRA: steps between inverse-root refreshes, ≥ 1 (default 20).", TSO_ALRA,
           filled=20),
    Option("t_stat", None, "TSO-ALRA: steps between updates of the factors' averages, ≥ 1 (default 1: every "
           "step, as the paper; K-FAC implementations update them every 10 or so, since a conv's statistic costs "
           "several times its forward).", TSO_ALRA, filled=1),
    Option("damping", None, "TSO-ALRA: ε in U(Λ+εI)^-½Uᵀ, > 0 (default 1e-6).", TSO_ALRA, filled=1e-6),
    Option("switch_at_step", None, "TSO-ALRA: train on plain gradients after this many steps (None: when "
           "svgd_fx.switch_to_sgd(model) is called).", TSO_ALRA),
    Option("accumulation", False, "give every graph the inputs svgd_fx.accumulate needs (an r-sized "
           "accumulator per σ' node, TSO-ALRA: factor-sized, and a mode flag: a few per cent of a small model's step, so off by "
           "default; transform builds such graphs on its own at the first accumulated step).", entry=BACKEND),
    Option("codegen", None, '"inductor" (default): inductor compiles the rewritten graphs, as the backend '
           'does; "fx": the rewritten FX graphs run as they are, T as the op (debugging, exact comparisons). '
           "The environment variable SVGD_FX_CODEGEN sets the default.", entry=TRANSFORM),
)

BY_NAME = {o.name: o for o in OPTIONS}


def names(entry: str) -> tuple[str, ...]:
    """The options ``entry`` (``"transform"`` or ``"backend"``) takes, in signature order."""
    return tuple(o.name for o in OPTIONS if o.entry in (None, entry))


def options_doc(entry: str) -> str:
    """The option section of ``entry``'s docstring."""
    lines = []
    for name in names(entry):
        text = BY_NAME[name].doc
        lines.append(f"    {name}: {text}")
    return "\n".join(lines)


CODEGENS = ("inductor", "fx")
VARIANTS = ("paper", "authors")
T_IMPLS = ("fused", "op")
# SVGD_FX_CODEGEN=fx runs every transform's graphs without code generation (debugging; the test
# suite's float64 comparisons); a codegen= given to transform wins
DEFAULT_CODEGEN = os.environ.get("SVGD_FX_CODEGEN", "inductor")


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"svgd_fx: {name} must be a real number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class SVGDConfig:
    """The options of one model, defaults filled in and checked (see :data:`OPTIONS`)."""
    s: float | None = None
    rho: float = 0.9
    eps: float = 1e-6
    reduction: str = "mean"
    r_shape: str = "full"
    variant: str = "paper"
    nonfinite: str = "raise"
    distributed: bool | None = None    # None: not given (an error where a process group has several ranks)
    method: str = SVGD
    accumulation: bool = False      # the compile backend: graphs take svgd_fx.accumulate's inputs
    gamma: float = 0.05
    t_int: int = 20
    t_stat: int = 1
    damping: float = 1e-6
    switch_at_step: int | None = None
    t_impl: str = "fused"

    @classmethod
    def from_options(cls, method: str = SVGD, **options) -> "SVGDConfig":
        """Options as the user gave them (None: not given): defaults filled in per method, and
        an option of the other method is an error rather than silently ignored."""
        if method not in METHODS:
            raise ValueError(f"svgd_fx: method must be one of {METHODS}, got {method!r}")
        foreign = sorted(k for k, v in options.items() if v is not None and BY_NAME[k].method not in (None, method))
        if foreign:
            own = [o.name for o in OPTIONS if o.method == method]
            raise ValueError(f"svgd_fx: {foreign} {'is' if len(foreign) == 1 else 'are'} not an option of "
                             f"method={method!r} (it takes {', '.join(own)})")
        fields = {f.name for f in dataclasses.fields(cls)}
        filled = {k: (v if v is not None else BY_NAME[k].filled) for k, v in options.items()
                  if k in fields and (v is not None or BY_NAME[k].filled is not None)}
        return cls(method=method, **filled)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"svgd_fx: method must be one of {METHODS}, got {self.method!r}")
        if self.method == SVGD:
            self._check_svgd()
        else:
            self._check_tso()
        if self.reduction not in ("mean", "sum"):
            raise ValueError(f"svgd_fx: reduction must be 'mean' or 'sum' (how the loss combines the "
                             f"batch: it sets the per-sample gradient B·g or g), got {self.reduction!r}")
        if self.nonfinite not in ("raise", "skip"):
            raise ValueError(f"svgd_fx: nonfinite must be 'raise' (an inf/NaN in ∇σ'J raises, naming the "
                             f"σ' node) or 'skip' (r keeps its old values there; training goes on), "
                             f"got {self.nonfinite!r}")
        if self.t_impl not in T_IMPLS:
            raise ValueError(f"svgd_fx: t_impl must be 'fused' (T as aten ops that inductor fuses with its "
                             f"neighbours, the default) or 'op' (the svgd_fx::virtual_grad custom op: the "
                             f"Triton kernel on CUDA), got {self.t_impl!r}")

    def describe(self) -> str:
        """The options that make this config what it is, as ``name=value`` pairs."""
        if self.method == TSO_ALRA:
            return (f"method='tso-alra', gamma={self.gamma}, t_int={self.t_int}, t_stat={self.t_stat}, "
                    f"damping={self.damping}, switch_at_step={self.switch_at_step}, reduction={self.reduction!r}")
        return (f"s={self.s}, rho={self.rho}, eps={self.eps}, reduction={self.reduction!r}, "
                f"r_shape={self.r_shape!r}" + (", variant='authors'" if self.variant == "authors" else "")
                + (", accumulation=True" if self.accumulation else ""))

    def _check_svgd(self) -> None:
        if self.s is None:
            raise ValueError("svgd_fx: SVGD needs T's scale s (s is the user's choice; the paper used "
                             "0.1, 0.01, 0.001), e.g. svgd_fx.transform(model, s=0.1) or "
                             "torch.compile(model, backend='svgd', options={'s': 0.1})")
        s, rho, eps = _real("s", self.s), _real("rho", self.rho), _real("eps", self.eps)
        if not (0 < s < float("inf")):
            raise ValueError(f"svgd_fx: s must be a finite number > 0 (the scale of T; the paper used "
                             f"0.1, 0.01, 0.001), got s={self.s!r}")
        if not (0 <= rho < 1):
            raise ValueError(f"svgd_fx: rho must lie in [0, 1) (the decay of r's moving average), "
                             f"got rho={self.rho!r}")
        if not (0 < eps < float("inf")):
            raise ValueError(f"svgd_fx: eps must be a finite number > 0 (it keeps sqrt(r + eps) away "
                             f"from zero), got eps={self.eps!r}")
        if self.variant not in VARIANTS:
            raise ValueError(f"svgd_fx: variant must be 'paper' (Algorithm 1, the default) or 'authors' (the "
                             f"authors' TensorFlow code's T), got {self.variant!r}")
        if self.r_shape not in ("full", "channel"):
            raise ValueError(f"svgd_fx: r_shape must be 'full' (r per output element, the default) "
                             f"or 'channel' (r per channel), got {self.r_shape!r}")
        object.__setattr__(self, "s", s)
        object.__setattr__(self, "rho", rho)
        object.__setattr__(self, "eps", eps)

    def _check_tso(self) -> None:
        gamma, damping = _real("gamma", self.gamma), _real("damping", self.damping)
        if not (0 <= gamma < 1):
            raise ValueError(f"svgd_fx: gamma must lie in [0, 1) (the weight of the new observation in the "
                             f"factors' moving averages, Eqs. 17-18), got gamma={self.gamma!r}")
        if not (0 < damping < float("inf")):
            raise ValueError(f"svgd_fx: damping must be a finite number > 0 (ε in U(Λ+εI)^-½Uᵀ), "
                             f"got damping={self.damping!r}")
        if isinstance(self.t_int, bool) or not isinstance(self.t_int, int) or self.t_int < 1:
            raise ValueError(f"svgd_fx: t_int must be an int ≥ 1 (steps between inverse-root refreshes), "
                             f"got t_int={self.t_int!r}")
        if isinstance(self.t_stat, bool) or not isinstance(self.t_stat, int) or self.t_stat < 1:
            raise ValueError(f"svgd_fx: t_stat must be an int ≥ 1 (steps between updates of the factors' "
                             f"averages), got t_stat={self.t_stat!r}")
        k = self.switch_at_step
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 0):
            raise ValueError(f"svgd_fx: switch_at_step must be None or an int ≥ 0 (the number of TSO-ALRA "
                             f"steps before plain SGD), got switch_at_step={k!r}")
        object.__setattr__(self, "gamma", gamma)
        object.__setattr__(self, "damping", damping)


def make_config(*, grad_scaler=None, exclude=None, codegen=None, **options) -> SVGDConfig:
    """An :class:`SVGDConfig` from an entry point's keyword arguments (``exclude``, the scaler and
    ``codegen`` are the entry point's to keep; the scaler sets ``nonfinite``'s default)."""
    scaling = isinstance(grad_scaler, torch.amp.GradScaler)
    if options.get("nonfinite") is None:
        options["nonfinite"] = "skip" if scaling else "raise"
    if options.get("distributed") is not None:
        options["distributed"] = bool(options["distributed"])
    options["accumulation"] = bool(options.get("accumulation", False))
    return SVGDConfig.from_options(**options)


def check_scaler(scaler):
    """The GradScaler to read, None (not given: an fp16 autocast forward raises), or False (no
    scaler, knowingly: given as False, or a disabled scaler, which scales nothing)."""
    if scaler is None or scaler is False:
        return scaler
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"svgd_fx: grad_scaler must be a torch.amp.GradScaler (or False: fp16 without a scaler), "
                        f"got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else False


def resolve_codegen(codegen: str | None) -> str:
    codegen = DEFAULT_CODEGEN if codegen is None else codegen
    if codegen not in CODEGENS:
        raise ValueError(f"svgd_fx: codegen must be 'inductor' (generated code, T fused into inductor's kernels: "
                         f"the default) or 'fx' (the rewritten FX graphs run as they are, the T op: for debugging "
                         f"and exact comparisons), got {codegen!r}")
    return codegen


def resolve_exclude(model: nn.Module, exclude: ExcludeSpec) -> frozenset[str]:
    """The names of the parameters ``exclude`` keeps on plain gradients (unknown names: an error)."""
    named = dict(model.named_parameters())
    if exclude is None:
        return frozenset()
    if callable(exclude):
        return frozenset(name for name, p in named.items() if exclude(name, p))
    given = {exclude} if isinstance(exclude, str) else set(exclude)
    unknown = sorted(given - set(named))
    if unknown:
        raise ValueError(f"svgd_fx: exclude names parameters the model does not have: {unknown}. "
                         f"Known parameters: {sorted(named)[:12]}{' ...' if len(named) > 12 else ''}")
    return frozenset(given)


def describe(config: SVGDConfig, excluded: frozenset[str]) -> str:
    return config.describe() + (f", exclude={sorted(excluded)}" if excluded else "")
