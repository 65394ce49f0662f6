"""Your own model wherever a model name is accepted: an ``nn.Module`` or a zero-argument factory.

The trainer builds its models from ``TrainConfig.model``: a name (``timm:resnet18``,
``cifar:resnet8``, ...; :func:`~filtersurgery.models.factory.build_model`), an ``nn.Module``
instance (a detector's backbone with a head, a Hugging Face ``transformers`` CNN, a
hand-written network) or a function without arguments that returns one.

- An instance is never changed: every model the run trains starts as a deep copy of it
  (step 1 therefore starts from its weights as given, pretrained or not); a *fresh* copy
  (Shrink & Perturb's noise) re-initializes every submodule that has ``reset_parameters``.
- A factory is called for every model the run needs, after the run has seeded torch's RNG,
  so step 1 and joint training start from a new seeded initialization, as with a name.
- A forward that does not return a tensor (``transformers``' ``ModelOutput``, a tuple, a
  dict) is read through :class:`Logits` (its ``logits``, else its first item).
- The model must already output one logit per class of the data; the run checks it on an
  example image before it writes anything.

A run folder records a user model as ``user:CLASS:FINGERPRINT`` (:func:`model_id`): the class
name and a hash of the architecture (every module's class and every parameter's and
buffer's name, shape and dtype), so a resume with another architecture is refused.
"""
from __future__ import annotations

import copy
import hashlib
from typing import Any, Callable, Union

import torch
from torch import nn

__all__ = ["ModelSpec", "Logits", "is_user_model", "make_model", "fresh_copy", "model_id", "fingerprint",
           "check_model_spec"]

ModelSpec = Union[str, nn.Module, Callable[[], nn.Module]]


class Logits(nn.Module):
    """Wraps a model whose forward returns a ``ModelOutput``, tuple or dict: returns its logits tensor."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``model(x).logits``, else ``model(x)["logits"]``, else the first item of a tuple/list."""
        return logits_of(self.model(x))


def logits_of(out: Any) -> torch.Tensor:
    """The logits tensor of a forward's output (tensor, ``.logits``, ``["logits"]`` or first item)."""
    if isinstance(out, torch.Tensor):
        return out
    if getattr(out, "logits", None) is not None:
        return out.logits
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise ValueError(f"model: its forward returned {type(out).__name__}, not logits (a tensor, an object with "
                     f".logits, a dict with 'logits', or a tuple whose first item is the logits)")


def is_user_model(spec: Any) -> bool:
    """True for an ``nn.Module`` instance or a factory (anything but a model name)."""
    return not isinstance(spec, str)


def check_model_spec(spec: Any) -> None:
    """One-line ValueError unless ``spec`` is a non-empty name, an ``nn.Module`` or a callable."""
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("model: expected a model name (timm:NAME, torchvision:NAME, cifar:resnetDEPTH), an "
                             "nn.Module or a zero-argument function returning one, got an empty name")
        return
    if not (isinstance(spec, nn.Module) or callable(spec)):
        raise ValueError(f"model: expected a model name, an nn.Module or a zero-argument function returning one, "
                         f"got {type(spec).__name__}")


def make_model(spec: ModelSpec, num_classes: int, in_chans: int) -> nn.Module:
    """A model from ``spec``: built by name, deep-copied from an instance, or returned by a factory."""
    check_model_spec(spec)
    if isinstance(spec, str):
        from filtersurgery.models.factory import build_model

        return build_model(spec, num_classes=num_classes, in_chans=in_chans)[0]
    if isinstance(spec, nn.Module):
        return copy.deepcopy(spec)
    model = spec()
    if not isinstance(model, nn.Module):
        raise ValueError(f"model: the factory {getattr(spec, '__name__', spec)!r} returned "
                         f"{type(model).__name__}, not an nn.Module")
    return model


def fresh_copy(spec: ModelSpec, num_classes: int, in_chans: int) -> nn.Module:
    """A freshly initialized model of ``spec``'s architecture (an instance: a deep copy whose submodules
    with ``reset_parameters`` are re-initialized; a name or factory: a new model) under torch's RNG."""
    model = make_model(spec, num_classes, in_chans)
    if isinstance(spec, nn.Module):
        for m in model.modules():
            if callable(getattr(m, "reset_parameters", None)):
                m.reset_parameters()
    return model


def fingerprint(model: nn.Module) -> str:
    """12 hex digits of a hash of ``model``'s architecture: every module's class name and every
    parameter's and buffer's name, shape and dtype (not their values)."""
    h = hashlib.sha256()
    for name, m in model.named_modules():
        h.update(f"{name}:{type(m).__qualname__};".encode())
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:12]


def model_id(spec: ModelSpec, model: nn.Module = None) -> str:
    """What a run folder records of its model: the name itself, or ``user:CLASS:FINGERPRINT`` for a user
    model (``model``: the one built from ``spec``, when at hand)."""
    if isinstance(spec, str):
        return spec
    if model is None:
        model = make_model(spec, 0, 0) if isinstance(spec, nn.Module) else spec()
    inner = model.model if isinstance(model, Logits) else model
    return f"user:{type(inner).__name__}:{fingerprint(inner)}"
