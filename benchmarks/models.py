"""Models the benchmarks train and time (architectures from the authors' code, docs/contract.md)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PaperMLP(nn.Module):
    """784-256-128-64-32-10 with Linear→BN→ReLU (the authors' MNIST MLP)."""

    def __init__(self, widths=(784, 256, 128, 64, 32, 10)):
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-2], widths[1:-1]):
            layers += [nn.Linear(a, b), nn.BatchNorm1d(b), nn.ReLU()]
        layers.append(nn.Linear(widths[-2], widths[-1]))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class PreActBlock(nn.Module):
    """Pre-activation basic block with the option-A shortcut (strided subsampling, zero channels)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.stride, self.pad = stride, c_out - c_in

    def forward(self, x):
        h = F.relu(self.bn1(x))
        shortcut = x
        if self.stride != 1 or self.pad:
            shortcut = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        h = self.conv2(F.relu(self.bn2(self.conv1(h))))
        return h + shortcut


class PreActResNet20(nn.Module):
    """Pre-activation ResNet-20 (3 stages × 3 blocks, 16/32/64 channels), option-A shortcuts."""

    def __init__(self, in_channels: int = 1, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        blocks, c = [], 16
        for c_out, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(PreActBlock(c, c_out, stride if i == 0 else 1))
                c = c_out
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        h = F.relu(self.bn(self.blocks(self.stem(x))))
        return self.fc(h.mean(dim=(2, 3)))


class PaperVGG(nn.Module):
    """The paper's small VGG (Fig. 10: "6 parameter layers, 46,126 params" on 3×32×32 CIFAR-10).

    The figure gives only its first layers ("3×3, 3 conv, bias/ReLU, 3×3, 16, bias/ReLU");
    the rest is taken from the authors' code (``experiments/vgg_so.py``, ``inference``):
    three VGG blocks, each ``num`` 3×3 stride-1 'SAME' convs with bias and ReLU (all but the
    last keep the block's input width, the last widens to the block's output width), then a
    BatchNorm (ε = 1e-3) on the block output:

        block(c_in → 16, 2 convs) · max-pool 3×3/2 · block(16 → 32, 2 convs) · max-pool 3×3/2 ·
        block(32 → 128, 1 conv) · global average pool · Linear(128 → 10)

    Counting with 3 input channels: convs 84 + 448 + 2,320 + 4,640 + 36,992, BatchNorm γ/β
    32 + 64 + 256, Linear 1,290: 46,126 parameters, exactly the paper's figure, in 6 parameter
    layers (5 convs + 1 Linear). TF's 'SAME' 3×3/2 max-pool pads only bottom/right; here the
    pool pads 1 on every side (same output size, 32→16→8 or 28→14→7). The authors' BatchNorm
    always used batch statistics, at test time too; this one uses running statistics in
    ``eval()`` (the PyTorch convention).
    """

    def __init__(self, in_channels: int = 3, classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for c_out, convs, pool in ((16, 2, True), (32, 2, True), (128, 1, False)):
            for i in range(convs):
                out = c_out if i == convs - 1 else c
                layers += [nn.Conv2d(c, out, 3, 1, 1), nn.ReLU()]
                c = out
            layers.append(nn.BatchNorm2d(c, eps=1e-3))
            if pool:
                layers.append(nn.MaxPool2d(3, 2, 1))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.features(x).mean(dim=(2, 3)))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.ff1, self.ff2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.heads = heads

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, t, d))
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x))))


class TinyGPT(nn.Module):
    """A small GPT-style stack: token + position embeddings, pre-LN blocks, tied output head."""

    def __init__(self, vocab: int = 256, seq: int = 64, dim: int = 128, heads: int = 4, layers: int = 2):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.zeros(seq, dim))
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads) for _ in range(layers)])
        self.lnf = nn.LayerNorm(dim)

    def forward(self, ids):
        h = self.blocks(self.emb(ids) + self.pos[: ids.shape[1]])
        return F.linear(self.lnf(h), self.emb.weight)
