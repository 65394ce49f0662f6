"""The accuracy-vs-sharing sweep of partial network sharing (paper §3.4, docs/method.md §6): ``sharing`` for each
sharing fraction (the base network trained once and reused), ``sweep.csv``/``sweep.json``/``sweep.png``, the
chosen configuration (the largest share whose all-class validation accuracy is within ``max_drop`` of no
sharing) and, per configuration, the measured training cost (``report/cost.py``)."""
from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from filtersurgery.data import ImageData, load_dataset
from filtersurgery.engine import checkpoint
from filtersurgery.engine.config import TrainConfig
from filtersurgery.methods.sharing import _example_batch, run_sharing
from filtersurgery.models.factory import build_model
from filtersurgery.ops.sharing import plan_share

__all__ = ["sweep_sharing", "choose", "plot_sweep"]


def _share_dir(s: float) -> str:
    return f"share{s:.2f}"


def choose(rows: List[Dict], max_drop: float = 1.0) -> Dict:
    """The row with the largest ``shared_fraction`` whose ``val_acc`` is within ``max_drop``
    points of the no-sharing row's (``shared_fraction == 0``); paper §3.4, decided on validation."""
    if not rows:
        raise ValueError("rows: the sweep has no configuration")
    if not max_drop >= 0:
        raise ValueError(f"max_drop: must be >= 0 accuracy points, got {max_drop}")
    ref = min(rows, key=lambda r: r["shared_fraction"])
    ok = [r for r in rows if r["val_acc"] >= ref["val_acc"] - max_drop]
    return max(ok, key=lambda r: (r["shared_fraction"], r["share"]))


def _mean(v):
    v = [x for x in v if x is not None]
    return statistics.fmean(v) if v else None


def sweep_sharing(cfg: TrainConfig, class_sets: List[List[int]], shares: Sequence[float], out_dir,
                  seeds: Sequence[int] = (0,), data: Optional[ImageData] = None, max_drop: float = 1.0,
                  cost: bool = True, title: str = "") -> Dict:
    """The accuracy-vs-sharing curve (paper §3.4, docs/method.md §6) -> ``sweep.csv``, ``sweep.json``, ``sweep.png``.

    ``share = 0`` (no sharing, the reference) is always included. Shares that give the same
    shared prefix (same number of shared layers) are trained once. The base network of a
    seed is trained once (by the ``share = 0`` run) and reused. Chosen configuration:
    :func:`choose` on the mean validation accuracy over seeds.
    """
    shares = sorted({0.0, *(float(s) for s in shares)})
    for s in shares:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"shares: each must be in [0, 1], got {s}")
    out = Path(out_dir)
    data = data if data is not None else load_dataset(cfg.data, root=cfg.data_root, download=cfg.download)
    probe, _ = build_model(cfg.model, num_classes=len(class_sets[0]), in_chans=data.in_chans)
    ex = _example_batch(data, 1, "cpu")
    plans = {s: plan_share(probe, s, ex) for s in shares}
    runs_for: Dict[int, float] = {}  # n_shared_layers -> the share trained for it
    for s in shares:
        runs_for.setdefault(plans[s].n_shared_layers, s)
    trained_as = {s: runs_for[plans[s].n_shared_layers] for s in shares}
    per_share = _sweep_runs(cfg, class_sets, trained_as, out, seeds, data, cost)
    rows = [_sweep_row(s, plans[s], trained_as[s], per_share[s], len(class_sets), cost) for s in shares]
    if cost:
        _relative_costs(rows)
    chosen = choose(rows, max_drop)
    for r in rows:
        r["chosen"] = int(r is chosen)
    result = {"model": cfg.model, "data": data.name, "class_sets": class_sets, "seeds": list(seeds),
              "max_drop": max_drop, "epochs": cfg.epochs, "subset": cfg.subset, "chosen_share": chosen["share"],
              "rows": rows}
    _write_sweep(out, result, max_drop, title or f"{cfg.model} on {data.name}")
    return result


def _sweep_runs(cfg: TrainConfig, class_sets: List[List[int]], trained_as: Dict[float, float], out: Path,
                seeds: Sequence[int], data: ImageData, cost: bool) -> Dict[float, List[Dict]]:
    """Run :func:`run_sharing` once per distinct shared prefix and seed; ``share -> [metrics per seed]``."""
    per_share: Dict[float, List[Dict]] = {s: [] for s in trained_as}
    for seed in seeds:
        base_ckpt = out / _share_dir(0.0) / f"seed{seed}" / "step1.safetensors"
        results: Dict[float, Dict] = {}
        for s in sorted(set(trained_as.values())):
            results[s] = run_sharing(cfg, class_sets, s, out / _share_dir(s) / f"seed{seed}", seed, data,
                                     base_from=None if s == 0.0 else base_ckpt, cost=cost)
        for s in trained_as:
            per_share[s].append(results[trained_as[s]])
    return per_share


def _sweep_row(s: float, plan, trained_as: float, ms: List[Dict], n_sets: int, cost: bool) -> Dict:
    """One row of the sweep: share ``s``'s plan and its metrics ``ms`` averaged over seeds."""
    e = [m["steps"][0] for m in ms]
    c = [m.get("cost", {}) for m in ms]
    row = {"share": s, "shared_fraction": round(plan.shared_fraction, 4),
           "n_shared_layers": plan.n_shared_layers, "cut": plan.cut, "trained_as": trained_as,
           "val_acc": round(_mean([x["val_acc"] for x in e]), 4),
           "test_acc": round(_mean([x["test_acc"] for x in e]), 4),
           "test_acc_std": round(statistics.stdev([x["test_acc"] for x in e]), 4) if len(e) > 1 else 0.0,
           "n_seeds": len(e)}
    for i in range(n_sets):
        row[f"set{i + 1}_test_acc"] = round(_mean([m["per_set"][i]["test_acc"] for m in ms]), 4)
    row["branch_seconds"] = round(_mean([sum(p["seconds"] for p in m["per_set"][1:]) for m in ms]), 2)
    if cost:
        row["train_macs_per_iter"] = c[0].get("train_macs_per_iter")
        row["trainable_params"] = c[0].get("trainable_params")
        row["stored_params"] = ms[0]["stored_params"]
        row["sec_per_iter"] = _round(_mean([x.get("sec_per_iter") for x in c]), 5)
        row["peak_mem_mb"] = _round(_mean([x.get("peak_mem_mb") for x in c]), 2)
    return row


def _relative_costs(rows: List[Dict]) -> None:
    """Add ``train_macs_rel`` and ``sec_per_iter_rel`` (relative to the first row, no sharing) to every row."""
    ref = rows[0]
    for r in rows:
        r["train_macs_rel"] = round(r["train_macs_per_iter"] / ref["train_macs_per_iter"], 4)
        r["sec_per_iter_rel"] = _round(r["sec_per_iter"] / ref["sec_per_iter"] if ref["sec_per_iter"] else None, 4)


def _write_sweep(out: Path, result: Dict, max_drop: float, title: str) -> None:
    """``sweep.json``, ``sweep.csv`` and ``sweep.png`` of a sweep ``result`` in ``out``."""
    rows = result["rows"]
    out.mkdir(parents=True, exist_ok=True)
    checkpoint.atomic_write_json(result, out / "sweep.json")
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot_sweep(rows, out / "sweep.png", max_drop=max_drop, title=title)


def _round(v, nd):
    return None if v is None else round(v, nd)


def plot_sweep(rows: List[Dict], path, max_drop: float = 1.0, title: str = "") -> Path:
    """Accuracy vs sharing (paper Fig. 2b / 4): all-class test and validation accuracy against the
    shared fraction, the chosen configuration marked, normalized training MACs on a second axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [100 * r["shared_fraction"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.errorbar(x, [r["test_acc"] for r in rows], yerr=[r.get("test_acc_std", 0) for r in rows], marker="o",
                capsize=3, label="test (all classes)")
    ax.plot(x, [r["val_acc"] for r in rows], marker="s", ls="--", label="validation (all classes)")
    ref = rows[0]["val_acc"]
    ax.axhline(ref - max_drop, color="gray", lw=0.8, ls=":", label=f"no-sharing val - {max_drop:g}")
    ch = next(r for r in rows if r.get("chosen"))
    ax.plot([100 * ch["shared_fraction"]], [ch["test_acc"]], marker="*", ms=16, color="red", ls="none",
            label=f"chosen: share {ch['share']:g} ({100 * ch['shared_fraction']:.0f}% shared)")
    labels: Dict[float, List[str]] = {}
    for r, xi in zip(rows, x):  # shares giving the same shared prefix share one point
        labels.setdefault(xi, []).append(f"{r['share']:g}")
    for xi, lab in labels.items():
        y = next(r["test_acc"] for r, xr in zip(rows, x) if xr == xi)
        ax.annotate("share " + "/".join(lab), (xi, y), textcoords="offset points", xytext=(0, 7), ha="center",
                    fontsize=7)
    ax.set_xlabel("shared conv parameters (%)")
    ax.set_ylabel("accuracy (%)")
    if rows[0].get("train_macs_rel") is not None:
        ax2 = ax.twinx()
        ax2.plot(x, [r["train_macs_rel"] for r in rows], color="green", marker="^", lw=0.8, alpha=0.6,
                 label="training MACs / iter (rel.)")
        ax2.set_ylabel("training MACs per iteration (relative to no sharing)")
        ax2.set_ylim(0, 1.05)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    else:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    from filtersurgery.report.figures import save_figure

    return save_figure(fig, path)
