"""Image folders: ``PATH/train/CLASS/*`` (and ``PATH/val/CLASS/*``) decoded to ``uint8`` tensors, in memory
when small, else lazily (:class:`~filtersurgery.data.images.LazyImages`)."""
from __future__ import annotations

import os
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

from filtersurgery.data.images import (ImageData, LazyImages, _balanced_subset, _finish, _subset_test, channel_stats,
                                      check_classes)

__all__ = ["load_imagefolder", "output_size", "IMAGE_EXTENSIONS", "IN_MEMORY_LIMIT_BYTES",
           "DEFAULT_IMAGE_SIZE"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
# image folders whose decoded train+test arrays stay below this many bytes are held in memory
IN_MEMORY_LIMIT_BYTES = 1 << 30
# output size of image folders whose images do not all share one size
DEFAULT_IMAGE_SIZE = 224




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


def load_imagefolder(path: str, size: Optional[int] = None, in_memory: Optional[bool] = None,
                     channels: Optional[int] = None, subset_test: Optional[int] = None,
                     stats_samples: int = 2000) -> ImageData:
    """An image-folder dataset: ``path/train/<class>/*`` and ``path/val/<class>/*`` (or ``test``).

    Class ids follow the sorted folder names of ``train``; fewer than 2 classes with
    training images is refused. Every image is decoded to ``uint8 [channels, size, size]``
    (see :func:`~filtersurgery.data.images.decode_image`). ``size=None``: the images' own size when they all share
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
