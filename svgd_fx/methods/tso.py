"""TSO-ALRA (Ida & Fujiwara): two-sided Kronecker T on Linear and Conv2d layers.

The numbers are in ``docs/tso-alra.md``; the joint-graph rewrite in
:mod:`svgd_fx.passes.kronecker`; the T node (``svgd_fx::kron_t``) in
:mod:`svgd_fx.kernels.kron_op`; the switch to SGD in :mod:`svgd_fx.switch`. The state per
Kronecker layer ``<σ'>`` is ``<σ'>.A``, ``.A_root``, ``.B``, ``.B_root``, ``.steps``, and one
``tso.switched`` flag per model, all in ``state_dict()`` (all "state" extra inputs).
"""

from __future__ import annotations

import weakref

import torch

from ..config import SVGDConfig
from ..errors import SVGDError, option_spelling
from ..kernels.kron_op import commit, nonfinite_statistic
from ..passes.kronecker import STATE_PARTS, KronSpec, kronecker_layer, precondition
from ..passes.locate import ParamInput
from ..session import SigmaRecord
from .base import MethodPlan, PlanContext, Variants

SWITCHED_KEY = "tso.switched"


class TSOMethod:
    supports = frozenset({"accumulate", "grad_scaler", "distributed"})

    def __init__(self, config: SVGDConfig) -> None:
        self.config = config

    def plan(self, ctx: PlanContext) -> MethodPlan:
        """Kronecker specs and their state for the σ' nodes of one graph.

        Marks every σ' node's parameter inputs for ``explain()``: preconditioned (weight and
        bias of a Kronecker layer) or plain, with the reason. The state inputs are each layer's
        factors, roots and step counter, then the model's ``tso.switched`` flag.
        """
        config, owner, layout = self.config, ctx.owner, ctx.layout
        log = owner.log
        trainable = set(ctx.name_to_input) - set(owner.excluded)
        layers, state_specs = [], []
        for sigma in ctx.analysis.sigmas:
            log.name(sigma)
            layer, why = kronecker_layer(sigma, ctx.param_nodes, trainable)
            own = {layer.weight, layer.bias} - {None} if layer else set()
            sigma.param_inputs = [_marked(p, layer, own, why, owner.excluded) for p in sigma.param_inputs]
            record = log.records.setdefault(sigma.name, SigmaRecord(sigma, sigma.name if layer else None,
                                                                    layer.sizes if layer else None))
            if layer is None:
                continue
            record.state_keys = tuple(f"{sigma.name}.{part}" for part in STATE_PARTS)
            n, m = layer.sizes
            dtype = torch.float64 if sigma.dtype == torch.float64 else torch.float32
            where = f"{sigma.name!r} ({sigma.location})"
            for key, shape in zip(record.state_keys, ((n, n), (n, n), (m, m), (m, m))):
                state_specs.append((key, shape, dtype, sigma.device, where))
            state_specs.append((record.state_keys[-1], (), torch.int64, torch.device("cpu"), where))
            layers.append((sigma, layer, record.state_keys))
        state_specs.append((SWITCHED_KEY, (), torch.float32, torch.device("cpu"), "TSO-ALRA's switch to SGD"))
        for spec in state_specs:
            layout.add("state", spec[0])
        scaled = isinstance(owner.grad_scaler, torch.amp.GradScaler)
        collecting = ctx.accumulating and bool(layers)
        # the fold graph (variants) marks a non-finite statistic here; the T ops raise it themselves
        # (with distributed=True the statistics are every rank's: the ranks mark and raise alike)
        flagged = config.nonfinite == "raise" and not ctx.accumulating and config.t_int > 1
        flags = [(f"{sigma.name}.nonfinite", sigma.device) for sigma, _, _ in layers] if flagged else []
        for key, _ in flags:
            layout.add("flag", key)
        acc_specs = []
        for sigma, layer, keys in layers:        # [Σāāᵀ, Σĝĝᵀ] (+ rows, samples): svgd_fx.accumulate
            if ctx.accumulating:
                n, m = layer.sizes
                acc_specs.append((f"{sigma.name}.kron", keys[0], n * n + m * m))
                layout.add("acc", acc_specs[-1][0])
        if scaled:
            layout.add("inv_scale", "grad_scaler.inv_scale")
        if collecting:
            layout.add("collect", "collect")
        specs = [
            KronSpec(
                source=sigma.source, name=sigma.name, layer=layer,
                weight_input=ctx.name_to_input[layer.weight],
                bias_input=ctx.name_to_input[layer.bias] if layer.bias is not None else None,
                state_inputs=tuple(layout.index("state", key) for key in keys),
                switched_input=layout.index("state", SWITCHED_KEY), gamma=config.gamma, t_int=config.t_int,
                t_stat=config.t_stat,
                damping=config.damping, mean_reduction=config.reduction == "mean",
                switch_at_step=-1 if config.switch_at_step is None else config.switch_at_step,
                scale_input=layout.optional_index("inv_scale", "grad_scaler.inv_scale"),
                sync=bool(config.distributed), skip_nonfinite=config.nonfinite == "skip",
                acc_input=layout.optional_index("acc", f"{sigma.name}.kron"),
                collect_input=layout.optional_index("collect", "collect"),
                flag_input=layout.optional_index("flag", f"{sigma.name}.nonfinite"),
            )
            for sigma, layer, keys in layers
        ]
        state = owner.svgd_state
        examples = [state.get_or_create(*spec) for spec in state_specs]
        by_key = dict(zip((spec[0] for spec in state_specs), examples))
        examples += [state.flag(key, device) for key, device in flags]
        examples += [state.acc(key, numel, by_key[like].dtype, by_key[like].device)
                     for key, like, numel in acc_specs]
        if scaled:
            examples.append(torch.ones((), device=state_specs[0][3]))
        if collecting:
            examples.append(state.collect_flag(torch.device("cpu")))     # read on the host by the T nodes
        return MethodPlan(specs, state_specs, examples, torch.device("cpu"), acc_specs=acc_specs,
                          flags_raised_at_next_call=False)

    def commit(self, state, phase: str) -> None:
        """The end of an ``svgd_fx.accumulate`` block: each layer folds its micro-batches' pooled
        statistics into its factors and refreshes its roots when due (not in the gradients pass),
        and counts the step (not in the statistics pass: the gradients pass runs the same step)."""
        config = self.config
        for key in sorted(state.accs):
            name = key.removesuffix(".kron")
            parts = [state.tensors.get(f"{name}.{part}") for part in STATE_PARTS]
            if any(p is None for p in parts):
                continue
            commit(state.accs[key], *parts, config.gamma, config.t_int, config.t_stat, config.damping,
                   config.reduction == "mean", bool(config.distributed), config.nonfinite == "skip", name, phase)

    def off_check(self, plan: MethodPlan):
        """``off(state)``: whether every Kronecker layer of this graph is past the switch to SGD (its
        T nodes would all return plain gradients, so a graph without them may run instead). Asked
        at every call: the state keys are formed once, here."""
        step_keys = [f"{spec.name}.steps" for spec in plan.specs]
        k = self.config.switch_at_step
        return lambda state: switched_off(state, k, step_keys)

    def variants(self, plan: MethodPlan):
        """The graphs for some steps only (``docs/tso-alra.md``, "Which graph runs a step"), as
        ``Variants``, or None. ``"steady"`` (``t_stat > 1``): steps that neither update the factors
        nor refresh the roots; ``"fold"`` (``nonfinite="raise"``, one process): steps that update the
        factors without a refresh. Chosen per call from the layers' step counters (all at the same t,
        before the switch), i.e. for t = counter + 1; the counters advance when a backward runs
        through the graph, and after a fold a statistic found non-finite raises at the end of that
        backward. Graphs that collect statistics for ``svgd_fx.accumulate`` always run the T nodes.

        A graph called again before the backward of an earlier call (a siamese loss; a forward
        with grad enabled that never gets a backward) runs the T nodes from then on, for this model:
        the T ops take their t when their backward runs, in whatever order. A call that ran a
        variant and finds, when its backward starts, that another call took its t meanwhile raises
        (its graph did the work of a t that is not its own).
        """
        config = self.config
        if config.t_int == 1 or not plan.specs or plan.acc_specs:
            return None
        fold = all(spec.flag_input is not None for spec in plan.specs)
        names = (("steady",) if config.t_stat > 1 else ()) + (("fold",) if fold else ())
        if not names:
            return None
        names_of = [spec.name for spec in plan.specs]
        step_keys = [f"{name}.steps" for name in names_of]
        t_stat, t_int, k = config.t_stat, config.t_int, config.switch_at_step
        calls = weakref.WeakKeyDictionary()    # state -> _Calls of this graph for that model

        def count(state) -> None:
            with torch.no_grad():
                for key in step_keys:
                    state.peek(key).add_(1)

        def choose(state) -> str | None:
            mine = calls.get(state)
            if mine is not None and (mine.several or mine.pending):
                return None
            steps = [state.peek(key) for key in step_keys]
            if any(t is None for t in steps):
                return None
            t = int(steps[0]) + 1
            if t == 1 or (t - 1) % t_int == 0:
                return None
            name = "fold" if (t - 1) % t_stat == 0 else "steady"
            if name not in names or not all(int(s) + 1 == t for s in steps[1:]) or switched_off(state, k, step_keys):
                return None
            return name

        def ran(state, name: str | None, node) -> None:
            """A call with grad enabled whose backward node is ``node``: pending until its backward
            starts, which counts a variant's step."""
            mine = calls.setdefault(state, _Calls())
            mine.several = mine.several or bool(mine.pending)   # called again before a backward
            call = _Call(name, int(state.peek(step_keys[0])))
            mine.pending.append(call)

            def backward_starts(grad_outputs) -> None:   # (retain_graph: refused by AOTAutograd's donated buffers)
                if call in mine.pending:
                    mine.pending.remove(call)
                if call.name is None:
                    return
                if int(state.peek(step_keys[0])) != call.steps:
                    raise SVGDError(
                        f"svgd_fx: TSO-ALRA's layers {names_of[:3]} ran the {call.name!r} graph of step "
                        f"t = {call.steps + 1} (docs/tso-alra.md, \"Which graph runs a step\"), but another call "
                        "of the model took that step before this backward: the T ops would take the next step "
                        "here. Call the model once per backward, or several times from the first step on (it then "
                        "runs the T ops at every step), or pass t_int=1.")
                count(state)
                if call.name == "fold":
                    torch.autograd.Variable._execution_engine.queue_callback(
                        lambda: _raise_if_flagged(state, names_of))

            node.register_prehook(backward_starts)

        return Variants(names, choose, ran)


    def rewrite(self, joint, plan: MethodPlan, param_sources, param_inputs, entry: str,
                variant: str | None = None) -> set[str]:
        return precondition(joint, plan.specs, param_sources, param_inputs, option_spelling(entry, "exclude", "[...]"),
                            variant=variant)


class _Calls:
    """One TSO-ALRA graph's calls for one model whose backward has not started yet, and whether
    the graph was ever called again before such a backward."""

    def __init__(self) -> None:
        self.pending: list[_Call] = []
        self.several = False


class _Call:
    def __init__(self, name: str | None, steps: int) -> None:
        self.name, self.steps = name, steps       # the variant (None: the T ops), the counter it saw


def _raise_if_flagged(state, names: list[str]) -> None:
    """The end of a backward through a fold graph: the layers whose statistic was non-finite (their
    factors were left as they were) get their step uncounted, and the one the backward reached first
    (the last in the forward) is named in a ``FactorError``, as its T op would have raised."""
    flags = [state.flags[f"{name}.nonfinite"] for name in names]
    if not bool(torch.stack(flags).any()):          # one device sync, not one per layer
        return
    codes = {name: int(flag) for name, flag in zip(names, flags)}
    for name, code in codes.items():
        state.flags[f"{name}.nonfinite"].zero_()
        if code:
            state.peek(f"{name}.steps").sub_(1)
    name = next(name for name in reversed(names) if codes[name])
    raise nonfinite_statistic(name, "A" if codes[name] & 1 else "B")


def switched_off(state, switch_at_step: int | None, step_keys: list[str]) -> bool:
    """The switch as the T nodes see it: the ``tso.switched`` flag, or every layer's step counter
    (``step_keys``: ``"<σ'>.steps"``) past ``switch_at_step``."""
    flag = state.peek(SWITCHED_KEY)
    if flag is not None and bool(flag):
        return True
    if switch_at_step is None or not step_keys:
        return False
    steps = [state.peek(key) for key in step_keys]
    return all(t is not None and int(t) >= switch_at_step for t in steps)


def _marked(p: ParamInput, layer, own: set[str], why: str, excluded) -> ParamInput:
    """``p`` as explain() should show it: preconditioned when all its parameters are the
    layer's weight/bias, otherwise plain with the reason."""
    if own.intersection(p.params):
        n, m = layer.sizes
        folded = " (bias folded into A as a constant-1 input)" if layer.bias is not None else ""
        return ParamInput(p.arg, p.params, set(p.params) <= own,
                          f"TSO-ALRA: Kronecker factors A {n}x{n}, B {m}x{m} of this {layer.kind}{folded}")
    return ParamInput(p.arg, p.params, False, "excluded by the user" if set(p.params) & set(excluded) else why)
