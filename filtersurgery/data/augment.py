"""Batched, on-device augmentation: normalization, random crop + flip, and docs/method.md §3's two views.

Every function takes a whole batch ``[B, C, H, W]`` and draws all its random numbers at
once (no Python loop over samples). ``uint8`` input gives ``uint8`` output (the colour
jitter is computed in float and rounded back), so augmented batches go through
:func:`normalize` like plain ones.

Randomness and reproducibility: each function takes an optional ``torch.Generator``.
Pass one created on the batch's device (``torch.Generator(device=x.device)``) to draw
the random numbers there without a host synchronisation; a CPU generator with a CUDA
batch also works (numbers drawn on the CPU and copied). With ``generator=None`` the
default generator of the batch's device is used, which ``torch.manual_seed`` seeds
(CPU and all CUDA devices). The same seed, device type, batch shape and torch version
give the same augmentation; CPU and CUDA generators give different streams.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

# ITU-R 601-2 luma weights (torchvision's rgb_to_grayscale)
LUMA = (0.299, 0.587, 0.114)


AOD_FLIPS = ("always", "random")  # how AOD's B_F view mirrors the crop (two_views)


def _check_batch(x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a [B, C, H, W] tensor, got {tuple(getattr(x, 'shape', ()))}")


def _rand(shape, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    """Uniform [0, 1) floats of ``shape`` on ``x.device`` from ``generator``."""
    dev = generator.device if generator is not None else x.device
    return torch.rand(shape, generator=generator, device=dev).to(x.device, non_blocking=True)


def _randint(high: int, shape, x: torch.Tensor, generator: Optional[torch.Generator]) -> torch.Tensor:
    dev = generator.device if generator is not None else x.device
    return torch.randint(0, high, shape, generator=generator, device=dev).to(x.device, non_blocking=True)


@functools.lru_cache(maxsize=64)
def _const(values: Tuple[float, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A small constant vector on ``device``, made once (pinned + non_blocking: no host sync)."""
    t = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def to_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float32 in [0, 1]; floating input is returned as float32 unchanged."""
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def normalize(x_uint8: torch.Tensor, mean: Sequence[float], std: Sequence[float],
              memory_format: torch.memory_format = torch.contiguous_format) -> torch.Tensor:
    """``(x / 255 - mean) / std`` per channel, as float32 (``mean``/``std`` in [0, 1] units).

    Accepts uint8 images or floats already in [0, 1]. ``memory_format`` may be
    ``torch.channels_last``.
    """
    _check_batch(x_uint8, "x_uint8")
    c = x_uint8.shape[1]
    if len(mean) != c or len(std) != c:
        raise ValueError(f"mean and std must have one value per channel ({c}), got {len(mean)} and {len(std)}")
    if any(float(s) <= 0 for s in std):
        raise ValueError(f"std must be > 0, got {list(std)}")
    m = _const(tuple(float(v) for v in mean), x_uint8.device, torch.float32).view(1, c, 1, 1)
    s = _const(tuple(float(v) for v in std), x_uint8.device, torch.float32).view(1, c, 1, 1)
    return ((to_float(x_uint8) - m) / s).contiguous(memory_format=memory_format)


def crop_indices(x: torch.Tensor, padding: int, generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-sample top/left offsets in ``[0, 2 * padding]`` for :func:`crop`."""
    b = x.shape[0]
    return _randint(2 * padding + 1, (b,), x, generator), _randint(2 * padding + 1, (b,), x, generator)


def crop(x: torch.Tensor, top: torch.Tensor, left: torch.Tensor, padding: int,
         flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Zero-pad by ``padding`` and cut an ``H x W`` window at per-sample (top, left).

    ``flip`` (bool ``[B]``) mirrors those samples horizontally. Two gathers, any dtype.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (padding, padding, padding, padding)) if padding else x
    rows = top.view(b, 1) + torch.arange(h, device=x.device).view(1, h)
    cols = left.view(b, 1) + torch.arange(w, device=x.device).view(1, w)
    if flip is not None:
        cols = torch.where(flip.view(b, 1), cols.flip(1), cols)
    xr = xp.gather(2, rows.view(b, 1, h, 1).expand(b, c, h, xp.shape[3]))
    return xr.gather(3, cols.view(b, 1, 1, w).expand(b, c, h, w))


def random_crop_flip(x: torch.Tensor, padding: int = 4, generator: Optional[torch.Generator] = None,
                     flip: bool = True) -> torch.Tensor:
    """The standard CIFAR / Fashion-MNIST training augmentation, batched.

    Zero-pad by ``padding``, random ``H x W`` crop per sample, horizontal flip with
    probability 1/2 per sample (``flip=False`` disables it). Dtype is preserved.
    """
    _check_batch(x)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding}")
    top, left = crop_indices(x, padding, generator)
    fl = _rand((x.shape[0],), x, generator) < 0.5 if flip else None
    return crop(x, top, left, padding, fl)


def _grey(x: torch.Tensor) -> torch.Tensor:
    """Luma ``[B, 1, H, W]`` of float images (the channel itself for 1 channel)."""
    if x.shape[1] == 3:
        w = _const(LUMA, x.device, x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    return x.mean(1, keepdim=True)


def _factors(x: torch.Tensor, strength: float, generator: Optional[torch.Generator]) -> torch.Tensor:
    lo, hi = max(0.0, 1.0 - strength), 1.0 + strength
    return (lo + (hi - lo) * _rand((x.shape[0], 1, 1, 1), x, generator)).to(x.dtype)


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Random brightness, contrast, saturation per sample, in that fixed order.

    Factors are uniform in ``[max(0, 1 - s), 1 + s]``. Brightness scales the image;
    contrast blends it with its mean grey level; saturation blends it with its per-pixel
    grey (RGB only: skipped for 1-channel images, docs/method.md §3). Results are clamped
    to [0, 1] (float) or rounded to uint8. Same formulas as torchvision's ColorJitter, in
    a fixed order and without hue.
    """
    _check_batch(x)
    for name, v in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not 0.0 <= float(v):
            raise ValueError(f"{name} must be >= 0, got {v}")
    was_uint8 = x.dtype == torch.uint8
    xf = to_float(x)
    if brightness > 0:
        xf = (xf * _factors(xf, brightness, generator)).clamp_(0, 1)
    if contrast > 0:
        m = _grey(xf).mean(dim=(1, 2, 3), keepdim=True)
        cf = _factors(xf, contrast, generator)
        xf = (cf * xf + (1 - cf) * m).clamp_(0, 1)
    if saturation > 0 and xf.shape[1] == 3:
        sf = _factors(xf, saturation, generator)
        xf = (sf * xf + (1 - sf) * _grey(xf)).clamp_(0, 1)
    if was_uint8:
        return xf.mul_(255.0).round_().to(torch.uint8)
    return xf.to(x.dtype) if x.dtype.is_floating_point else xf


def two_views(x: torch.Tensor, generator: Optional[torch.Generator] = None, padding: int = 4,
              brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4, flip: str = "always"
              ) -> Tuple[torch.Tensor, torch.Tensor]:
    """docs/method.md §3 (AOD, eqs. 5-8): two views of the *same* random crop of every sample.

    ``B_F`` = the crop mirrored horizontally (``flip="always"``, the paper's "horizontal flip
    version of the batch"), or mirrored with probability 1/2 per sample (``flip="random"``,
    the usual flip augmentation: a model trained by CE on ``B_F`` then also sees the
    unmirrored orientation); ``B_C`` = the (unmirrored) crop with :func:`color_jitter`
    (brightness/contrast/saturation; brightness/contrast only for 1-channel data). Returns
    ``(x_flip, x_color)``, each with ``x``'s shape and dtype.
    """
    _check_batch(x)
    if not isinstance(padding, int) or padding < 0:
        raise ValueError(f"padding must be an int >= 0, got {padding}")
    if flip not in AOD_FLIPS:
        raise ValueError(f"flip: must be one of {AOD_FLIPS}, got {flip!r}")
    top, left = crop_indices(x, padding, generator)
    c = crop(x, top, left, padding)
    xf = c.flip(3) if flip == "always" else crop(x, top, left, padding, flip=_rand((x.shape[0],), x, generator) < 0.5)
    return xf, color_jitter(c, brightness, contrast, saturation, generator)
