"""Build timm / torchvision models from a model ``spec`` string, and list the CNNs of each source.

A ``spec`` is ``timm:NAME``, ``torchvision:NAME``, ``cifar:resnetDEPTH`` (the CIFAR-style
ResNet of :mod:`filtersurgery.models.cifar_resnet`) or a bare timm ``NAME``. Models are built
with random weights (``pretrained=False`` / ``weights=None``).
"""
from __future__ import annotations

import fnmatch
from typing import List, Optional, Tuple

from torch import nn

from filtersurgery.models.cifar_resnet import cifar_resnet

__all__ = ["build_model", "list_cnns", "parse_spec", "cifar_resnet", "SOURCES"]

SOURCES = ("timm", "torchvision")  # model zoos that `filtersurgery zoo` lists
_ALL_SOURCES = SOURCES + ("cifar",)

# timm model modules (timm.models.<module>) whose models are convolutional networks:
# conv stages with per-channel norms, possibly with SE/attention gates. Pure and hybrid
# transformers (vision_transformer*, swin*, maxxvit, levit, mobilevit, ...) are left out.
TIMM_CNN_MODULES = (
    "byobnet", "convmixer", "convnext", "cspnet", "cspnext", "densenet", "dla", "dpn", "efficientnet",
    "fasternet", "ghostnet", "hardcorenas", "hgnet", "hrnet", "inception_next", "inception_resnet_v2",
    "inception_v3", "inception_v4", "lcnetv2", "mambaout", "mobilenetv3", "nasnet", "nfnet", "pnasnet",
    "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest", "resnet", "resnetv2", "rexnet",
    "selecsls", "senet", "sknet", "starnet", "tresnet", "vgg", "vovnet", "xception", "xception_aligned",
)
# torchvision classification builders that are not CNNs
_TV_NOT_CNN = ("vit_*", "swin_*", "swin3d_*", "maxvit_*")

_HOW_TO_LIST = "list valid names with `python -c \"import {mod}; print({call})\"`"
_LIST_CALL = {"timm": "timm.list_models()", "torchvision": "torchvision.models.list_models(module=torchvision.models)"}


def close_matches(name: str, names: List[str], n: int = 5) -> List[str]:
    """Up to ``n`` entries of ``names`` closest to ``name`` (``difflib``, case-insensitive), best first."""
    import difflib

    low = {c.lower(): c for c in names}
    return [low[m] for m in difflib.get_close_matches(name.lower(), list(low), n=n, cutoff=0.6)]


def _unknown_model(source: str, name: str) -> ValueError:
    """One-line error for a model name ``source`` does not have, with close matches from its list.

    A name the *other* zoo has is pointed there (``timm:NAME`` / ``torchvision:NAME``).
    """
    what = "timm model" if source == "timm" else "torchvision classification model"
    own = _timm_names() if source == "timm" else _tv_names()
    other = "torchvision" if source == "timm" else "timm"
    other_names = _tv_names() if source == "timm" else _timm_names()
    hints = close_matches(name, own)
    if name in other_names:
        hint = f"'{name}' is a {other} model: use {other}:{name}"
    elif hints:
        hint = "did you mean " + ", ".join(f"{source}:{m}" for m in hints) + "?"
    else:
        near = close_matches(name, other_names, n=3)
        hint = ("did you mean " + ", ".join(f"{other}:{m}" for m in near) + "?") if near else "no close match"
    how = _HOW_TO_LIST.format(mod=source, call=_LIST_CALL[source])
    return ValueError(f"spec: unknown {what} '{name}'; {hint} ({how})")


def parse_spec(spec: str) -> Tuple[str, str]:
    """``"timm:resnet18"`` -> ``("timm", "resnet18")``; a bare name is a timm name."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("spec: expected 'timm:NAME', 'torchvision:NAME' or a bare timm NAME, got an empty value")
    src, sep, name = spec.strip().partition(":")
    if not sep:
        return "timm", src
    if src not in _ALL_SOURCES:
        raise ValueError(f"spec: source must be one of {', '.join(_ALL_SOURCES)} (as in 'timm:resnet18'), got '{src}'")
    if not name:
        raise ValueError(f"spec: missing model name after '{src}:'")
    return src, name


def _timm_names() -> List[str]:
    import timm

    return timm.list_models()


def _tv_names() -> List[str]:
    import torchvision

    return sorted(torchvision.models.list_models(module=torchvision.models))


def _replace_first_conv(model: nn.Module, in_chans: int) -> str:
    """Swap the first ``nn.Conv2d`` (module order) for one taking ``in_chans`` channels."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            new = nn.Conv2d(
                in_chans, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                groups=1 if m.groups == m.in_channels and in_chans != m.in_channels else m.groups,
                bias=m.bias is not None, padding_mode=m.padding_mode,
            ).to(device=m.weight.device, dtype=m.weight.dtype)
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, new)
            return name
    raise ValueError("in_chans: the model has no nn.Conv2d to adapt to a different channel count")


def build_model(spec: str, num_classes: Optional[int] = None, in_chans: Optional[int] = None, **kw) -> Tuple[nn.Module, str]:
    """Build ``spec`` with random weights; return ``(model, source)``.

    ``num_classes``/``in_chans`` are passed to timm; for torchvision ``num_classes`` goes to
    the builder and ``in_chans != 3`` replaces the first ``nn.Conv2d`` by a fresh one with
    ``in_chans`` input channels (torchvision builders have no such argument).
    """
    src, name = parse_spec(spec)
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes: expected an integer >= 1, got {num_classes!r}")
    if in_chans is not None and (not isinstance(in_chans, int) or in_chans < 1):
        raise ValueError(f"in_chans: expected an integer >= 1, got {in_chans!r}")
    if src == "cifar":
        depth = name[len("resnet"):] if name.startswith("resnet") else ""
        if not depth.isdigit():
            raise ValueError(f"spec: cifar models are 'cifar:resnetDEPTH' with DEPTH = 6n+2 (e.g. cifar:resnet32), got '{spec}'")
        return cifar_resnet(int(depth), num_classes=num_classes or 10, in_chans=in_chans or 3), "cifar"
    if src == "timm":
        import timm

        if not timm.is_model(name):
            raise _unknown_model("timm", name)
        args = dict(kw)
        if num_classes is not None:
            args["num_classes"] = num_classes
        if in_chans is not None:
            args["in_chans"] = in_chans
        return timm.create_model(name, pretrained=False, **args), "timm"
    import torchvision

    if name not in _tv_names():
        raise _unknown_model("torchvision", name)
    args = dict(kw)
    if num_classes is not None:
        args["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3"):
        args.setdefault("init_weights", True)  # silences torchvision's init warning; same random init
    model = torchvision.models.get_model(name, weights=None, **args)
    if in_chans is not None and in_chans != 3:
        if getattr(model, "transform_input", False):
            model.transform_input = False  # the ImageNet RGB re-normalization needs 3 channels
        _replace_first_conv(model, in_chans)
    return model, "torchvision"


def list_cnns(source: str = "timm", pattern: Optional[str] = None) -> List[str]:
    """Names of the CNNs of ``source`` (optionally filtered by a glob ``pattern``), sorted.

    timm: every model whose module is one of ``TIMM_CNN_MODULES`` (decided from timm's
    registry, nothing is built). torchvision: the classification builders minus ViT/Swin/MaxViT.
    """
    if source not in SOURCES:
        raise ValueError(f"source: expected one of {', '.join(SOURCES)}, got '{source}'")
    if source == "timm":
        import timm

        names = timm.list_models(module=list(TIMM_CNN_MODULES))
    else:
        names = [n for n in _tv_names() if not any(fnmatch.fnmatch(n, p) for p in _TV_NOT_CNN)]
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return sorted(names)
