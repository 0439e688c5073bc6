"""σ' nodes whose per-sample shape changes between calls (dynamic padding): r keeps the dims that
do not vary and averages the others, with the default options, on both entry points."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from helpers import assert_t_fired, state, wrap
from reference import SVGDReference


class VaryingSeq(nn.Module):
    """Token and position embeddings, a LayerNorm and a linear over [B, T, C], pooled over T."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.pos = nn.Embedding(16, 4)
        self.ln = nn.LayerNorm(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.emb(ids) + self.pos(torch.arange(ids.shape[1]))
        return self.fc(self.ln(h)).mean(1)


SHAPES = [(4, 5), (4, 7), (3, 3), (4, 5), (2, 8)]    # (batch, sequence length) per step


def _ids(b, t, gen):
    return torch.randint(0, 10, (b, t), generator=gen)


def _train(wrapped, model, ref_model, shapes=SHAPES, seed=0, check=True, inputs=_ids, r_shape="full",
           after_step=None):
    """SGD on ``wrapped`` and on the reference for ``shapes`` ((batch, size) per step, the batch made
    by ``inputs``), gradients compared at every step; ``after_step(step)`` after each."""
    ref = SVGDReference(ref_model, s=0.1, r_shape=r_shape)
    opt, opt_r = torch.optim.SGD(model.parameters(), lr=0.1), torch.optim.SGD(ref_model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step, (b, t) in enumerate(shapes):
        x, y = inputs(b, t, gen), torch.randint(0, 3, (b,), generator=gen)
        opt.zero_grad()
        opt_r.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        if check:
            for (n, p), q in zip(model.named_parameters(), ref_model.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"B={b} T={t} {n}: {m}")
        opt.step()
        opt_r.step()
        if after_step is not None:
            after_step(step)


@pytest.mark.parametrize("kind", ["transform", "backend_fused", "backend_op"])
def test_varying_sequence_length_matches_reference_with_defaults(kind):
    torch.manual_seed(0)
    model = VaryingSeq().double()
    ref_model = copy.deepcopy(model)
    wrapped = wrap(model, kind)
    _train(wrapped, model, ref_model)
    st = state(wrapped, model)
    assert_t_fired(wrapped, st, {"emb.embedding", "pos.add", "ln.layer_norm", "fc.linear"})
    # r keeps the feature dim; the sequence dim (1) is averaged, as over the batch
    assert {k: tuple(v.shape) for k, v in st.tensors.items()} == {
        "emb.embedding.r": (4,), "pos.add.r": (4,), "ln.layer_norm.r": (4,), "fc.linear.r": (3,)}
    rows = {row["node"]: row for row in svgd_fx.explain(wrapped).rows}
    assert rows["fc.linear"]["r_averaged"] == (1,)
    assert "mean over dim 1" in str(svgd_fx.explain(wrapped))


class SizesFromInputs(nn.Module):
    """Parameter-derived values shaped by a whole ``.size()`` / ``.shape`` of an input (Hugging Face's
    ``torch.zeros(input_shape)`` token types and position ids, ``bias.expand(h.size())``): under
    dynamic shapes that size is a value in the graph, and it carries no batch data."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.types = nn.Embedding(2, 4)
        self.bias = nn.Parameter(torch.randn(4) * 0.1)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        h = self.emb(ids) + self.types(torch.zeros(ids.shape, dtype=torch.long))
        h = torch.tanh(h + self.bias.expand(h.size()))
        return self.fc(h).mean(1)


@pytest.mark.parametrize("kind", ["transform", "backend_fused"])
def test_sizes_of_inputs_are_not_batch_data(kind):
    torch.manual_seed(0)
    model = SizesFromInputs().double()
    ref_model = copy.deepcopy(model)
    wrapped = wrap(model, kind)
    _train(wrapped, model, ref_model)
    assert_t_fired(wrapped, state(wrapped, model), {"emb.embedding", "types.add", "bias.add", "fc.linear"})
    assert all(not row["node"].startswith(("types.embedding", "bias.expand")) for row in svgd_fx.explain(wrapped).rows)


class _Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x):
        return self.weight * x


class _TwoScales(nn.Module):
    """Two instances of one user module, each a frame of its own (the caller runs uncompiled, as
    Hugging Face's LongT5 stacks after a graph break), with lengths that change between steps: enc
    6 → 5 while dec 5 → 4. TorchDynamo hands dec's call the graph it made for enc's."""

    def __init__(self):
        super().__init__()
        self.enc, self.dec = _Scale(), _Scale()
        self.head = nn.Linear(4, 3)

    @torch._dynamo.disable(recursive=False)
    def forward(self, x):
        a, b = x[:, :, :4].contiguous(), x[:, :-1, 4:].contiguous()
        return self.head(torch.tanh(self.enc(a)).mean(1) + torch.tanh(self.dec(b)).mean(1))


@pytest.mark.parametrize("kind", ["transform", "backend_fused"])
def test_instances_of_one_frame_with_their_own_lengths(kind):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _TwoScales().double()
    ref_model = copy.deepcopy(model)
    wrapped = wrap(model, kind)

    def two_lengths(b, t, gen):
        return torch.randn(b, t, 8, generator=gen, dtype=torch.float64)

    _train(wrapped, model, ref_model, shapes=[(4, 6), (3, 5), (4, 7)], inputs=two_lengths)
    assert {k: tuple(v.shape) for k, v in state(wrapped, model).tensors.items() if k.endswith("mul.r")} == {
        "enc.mul.r": (4,), "dec.mul.r": (4,)}


def test_fixed_shapes_keep_the_full_r():
    """Where nothing varies, r has the contract's full per-sample shape (only the batch size changes)."""
    torch.manual_seed(0)
    model = VaryingSeq().double()
    model_t = svgd_fx.transform(model, s=0.1)
    _train(model_t, model, copy.deepcopy(model), shapes=[(4, 5), (3, 5), (4, 5)])
    assert tuple(model_t.svgd_state["fc.linear.r"].shape) == (5, 3)
    assert svgd_fx.explain(model_t).rows[-1]["r_averaged"] == ()


@pytest.mark.parametrize("entry", ["torch.compile", "in place"])
def test_dynamic_true_averages_only_the_dims_that_vary(entry):
    """torch.compile(..., dynamic=True) makes every dimension symbolic from the first call. r still
    keeps the sequence dim while its size stays the same (the contract's full shape, as with the
    default), and averages it from the first call where it changes; the reference's numbers
    throughout."""
    torch.manual_seed(0)
    model = VaryingSeq().double()
    ref_model = copy.deepcopy(model)
    if entry == "in place":
        model.compile(backend="svgd", dynamic=True, options={"s": 0.1})
        wrapped = model
    else:
        wrapped = torch.compile(model, backend="svgd", dynamic=True, options={"s": 0.1})

    def full_while_fixed(step):          # T fixed at steps 0-2: the full per-sample shape
        if step == 2:
            assert tuple(svgd_fx.state_of(model)["fc.linear.r"].shape) == (5, 3)

    _train(wrapped, model, ref_model, shapes=[(4, 5), (3, 5), (4, 5)] + SHAPES[1:], after_step=full_while_fixed)
    assert_t_fired(wrapped, svgd_fx.state_of(model), {"emb.embedding", "pos.add", "ln.layer_norm", "fc.linear"})
    assert tuple(svgd_fx.state_of(model)["fc.linear.r"].shape) == (3,)


def test_a_dim_marked_dynamic_is_averaged_from_the_first_call():
    """torch._dynamo.mark_dynamic(x, 1) declares the sequence dim varying: r averages it from the
    first call, and explain() says so."""
    torch.manual_seed(0)
    model = VaryingSeq().double()
    wrapped = torch.compile(model, backend="svgd", options={"s": 0.1})
    ids = torch.randint(0, 10, (4, 5))
    torch._dynamo.mark_dynamic(ids, 1)
    F.cross_entropy(wrapped(ids), torch.randint(0, 3, (4,))).backward()
    assert tuple(svgd_fx.state_of(model)["fc.linear.r"].shape) == (3,)
    assert {row["node"]: row for row in svgd_fx.explain(wrapped).rows}["fc.linear"]["r_averaged"] == (1,)
    assert_t_fired(wrapped, svgd_fx.state_of(model), {"emb.embedding", "pos.add", "ln.layer_norm", "fc.linear"})


def test_checkpoint_of_an_averaged_r_loads_into_a_fresh_model():
    """Saved after the sequence length varied (r over the features only), loaded before the first
    forward of a fresh transform: the next steps are bit-identical to the original's."""
    torch.manual_seed(0)
    model = VaryingSeq().double()
    model_t = svgd_fx.transform(model, s=0.1)
    _train(model_t, model, copy.deepcopy(model), shapes=SHAPES[:3], check=False)
    saved = copy.deepcopy(model_t.state_dict())
    assert tuple(saved["svgd_state.fc.linear.r"].shape) == (3,)

    twin = VaryingSeq().double()
    twin_t = svgd_fx.transform(twin, s=0.1)
    twin_t.load_state_dict(saved)
    gen = torch.Generator().manual_seed(5)
    for b, t in [(4, 6), (4, 6), (3, 9)]:          # the first length is fixed for a while
        ids, y = torch.randint(0, 10, (b, t), generator=gen), torch.randint(0, 3, (b,), generator=gen)
        for m, mt in ((model, model_t), (twin, twin_t)):
            m.zero_grad()
            F.cross_entropy(mt(ids), y).backward()
        for p, q in zip(model.parameters(), twin.parameters()):
            assert torch.equal(p.grad, q.grad)
        with torch.no_grad():
            for p, q in zip(model.parameters(), twin.parameters()):
                p -= 0.1 * p.grad
                q -= 0.1 * q.grad
    assert torch.equal(model_t.svgd_state["fc.linear.r"], twin_t.svgd_state["fc.linear.r"])


@pytest.mark.parametrize("kind", ["transform", "backend_fused"])
def test_static_graphs_of_an_older_layout_recompile_for_the_current_r(kind):
    """With torch.compile(dynamic=False) (and under transform, whose graphs inductor may make
    static), Dynamo keeps a graph per sequence length; the first was compiled for the full r,
    which has since been averaged over the sequence dim. Called again, it is planned and compiled
    again for the current r at that call: the reference's numbers, never a graph run on an r it
    was not built for."""
    torch.manual_seed(0)
    model = VaryingSeq().double()
    ref_model = copy.deepcopy(model)
    if kind == "backend_fused":
        wrapped = torch.compile(model, backend=svgd_fx.backend(s=0.1), dynamic=False)
    else:
        wrapped = svgd_fx.transform(model, s=0.1)
    _train(wrapped, model, ref_model, shapes=[(4, 5), (4, 7), (4, 5), (3, 5), (4, 7), (4, 5)])
    assert tuple(state(wrapped, model)["fc.linear.r"].shape) == (3,)
    assert_t_fired(wrapped, state(wrapped, model), {"emb.embedding", "pos.add", "ln.layer_norm", "fc.linear"})


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1, self.bn, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.c2(F.relu(self.bn(self.c1(x)))))
        return self.fc(h.mean((2, 3)))


MULTI_SCALE = [(3, 6), (4, 6), (3, 8), (4, 6), (3, 7)]     # (batch, image side) per step


def _images(b, side, gen):
    return torch.randn(b, 3, side, side, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["transform", "backend_fused"])
def test_multi_scale_images(kind):
    """Image sizes that change and come back (multi-scale training). Under inductor (the backend
    here), whose conv lowering specialises H and W, the graph of the second size is static again and
    Dynamo goes back to the graph of the first size, compiled for the full r, after r was averaged
    over H×W: that graph is planned again for the current r at that call. The reference's numbers
    throughout, with the default r and with r_shape='channel'."""
    torch.manual_seed(0)
    model = _ConvNet().double()
    ref_model = copy.deepcopy(model)
    wrapped = wrap(model, kind)
    _train(wrapped, model, ref_model, shapes=MULTI_SCALE, inputs=_images)
    assert tuple(state(wrapped, model)["c1.conv2d.r"].shape) == (4,)
    assert_t_fired(wrapped, state(wrapped, model), {"c1.conv2d", "bn.batch_norm", "c2.conv2d", "fc.linear"})
    torch._dynamo.reset()
    model = _ConvNet().double()
    wrapped = wrap(model, kind, r_shape="channel")
    _train(wrapped, model, copy.deepcopy(model), shapes=MULTI_SCALE, inputs=_images, r_shape="channel")
    assert_t_fired(wrapped, state(wrapped, model), {"c1.conv2d", "bn.batch_norm", "c2.conv2d", "fc.linear"})
