"""The case table: models, inputs, and which σ' nodes must (not) get a T node."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class PaperMLP(nn.Module):
    """784-256-128-64-32-10, Linear→BN→ReLU (the authors' MNIST MLP)."""

    def __init__(self, widths=(784, 256, 128, 64, 32, 10)):
        super().__init__()
        layers = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class ResBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(h)))


class ResCNN(nn.Module):
    def __init__(self, c=6):
        super().__init__()
        self.stem = nn.Conv2d(1, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.blocks = nn.Sequential(ResBlock(c), ResBlock(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x):
        h = self.blocks(F.relu(self.bn(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


class GroupedConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.gc = nn.Conv2d(8, 12, 3, stride=2, padding=2, dilation=2, groups=4)
        self.c1 = nn.Conv1d(12, 4, 3, stride=2)
        self.c3 = nn.Conv3d(1, 2, (1, 2, 2), padding=(0, 1, 0))
        self.fc = nn.Linear(2 * 1 * 4 * 2, 5)

    def forward(self, x):
        h = F.relu(self.gc(F.relu(self.dw(self.pw(x)))))          # [B, 12, 4, 4]
        h = self.c1(h.flatten(2))                                  # [B, 4, 7]
        h = self.c3(h[:, None, :, :3, None].expand(-1, 1, 4, 3, 2).contiguous())  # [B, 2, 4, 4, 1]
        return self.fc(torch.tanh(h.flatten(1)[:, :16]))


class ConvTransposeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.t1 = nn.ConvTranspose1d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.t2 = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, dilation=2)
        self.t3 = nn.ConvTranspose3d(4, 2, 2, stride=1, bias=False)

    def forward(self, x):                                           # x: [B, 4, 5]
        h = torch.tanh(self.t1(x))                                  # [B, 6, 10]
        h = torch.tanh(self.t2(h[:, :, None, :].expand(-1, -1, 3, -1)))  # [B, 4, 7, 21]
        return self.t3(h[:, :, None, :3, :3])                       # [B, 2, 2, 4, 4]


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 8, 3, padding=1)
        self.gn = nn.GroupNorm(4, 8)
        self.act = nn.PReLU(8)
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.act2 = nn.PReLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        h = self.act(self.gn(self.conv(x)))
        h = self.act2(self.inorm(h))
        return self.fc(h.mean(dim=(2, 3)))


class TinyTransformer(nn.Module):
    """Embedding, an nn.Parameter added directly, LayerNorm, SDPA attention, head tied to the embedding."""

    def __init__(self, vocab=11, seq=6, dim=8, heads=2):
        super().__init__()
        self.heads = heads
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.1)
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.ff1 = nn.Linear(dim, 2 * dim)
        self.ff2 = nn.Linear(2 * dim, dim)
        self.lnf = nn.LayerNorm(dim)

    def forward(self, ids):
        b, t = ids.shape
        h = self.emb(ids) + self.pos
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        split = lambda z: z.view(b, t, self.heads, -1).transpose(1, 2)  # noqa: E731
        a = F.scaled_dot_product_attention(split(q), split(k), split(v), is_causal=True)
        h = h + self.proj(a.transpose(1, 2).reshape(b, t, -1))
        h = h + self.ff2(F.gelu(self.ff1(self.ln2(h))))
        return F.linear(self.lnf(h), self.emb.weight)


class SplitQKV(nn.Module):
    """Hugging Face's attention layout: one LayerNorm output read by separate q, k and v linears
    (three batch sums of T(g) for the norm's bias, next to r's own statistic)."""

    def __init__(self, dim=8, classes=3):
        super().__init__()
        self.ln = nn.LayerNorm(dim)
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):                                            # x: [B, T, dim]
        h = self.ln(x)
        a = torch.softmax(self.q(h) @ self.k(h).transpose(-1, -2), dim=-1) @ self.v(h)
        return self.out(a.mean(dim=1))


class SigmoidGate(nn.Module):
    """x * sigmoid(g): g enters non-linearly (plain gradient); the linears are routed."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.g = nn.Parameter(torch.randn(4))
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x)) * torch.sigmoid(self.g))


class LSTMNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(3, 6)
        self.lstm = nn.LSTM(6, 5, batch_first=True)
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        h, _ = self.lstm(torch.tanh(self.inp(x)))
        return self.head(h[:, -1])


class ChainNet(nn.Module):
    """Parameter-derived chains: W.t() into a matmul (linear), nn.RMSNorm (linear in its weight),
    a symmetric matrix from one triangle (linear), `- c` and `+= d` (linear), x / scale (not linear in scale), x * (2 * a)
    (linear), weight-norm style g * v / ||v|| (linear in g only: g gets T, v plain)."""

    def __init__(self):
        super().__init__()
        self.W = nn.Parameter(torch.randn(6, 5) * 0.3)
        self.norm = nn.RMSNorm(6)
        self.S = nn.Parameter(torch.randn(6, 6) * 0.3)
        self.c = nn.Parameter(torch.randn(6) * 0.1)
        self.d = nn.Parameter(torch.randn(6) * 0.1)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.a = nn.Parameter(torch.randn(6))
        self.v = nn.Parameter(torch.randn(3, 6))
        self.gain = nn.Parameter(torch.ones(3, 1))

    def forward(self, x):
        h = self.norm(x @ self.W.t())
        h = h @ (self.S.triu() + self.S.triu(1).mT) - self.c
        h += self.d
        h = torch.tanh(h / self.scale) * (2 * self.a)
        w = self.gain * self.v / self.v.norm(dim=1, keepdim=True)
        return F.linear(h, w)


class PositionalNet(nn.Module):
    """GPT-2/BERT/ViT layouts: a position table looked up with constant indices (a row gather,
    linear in the table) and scaled by a Python number, a class token concatenated in front of
    the batch (cat: linear in the token), a BERT-style token-type table."""

    def __init__(self, vocab=11, seq=6, dim=8, classes=3):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(seq + 1, dim)
        self.types = nn.Embedding(2, dim)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        b, t = ids.shape
        h = self.tok(ids) + self.types(torch.zeros(t, dtype=torch.long))
        h = torch.cat([self.cls.expand(b, -1, -1), h], dim=1)
        h = h + 0.5 * self.pos(torch.arange(t + 1))
        return self.head(self.ln(h)[:, 0])


class WeightNormNet(nn.Module):
    """Both weight-norm APIs: w = g·v/‖v‖ is linear in g (T), not in v (plain)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.utils.parametrizations.weight_norm(nn.Linear(5, 6))
        self.conv = nn.Conv1d(1, 2, 3, padding=1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)   # the hook-based API is deprecated
            self.fc2 = nn.utils.weight_norm(nn.Linear(12, 3))

    def forward(self, x):
        h = torch.tanh(self.fc1(x))                                   # [B, 6]
        return self.fc2(torch.tanh(self.conv(h[:, None, :])).flatten(1))


class CheckpointedNet(nn.Module):
    """Blocks under activation checkpointing (non-reentrant and reentrant), and a layer whose
    op name (``linear``) also appears outside the checkpointed regions."""

    def __init__(self, dim=6):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(dim, dim), nn.LayerNorm(dim), nn.Tanh())
                                    for _ in range(2))
        self.out = nn.Linear(dim, 3)
        self.checkpointed = True     # the reference runs without: checkpointing changes no number

    def forward(self, x):
        h = self.inp(x)
        for reentrant, block in zip((False, True), self.blocks):
            h = checkpoint(block, h, use_reentrant=reentrant) if self.checkpointed else block(h)
        return self.out(h)


class _GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return -0.5 * grad


class _FusedGelu(torch.autograd.Function):
    """A parameter-free activation written as a Function (BLOOM's GELU)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x * torch.sigmoid(1.702 * x)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        s = torch.sigmoid(1.702 * x)
        return grad * (s + 1.702 * x * s * (1 - s))


class FunctionNet(nn.Module):
    """Custom autograd Functions right after σ' nodes: gradient reversal and a fused activation."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(_GradientReversal.apply(self.fc1(x)))
        return self.fc3(_FusedGelu.apply(self.fc2(h)))


class AttentionNet(nn.Module):
    """torch.nn's own attention: nn.MultiheadAttention (weights returned) with learned key/value
    biases and a zero position, then an nn.TransformerEncoder (two post-norm layers) with a key
    padding mask, batch first: the projections inside F.multi_head_attention_forward are σ' nodes."""

    def __init__(self, dim=8, heads=2, classes=3):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True, add_bias_kv=True, add_zero_attn=True)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):                                         # x: [B, T, 4]
        h = self.inp(x)
        a, _ = self.attn(h, h, h)
        padding = torch.zeros(x.shape[:2], dtype=torch.bool)
        padding[:, -1] = True                                     # the last position is padding
        return self.out(self.enc(h + a, src_key_padding_mask=padding)[:, 0])


class SeqFirstAttentionNet(nn.Module):
    """The other layouts: sequence first (batch_first=False), cross-attention with kdim/vdim
    (separate q/k/v weights), and nn.TransformerDecoderLayer (key is value: packed k/v)."""

    def __init__(self, dim=8, heads=2, classes=3):
        super().__init__()
        self.inp = nn.Linear(4, dim)
        self.mem = nn.Linear(4, 6)
        self.cross = nn.MultiheadAttention(dim, heads, kdim=6, vdim=6)
        self.dec = nn.TransformerDecoderLayer(dim, heads, 2 * dim, dropout=0.0, norm_first=True)
        self.out = nn.Linear(dim, classes)

    def forward(self, x):                                         # x: [B, T, 4]
        h = self.inp(x).transpose(0, 1)                           # [T, B, dim]
        m = torch.tanh(self.mem(x)).transpose(0, 1)               # [T, B, 6]
        a, _ = self.cross(h, m, m, need_weights=False)
        causal = nn.Transformer.generate_square_subsequent_mask(h.shape[0])
        return self.out(self.dec(h + a, h, tgt_mask=causal, tgt_is_causal=True)[0])


class ExpandedBias(nn.Module):
    """``x + p.expand(B, -1)``: the parameter-derived operand has the output's full shape, so the
    add's backward is the identity at every batch size (Swin's shifted-window bias, a position
    table at batch size 1)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.p = nn.Parameter(torch.randn(4) * 0.1)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x) + self.p.expand(x.shape[0], -1)))


@dataclass
class Case:
    name: str
    make: Callable[[], nn.Module]
    inputs: Callable[[int], tuple]          # batch size -> inputs
    target: Callable[[int], torch.Tensor]   # batch size -> targets
    loss: str                               # "ce" | "mse" | "ce_seq"
    t_nodes: set[str]                       # σ' names that must get a T node
    plain: set[str] = field(default_factory=set)   # σ' names that must not
    batch: int = 8


def _x(*shape):
    return lambda b: (torch.randn(b, *shape),)


def _cls(n):
    return lambda b: torch.randint(0, n, (b,))


CASES = [
    Case("paper_mlp", PaperMLP, _x(784), _cls(10), "ce",
         {"net.0.linear", "net.1.batch_norm", "net.3.linear", "net.4.batch_norm", "net.6.linear",
          "net.7.batch_norm", "net.9.linear", "net.10.batch_norm", "net.12.linear"}, batch=32),
    Case("res_cnn", ResCNN, _x(1, 8, 8), _cls(10), "ce",
         {"stem.conv2d", "bn.batch_norm", "fc.linear"}
         | {f"blocks.{i}.{m}" for i in (0, 1) for m in ("conv1.conv2d", "bn1.batch_norm",
                                                         "conv2.conv2d", "bn2.batch_norm")}),
    Case("grouped_conv", GroupedConvNet, _x(3, 6, 6), _cls(5), "ce",
         {"pw.conv2d", "dw.conv2d", "gc.conv2d", "c1.conv1d", "c3.conv3d", "fc.linear"}),
    Case("conv_transpose", ConvTransposeNet, _x(4, 5), lambda b: torch.randn(b, 2, 2, 4, 4), "mse",
         {"t1.conv_transpose1d", "t2.conv_transpose2d", "t3.conv_transpose3d"}),
    Case("group_norm_prelu", NormNet, _x(2, 5, 5), _cls(3), "ce",
         {"conv.conv2d", "gn.group_norm", "act.prelu", "inorm.instance_norm", "act2.prelu", "fc.linear"}),
    Case("tiny_transformer", TinyTransformer, lambda b: (torch.randint(0, 11, (b, 6)),),
         lambda b: torch.randint(0, 11, (b, 6)), "ce_seq",
         {"emb.embedding", "pos.add", "ln1.layer_norm", "qkv.linear", "proj.linear", "ln2.layer_norm",
          "ff1.linear", "ff2.linear", "lnf.layer_norm", "emb.linear"}),
    Case("split_qkv", SplitQKV, _x(5, 8), _cls(3), "ce",
         {"ln.layer_norm", "q.linear", "k.linear", "v.linear", "out.linear"}),
    Case("positional", PositionalNet, lambda b: (torch.randint(0, 11, (b, 6)),), _cls(3), "ce",
         {"tok.embedding", "types.add", "cls.cat", "pos.add", "ln.layer_norm", "head.linear"}),
    Case("weight_norm", WeightNormNet, _x(5), _cls(3), "ce",
         {"fc1.parametrizations.weight.linear", "conv.conv1d", "fc2.linear"}),
    Case("checkpointed", CheckpointedNet, _x(4), _cls(3), "ce",
         {"inp.linear", "blocks.0.0.linear", "blocks.0.1.layer_norm", "blocks.1.0.linear",
          "blocks.1.1.layer_norm", "out.linear"}),
    Case("functions", FunctionNet, _x(4), _cls(3), "ce", {"fc1.linear", "fc2.linear", "fc3.linear"}),
    Case("attention", AttentionNet, _x(5, 4), _cls(3), "ce",
         {"inp.linear", "attn.linear", "attn.cat", "attn.cat#1", "attn.out_proj.linear", "out.linear"}
         | {f"enc.layers.{i}.{m}" for i in (0, 1) for m in (
             "self_attn.linear", "self_attn.out_proj.linear", "linear1.linear", "linear2.linear",
             "norm1.layer_norm", "norm2.layer_norm")}),
    Case("seq_first_attention", SeqFirstAttentionNet, _x(5, 4), _cls(3), "ce",
         {"inp.linear", "mem.linear", "cross.linear", "cross.linear#1", "cross.linear#2", "cross.out_proj.linear",
          "out.linear"} | {f"dec.{m}" for m in (
              "self_attn.linear", "self_attn.out_proj.linear", "multihead_attn.linear", "multihead_attn.linear#1",
              "multihead_attn.out_proj.linear", "linear1.linear", "linear2.linear", "norm1.layer_norm",
              "norm2.layer_norm", "norm3.layer_norm")}),
    Case("expanded_bias", ExpandedBias, _x(5), _cls(3), "ce", {"fc.linear", "p.add", "out.linear"}),
    Case("sigmoid_gate", SigmoidGate, _x(5), _cls(3), "ce", {"fc.linear", "out.linear"}, {"g.mul"}),
    Case("lstm", LSTMNet, _x(4, 3), _cls(2), "ce", {"inp.linear", "head.linear"}, {"lstm.lstm"}),
    Case("chains", ChainNet, _x(5), _cls(3), "ce", {"W.matmul", "norm.rms_norm", "S.matmul", "c.sub", "d.add", "a.mul", "gain.linear"},
         {"scale.div"}),
]


def loss_fn(kind: str, out: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if kind == "ce":
        return F.cross_entropy(out, y, reduction=reduction)
    if kind == "ce_seq":
        return F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction=reduction)
    return F.mse_loss(out, y, reduction=reduction)
