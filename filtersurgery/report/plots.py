"""Figures. ``gamma_histogram`` draws Fig. 3 of the multistep paper (SST vs BST).

Fig. 3: (a)/(b) distribution of the scaling factors |gamma| of each network (pre-trained,
after BST, after SST); (c) distribution and mean of the *remaining* factors, i.e. without
the ``target_r`` fraction of useless (smallest) ones.
"""
from __future__ import annotations

from pathlib import Path

from typing import Dict, Mapping, Sequence, Union

import torch

from filtersurgery.ops.checks import check_target_r, smallest_mask
from filtersurgery.ops.ranking import gamma_values


def _as_dict(models_or_dict) -> Dict[str, object]:
    if isinstance(models_or_dict, Mapping):
        items = dict(models_or_dict)
    elif isinstance(models_or_dict, Sequence) and not isinstance(models_or_dict, (str, torch.Tensor)):
        items = {f"model {i}": m for i, m in enumerate(models_or_dict)}
    else:
        items = {"model": models_or_dict}
    if not items:
        raise ValueError("models_or_dict: needs at least one model, ScalingMap or gamma tensor")
    return items


def gamma_stats(gammas: torch.Tensor, target_r: float = 0.3) -> Dict[str, float]:
    """``mean_all``, ``mean_remaining`` (without the ``target_r`` smallest), ``n`` and ``n``-fraction ~0."""
    a = gammas.abs().float()
    keep = ~smallest_mask(a, target_r)
    return {
        "n": int(a.numel()),
        "mean_all": float(a.mean()),
        "mean_remaining": float(a[keep].mean()) if bool(keep.any()) else 0.0,
        "median": float(a.median()),
    }


def gamma_histogram(
    models_or_dict: Union[Mapping[str, object], Sequence[object], object],
    path,
    target_r: float = 0.3,
    bins: int = 60,
    title: str = "Scaling factors |gamma|",
) -> Dict[str, Dict[str, float]]:
    """Write the Fig. 3 PNG to ``path``; return per-label :func:`gamma_stats`.

    ``models_or_dict``: ``{label: model | ScalingMap | gamma tensor}`` (e.g. pre-trained,
    BST, SST) or a list (labelled ``model 0, 1, ...``). Left panel: all |gamma|; right
    panel: the remaining ones (useless ``target_r`` fraction removed) with each mean as a
    dashed line.
    """
    import matplotlib
    from matplotlib.figure import Figure  # no pyplot: the user's backend is left alone

    target_r = check_target_r(target_r)
    vals = {k: gamma_values(v) for k, v in _as_dict(models_or_dict).items()}
    stats = {k: gamma_stats(v, target_r) for k, v in vals.items()}
    hi = max(float(v.max()) for v in vals.values() if v.numel()) or 1.0
    edges = torch.linspace(0.0, hi * 1.001, bins + 1).numpy()
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_all, ax_rem = fig.subplots(1, 2)
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (label, v) in enumerate(vals.items()):
        col = colors[i % len(colors)]
        keep = ~smallest_mask(v, target_r)
        ax_all.hist(v.numpy(), bins=edges, alpha=0.45, color=col, label=label)
        ax_rem.hist(v[keep].numpy(), bins=edges, alpha=0.45, color=col, label=f"{label} (mean {stats[label]['mean_remaining']:.3f})")
        ax_rem.axvline(stats[label]["mean_remaining"], color=col, ls="--", lw=1.5)
    ax_all.set_title(f"{title}: all factors")
    ax_rem.set_title(f"remaining factors (smallest {target_r:.0%} removed) and their mean")
    for ax in (ax_all, ax_rem):
        ax.set_xlabel("|gamma|")
        ax.set_ylabel("count")
        ax.legend(fontsize=8)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(str(path), dpi=120)
    return stats


__all__ = ["gamma_histogram", "gamma_stats"]
