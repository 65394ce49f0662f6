"""What kind of normalization layer a module is (``norm_kind``): which norms carry scaling factors.

Used by the tracer, by the operations that treat norm parameters apart (``ops/checks.py``,
``ops/warmstart.py``) and by the map's checks; it imports nothing heavy (no torch-pruning).
"""
from __future__ import annotations

import re
from typing import Optional

from torch import nn

__all__ = ["norm_kind", "is_norm"]

# class names of norm layers we cannot map (EvoNorm2dB0, FilterResponseNormAct2d, ...), not
# blocks that merely contain the word (NormFreeBlock)
_NORM_CLASS_RE = re.compile(r"Norm(Act)?(\d+d)?([A-Z]\d*)?$")


def norm_kind(m: nn.Module) -> Optional[str]:
    """Kind of a normalization module, or ``None`` when ``m`` is not a norm.

    ``"bn"`` (BatchNorm1d/2d/3d, SyncBatchNorm, timm BatchNormAct2d), ``"gn"`` (GroupNorm),
    ``"in"`` (InstanceNorm), ``"ln2d"`` (timm/torchvision LayerNorm2d, a LayerNorm with
    ``data_format="channels_first"`` such as Hugging Face's ConvNextLayerNorm: channel dim 1),
    ``"ln"`` (nn.LayerNorm over the last dim), ``"norm2d"``/``"norm"`` (other timm norms
    with a per-channel weight: RmsNorm2d/SimpleNorm2d, RmsNorm/SimpleNorm),
    ``"frozen"`` (torchvision's FrozenBatchNorm2d, timm's FrozenBatchNormAct2d: gamma is a
    buffer; mapped like a BatchNorm, its factors are *frozen*), ``"other"`` (a norm we cannot map).
    """
    cls = type(m).__name__
    if cls.startswith("FrozenBatchNorm"):
        return "frozen"
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        return "bn"
    if isinstance(m, nn.GroupNorm):
        return "gn"
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return "in"
    if isinstance(m, nn.LayerNorm):
        if len(m.normalized_shape) != 1:
            return "other"
        channels_first = "2d" in cls.lower() or getattr(m, "data_format", None) == "channels_first"
        return "ln2d" if channels_first else "ln"  # data_format: Hugging Face's ConvNextLayerNorm
    if cls.startswith(("RmsNorm", "SimpleNorm")):
        return "norm2d" if "2d" in cls.lower() else "norm"
    if _NORM_CLASS_RE.search(cls) and any(isinstance(p, nn.Parameter) for p in m.parameters(recurse=False)):
        return "other"  # e.g. EvoNorm: per-channel weight, but not a plain normalize-then-scale
    return None


def is_norm(m: nn.Module) -> bool:
    """True when ``m`` is a normalization layer of any kind (:func:`norm_kind` is not None)."""
    return norm_kind(m) is not None
