"""torch.nn layers called outside the captured graphs (a frame TorchDynamo runs uncompiled) get
graphs of their own inside an SVGD model's call: exact against the reference, BatchNorm's running
statistics updated once, and nothing redirected outside the model's call or inside its graphs."""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import svgd_fx
from helpers import t_fired
from reference import SVGDReference


class _BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.net(x))


class _Disabled(_BNNet):
    """Its whole forward runs uncompiled: every layer is called from eager code."""

    @torch._dynamo.disable
    def forward(self, x):
        return super().forward(x)


def _wrap(model, entry):
    if entry == "transform":
        return svgd_fx.transform(model, s=0.1)
    return torch.compile(model, backend="svgd", options={"s": 0.1})


def _steps(model, wrapped, ref_model, ref, batch, gen, rtol):
    """Three SGD steps on ``wrapped`` against the reference: gradients and buffers (updated once per
    step) compared; the reference's parameters follow the model's."""
    for step in range(3):
        x = batch()
        y = torch.randint(0, 3, (x.shape[0],), generator=gen)
        model.zero_grad()
        ref_model.zero_grad()
        F.cross_entropy(wrapped(x), y).backward()
        F.cross_entropy(ref(x), y).backward()
        for (name, p), q in zip(model.named_parameters(), ref_model.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=rtol, atol=rtol * 1e-3, msg=lambda m: f"{step} {name}: {m}")
        for (name, b), c in zip(model.named_buffers(), ref_model.buffers()):
            torch.testing.assert_close(b, c, rtol=rtol, atol=rtol * 1e-3, msg=lambda m: f"{step} {name}: {m}")
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                p -= 0.1 * p.grad
                q.copy_(p)


def _train_quietly(make, entry, batch):
    """``make()`` (float64) through ``entry`` for three steps against the reference, the eager-layer
    warning silenced; ``batch(gen)`` makes the inputs. Returns the wrapped model, the model, the
    reference."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = make().double()
    ref_model = copy.deepcopy(model)
    ref = SVGDReference(ref_model, s=0.1)
    wrapped = _wrap(model, entry)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", svgd_fx.EagerLayerWarning)
        _steps(model, wrapped, ref_model, ref, lambda: batch(gen), gen, rtol=1e-9)
    return wrapped, model, ref


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_layers_of_an_uncompiled_forward_are_exact(entry):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Disabled().double().train()
    ref_model = copy.deepcopy(model)
    ref = SVGDReference(ref_model, s=0.1)
    wrapped = _wrap(model, entry)
    gen = torch.Generator().manual_seed(1)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _steps(model, wrapped, ref_model, ref, lambda: torch.randn(5, 6, generator=gen, dtype=torch.float64), gen,
               rtol=1e-10)
    assert t_fired(wrapped) == {"net.0.linear", "net.1.batch_norm", "net.3.linear", "norm.layer_norm"}
    layer_warnings = [w for w in seen if issubclass(w.category, svgd_fx.EagerLayerWarning)]
    assert len(layer_warnings) == 1 and "'net.0' (Linear)" in str(layer_warnings[0].message)


class _EncoderDecoder(nn.Module):
    """nn.Transformer with a causal tgt_mask: its mask check (`_detect_is_causal_mask`) breaks the
    graph, so its layers run through graphs of their own; the encoder's and the decoder's linears
    see lengths 5 and 4 (each the same at every call)."""

    def __init__(self):
        super().__init__()
        self.src, self.tgt = nn.Linear(3, 8), nn.Linear(3, 8)
        self.tr = nn.Transformer(d_model=8, nhead=2, num_encoder_layers=1, num_decoder_layers=1, dim_feedforward=16,
                                 dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(4, dtype=x.dtype)
        return self.head(self.tr(self.src(x), self.tgt(x[:, :4]), tgt_mask=mask).mean(1))


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_layers_of_one_class_with_different_fixed_lengths_keep_their_full_r(entry):
    """Dynamo keeps what it learns about a frame's input sizes by the frame's code name: the layer
    graphs have one name each, or the decoder's linears (length 4, after the encoder's 5) would be
    compiled with the length dynamic from their first call and r averaged over it."""
    wrapped, model, _ = _train_quietly(_EncoderDecoder, entry,
                                       lambda gen: torch.randn(4, 5, 3, generator=gen, dtype=torch.float64))
    state = wrapped.svgd_state if entry == "transform" else svgd_fx.state_of(model)
    shapes = {key: tuple(r.shape) for key, r in state.tensors.items()}
    assert shapes["tr.decoder.layers.0.linear1.linear.r"] == (4, 16), shapes
    assert shapes["tr.encoder.layers.0.linear1.linear.r"] == (5, 16), shapes
    assert "tr.decoder.layers.0.linear1.linear" in t_fired(wrapped)


class _SharedLayers(nn.Module):
    """One nn.Linear and one nn.LayerNorm called twice in an uncompiled forward (a token embedding
    shared by an encoder and a decoder), on inputs of different lengths."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    @torch._dynamo.disable
    def forward(self, x):
        a = torch.tanh(self.norm(self.proj(x))).mean(1)
        b = torch.tanh(self.norm(self.proj(x[:, :3] * 2))).mean(1)
        return self.head(a * b)


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_a_layer_called_twice_is_two_sigma_nodes(entry):
    """Each call is a σ' node with its own r (its own graph), as inside a compiled graph."""
    wrapped, model, ref = _train_quietly(_SharedLayers, entry,
                                         lambda gen: torch.randn(4, 5, 3, generator=gen, dtype=torch.float64))
    state = wrapped.svgd_state if entry == "transform" else svgd_fx.state_of(model)
    shapes = {key: tuple(r.shape) for key, r in state.tensors.items()}
    assert shapes["proj.linear.r"] == (5, 8) and shapes["proj.linear@call2.r"] == (3, 8), shapes
    assert shapes["norm.layer_norm.r"] == (5, 8) and shapes["norm.layer_norm@call2.r"] == (3, 8), shapes
    assert t_fired(wrapped) == {"proj.linear", "proj.linear@call2", "norm.layer_norm", "norm.layer_norm@call2",
                                "head.linear"}
    assert len(ref.sigma_ops) == 5


class _TiedEmbeddings(nn.Module):
    """Hugging Face's encoder and decoder embeddings, two modules holding one tied table (named
    after ``shared``), both called from an uncompiled forward."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Embedding(12, 8)
        self.enc_emb, self.dec_emb = nn.Embedding(12, 8), nn.Embedding(12, 8)
        self.enc_emb.weight = self.dec_emb.weight = self.shared.weight
        self.head = nn.Linear(8, 3)

    @torch._dynamo.disable
    def forward(self, ids):
        a = torch.tanh(self.enc_emb(ids)).mean(1)
        b = torch.tanh(self.dec_emb(ids[:, :3].flip(1))).mean(1)
        return self.head(a * b)


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_tied_layers_outside_the_graphs_are_two_sigma_nodes(entry):
    wrapped, _, ref = _train_quietly(_TiedEmbeddings, entry, lambda gen: torch.randint(0, 12, (4, 5), generator=gen))
    assert t_fired(wrapped) == {"shared.embedding@enc_emb", "shared.embedding@dec_emb", "head.linear"}
    assert len(ref.sigma_ops) == 3


def test_nothing_is_redirected_outside_the_models_call():
    """The bare model called directly is not sent through layer graphs: its plain gradients stay
    plain, which the gradient check reports as ever (and r does not move)."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _Disabled().double()
    model_c = _wrap(model, "backend")
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    F.cross_entropy(model_c(x), y).backward()
    before = {k: r.clone() for k, r in svgd_fx.state_of(model_c).tensors.items()}
    graphs = svgd_fx.capture.backend.binding_of(model).log.graphs
    with pytest.raises(svgd_fx.CoverageError, match="net.0.weight"):
        F.cross_entropy(model(x), y).backward()
    assert all(torch.equal(r, before[k]) for k, r in svgd_fx.state_of(model_c).tensors.items())
    assert svgd_fx.capture.backend.binding_of(model).log.graphs == graphs     # no layer graph compiled


@pytest.mark.parametrize("entry", ["transform", "backend"])
def test_a_compiled_layer_is_not_routed_twice(entry):
    """A torch.nn layer that is the compiled model itself runs in its graph only (its hooks are
    traced there and do nothing): one T, one r update, no layer graph of its own."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    layer = nn.Linear(4, 3).double()
    ref_layer = copy.deepcopy(layer)
    ref = SVGDReference(ref_layer, s=0.1)
    wrapped = _wrap(layer, entry)
    with warnings.catch_warnings():
        warnings.simplefilter("error", svgd_fx.EagerLayerWarning)
        for _ in range(2):
            x = torch.randn(5, 4, dtype=torch.float64)
            layer.zero_grad()
            ref_layer.zero_grad()
            wrapped(x).pow(2).sum().backward()
            ref(x).pow(2).sum().backward()
            for p, q in zip(layer.parameters(), ref_layer.parameters()):
                torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-13)
    assert t_fired(wrapped) == {"weight.linear"}
