"""Datasets, the docs/method.md §8 split protocol and a device-resident batch loader.

One interface for every dataset: :class:`ImageData`. Its image fields (``train_x``,
``test_x``) are either a ``uint8`` tensor ``[N, C, H, W]`` held in memory (Fashion-MNIST,
CIFAR-100, the embedded demo subset, small image folders) or a :class:`LazyImages`
(big image folders, decoded on access). Both index the same way (``x[idx]`` with an
index tensor gives a subset of the same kind, ``x.shape``, ``len(x)``) and
:class:`BatchLoader` accepts both, always yielding ``uint8`` batches on the target
device. The trainer therefore never needs to know which kind it holds.

See docs/data.md for where files are looked for and how to get them.
"""
from __future__ import annotations

import gzip
import os
import warnings
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEMO_FILE = "fashion_mnist_subset.npz"
DATASET_NAMES = ("fashion-mnist", "cifar100", "imagefolder:PATH", "demo")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# image folders whose decoded train+test arrays stay below this many bytes are held in memory
IN_MEMORY_LIMIT_BYTES = 1 << 30
# output size of image folders whose images do not all share one size
DEFAULT_IMAGE_SIZE = 224

FASHION_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}


def default_root() -> str:
    """Where datasets are looked for / downloaded when no root is given.

    ``$FILTERSURGERY_DATA`` if set, else ``~/.cache/filtersurgery/data``.
    """
    return os.path.expanduser(os.environ.get("FILTERSURGERY_DATA", "~/.cache/filtersurgery/data"))


# --------------------------------------------------------------------------- containers


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


# --------------------------------------------------------------------------- readers


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (the MNIST format; ``.gz`` or plain) into a uint8 array."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"not an unsigned-byte IDX file: {path}")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    n = int(np.prod(dims)) if dims else 0
    if len(raw) - offset != n:
        raise ValueError(f"truncated or corrupt IDX file {path}: expected {n} bytes of data, got {len(raw) - offset}")
    return np.frombuffer(raw, dtype=np.uint8, offset=offset).reshape(dims).copy()


def _find_idx(directory: str, stem: str) -> Optional[str]:
    for name in (stem + ".gz", stem, stem.replace("-idx", ".idx") + ".gz", stem.replace("-idx", ".idx")):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    return None


def _fashion_mnist_dir(candidates: Sequence[str]) -> Optional[str]:
    for d in candidates:
        if d and all(_find_idx(d, stem) for stem in FASHION_MNIST_FILES.values()):
            return d
    return None


def _fashion_mnist_candidates(root: Optional[str]) -> List[str]:
    out: List[str] = []
    bases = ([os.path.expanduser(root)] if root else []) + [None, default_root()]
    for base in bases:
        if base is None:
            out.append(DEBIAN_FASHION_MNIST)
            continue
        out += [base, os.path.join(base, "FashionMNIST", "raw"), os.path.join(base, "fashion-mnist")]
    return out


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


FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


def _missing_fashion_mnist(root: Optional[str], why: str = "") -> FileNotFoundError:
    where = ", ".join(dict.fromkeys(_fashion_mnist_candidates(root)))
    extra = f" ({why})" if why else ""
    return FileNotFoundError(
        f"Fashion-MNIST not found{extra} (looked in {where}); get it with "
        f"'apt-get install dataset-fashion-mnist', point --data-root DIR at a folder holding the 4 idx files, "
        f"or pass --download")


def load_fashion_mnist(root: Optional[str] = None, download: bool = False,
                       subset_test: Optional[int] = None, allow_demo: bool = False) -> ImageData:
    """Fashion-MNIST (60000 train / 10000 test, 1x28x28, 10 classes) from idx files.

    Looked for in ``root`` (also ``root/FashionMNIST/raw`` and ``root/fashion-mnist``),
    then the Debian package path ``/usr/share/datasets/fashion-mnist``, then
    :func:`default_root`. With ``download=True`` torchvision's downloader fetches it into
    ``root`` (or the default root). With ``allow_demo=True`` and nothing found, the
    embedded class-balanced subset is returned instead (with a warning).
    """
    directory = _fashion_mnist_dir(_fashion_mnist_candidates(root))
    why = ""
    if directory is None and download:
        target = os.path.expanduser(root) if root else default_root()
        try:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(target, train=True, download=True)
            directory = _fashion_mnist_dir([os.path.join(target, "FashionMNIST", "raw")])
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
            why = f"download failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    if directory is None:
        if allow_demo:
            warnings.warn("Fashion-MNIST not found; using the embedded 6000/1000 demo subset "
                          "(install dataset-fashion-mnist or pass a data root for the full set)", stacklevel=2)
            return load_demo(subset_test=subset_test)
        raise _missing_fashion_mnist(root, why)
    arrays = {k: read_idx(_find_idx(directory, stem)) for k, stem in FASHION_MNIST_FILES.items()}
    for k in ("train_x", "test_x"):
        if arrays[k].ndim != 3:
            raise ValueError(f"unexpected Fashion-MNIST image array shape {arrays[k].shape} in {directory}")
    if len(arrays["train_x"]) != len(arrays["train_y"]) or len(arrays["test_x"]) != len(arrays["test_y"]):
        raise ValueError(f"Fashion-MNIST image and label counts differ in {directory}")
    return _finish(torch.from_numpy(arrays["train_x"]).unsqueeze(1), torch.from_numpy(arrays["train_y"]),
                   torch.from_numpy(arrays["test_x"]).unsqueeze(1), torch.from_numpy(arrays["test_y"]),
                   "fashion-mnist", directory, subset_test, classes=list(FASHION_MNIST_CLASSES), num_classes=10)


def demo_path() -> str:
    """Path of the embedded demo subset file inside the installed package."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "_datafiles", DEMO_FILE)


def load_demo(subset_test: Optional[int] = None) -> ImageData:
    """The embedded Fashion-MNIST subset: 6000 train / 1000 test, class-balanced, uint8.

    Shipped inside the package (``filtersurgery/data/_datafiles/``; MIT licence, Zalando
    Research, see ``FASHION_MNIST_LICENSE.txt`` there). Made by
    ``benchmarks/make_demo_subset.py`` from the official files.
    """
    source = demo_path()
    try:
        with np.load(source) as z:
            arrays = {k: z[k] for k in ("train_x", "train_y", "test_x", "test_y")}
    except (OSError, KeyError, ValueError) as e:
        raise FileNotFoundError(f"embedded demo subset missing or unreadable ({DEMO_FILE}): {e}") from None
    return _finish(torch.from_numpy(arrays["train_x"]), torch.from_numpy(arrays["train_y"]),
                   torch.from_numpy(arrays["test_x"]), torch.from_numpy(arrays["test_y"]),
                   "fashion-mnist-demo", source, subset_test, classes=list(FASHION_MNIST_CLASSES), num_classes=10)


def load_cifar100(root: Optional[str] = None, download: bool = False,
                  subset_test: Optional[int] = None) -> ImageData:
    """CIFAR-100 (50000 / 10000, 3x32x32, 100 classes) in torchvision's layout under ``root``."""
    from torchvision.datasets import CIFAR100

    target = os.path.expanduser(root) if root else default_root()
    try:
        tr = CIFAR100(target, train=True, download=download)
        te = CIFAR100(target, train=False, download=download)
    except (OSError, RuntimeError) as e:
        raise FileNotFoundError(
            f"CIFAR-100 not found under {target} (expected {os.path.join(target, 'cifar-100-python')}; "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}); point --data-root DIR at the folder "
            f"holding cifar-100-python, or pass --download") from None
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    return _finish(to_t(tr.data), torch.tensor(tr.targets), to_t(te.data), torch.tensor(te.targets),
                   "cifar100", os.path.join(target, "cifar-100-python"), subset_test,
                   classes=list(tr.classes), num_classes=100)


# --------------------------------------------------------------------------- image folders


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


def _scan_split(directory: str, classes: Optional[List[str]]) -> Tuple[List[str], List[int], List[str]]:
    found = sorted(e.name for e in os.scandir(directory) if e.is_dir() and not e.name.startswith("."))
    training = classes is None  # the training split defines the classes: each needs images
    if training:
        classes = found
    unknown = sorted(set(found) - set(classes))
    if unknown:
        raise ValueError(f"{directory} has class folders not in the training set: {', '.join(unknown[:5])}")
    paths, labels = [], []
    for ci, c in enumerate(classes):
        d = os.path.join(directory, c)
        if not os.path.isdir(d):
            continue
        n = len(paths)
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames.sort()
            for fn in sorted(filenames):
                if fn.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(dirpath, fn))
                    labels.append(ci)
        if training and len(paths) == n:
            raise ValueError(f"data: class folder {d} holds no image ({', '.join(IMAGE_EXTENSIONS)}); a class without "
                             f"training images cannot be learned: remove the folder or add its images")
    return paths, labels, classes


def _image_sizes(paths: Sequence[str]) -> List[Tuple[int, int]]:
    """``(width, height)`` of every image file (reads only the headers)."""
    from PIL import Image

    out = []
    for p in paths:
        try:
            with Image.open(p) as im:
                out.append(tuple(im.size))
        except OSError as e:
            raise ValueError(f"cannot decode image {p}: {e}") from None
    return out


def output_size(sizes: Sequence[Tuple[int, int]], size: Optional[int]) -> Tuple[int, str]:
    """The square output size of an image folder and what decoding does to reach it.

    ``size=None``: the images' own size when they all share one (``min(w, h)``: a
    non-square size is centre-cropped, not resized), else :data:`DEFAULT_IMAGE_SIZE`.
    Returns ``(size, note)``; ``note`` is ``""`` when no image is resized, else one
    sentence saying how many are (for a warning).
    """
    distinct = sorted(set(sizes))
    if size is None:
        size = min(distinct[0]) if len(distinct) == 1 else DEFAULT_IMAGE_SIZE
    elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"image_size: must be an integer >= 1 (pixels), got {size!r}")
    resized = sum(1 for wh in sizes if min(wh) != size)
    if not resized:
        return size, ""
    own = (f"the images have {len(distinct)} different sizes" if len(distinct) > 1
           else f"the images are {distinct[0][0]}x{distinct[0][1]}")
    return size, (f"image folder: resizing {resized} of {len(sizes)} images to {size}x{size} (shorter side, "
                  f"bilinear, then centre crop; {own}); set the size with --image-size / image_size=")


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


def load_imagefolder(path: str, size: Optional[int] = None, in_memory: Optional[bool] = None,
                     channels: Optional[int] = None, subset_test: Optional[int] = None,
                     stats_samples: int = 2000) -> ImageData:
    """An image-folder dataset: ``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``test``).

    Class ids follow the sorted folder names of ``train``; fewer than 2 classes with
    training images is refused. Every image is decoded to ``uint8 [channels, size, size]``
    (see :func:`decode_image`). ``size=None``: the images' own size when they all share
    one (every file's header is read once), else 224; a ``UserWarning`` says when images
    are resized (:func:`output_size`). ``channels`` defaults to
    1 when the first training image is grey-scale, else 3. ``in_memory=None`` decodes
    everything into tensors when the arrays fit in 1 GiB, else keeps :class:`LazyImages`;
    ``True``/``False`` force either. For lazy sets ``mean``/``std`` come from a fixed
    (seed 0) class-balanced sample of ``stats_samples`` training images.
    """
    path = os.path.expanduser(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"data: image folder {path} does not exist (--data imagefolder:PATH)")
    train_dir = os.path.join(path, "train")
    test_dir = next((os.path.join(path, s) for s in ("val", "test") if os.path.isdir(os.path.join(path, s))), None)
    if not os.path.isdir(train_dir) or test_dir is None:
        raise FileNotFoundError(f"image folder {path} must contain train/ and val/ (or test/) with one folder per class")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"image_size: must be an integer >= 1 (pixels), got {size!r}")
    tr_paths, tr_labels, classes = _scan_split(train_dir, None)
    if len(classes) < 2:
        raise ValueError(f"data: image folder {train_dir} has {len(classes)} class folder(s)"
                         f"{' (' + classes[0] + ')' if classes else ''}; a classifier needs at least 2 classes "
                         f"(a 1-class model scores 100% by construction)")
    te_paths, te_labels, _ = _scan_split(test_dir, classes)
    if not tr_paths or not te_paths:
        raise ValueError(f"image folder {path}: no images found in {train_dir if not tr_paths else test_dir}")
    size, note = output_size(_image_sizes(tr_paths + te_paths), size)
    if note:
        warnings.warn(note, stacklevel=2)
    if channels is None:
        from PIL import Image

        with Image.open(tr_paths[0]) as im:
            channels = 1 if im.mode in ("L", "1", "I", "I;16", "F") else 3
    train_x = LazyImages(tr_paths, size, channels)
    test_x = LazyImages(te_paths, size, channels)
    train_y, test_y = torch.tensor(tr_labels), torch.tensor(te_labels)
    test_x, test_y = _subset_test(test_x, test_y, subset_test)
    if in_memory is None:
        in_memory = (len(train_x) + len(test_x)) * channels * size * size <= IN_MEMORY_LIMIT_BYTES
    if in_memory:
        train_x, test_x = train_x.materialize(), test_x.materialize()
        mean_std = channel_stats(train_x)
    else:
        sample = _balanced_subset(train_y, min(stats_samples, len(train_y)), seed=0)
        mean_std = channel_stats(train_x[sample].materialize())
    return check_classes(_finish(train_x, train_y, test_x, test_y, f"imagefolder:{path}", path, None,
                                 classes=classes, mean_std=mean_std, num_classes=len(classes)))


def load_dataset(name: str, root: Optional[str] = None, download: bool = False,
                 subset_test: Optional[int] = None, allow_demo: bool = False,
                 image_size: Optional[int] = None) -> ImageData:
    """Load a dataset by name: ``fashion-mnist``, ``cifar100``, ``imagefolder:PATH`` or ``demo``.

    ``root``: folder holding the files (see docs/data.md for the search order).
    ``download``: let torchvision fetch Fashion-MNIST / CIFAR-100 into ``root``.
    ``subset_test``: keep a fixed (seed 0), class-balanced subset of N test images.
    ``allow_demo``: ``fashion-mnist`` falls back to the embedded subset when no files exist.
    ``image_size``: output size for image folders (default: the images' own size when
    they all share one, else 224; see :func:`load_imagefolder`); other datasets have a
    fixed size and refuse it.
    Missing files raise a one-line ``FileNotFoundError`` saying how to get them.
    """
    if not isinstance(name, str):
        raise ValueError(f"name: dataset name must be a string, got {type(name).__name__}")
    key = name.strip()
    low = key.lower()
    if root is not None and not download and low in _ROOTED and not os.path.isdir(os.path.expanduser(root)):
        raise FileNotFoundError(f"root: data folder {root} does not exist (--data-root); "
                                "pass an existing folder, or --download to fetch the data into it")
    if image_size is not None and not low.startswith("imagefolder:"):
        raise ValueError(f"image_size: only image folders are resized (--data imagefolder:PATH); "
                         f"{key} has a fixed image size, got image_size={image_size}")
    if low in ("fashion-mnist", "fashion_mnist", "fashionmnist"):
        return load_fashion_mnist(root, download, subset_test, allow_demo)
    if low in ("cifar100", "cifar-100"):
        return load_cifar100(root, download, subset_test)
    if low == "demo":
        return load_demo(subset_test)
    if low.startswith("imagefolder:"):
        path = key.split(":", 1)[1]
        if not path:
            raise ValueError("name: dataset 'imagefolder:PATH' needs a PATH")
        return load_imagefolder(path, size=image_size, subset_test=subset_test)
    raise ValueError(f"name: unknown dataset {name!r}; allowed: {', '.join(DATASET_NAMES)}")


# dataset names whose files are looked for under ``root``
_ROOTED = ("fashion-mnist", "fashion_mnist", "fashionmnist", "cifar100", "cifar-100")


# --------------------------------------------------------------------------- splits (docs/method.md §8)


def _shuffled_by_class(y: torch.Tensor, g: torch.Generator) -> List[torch.Tensor]:
    """For each class id 0..max(y): its indices in a random order drawn from ``g``."""
    y = y.reshape(-1).to(torch.int64).cpu()
    order = torch.argsort(y, stable=True)
    counts = torch.bincount(y, minlength=int(y.max()) + 1 if len(y) else 0).tolist()
    out, start = [], 0
    for n in counts:
        idx = order[start:start + n]
        out.append(idx[torch.randperm(n, generator=g)])
        start += n
    return out


def _quotas(available: Sequence[int], n: int, g: torch.Generator) -> List[int]:
    """Split ``n`` over classes as evenly as their ``available`` counts allow (±1).

    Water-filling; the classes that get the +1 remainders are chosen at random from ``g``.
    """
    q = [0] * len(available)
    left = n
    while left > 0:
        active = [c for c, a in enumerate(available) if q[c] < a]
        if not active:
            raise ValueError(f"cannot take {n} samples from {sum(available)}")
        share = left // len(active)
        if share == 0:
            pick = torch.randperm(len(active), generator=g)[:left].tolist()
            for i in pick:
                q[active[i]] += 1
            break
        for c in active:
            add = min(share, available[c] - q[c])
            q[c] += add
            left -= add
    return q


def split_parts(y: torch.Tensor, parts: int, seed: int, val_fraction: float = 0.1,
                subset: Optional[int] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """docs/method.md §8: a random, seeded, non-overlapping, class-balanced partition into ``parts``.

    Every class's samples are shuffled (generator seeded with ``seed``) and dealt to the
    parts in turn, the starting part rotating from class to class, so each part holds
    each class within ±1 and the part sizes differ by at most 1 (1:1 for ``parts=2``,
    1:1:1:1 for ``parts=4``). Within each part ``round(val_fraction * len(part))``
    samples, class-balanced, are held out for validation. ``subset=N`` keeps N training
    images per part (class-balanced) and ``round(N * val_fraction / (1 - val_fraction))``
    of its validation images, for quick runs.

    Returns one ``(train_idx, val_idx)`` pair of sorted int64 index tensors per part.
    """
    y = torch.as_tensor(y)
    if y.dim() != 1 or y.dtype.is_floating_point or y.dtype == torch.bool:
        raise ValueError(f"y must be a 1-D integer label tensor, got {y.dtype} {tuple(y.shape)}")
    if len(y) and int(y.min()) < 0:
        raise ValueError(f"y must hold labels >= 0, got min {int(y.min())}")
    if not isinstance(parts, int) or parts < 1 or parts > max(1, len(y)):
        raise ValueError(f"parts must be an int in [1, {len(y)}], got {parts}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    by_class = _shuffled_by_class(y, g)
    members: List[List[List[torch.Tensor]]] = [[[] for _ in by_class] for _ in range(parts)]
    start = 0
    for c, idx in enumerate(by_class):
        for p in range(parts):
            members[(start + p) % parts][c].append(idx[p::parts])
        start = (start + len(idx)) % parts
    result = []
    for p in range(parts):
        cls_idx = [torch.cat(m) if m else torch.empty(0, dtype=torch.int64) for m in members[p]]
        cls_idx = [v[torch.randperm(len(v), generator=g)] for v in cls_idx]
        n_part = sum(len(v) for v in cls_idx)
        n_val = int(round(val_fraction * n_part))
        vq = _quotas([len(v) for v in cls_idx], n_val, g)
        val = [v[:q] for v, q in zip(cls_idx, vq)]
        train = [v[q:] for v, q in zip(cls_idx, vq)]
        if subset is not None:  # own RNG stream: the subset parts are subsets of the full parts
            gs = torch.Generator().manual_seed(_epoch_seed(seed, 1_000_003 + p))
            n_train = sum(len(v) for v in train)
            if not isinstance(subset, int) or not 1 <= subset <= n_train:
                raise ValueError(f"subset must be an int in [1, {n_train}] (training images per part), got {subset}")
            tq = _quotas([len(v) for v in train], subset, gs)
            train = [v[:q] for v, q in zip(train, tq)]
            n_val_sub = min(int(round(subset * val_fraction / (1.0 - val_fraction))), sum(len(v) for v in val))
            vq = _quotas([len(v) for v in val], n_val_sub, gs)
            val = [v[:q] for v, q in zip(val, vq)]
        result.append((torch.cat(train).sort().values, torch.cat(val).sort().values))
    return result


# --------------------------------------------------------------------------- batches


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch) & 0xFFFFFFFF]).generate_state(1)[0])


class _Gather(torch.utils.data.Dataset):
    def __init__(self, images: LazyImages):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]


class BatchLoader:
    """Iterates ``(x uint8 [B, C, H, W], y int64 [B])`` batches already on ``device``.

    In-memory images (a uint8 tensor) are copied to ``device`` once, at construction;
    each batch is an ``index_select`` on the device with an index tensor made once per
    epoch, so iterating causes no host synchronisation. :class:`LazyImages` are decoded
    by a ``torch.utils.data.DataLoader`` (``num_workers`` processes, pinned memory on
    CUDA) over the same index order and copied with ``non_blocking=True``.

    Order: with ``shuffle`` a permutation drawn from a CPU generator seeded by
    ``(seed, epoch)`` (call :meth:`set_epoch` before each epoch, as with
    ``DistributedSampler``; resuming at epoch e gives epoch e's order again); without,
    the original order. Sharding: the order is padded by wrapping around to a multiple
    of ``world_size`` and rank ``r`` takes every ``world_size``-th element from ``r``, so
    every rank has the same number of samples (a few samples repeat when the size is not
    divisible; evaluate on one rank when exact counts matter). ``rank``/``world_size``
    default to ``torch.distributed``'s when it is initialised, else 0/1.
    """

    def __init__(self, x_uint8: Images, y: torch.Tensor, batch_size: int, shuffle: bool,
                 device: Union[str, torch.device] = "cpu", seed: int = 0, drop_last: bool = False,
                 rank: Optional[int] = None, world_size: Optional[int] = None, num_workers: int = 0):
        if not isinstance(x_uint8, (torch.Tensor, LazyImages)):
            raise ValueError(f"x_uint8 must be a uint8 tensor or LazyImages, got {type(x_uint8).__name__}")
        if isinstance(x_uint8, torch.Tensor) and (x_uint8.dtype != torch.uint8 or x_uint8.dim() != 4):
            raise ValueError(f"x_uint8 must be uint8 [N, C, H, W], got {x_uint8.dtype} {tuple(x_uint8.shape)}")
        y = torch.as_tensor(y)
        if y.dim() != 1 or len(y) != len(x_uint8):
            raise ValueError(f"y must be 1-D with one label per image ({len(x_uint8)}), got shape {tuple(y.shape)}")
        if len(y) == 0:
            raise ValueError("x_uint8 is empty: a loader needs at least one sample")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size}")
        if world_size is None or rank is None:
            dist = torch.distributed
            on = dist.is_available() and dist.is_initialized()
            world_size = world_size if world_size is not None else (dist.get_world_size() if on else 1)
            rank = rank if rank is not None else (dist.get_rank() if on else 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size) and world_size >= 1, got rank={rank}, world_size={world_size}")
        self.device = torch.device(device)
        self.batch_size, self.shuffle, self.seed, self.drop_last = batch_size, bool(shuffle), int(seed), bool(drop_last)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.n = len(y)
        self.epoch = 0
        self.lazy = isinstance(x_uint8, LazyImages)
        self.y = y.to(self.device, torch.int64)
        self.x = x_uint8 if self.lazy else x_uint8.to(self.device)
        self.per_rank = -(-self.n // self.world_size)
        if self.drop_last and self.per_rank < self.batch_size:
            raise ValueError(f"batch_size {batch_size} exceeds the {self.per_rank} samples per rank with drop_last=True")

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffle order of ``epoch`` (deterministic in ``(seed, epoch)``)."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order (CPU)."""
        if self.shuffle:
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        total = self.per_rank * self.world_size
        if total > self.n:
            order = torch.cat([order, order.repeat(-(-(total - self.n) // self.n))[: total - self.n]])
        return order[self.rank::self.world_size]

    def __len__(self) -> int:
        return self.per_rank // self.batch_size if self.drop_last else -(-self.per_rank // self.batch_size)

    def _to_device(self, idx: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cuda":  # pinned + non_blocking: no host synchronisation
            return idx.pin_memory().to(self.device, non_blocking=True)
        return idx.to(self.device)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = self.indices()
        nb = len(self)
        if not self.lazy:
            idx_dev = self._to_device(idx)
            for b in range(nb):
                sl = idx_dev[b * self.batch_size:(b + 1) * self.batch_size]
                yield self.x.index_select(0, sl), self.y.index_select(0, sl)
            return
        batches = [idx[b * self.batch_size:(b + 1) * self.batch_size].tolist() for b in range(nb)]
        loader = torch.utils.data.DataLoader(_Gather(self.x), batch_sampler=batches, num_workers=self.num_workers,
                                             pin_memory=self.device.type == "cuda")
        idx_dev = self._to_device(idx)
        for b, xb in enumerate(loader):
            sl = idx_dev[b * self.batch_size:(b + 1) * self.batch_size]
            yield xb.to(self.device, non_blocking=True), self.y.index_select(0, sl)
