"""Load a dataset by name (:func:`load_dataset`): ``fashion-mnist``, ``cifar100``, ``imagefolder:PATH``, ``demo``.

The sources are ``data/sources.py`` (Fashion-MNIST, the demo subset, CIFAR-100) and
``data/imagefolder.py``; every one returns an :class:`~filtersurgery.data.images.ImageData`.
The split protocol is ``data/splits.py``, the batch loader ``data/loader.py``.
See docs/data.md for where files are looked for and how to get them.
"""
from __future__ import annotations

import os
from typing import Optional

from filtersurgery.data.imagefolder import load_imagefolder
from filtersurgery.data.images import ImageData
from filtersurgery.data.sources import load_cifar100, load_demo, load_fashion_mnist

__all__ = ["load_dataset", "DATASET_NAMES"]

DATASET_NAMES = ("fashion-mnist", "cifar100", "imagefolder:PATH", "demo")


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
