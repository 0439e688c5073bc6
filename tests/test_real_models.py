"""Hugging Face models from tiny configs against the independent reference, on both entry points.

float64, three SGD steps; every σ' node the reference routes gets a T node in the graph, and the
ones it keeps plain do not. Inductor's compiles cost most of the time, so the compile backend
runs by default on a subset that covers each mechanism (flattened Conv1D rows, identity-backward
adds, SDPA with a learned bias, class-token concatenation); ``-m slow`` adds Llama, ConvNeXt,
Swin, DeiT, BLOOM, CLIP, GPT-NeoX, Gemma, OPT, Mamba and Falcon (RMSNorm, channel LayerNorm and layer
scale, shifted windows, ALiBi, two towers, rotary tables, a selective scan) and GPT-2 with changing
lengths under the backend (the case table's changing lengths run on the backend by default, in
test_varying_shapes.py). ``model.compile(backend="svgd")`` in place runs on GPT-2 by default and on
every model with ``-m slow``."""

import copy

import peft
import pytest
import torch

import svgd_fx
from reference import SVGDReference
from zoo import MODELS, ZOO


def _wrapped(model, kind):
    if kind == "transform":
        return svgd_fx.transform(model, s=0.1)
    if kind == "in_place":
        model.compile(backend="svgd", options={"s": 0.1})
        return model
    return torch.compile(model, backend=svgd_fx.backend(s=0.1))


def train_against_reference(real, kind, shapes=((4, 6),) * 3, setup=None, seed=0, adapt=None):
    """SGD on ``real`` through ``kind`` and on the reference; gradients compared every step.
    ``adapt(model)`` returns the model to train instead (adapters put on it); the reference gets a
    copy of it. Returns the wrapped model and the reference."""
    torch.manual_seed(seed)
    model = real.make().double().train()
    if adapt is not None:
        model = adapt(model)
        ref_model = copy.deepcopy(model)
    else:
        ref_model = real.make().double().train()
        ref_model.load_state_dict(model.state_dict())
    if setup is not None:
        setup(model)
    wrapped, ref = _wrapped(model, kind), SVGDReference(ref_model, s=0.1)
    rtol = real.rtol if kind == "transform" or real.compiled_rtol is None else real.compiled_rtol
    gen = torch.Generator().manual_seed(seed + 1)
    for step, (b, t) in enumerate(shapes):
        inputs = real.inputs(b, t, gen)
        model.zero_grad()
        ref_model.zero_grad()
        wrapped(**inputs).loss.backward()
        ref(**inputs).loss.backward()
        grads = [(n, p.grad, q.grad) for (n, p), q in zip(model.named_parameters(), ref_model.parameters())]
        scale = max(q.abs().max().item() for _, _, q in grads if q is not None)
        for name, got, want in grads:
            assert (got is None) == (want is None), name
            if want is not None:
                torch.testing.assert_close(got, want, rtol=rtol, atol=rtol * 1e-2 * scale,
                                           msg=lambda m: f"{real.name} step {step} (B={b}, T={t}) {name}: {m}")
        with torch.no_grad():
            for p, q in zip(model.parameters(), ref_model.parameters()):
                if p.grad is not None:
                    p -= 0.05 * p.grad
                    q -= 0.05 * q.grad
    return wrapped, ref


def check_t_placement(real, wrapped, ref):
    """T at every σ' node the reference routes (the same count), none where it must not."""
    rows = svgd_fx.explain(wrapped).rows
    with_t = [row["node"] for row in rows if row["t_in_graph"]]
    assert len(with_t) == len(ref.sigma_ops) == real.routed, (len(with_t), len(ref.sigma_ops), real.routed)
    silent = [row["node"] for row in rows if any(row["linear"].values()) and not row["t_in_graph"]]
    assert not silent, f"linear σ' nodes without T: {silent}"
    plain = {row["node"] for row in rows if not row["t_in_graph"]}
    assert plain == set(real.plain)


@pytest.mark.parametrize("real", ZOO, ids=lambda m: m.name)
def test_transform_matches_reference(real):
    wrapped, ref = train_against_reference(real, "transform")
    check_t_placement(real, wrapped, ref)


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "convnext", "swin", "deit", "bloom", "clip", "wav2vec2"])
def test_transform_at_batch_size_one(name):
    """Batch size 1: every position table (and Swin's bias) meets an add whose backward is the
    identity; T must be there all the same."""
    real = MODELS[name]
    wrapped, ref = train_against_reference(real, "transform", shapes=((1, 6),) * 2)
    check_t_placement(real, wrapped, ref)


_SLOW = pytest.mark.slow


@pytest.mark.parametrize("name", ["gpt2", "bert", "vit", "wav2vec2"] + [
    pytest.param(n, marks=_SLOW) for n in ("t5", "llama", "convnext", "swin", "deit", "bloom", "clip", "gpt_neox",
                                           "gemma", "opt", "mamba", "falcon")])
def test_backend_matches_reference(name):
    real = MODELS[name]
    wrapped, ref = train_against_reference(real, "backend")
    check_t_placement(real, wrapped, ref)


@pytest.mark.parametrize("name", ["gpt2"] + [pytest.param(m.name, marks=_SLOW) for m in ZOO if m.name != "gpt2"])
def test_in_place_compile_matches_reference(name):
    """``model.compile(backend="svgd", ...)``, in place: the same graphs as ``torch.compile(model)``."""
    real = MODELS[name]
    wrapped, ref = train_against_reference(real, "in_place")
    check_t_placement(real, wrapped, ref)


@pytest.mark.parametrize("kind", ["transform", pytest.param("backend", marks=_SLOW)])
def test_changing_sequence_lengths(kind):
    """Dynamic padding with the default options: lengths and batch sizes change every step."""
    real = MODELS["gpt2"]
    wrapped, ref = train_against_reference(real, kind, shapes=((4, 6), (4, 9), (3, 5), (2, 9), (4, 6)))
    check_t_placement(real, wrapped, ref)
    state = wrapped.svgd_state if kind == "transform" else svgd_fx.state_of(wrapped)
    assert tuple(state["transformer.h.0.ln_1.layer_norm.r"].shape) == (16,)     # the sequence dim averaged


@pytest.mark.parametrize("name,kind", [("llama", "transform"), ("gpt2", "transform"), ("llama", "backend")])
def test_gradient_checkpointing(name, kind):
    """Hugging Face's gradient_checkpointing_enable(): the checkpointed blocks' σ' nodes get T, and
    the recomputation in the backward does not update r a second time. (use_cache=False, as for
    any training with checkpointing: otherwise the model logs a warning from inside its forward,
    which TorchDynamo cannot trace, and the compile backend's coverage check stops it.)"""
    real = MODELS[name]

    def setup(model):
        model.config.use_cache = False
        model.gradient_checkpointing_enable()

    wrapped, ref = train_against_reference(real, kind, setup=setup)
    check_t_placement(real, wrapped, ref)


@pytest.mark.parametrize("kind", ["transform", "backend", pytest.param("in_place", marks=_SLOW)])
def test_lora_adapters(kind):
    """PEFT's LoRA on GPT-2 (attention and projection Conv1D layers, adapters of rank 4 with random
    B, so that they are not zero): the base weights are frozen and get no gradient; every adapter
    layer gets T, as the reference routes it."""
    real = MODELS["gpt2"]

    def adapt(model):
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
        return peft.get_peft_model(model, config)

    wrapped, ref = train_against_reference(real, kind, adapt=adapt)
    rows = svgd_fx.explain(wrapped).rows
    with_t = [row["node"] for row in rows if row["t_in_graph"]]
    assert len(with_t) == len(ref.sigma_ops) == 12, (with_t, len(ref.sigma_ops))
    assert all(".lora_A." in node or ".lora_B." in node for node in with_t), with_t
    silent = [row["node"] for row in rows if any(row["linear"].values()) and not row["t_in_graph"]]
    assert not silent, f"linear σ' nodes without T: {silent}"
