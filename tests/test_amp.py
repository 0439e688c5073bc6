"""Mixed precision: fp16 autocast with a GradScaler builds r from the unscaled gradient and
leaves r alone on the steps the scaler skips."""

import copy

import pytest
import torch

import svgd_fx
from cases import PaperMLP
from helpers import assert_t_fired

SMALL_T = {"net.0.linear", "net.1.batch_norm", "net.3.linear", "net.4.batch_norm", "net.6.linear"}


def _wrap(model, kind, **kw):
    if kind == "transform":
        return svgd_fx.transform(model, s=0.1, **kw)
    return torch.compile(model, backend=svgd_fx.backend(s=0.1, **kw))


def _state(wrapped, model):
    return wrapped.svgd_state if isinstance(wrapped, svgd_fx.SVGDModule) else svgd_fx.state_of(model)


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_grad_scaler_fp16_matches_fp32_and_skipped_steps_keep_r(kind):
    torch.manual_seed(0)
    model16 = PaperMLP(widths=(20, 16, 12, 5))
    model32 = copy.deepcopy(model16)
    # a scale that overflows fp16 at first (skipped steps, backoff), then grows back every 3 steps
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 22, growth_interval=3)
    wrapped16 = _wrap(model16, kind, grad_scaler=scaler)
    wrapped32 = _wrap(model32, kind)
    opt16 = torch.optim.SGD(model16.parameters(), lr=0.0)    # parameters fixed: only r evolves
    gen = torch.Generator().manual_seed(1)
    skipped, kept, scales = 0, 0, []
    for step in range(12):
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        opt16.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            out = wrapped16(x)
        scale = scaler.get_scale()
        scaler.scale(torch.nn.functional.cross_entropy(out.float(), y)).backward()
        scaler.unscale_(opt16)
        grads16 = [p.grad.clone() for p in model16.parameters()]
        scaler.step(opt16)
        scaler.update()
        scales.append(scale)
        if scaler.get_scale() < scale:          # inf found: the step was skipped
            skipped += 1
            continue
        kept += 1
        model32.zero_grad()
        torch.nn.functional.cross_entropy(wrapped32(x), y).backward()
        grad_scale = max(p.grad.abs().max().item() for p in model32.parameters())
        for (n, p), g16 in zip(model32.named_parameters(), grads16):
            torch.testing.assert_close(g16, p.grad, rtol=5e-2, atol=1e-2 * grad_scale,
                                       msg=lambda m: f"step {step} (scale {scale}) {n}: {m}")
    with torch.no_grad():                       # the forward that rolls back a last skipped step
        wrapped16(torch.randn(4, 20))
    r16, r32 = _state(wrapped16, model16).tensors, _state(wrapped32, model32).tensors
    for key in r32:
        torch.testing.assert_close(r16[key], r32[key], rtol=5e-2, atol=1e-6 * r32[key].max().item(),
                                   msg=lambda m: f"{key}: {m}")
    assert skipped >= 1 and kept >= 4 and len(set(scales)) >= 3, (skipped, kept, scales)
    assert_t_fired(wrapped16, _state(wrapped16, model16), SMALL_T)


def test_grad_scaler_must_be_a_grad_scaler():
    with pytest.raises(TypeError, match="GradScaler"):
        svgd_fx.transform(PaperMLP(), s=0.1, grad_scaler=object())


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_bf16_autocast_keeps_r_in_float32(kind):
    """bf16 autocast: r and T's arithmetic stay float32; the virtual gradients follow fp32's
    within bf16 tolerance."""
    torch.manual_seed(0)
    model16 = PaperMLP(widths=(20, 16, 12, 5))
    model32 = copy.deepcopy(model16)
    wrapped16, wrapped32 = _wrap(model16, kind), _wrap(model32, kind)
    gen = torch.Generator().manual_seed(1)
    for step in range(3):
        x, y = torch.randn(16, 20, generator=gen), torch.randint(0, 5, (16,), generator=gen)
        for wrapped, model, amp in ((wrapped16, model16, True), (wrapped32, model32, False)):
            model.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                out = wrapped(x)
            torch.nn.functional.cross_entropy(out.float(), y).backward()
        scale = max(p.grad.abs().max().item() for p in model32.parameters())
        for (n, p), q in zip(model16.named_parameters(), model32.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-1, atol=3e-2 * scale, msg=lambda m: f"step {step} {n}: {m}")
    assert_t_fired(wrapped16, _state(wrapped16, model16), SMALL_T)
    for key, r in _state(wrapped16, model16).tensors.items():
        assert r.dtype == torch.float32, key
        torch.testing.assert_close(r, _state(wrapped32, model32).tensors[key], rtol=0.1, atol=1e-3 * r.max().item())


@pytest.mark.parametrize("kind", ["transform", "backend"])
def test_fp16_autocast_without_a_scaler_raises_and_names_the_option(kind):
    """fp16 training with a GradScaler that svgd_fx was not given builds r from S·g: virtual
    gradients S times too small, silently. A grad-enabled forward under fp16 autocast needs the
    scaler, or grad_scaler=False said on purpose; bf16 and no_grad forwards need nothing."""
    torch.manual_seed(0)
    x = torch.randn(8, 20)
    model = PaperMLP(widths=(20, 16, 5))
    wrapped = _wrap(model, kind)
    with torch.autocast("cpu", dtype=torch.float16):
        with pytest.raises(svgd_fx.SVGDError, match="grad_scaler"):
            wrapped(x)
        with torch.no_grad():
            wrapped(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        wrapped(x).float().sum().backward()
    torch._dynamo.reset()
    knowingly = PaperMLP(widths=(20, 16, 5))
    wrapped = _wrap(knowingly, kind, grad_scaler=False)
    with torch.autocast("cpu", dtype=torch.float16):
        wrapped(x).float().sum().backward()
    assert_t_fired(wrapped, _state(wrapped, knowingly), {"net.0.linear", "net.1.batch_norm", "net.3.linear"})
