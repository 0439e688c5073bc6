"""The linearity tables of ``svgd_fx.passes.linearity`` against the ops' numbers.

What is checked, in float64 on small random arguments (batch dim first):

* every key of ``SIGMA_OPS``, called the way an FX node with that key calls it (a
  ``call_function`` target with the table's positional order; a ``"method:<name>"`` key as
  ``args[0].<name>(*args[1:])``, the receiver being the table's first argument), and every
  floating tensor argument of it (a list of tensors for ``cat``/``stack``):

  - an argument the row says the op is linear in must be affine, with every other argument
    held fixed: f(a + b) − f(a) − f(b) + f(0) == 0, in every example call of the op (both
    modes of batch/instance norm);
  - an argument the row leaves out must be really non-linear: that quantity is clearly
    non-zero in at least one example call. Where the op is in fact affine in an argument the
    row leaves out, the case is marked ``xfail(strict=True)`` with the reason (the table errs
    on the safe side there: the parameter gets the plain gradient);

  non-tensor arguments (stride, padding, normalized_shape, num_groups, dim, eps, mode flags)
  and integer/bool tensors (embedding indices, ``where``'s condition) are held fixed;
* every key of ``SIGMA_OPS`` has examples here, so a new row cannot go without a check;
* keyword arguments outside a row's ``args``: the row's claim stands for a call that passes
  them, except those its ``spoilers`` name (div's ``rounding_mode``, embedding's ``max_norm``),
  with which the op must be non-linear;
* ``chain_linearity`` on tiny traced parameter-only graphs: its answer per parameter equals
  the module docstring's rules and agrees with the numbers of the traced function.

The affinity test uses a base point c: f(c+a+b) − f(c+a) − f(c+b) + f(c), c = 0 except where 0
is outside the op's domain (a divisor, the chains' divisions), where c = 1.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch.fx import symbolic_trace

from svgd_fx.passes.linearity import SIGMA_OPS, OpRule, chain_linearity

DT = torch.float64
B = 3                       # batch size; the batch dim is dim 0 of every batch-like argument


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(*shape: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, dtype=DT, generator=g)


def positive(*shape: int, g: torch.Generator) -> torch.Tensor:
    """Values in [0.5, 1.5): variances, divisors, and every per-channel vector of a norm op."""
    return torch.rand(*shape, dtype=DT, generator=g) + 0.5


# ------------------------------------------------------------------ example calls, per op name


@dataclass
class Example:
    """One call of an op: the table's arguments by name, plus further keyword arguments."""

    args: dict[str, Any]
    kwargs: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    positive: frozenset[str] = frozenset()   # arguments sampled in [0.5, 1.5)
    base: dict[str, float] = field(default_factory=dict)   # base point c per argument (else 0)


def _linear(key, g):
    return [Example({"input": randn(B, 4, g=g), "weight": randn(5, 4, g=g), "bias": randn(5, g=g)})]


def _matmul(key, g):
    return [Example({"input": randn(B, 2, 4, g=g), "other": randn(4, 5, g=g)})]


def _mm(key, g):
    return [Example({"input": randn(B, 4, g=g), "mat2": randn(4, 5, g=g)})]


def _bmm(key, g):
    return [Example({"input": randn(B, 2, 4, g=g), "mat2": randn(B, 4, 5, g=g)})]


def _addmm(key, g):
    return [Example({"input": randn(B, 5, g=g), "mat1": randn(B, 4, g=g), "mat2": randn(4, 5, g=g)})]


def _conv(dims):
    def make(key, g):    # 2 input channels in 2 groups, 4 output channels, stride 2, padding 1
        return [Example({"input": randn(B, 2, *[5] * dims, g=g), "weight": randn(4, 1, *[3] * dims, g=g),
                         "bias": randn(4, g=g), "stride": 2, "padding": 1, "dilation": 1, "groups": 2})]
    return make


def _conv_transpose(dims):
    def make(key, g):    # weight [in, out/groups, k...]
        return [Example({"input": randn(B, 2, *[3] * dims, g=g), "weight": randn(2, 3, *[3] * dims, g=g),
                         "bias": randn(3, g=g), "stride": 2, "padding": 1, "output_padding": 1,
                         "groups": 1, "dilation": 1})]
    return make


def _embedding(key, g):
    return [Example({"input": torch.randint(0, 6, (B, 4), generator=g), "weight": randn(6, 3, g=g)})]


def _layer_norm(key, g):
    return [Example({"input": randn(B, 4, 5, g=g), "normalized_shape": (5,), "weight": randn(5, g=g),
                     "bias": randn(5, g=g)})]


def _rms_norm(key, g):
    return [Example({"input": randn(B, 4, 5, g=g), "normalized_shape": (5,), "weight": randn(5, g=g)})]


def _group_norm(key, g):
    return [Example({"input": randn(B, 4, 3, g=g), "num_groups": 2, "weight": randn(4, g=g),
                     "bias": randn(4, g=g)})]


def _running_stats_norm(flag):
    """batch_norm (flag "training") and instance_norm ("use_input_stats"), in both modes: the
    running statistics are read in one mode only (and updated in place in the other)."""
    def make(key, g):
        extra = {"cudnn_enabled": False} if key in (torch.batch_norm, torch.instance_norm) else {}
        vectors = ("running_mean", "running_var", "weight", "bias")
        examples = []
        for mode in (True, False):
            args = {"input": randn(B, 4, 3, g=g), **{name: positive(4, g=g) for name in vectors}}
            examples.append(Example(args, {flag: mode, "momentum": 0.1, "eps": 1e-5, **extra},
                                    label=f"{flag}={mode}", positive=frozenset(vectors)))
        return examples
    return make


def _prelu(key, g):
    return [Example({"input": randn(B, 4, 3, g=g), "weight": randn(4, g=g)})]


def _cat(key, g):
    return [Example({"tensors": [randn(B, 2, 3, g=g), randn(B, 1, 3, g=g)], "dim": 1})]


def _stack(key, g):
    return [Example({"tensors": [randn(B, 3, g=g), randn(B, 3, g=g)], "dim": 1})]


def _where(key, g):
    return [Example({"condition": torch.rand(B, 4, generator=g) > 0.5, "input": randn(B, 4, g=g),
                     "other": randn(4, g=g)})]


def _binary(key, g):       # a batch tensor and a per-feature (parameter-like) one
    return [Example({"input": randn(B, 4, g=g), "other": randn(4, g=g)})]


def _div(key, g):
    return [Example({"input": randn(B, 4, g=g), "other": positive(4, g=g)},
                    positive=frozenset({"other"}), base={"other": 1.0})]


# op name (OpRule.name) -> (key, generator) -> example calls
FACTORIES: dict[str, Callable[[Any, torch.Generator], list[Example]]] = {
    "linear": _linear,
    "matmul": _matmul,
    "mm": _mm,
    "bmm": _bmm,
    "addmm": _addmm,
    **{f"conv{d}d": _conv(d) for d in (1, 2, 3)},
    **{f"conv_transpose{d}d": _conv_transpose(d) for d in (1, 2, 3)},
    "embedding": _embedding,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "group_norm": _group_norm,
    "batch_norm": _running_stats_norm("training"),
    "instance_norm": _running_stats_norm("use_input_stats"),
    "prelu": _prelu,
    "cat": _cat,
    "stack": _stack,
    "where": _where,
    "mul": _binary,
    "add": _binary,
    "sub": _binary,
    "div": _div,
}


def examples(key: Any, seed: int = 0) -> list[Example]:
    return FACTORIES[SIGMA_OPS[key].name](key, _gen(seed))


# ------------------------------------------------------------------ calling an op, tensor algebra


def key_name(key: Any) -> str:
    if isinstance(key, str):
        return key
    for prefix, namespace in (("torch", torch), ("F", F), ("operator", operator)):
        if getattr(namespace, getattr(key, "__name__", ""), None) is key:
            return f"{prefix}.{key.__name__}"
    return repr(key)


def call(key: Any, rule: OpRule, args: dict[str, Any], kwargs: dict[str, Any]) -> torch.Tensor:
    """Call ``key`` as an FX node with that target would: the table's names in positional order."""
    positional = [_map(torch.clone, args[name]) for name in rule.args]   # clones: in-place ops, running stats
    if isinstance(key, str):
        method = key.removeprefix("method:")
        return getattr(positional[0], method)(*positional[1:], **kwargs)
    return key(*positional, **kwargs)


def _map(fn, *values):
    """``fn`` over tensors, elementwise over lists of tensors (``cat``'s ``tensors``)."""
    if isinstance(values[0], (list, tuple)) and all(isinstance(v, torch.Tensor) for v in values[0]):
        return [fn(*parts) for parts in zip(*values)]
    if isinstance(values[0], torch.Tensor):
        return fn(*values)
    return values[0]


def _is_float_arg(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_is_float_arg(v) for v in value)
    return isinstance(value, torch.Tensor) and value.is_floating_point()


def affinity_residual(key: Any, example: Example, arg: str, seed: int = 1):
    """f(c+a+b) − f(c+a) − f(c+b) + f(c) in ``arg``, every other argument held fixed, and the
    largest |f| seen (to scale tolerances)."""
    rule, g = SIGMA_OPS[key], _gen(seed)
    fixed = example.args[arg]
    sample = positive if arg in example.positive else randn
    a = _map(lambda t: sample(*t.shape, g=g), fixed)
    b = _map(lambda t: sample(*t.shape, g=g), fixed)
    c = _map(lambda t: torch.full_like(t, example.base.get(arg, 0.0)), fixed)

    def f(value):
        return call(key, rule, {**example.args, arg: value}, example.kwargs)

    outs = [f(_map(lambda x, y, z: x + y + z, c, a, b)), f(_map(torch.add, c, a)), f(_map(torch.add, c, b)), f(c)]
    scale = max(1.0, *(float(o.abs().max()) for o in outs))
    return outs[0] - outs[1] - outs[2] + outs[3], scale


def assert_affine(residual: torch.Tensor, scale: float, what: str) -> None:
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-11 * scale,
                               msg=lambda m: f"{what} is not affine:\n{m}")


def is_clearly_nonlinear(residual: torch.Tensor, scale: float) -> bool:
    return bool(residual.isfinite().all()) and float(residual.abs().max()) > 1e-3 * scale


# ------------------------------------------------------------------ the cases

# (key, argument) where the op is affine but the row leaves the argument out: the safe side (the
# parameter gets the plain gradient). `input` of linear/conv is a batch tensor in every model; a
# running statistic is a buffer.
_OMITS_AFFINE = "op is affine in `{arg}` but the row leaves it out (safe side: plain gradient)"
KNOWN_WRONG: dict[tuple[Any, str], str] = {
    (F.linear, "input"): _OMITS_AFFINE.format(arg="input"),
    **{(getattr(torch, f"conv{kind}{d}d"), "input"): _OMITS_AFFINE.format(arg="input")
       for d in (1, 2, 3) for kind in ("", "_transpose")},
    **{(fn, "running_mean"): _OMITS_AFFINE.format(arg="running_mean") + ": eval mode subtracts it, training ignores it"
       for fn in (F.batch_norm, torch.batch_norm, F.instance_norm, torch.instance_norm)},
}


def _cases() -> list:
    cases = []
    for key, rule in SIGMA_OPS.items():
        example = examples(key)[0]
        for arg in rule.args:
            if not _is_float_arg(example.args[arg]):
                continue        # held fixed: non-tensor, integer indices, bool condition
            linear = arg in rule.linear_in
            marks = ([pytest.mark.xfail(strict=True, reason=KNOWN_WRONG[(key, arg)])]
                     if (key, arg) in KNOWN_WRONG else [])
            cases.append(pytest.param(key, arg, linear, marks=marks,
                                      id=f"{rule.name}:{key_name(key)}-{arg}-{'linear' if linear else 'nonlinear'}"))
    return cases


CASES = _cases()


@pytest.mark.parametrize("key, arg, linear", CASES)
def test_row_matches_numbers(key, arg, linear):
    results = []
    for example in examples(key):
        residual, scale = affinity_residual(key, example, arg)
        what = f"{key_name(key)} [{example.label or 'default'}] in `{arg}`"
        if linear:
            assert_affine(residual, scale, what)     # affine in every example call
        results.append((what, is_clearly_nonlinear(residual, scale), float(residual.abs().max())))
    if not linear:
        assert any(nonlinear for _, nonlinear, _ in results), (
            f"the row omits `{arg}` but the op is affine in it in every example call: {results}")


def test_every_table_key_has_examples():
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))
    names = {key_name(key) for key in SIGMA_OPS}
    assert len(names) == len(SIGMA_OPS), "two keys print the same; test ids would collide"
    for key, rule in SIGMA_OPS.items():
        assert rule.name in FACTORIES, f"no example factory for {key_name(key)} ({rule.name})"
        if isinstance(key, str):
            assert key.startswith("method:") and hasattr(torch.Tensor, key.removeprefix("method:")), key
        else:
            assert callable(key)
        for example in examples(key):
            assert set(example.args) == set(rule.args), (key_name(key), sorted(example.args), rule.args)
            untested = {arg for arg in rule.linear_in if not _is_float_arg(example.args[arg])}
            assert not untested, f"{key_name(key)}: linear in {untested} but no float tensor to check it with"
    for key, arg in KNOWN_WRONG:
        assert key in SIGMA_OPS and arg in SIGMA_OPS[key].args, (key_name(key), arg)


# Keyword arguments outside a row's ``args``: ``bind_args`` drops them, so the row's claim holds
# for a call that passes them too, except where ``OpRule.spoilers`` names the argument (it makes
# the op linear in nothing): then the numbers must say non-linear.
_KWARG_CASES = [
    pytest.param(torch.div, "input", {"rounding_mode": "floor"}, id="torch.div-input-rounding_mode=floor"),
    pytest.param("method:div", "input", {"rounding_mode": "trunc"}, id="method:div-input-rounding_mode=trunc"),
    pytest.param(F.embedding, "weight", {"max_norm": 1.0}, id="F.embedding-weight-max_norm=1"),
    pytest.param(torch.add, "other", {"alpha": 2.5}, id="torch.add-other-alpha"),
    pytest.param(torch.sub, "other", {"alpha": 2.5}, id="torch.sub-other-alpha"),
    pytest.param(torch.addmm, "input", {"beta": 0.5, "alpha": 2.0}, id="torch.addmm-input-beta-alpha"),
    pytest.param(torch.addmm, "mat1", {"beta": 0.5, "alpha": 2.0}, id="torch.addmm-mat1-beta-alpha"),
]


@pytest.mark.parametrize("key, arg, kwargs", _KWARG_CASES)
def test_row_claim_holds_with_extra_keywords(key, arg, kwargs):
    rule = SIGMA_OPS[key]
    assert arg in rule.linear_in
    claimed = rule.spoiled_by((), kwargs) is None
    for example in examples(key):
        example.kwargs = {**example.kwargs, **kwargs}
        if key is F.embedding:      # rows of norm > max_norm exist, so renormalization happens
            example.args["weight"] = example.args["weight"] * 3
        residual, scale = affinity_residual(key, example, arg)
        if claimed:
            assert_affine(residual, scale, f"{key_name(key)}({kwargs}) in `{arg}`")
        else:
            assert is_clearly_nonlinear(residual, scale), f"{key_name(key)}({kwargs}) is affine in `{arg}`"


# ------------------------------------------------------------------ chain_linearity on traced chains


def chain_claims(fn: Callable, param_names: tuple[str, ...]) -> dict[str, bool]:
    """Walk ``symbolic_trace(fn)`` as ``locate`` does for parameter-derived nodes: a parameter
    placeholder starts as {name: True}, constants as {}, and every call node with a
    parameter below it gets ``chain_linearity``'s map."""
    gm = symbolic_trace(fn)
    maps: dict[Any, dict[str, bool]] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            maps[node] = {node.name: True} if node.name in param_names else {}
        elif node.op in ("call_function", "call_method"):
            below = any(maps.get(n) for n in node.all_input_nodes)
            maps[node] = chain_linearity(node, lambda n: maps.get(n, {}))[0] if below else {}
        elif node.op == "output":
            return maps[node.args[0]]
    raise AssertionError("no output")


def _weight_norm(v, g):
    return g * v / v.norm(dim=1, keepdim=True)


# id -> (function, parameter shapes, constants, parameters it is linear in per the module's rules)
CHAINS: dict[str, tuple[Callable, dict[str, tuple[int, ...]], tuple, set[str]]] = {
    "structural": (lambda w: w.t().reshape(9).flip(0).neg()[2:7].unsqueeze(0).expand(2, 5).sum(0),
                   {"w": (3, 3)}, (), {"w"}),
    "transpose-attributes": (lambda w: w.T + w.mT.rot90(1, (0, 1)) + w.H, {"w": (3, 3)}, (), {"w"}),
    "triangles": (lambda w: w.triu(1) + torch.tril(w) + w.triu().mT, {"w": (3, 3)}, (), {"w"}),
    "add-sub": (lambda w1, w2: w1 + w2 - w1, {"w1": (3, 3), "w2": (3, 3)}, (), {"w1", "w2"}),
    "mul-one-factor-each": (lambda w1, w2: w1 * w2, {"w1": (3, 3), "w2": (3, 3)}, (), {"w1", "w2"}),
    "mul-same-param-twice": (lambda w: w * w, {"w": (3, 3)}, (), set()),
    "shared-factor": (lambda w1, w2: (w1 + w2) * w1, {"w1": (3, 3), "w2": (3, 3)}, (), {"w2"}),
    "matmul": (lambda w1, w2: w1 @ w2, {"w1": (3, 3), "w2": (3, 3)}, (), {"w1", "w2"}),
    "einsum": (lambda w1, w2: torch.einsum("ij,jk->ik", w1, w2), {"w1": (3, 3), "w2": (3, 3)}, (), {"w1", "w2"}),
    "div-numerator-only": (lambda w1, w2: w1 / w2, {"w1": (3, 3), "w2": (3, 3)}, (), {"w1"}),
    "weight-norm-by-hand": (_weight_norm, {"v": (3, 4), "g": (3, 1)}, (), {"g"}),
    "torch._weight_norm": (lambda v, g: torch._weight_norm(v, g, 0), {"v": (3, 4), "g": (3, 1)}, (), {"g"}),
    "where-const-condition": (lambda w1, w2, mask: torch.where(mask, w1, w2), {"w1": (3, 3), "w2": (3, 3)},
                              (torch.tensor([[True, False, True]] * 3),), {"w1", "w2"}),
    "embedding-const-indices": (lambda w, idx: F.embedding(idx, w), {"w": (5, 3)},
                                (torch.tensor([0, 3, 3, 1]),), {"w"}),
    "cat-mean": (lambda w1, w2: torch.cat([w1, w2]).mean(0), {"w1": (3, 3), "w2": (2, 3)}, (), {"w1", "w2"}),
    "sigmoid": (lambda w, w2: torch.sigmoid(w) * w2, {"w": (3, 3), "w2": (3, 3)}, (), {"w2"}),
    "pow": (lambda w, w2: w ** 2 + w2, {"w": (3, 3), "w2": (3, 3)}, (), {"w2"}),
    "exp": (lambda w: w.exp(), {"w": (3, 3)}, (), set()),
    "div-rounding-mode": (lambda w1, w2: torch.div(w1, w2, rounding_mode="floor"), {"w1": (3, 3), "w2": (3, 3)},
                          (), set()),
}


@pytest.mark.parametrize("chain, param", [pytest.param(c, p, id=f"{c}-{p}")
                                          for c, (_, shapes, _, _) in CHAINS.items() for p in shapes])
def test_chain_linearity_matches_rules_and_numbers(chain, param):
    fn, shapes, consts, expected = CHAINS[chain]
    claims = chain_claims(fn, tuple(shapes))
    assert set(claims) == set(shapes), claims
    assert claims[param] == (param in expected), f"chain_linearity says {claims}, the rules say linear in {expected}"

    # numbers: around c = 1 (the divisors stay away from 0), a, b in [0.5, 1.5)
    g = _gen(2)
    values = {name: positive(*shape, g=g) for name, shape in shapes.items()}
    a, b = positive(*shapes[param], g=g), positive(*shapes[param], g=g)
    ones = torch.ones(shapes[param], dtype=DT)

    def f(value):
        return fn(*{**values, param: value}.values(), *consts)

    outs = [f(ones + a + b), f(ones + a), f(ones + b), f(ones)]
    residual, scale = outs[0] - outs[1] - outs[2] + outs[3], max(1.0, *(float(o.abs().max()) for o in outs))
    if claims[param]:
        assert_affine(residual, scale, f"chain {chain} in {param}")
    else:
        assert is_clearly_nonlinear(residual, scale), f"chain {chain} is affine in {param}: {residual}"


def test_a_spoiling_argument_keeps_the_parameter_on_its_plain_gradient():
    """nn.Embedding(max_norm=...) renormalises the rows it reads: its σ' node is not linear in
    the table, so the table gets no T (explain says why) while the Linear after it does."""
    import svgd_fx

    model = torch.nn.Sequential(torch.nn.Embedding(10, 4, max_norm=1.0), torch.nn.Linear(4, 3))
    model_t = svgd_fx.transform(model, s=0.1)
    model_t(torch.randint(0, 10, (5, 2))).sum().backward()
    rows = {row["node"]: row for row in svgd_fx.explain(model_t).rows}
    assert rows["1.linear"]["t_in_graph"] and not rows["0.embedding"]["t_in_graph"]
    assert "max_norm" in str(rows["0.embedding"])
