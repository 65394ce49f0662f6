"""The datasets a name loads: Fashion-MNIST (idx files, torchvision's downloader), the embedded demo subset,
CIFAR-100. See docs/data.md for where files are looked for and how to get them."""
from __future__ import annotations

import gzip
import os
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from filtersurgery.data.images import ImageData, _finish

__all__ = ["read_idx", "load_fashion_mnist", "load_demo", "demo_path", "load_cifar100", "default_root",
           "DEBIAN_FASHION_MNIST", "DEMO_FILE", "FASHION_MNIST_FILES", "FASHION_MNIST_CLASSES"]

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
DEMO_FILE = "fashion_mnist_subset.npz"
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
