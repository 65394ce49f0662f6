"""Data layer: datasets, docs/method.md §8 splits, the batch loader and the batched augmentation."""
import os
import warnings

import numpy as np
import pytest
import torch

from filtersurgery.data import augment

from filtersurgery.data import imagefolder, images, sources
from filtersurgery.data import BatchLoader, ImageData, LazyImages, load_dataset, split_parts

HAVE_FMNIST = os.path.isfile(os.path.join(sources.DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz"))


def labels(n_per_class=30, classes=10, extra=()):
    y = torch.arange(classes).repeat_interleave(n_per_class)
    return torch.cat([y, torch.tensor(extra, dtype=torch.int64)])


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("parts", [2, 4])
def test_split_disjoint_balanced_equal(parts):
    y = labels(n_per_class=103, extra=[0, 0, 3, 7, 7])  # not divisible: balance within ±1
    sp = split_parts(y, parts, seed=1)
    assert len(sp) == parts
    all_idx = torch.cat([torch.cat([tr, va]) for tr, va in sp])
    assert len(all_idx) == len(y) and len(all_idx.unique()) == len(y)  # partition: disjoint and complete
    sizes = [len(tr) + len(va) for tr, va in sp]
    assert max(sizes) - min(sizes) <= 1
    per_class = torch.stack([torch.bincount(y[torch.cat([tr, va])], minlength=10) for tr, va in sp])
    assert (per_class.max(0).values - per_class.min(0).values).max() <= 1
    for tr, va in sp:
        assert abs(len(va) - round(0.1 * (len(tr) + len(va)))) == 0
        vc = torch.bincount(y[va], minlength=10)
        assert vc.max() - vc.min() <= 1  # validation class-balanced
        assert len(np.intersect1d(tr.numpy(), va.numpy())) == 0
        assert torch.equal(tr, tr.sort().values)


def test_split_seeded_reproducible_and_random():
    y = labels(50)
    a, b, c = split_parts(y, 4, seed=3), split_parts(y, 4, seed=3), split_parts(y, 4, seed=4)
    assert all(torch.equal(x[0], z[0]) and torch.equal(x[1], z[1]) for x, z in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    # random, not contiguous blocks of the original order
    assert not torch.equal(a[0][0], torch.arange(len(a[0][0])))


def test_split_val_fraction_and_subset():
    y = labels(200)
    sp = split_parts(y, 2, seed=0, val_fraction=0.25)
    assert [len(va) for _, va in sp] == [250, 250] and [len(tr) for tr, _ in sp] == [750, 750]
    sub = split_parts(y, 4, seed=0, subset=37)
    full = split_parts(y, 4, seed=0)
    for (tr, va), (ftr, fva) in zip(sub, full):
        assert len(tr) == 37 and len(va) == round(37 * 0.1 / 0.9)
        assert set(tr.tolist()) <= set(ftr.tolist()) and set(va.tolist()) <= set(fva.tolist())
        cnt = torch.bincount(y[tr], minlength=10)
        assert cnt.max() - cnt.min() <= 1
    assert all(len(va) == 0 for _, va in split_parts(y, 2, seed=0, val_fraction=0.0))


@pytest.mark.parametrize("kwargs", [dict(parts=0), dict(val_fraction=1.0), dict(val_fraction=-0.1),
                                    dict(subset=10 ** 6), dict(subset=0)])
def test_split_bad_input(kwargs):
    args = dict(parts=2, seed=0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        split_parts(labels(10), **args)
    with pytest.raises(ValueError, match="y must"):
        split_parts(torch.rand(10), 2, 0)


# ---------------------------------------------------------------- loader


def test_loader_epochs_deterministic_and_complete():
    x = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1).expand(50, 1, 2, 2).contiguous()
    y = torch.arange(50)
    ld = BatchLoader(x, y, batch_size=8, shuffle=True, device="cpu", seed=5)
    assert len(ld) == 7
    orders = []
    for epoch in (0, 1, 0):
        ld.set_epoch(epoch)
        batches = list(ld)
        assert all(xb.dtype == torch.uint8 and yb.dtype == torch.int64 for xb, yb in batches)
        got = torch.cat([yb for _, yb in batches])
        assert torch.equal(torch.cat([xb[:, 0, 0, 0] for xb, _ in batches]).long(), got)  # x and y stay paired
        assert sorted(got.tolist()) == list(range(50))
        orders.append(got)
    assert torch.equal(orders[0], orders[2]) and not torch.equal(orders[0], orders[1])
    # a fresh loader (as after a resume) gives the same epoch-1 order
    ld2 = BatchLoader(x, y, 8, True, "cpu", seed=5)
    ld2.set_epoch(1)
    assert torch.equal(torch.cat([yb for _, yb in ld2]), orders[1])
    ld3 = BatchLoader(x, y, 8, True, "cpu", seed=5, drop_last=True)
    assert len(ld3) == 6 and all(len(yb) == 8 for _, yb in ld3)
    plain = BatchLoader(x, y, 64, shuffle=False, device="cpu")
    assert torch.equal(next(iter(plain))[1], y)


def test_loader_shards():
    x = torch.zeros(23, 1, 2, 2, dtype=torch.uint8)
    y = torch.arange(23)
    shards = [BatchLoader(x, y, 4, True, "cpu", seed=2, rank=r, world_size=3) for r in range(3)]
    for s in shards:
        s.set_epoch(4)
    got = [torch.cat([yb for _, yb in s]) for s in shards]
    assert len({len(g) for g in got}) == 1 and len(got[0]) == 8  # same length on every rank
    assert len({len(s) for s in shards}) == 1
    assert set(torch.cat(got).tolist()) == set(range(23))  # together they cover the data
    first = [set(g.tolist()) for g in got]
    assert len(first[0] & first[1]) + len(first[1] & first[2]) + len(first[0] & first[2]) <= 1  # only padding repeats
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(x, y, 4, True, "cpu", rank=3, world_size=3)


def test_loader_bad_input():
    x = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="batch_size"):
        BatchLoader(x, torch.arange(4), 0, True, "cpu")
    with pytest.raises(ValueError, match="y must"):
        BatchLoader(x, torch.arange(5), 2, True, "cpu")
    with pytest.raises(ValueError, match="empty"):
        BatchLoader(x[:0], torch.arange(0), 2, True, "cpu")
    with pytest.raises(ValueError, match="uint8"):
        BatchLoader(x.float(), torch.arange(4), 2, True, "cpu")


# ---------------------------------------------------------------- augmentation


def test_random_crop_flip_shapes_and_content():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 256, (16, 3, 8, 8), dtype=torch.uint8)  # no zeros: padding is recognisable
    out = augment.random_crop_flip(x, padding=2, generator=g)
    assert out.shape == x.shape and out.dtype == torch.uint8
    assert not torch.equal(out, x)
    xp = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):  # every output is some crop of the padded input, maybe mirrored
        windows = [xp[i, :, t:t + 8, l:l + 8] for t in range(5) for l in range(5)]
        assert any(torch.equal(out[i], w) or torch.equal(out[i], w.flip(2)) for w in windows)
    again = augment.random_crop_flip(x, padding=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, again)
    assert torch.equal(augment.random_crop_flip(x, padding=0, flip=False), x)


def test_two_views_flip_equals_flipped_crop():
    x = torch.randint(0, 256, (8, 3, 10, 10), dtype=torch.uint8)
    g = torch.Generator().manual_seed(1)
    xf, xc = augment.two_views(x, generator=g, brightness=0, contrast=0, saturation=0)
    assert torch.equal(xf, xc.flip(3))  # no jitter: colour view is the crop itself
    g = torch.Generator().manual_seed(1)
    xf2, xc2 = augment.two_views(x, generator=g)
    assert torch.equal(xf2, xf)  # same generator state -> same crop
    assert xc2.shape == x.shape and xc2.dtype == torch.uint8 and not torch.equal(xc2, xc)
    top, left = augment.crop_indices(x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(xf, augment.crop(x, top, left, 4).flip(3))


def test_two_views_random_flip_mirrors_about_half_and_keeps_the_colour_crop():
    x = torch.randint(0, 256, (400, 1, 10, 10), dtype=torch.uint8)
    xf, xc = augment.two_views(x, generator=torch.Generator().manual_seed(1), brightness=0, contrast=0,
                               saturation=0, flip="random")
    mirrored = (xf == xc.flip(3)).flatten(1).all(1)
    same = (xf == xc).flatten(1).all(1)
    assert bool((mirrored | same).all())  # every B_F is the colour view's crop, mirrored or not
    assert 0.4 < float(mirrored.float().mean()) < 0.6
    with pytest.raises(ValueError, match="flip: must be one of"):
        augment.two_views(x, flip="sometimes")


def test_color_jitter_ranges_and_grey():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, 1, 8, 8)
    out = augment.color_jitter(x, generator=g)
    assert out.shape == x.shape and out.dtype == x.dtype and 0 <= out.min() and out.max() <= 1
    assert not torch.allclose(out, x)
    # brightness only: per-sample scaling within [0.6, 1.4]
    b = augment.color_jitter(x, brightness=0.4, contrast=0, saturation=0, generator=g)
    ratio = (b / x.clamp_min(1e-6))[x > 0.05]
    assert ratio.min() >= 0.6 - 1e-5 and ratio.max() <= 1.4 + 1e-5
    # saturation is skipped for 1 channel (no RNG consumed either)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(augment.color_jitter(x, 0.4, 0.4, 0.0, g1), augment.color_jitter(x, 0.4, 0.4, 0.9, g2))
    # grey RGB images stay grey
    grey = torch.rand(4, 1, 5, 5).expand(4, 3, 5, 5)
    out = augment.color_jitter(grey, generator=g)
    assert torch.allclose(out[:, 0], out[:, 1], atol=1e-6) and torch.allclose(out[:, 1], out[:, 2], atol=1e-6)


def test_normalize():
    x = torch.full((2, 3, 4, 4), 255, dtype=torch.uint8)
    out = augment.normalize(x, [0.5, 0.5, 0.0], [0.5, 0.25, 1.0])
    assert out.dtype == torch.float32
    assert torch.allclose(out[:, 0], torch.ones(1)) and torch.allclose(out[:, 1], torch.full((1,), 2.0))
    assert augment.normalize(x, [0.5] * 3, [0.5] * 3, torch.channels_last).is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="one value per channel"):
        augment.normalize(x, [0.5], [0.5])
    with pytest.raises(ValueError, match="std"):
        augment.normalize(x, [0.5] * 3, [0.5, 0.0, 1.0])


# ---------------------------------------------------------------- datasets


@pytest.mark.skipif(not HAVE_FMNIST, reason="Debian dataset-fashion-mnist not installed")
def test_load_real_fashion_mnist():
    d = load_dataset("fashion-mnist")
    assert d.train_x.shape == (60000, 1, 28, 28) and d.test_x.shape == (10000, 1, 28, 28)
    assert d.train_x.dtype == torch.uint8 and d.train_y.dtype == torch.int64
    assert d.num_classes == 10 and d.in_chans == 1 and d.size == 28 and d.in_memory
    assert torch.equal(torch.bincount(d.train_y), torch.full((10,), 6000))
    assert abs(d.mean[0] - 0.2860) < 1e-3 and abs(d.std[0] - 0.3530) < 1e-3  # the published statistics
    assert d.preprocess() == {"mean": d.mean, "std": d.std, "size": 28}
    small = load_dataset("fashion-mnist", subset_test=50)
    assert len(small.test_y) == 50 and torch.equal(torch.bincount(small.test_y), torch.full((10,), 5))


def test_embedded_demo_subset():
    d = load_dataset("demo")
    assert d.train_x.shape == (6000, 1, 28, 28) and d.test_x.shape == (1000, 1, 28, 28)
    assert torch.equal(torch.bincount(d.train_y), torch.full((10,), 600))
    assert torch.equal(torch.bincount(d.test_y), torch.full((10,), 100))
    assert d.num_classes == 10 and d.name == "fashion-mnist-demo"
    assert 0.25 < d.mean[0] < 0.32 and 0.33 < d.std[0] < 0.38
    if HAVE_FMNIST:  # it really is a subset of the official files
        with np.load(d.source) as z:
            ti = torch.from_numpy(z["train_index"].astype(np.int64))
        full = sources.load_fashion_mnist()
        assert torch.equal(full.train_x[ti[:200]], d.train_x[:200]) and torch.equal(full.train_y[ti], d.train_y)


def test_missing_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    monkeypatch.setenv("FILTERSURGERY_DATA", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError) as e:
        load_dataset("fashion-mnist", root=str(tmp_path))
    msg = str(e.value)
    assert "\n" not in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "--data-root" in msg and "--download" in msg
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        d = load_dataset("fashion-mnist", root=str(tmp_path), allow_demo=True)
    assert d.name == "fashion-mnist-demo" and any("demo" in str(x.message) for x in w)


def test_fashion_mnist_from_root_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "DEBIAN_FASHION_MNIST", str(tmp_path / "nowhere"))
    raw = tmp_path / "FashionMNIST" / "raw"  # torchvision's layout, uncompressed files
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def idx(path, arr):
        hdr = bytes([0, 0, 8, arr.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in arr.shape)
        path.write_bytes(hdr + arr.astype(np.uint8).tobytes())

    for split, n in (("train", 20), ("t10k", 10)):
        idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10)
    d = load_dataset("fashion-mnist", root=str(tmp_path))
    assert d.train_x.shape == (20, 1, 28, 28) and d.source == str(raw)
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x0a\x01")  # truncated
    with pytest.raises(ValueError, match="truncated or corrupt IDX"):
        load_dataset("fashion-mnist", root=str(tmp_path))


def test_unknown_dataset_and_missing_cifar(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset 'mnist3'; allowed"):
        load_dataset("mnist3")
    with pytest.raises(FileNotFoundError, match="--data-root"):
        load_dataset("cifar100", root=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="train/ and val/"):
        load_dataset(f"imagefolder:{tmp_path}")


def _make_folder(root, sizes=((12, 9), (7, 16))):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 3), ("val", 2)):
        for ci, cls in enumerate(["cat", "dog"]):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(i + ci) % len(sizes)]
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(d / f"{i}.png")


@pytest.mark.parametrize("in_memory", [True, False])
def test_imagefolder_common_interface(tmp_path, in_memory):
    _make_folder(tmp_path)
    d = imagefolder.load_imagefolder(str(tmp_path), size=8, in_memory=in_memory)
    assert isinstance(d, ImageData) and d.in_memory == in_memory
    assert d.classes == ["cat", "dog"] and d.num_classes == 2 and d.in_chans == 3 and d.size == 8
    assert tuple(d.train_x.shape) == (6, 3, 8, 8) and tuple(d.test_x.shape) == (4, 3, 8, 8)
    assert torch.equal(d.train_y, torch.tensor([0, 0, 0, 1, 1, 1]))
    assert len(d.mean) == 3 and all(0 < s for s in d.std)
    sub = d.train_x[torch.tensor([1, 4])]  # same indexing for both kinds
    assert len(sub) == 2
    head = d.train_x[0:2].to("cpu")
    assert isinstance(head, torch.Tensor) and head.shape == (2, 3, 8, 8) and head.dtype == torch.uint8
    ld = BatchLoader(sub, d.train_y[torch.tensor([1, 4])], batch_size=2, shuffle=False, device="cpu")
    xb, yb = next(iter(ld))
    assert xb.shape == (2, 3, 8, 8) and xb.dtype == torch.uint8 and yb.tolist() == [0, 1]
    assert torch.equal(xb[1], images.decode_image(str(tmp_path / "train" / "dog" / "1.png"), 8, 3))


def test_lazy_loader_matches_memory_loader(tmp_path):
    _make_folder(tmp_path)
    lazy = imagefolder.load_imagefolder(str(tmp_path), size=6, in_memory=False)
    mem = imagefolder.load_imagefolder(str(tmp_path), size=6, in_memory=True)
    a = BatchLoader(lazy.train_x, lazy.train_y, 4, True, "cpu", seed=1)
    b = BatchLoader(mem.train_x, mem.train_y, 4, True, "cpu", seed=1)
    for ld in (a, b):
        ld.set_epoch(3)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert isinstance(lazy.train_x, LazyImages) and lazy.mean == pytest.approx(mem.mean)
