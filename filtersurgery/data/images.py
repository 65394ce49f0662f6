"""The one interface of every dataset, :class:`ImageData`, and its image containers.

Its image fields (``train_x``, ``test_x``) are either a ``uint8`` tensor ``[N, C, H, W]`` held in
memory (Fashion-MNIST, CIFAR-100, the embedded demo subset, small image folders) or a
:class:`LazyImages` (big image folders, decoded on access). Both index the same way (``x[idx]``
with an index tensor gives a subset of the same kind, ``x.shape``, ``len(x)``) and
:class:`~filtersurgery.data.loader.BatchLoader` accepts both, always yielding ``uint8`` batches
on the target device. The trainer therefore never needs to know which kind it holds.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from filtersurgery.data.splits import _quotas, _shuffled_by_class

__all__ = ["ImageData", "LazyImages", "Images", "channel_stats", "check_classes", "decode_image"]


def decode_image(path: str, size: int, channels: int) -> torch.Tensor:
    """Decode one image file to ``uint8 [channels, size, size]``.

    Shorter side resized to ``size`` (bilinear), then centre-cropped.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im = im.convert("L" if channels == 1 else "RGB")
            w, h = im.size
            s = size / min(w, h)
            nw, nh = max(size, round(w * s)), max(size, round(h * s))
            if (nw, nh) != (w, h):
                im = im.resize((nw, nh), Image.BILINEAR)
            left, top = (nw - size) // 2, (nh - size) // 2
            im = im.crop((left, top, left + size, top + size))
            a = np.array(im, dtype=np.uint8)  # a writable copy: torch warns on read-only arrays
    except OSError as e:
        raise ValueError(f"cannot decode image {path}: {e}") from None
    if a.ndim == 2:
        a = a[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))



class LazyImages:
    """A ``uint8 [N, C, size, size]`` image array decoded from files on access.

    Indexing with an int gives one ``uint8 [C, size, size]`` tensor; indexing with an
    index tensor / list / slice gives another ``LazyImages`` over those samples (no
    decoding). Each image is converted to ``L`` (``channels == 1``) or ``RGB``, its
    shorter side resized to ``size`` (bilinear) and centre-cropped to ``size x size``.
    """

    def __init__(self, paths: Sequence[str], size: int, channels: int):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise ValueError(f"size must be >= 1, got {size}")
        self.paths = list(paths)
        self.size = int(size)
        self.channels = int(channels)

    @property
    def shape(self) -> torch.Size:
        """``[N, C, size, size]``, like a uint8 image tensor's shape."""
        return torch.Size((len(self.paths), self.channels, self.size, self.size))

    dtype = torch.uint8

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)):
            return decode_image(self.paths[int(index)], self.size, self.channels)
        if isinstance(index, slice):
            return LazyImages(self.paths[index], self.size, self.channels)
        idx = torch.as_tensor(index).reshape(-1).tolist()
        return LazyImages([self.paths[i] for i in idx], self.size, self.channels)

    def materialize(self) -> torch.Tensor:
        """Decode everything into one ``uint8 [N, C, size, size]`` tensor."""
        out = torch.empty(tuple(self.shape), dtype=torch.uint8)
        for i, p in enumerate(self.paths):
            out[i] = decode_image(p, self.size, self.channels)
        return out

    def to(self, *args, **kwargs) -> torch.Tensor:
        """Decode (in this process) and move, like ``Tensor.to``: ``x[i:i + B].to(device)`` works for both kinds."""
        return self.materialize().to(*args, **kwargs)


Images = Union[torch.Tensor, LazyImages]


@dataclass
class ImageData:
    """A whole dataset: uint8 images (a tensor in memory, or :class:`LazyImages`) and labels.

    ``mean``/``std`` are per-channel statistics of the *training* images in ``[0, 1]``
    units (pass them to :func:`filtersurgery.data.augment.normalize`). ``size`` is H (= W).
    """

    train_x: Images
    train_y: torch.Tensor
    test_x: Images
    test_y: torch.Tensor
    num_classes: int
    in_chans: int
    size: int
    mean: List[float]
    std: List[float]
    name: str
    classes: Optional[List[str]] = None
    source: str = ""  # where the files were read from
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        """One-line ValueError for inconsistent fields: label range, counts, sizes."""
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(f"num_classes: must be an integer >= 1, got {self.num_classes!r}")
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if not torch.is_tensor(y) or y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
                shape = tuple(y.shape) if torch.is_tensor(y) else type(y).__name__
                raise ValueError(f"{split}_y: must be a 1-D integer label tensor, got {shape}")
            if len(y) != len(x):
                raise ValueError(f"{split}_y: {len(y)} labels for {len(x)} images in {split}_x")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"{split}_y: labels must be in [0, {self.num_classes}) (num_classes={self.num_classes}), "
                    f"got min {int(y.min())}, max {int(y.max())}"
                )
        if len(self.train_y) == 0:
            raise ValueError("train_x: the training set is empty")

    def __repr__(self) -> str:
        kind = "in memory" if self.in_memory else "lazy"
        return (f"ImageData({self.name!r}, {len(self.train_y)} train / {len(self.test_y)} test, "
                f"{self.num_classes} classes, {self.in_chans}x{self.size}x{self.size}, {kind})")

    @property
    def in_memory(self) -> bool:
        """True when the images are uint8 tensors (not decoded lazily from files)."""
        return isinstance(self.train_x, torch.Tensor) and isinstance(self.test_x, torch.Tensor)

    def preprocess(self) -> dict:
        """The preprocessing record written to ``metrics.json``: mean, std, size."""
        return {"mean": list(self.mean), "std": list(self.std), "size": int(self.size)}


def channel_stats(x: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Exact per-channel mean and std of uint8 images ``[N, C, H, W]``, in [0, 1] units.

    Computed from a 256-bin histogram per channel (no float copy of the data).
    """
    if x.dtype != torch.uint8 or x.dim() != 4:
        raise ValueError(f"x must be uint8 [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
    levels = torch.arange(256, dtype=torch.float64) / 255.0
    means, stds = [], []
    for c in range(x.shape[1]):
        counts = torch.bincount(x[:, c].reshape(-1).cpu().to(torch.int64), minlength=256).to(torch.float64)
        n = counts.sum()
        m = (counts * levels).sum() / n
        var = (counts * (levels - m) ** 2).sum() / n
        means.append(float(m))
        stds.append(float(var.sqrt()))
    return means, stds


def _balanced_subset(y: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a class-balanced (within ±1) random subset of ``n`` labels."""
    g = torch.Generator().manual_seed(seed)
    by_class = _shuffled_by_class(y, g)
    take = _quotas([len(v) for v in by_class], n, g)
    idx = torch.cat([v[:q] for v, q in zip(by_class, take)])
    return idx.sort().values


def _subset_test(test_x, test_y: torch.Tensor, subset_test: Optional[int]):
    """The class-balanced first ``subset_test`` test images (seed 0), or all of them for ``None``."""
    if subset_test is None:
        return test_x, test_y
    if not 1 <= subset_test <= len(test_y):
        raise ValueError(f"subset_test must be in [1, {len(test_y)}], got {subset_test}")
    keep = _balanced_subset(test_y, subset_test, seed=0)
    return test_x[keep], test_y[keep]


def _finish(train_x, train_y, test_x, test_y, name, source, subset_test, classes=None,
            mean_std=None, num_classes=None) -> ImageData:
    train_y = torch.as_tensor(train_y, dtype=torch.int64)
    test_y = torch.as_tensor(test_y, dtype=torch.int64)
    test_x, test_y = _subset_test(test_x, test_y, subset_test)
    if num_classes is None:
        num_classes = int(max(int(train_y.max()), int(test_y.max()) if len(test_y) else 0)) + 1
    mean, std = mean_std if mean_std is not None else channel_stats(train_x)
    return ImageData(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y,
                     num_classes=num_classes, in_chans=int(train_x.shape[1]), size=int(train_x.shape[2]),
                     mean=mean, std=std, name=name, classes=classes, source=source)


def check_classes(data: "ImageData", arg: str = "data") -> "ImageData":
    """Refuse a dataset whose training images cover fewer than 2 classes (one-line ValueError).

    A one-class classifier is always right: it would train and report 100% accuracy.
    Returns ``data`` unchanged.
    """
    present = int(torch.unique(torch.as_tensor(data.train_y)).numel()) if len(data.train_y) else 0
    if data.num_classes < 2 or present < 2:
        names = f" ({', '.join(data.classes[:3])})" if data.classes and data.num_classes < 2 else ""
        raise ValueError(f"{arg}: {data.name} has {present} class(es) with training images{names}; "
                         f"a classifier needs at least 2 classes (a 1-class model scores 100% by construction)")
    return data
