"""What the two warm-start operations share: their papers' defaults and the checks of their arguments.

The operations are ``ops/shrink_perturb.py`` (Shrink & Perturb) and ``ops/dash.py`` (DASH), both
public as ``filtersurgery.warmstart``; each is a function of a model, run once between two training
steps, that changes the model's parameters in place (docs/warmstart.md has the equations, defaults
and sources). The multi-step baselines ``shrink-perturb`` and ``dash`` apply them at the start of
every step k >= 2 (their warm-start objects: ``methods/multistep/phases.py``).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.ops.checks import first_nonfinite as _first_nonfinite, nonfinite_message as _nonfinite_message
from filtersurgery.tracing.scaling_map import ScalingMap, unwrap

__all__ = ["DEFAULTS"]

# the papers' defaults of each operation's options (the multi-step baselines' own: methods/multistep/config.py)
DEFAULTS: Dict[str, Dict[str, Any]] = {
    "shrink-perturb": {"shrink": 0.4, "noise": 0.1},
    "dash": {"lam": 0.3, "alpha": None, "granularity": "kernel"},
}
_DASH_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
_GRANULARITIES = ("kernel", "filter")
_BN_STATS = ("reset", "keep")


# --------------------------------------------------------------------------- checks
def _number(name: str, value, allowed: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{name}: must be a number in {allowed}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: must be a number in {allowed}, got {value!r}") from None
    return v


def _check_shrink(shrink) -> float:
    v = _number("shrink", shrink, "(0, 1]")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"shrink: must be in (0, 1] (1 = no shrinking), got {shrink!r}")
    return v


def _check_noise(noise) -> float:
    v = _number("noise", noise, "[0, inf)")
    if not (math.isfinite(v) and v >= 0.0):
        raise ValueError(f"noise: must be a finite number >= 0 (0 = shrink only), got {noise!r}")
    return v


def _check_lam(lam) -> float:
    v = _number("lam", lam, "[0, 1]")
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"lam: must be in [0, 1] (the smallest shrink factor), got {lam!r}")
    return v


def _check_alpha(alpha) -> Optional[float]:
    if alpha is None:
        return None
    v = _number("alpha", alpha, "(0, 1] or None")
    if not 0.0 < v <= 1.0:
        raise ValueError(f"alpha: must be None (mean gradient) or in (0, 1] (EMA weight of the newest batch), got {alpha!r}")
    return v


def _check_choice(name: str, value, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {', '.join(allowed)}, got {value!r}")
    return value


def _as_module(model, arg: str = "model") -> nn.Module:
    if isinstance(model, ScalingMap):
        model = model.module
    if not isinstance(model, nn.Module):
        raise ValueError(f"{arg}: expected an nn.Module, got {type(model).__name__}")
    return unwrap(model)


def _prefixes(exclude) -> Tuple[str, ...]:
    if exclude is None:
        return ()
    if isinstance(exclude, str):
        exclude = (exclude,)
    try:
        out = tuple(exclude)
    except TypeError:
        raise ValueError(f"exclude: must be a parameter-name prefix or a list of them, got {exclude!r}") from None
    if not all(isinstance(e, str) and e for e in out):
        raise ValueError(f"exclude: must be non-empty parameter-name prefixes (e.g. 'fc'), got {exclude!r}")
    return out


def _excluded(name: str, prefixes: Tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _check_finite_named(named: List[Tuple[str, torch.Tensor]], arg: str, what: str, hint: Optional[str] = None) -> None:
    """One-line ValueError naming the count and the first NaN/Inf entry of ``named``."""
    first = _first_nonfinite(named)
    if first is None:
        return
    count = sum(int((~torch.isfinite(t)).sum()) for _, t in named)
    msg = _nonfinite_message(arg, count, what, first)
    if hint is not None:
        msg = msg.split("; ")[0] + "; " + hint
    raise ValueError(msg)
