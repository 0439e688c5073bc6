"""A tiny GPT-2 (tied lm_head, no dropout), token batches, the plain loop the framework tests
compare with, and their fresh-process resume check."""

import contextlib
import subprocess
import sys

import torch

import svgd_fx

SEQ = 8
VOCAB = 40


def gpt2(seed=0):
    import transformers

    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=16, vocab_size=VOCAB, n_positions=16,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)        # lm_head tied to the token embedding


def token_rows(n=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, SEQ), generator=g)


def same_parameters(a, b, exact=False):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        if exact:
            assert torch.equal(p, q), name
        else:
            torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=lambda m, name=name: f"{name}: {m}")


def plain_loop(micro_batches, per_step, loss, lr=0.05, s=0.1):
    """transform + SGD by hand: ``per_step`` micro-batches per optimizer step (inside
    svgd_fx.accumulate when more than one); ``loss(model_t, micro_batch)`` is each one's loss."""
    model = gpt2()
    model_t = svgd_fx.transform(model, s=s)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for i in range(0, len(micro_batches), per_step):
        with svgd_fx.accumulate(model_t) if per_step > 1 else contextlib.nullcontext():
            for micro_batch in micro_batches[i:i + per_step]:
                loss(model_t, micro_batch).backward()
        opt.step()
        opt.zero_grad()
    return model, model_t


def assert_resume_is_bit_identical(script, out, n_r=16):
    """Run ``script out full`` and ``script out resume`` in fresh processes; each saves
    ``{"params", "r"}`` at its end as ``out/<phase>.pt``: both must be equal bit for bit."""
    for phase in ("full", "resume"):
        done = subprocess.run([sys.executable, str(script), out, phase], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    full, resumed = torch.load(out + "/full.pt"), torch.load(out + "/resume.pt")
    assert len(full["r"]) == n_r and full["r"].keys() == resumed["r"].keys()
    for key in full["r"]:
        assert torch.equal(full["r"][key], resumed["r"][key]), key
    for i, (a, b) in enumerate(zip(full["params"], resumed["params"])):
        assert torch.equal(a, b), f"parameter {i} differs after resuming"
