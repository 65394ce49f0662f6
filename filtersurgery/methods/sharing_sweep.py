"""The accuracy-vs-sharing sweep of partial network sharing (paper §3.4, docs/method.md §6): ``sharing`` for each
sharing fraction (the base network trained once and reused), ``sweep.csv``/``sweep.json``/``sweep.png``, the
chosen configuration (the largest share whose all-class validation accuracy is within ``max_drop`` of no
sharing) and, per configuration, the measured training cost (``report/cost.py``).

For comparing costs across shares, :func:`measure_side_by_side` times every configuration's branch in one
process, interleaved (the per-run measurements of the sweep are taken at different times, under whatever
load the machine had then); :func:`with_side_by_side_costs` puts those figures into the sweep rows and
:func:`relative_costs` expresses them as ratios to no sharing. :func:`best_per_cost`, :func:`saving_gap` and
:func:`time_split` summarize the result."""
from __future__ import annotations

import csv
import statistics
import time
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from filtersurgery.data import ImageData, load_dataset
from filtersurgery.engine import checkpoint
from filtersurgery.engine.config import TrainConfig
from filtersurgery.methods.sharing import _example_batch, run_sharing
from filtersurgery.models.factory import build_model
from filtersurgery.ops.sharing import plan_share, share
from filtersurgery.report.cost import training_cost

__all__ = ["sweep_sharing", "choose", "plot_sweep", "relative_costs", "measure_side_by_side",
           "with_side_by_side_costs", "best_per_cost", "saving_gap", "time_split", "COST_KEYS"]

#: cost column -> its ratio-to-no-sharing column (:func:`relative_costs`)
COST_KEYS = {"train_macs_per_iter": "train_macs_rel", "sec_per_iter": "sec_per_iter_rel",
             "peak_mem_mb": "peak_mem_rel", "trainable_params": "trainable_rel", "stored_params": "stored_rel"}


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
        relative_costs(rows)
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


def relative_costs(rows: List[Dict], keys: Mapping[str, str] = COST_KEYS) -> List[Dict]:
    """Add to every row, for each ``cost -> cost_rel`` of ``keys``, its cost as a ratio to the no-sharing
    row's (``share == 0``), rounded to 4 digits; None where either value is missing or the reference is 0.
    The rows are changed in place and returned."""
    ref = next((r for r in rows if r["share"] == 0.0), None)
    if ref is None:
        raise ValueError("rows: no share-0 (no sharing) row to take the ratios to")
    for r in rows:
        for k, rel in keys.items():
            v, v0 = r.get(k), ref.get(k)
            r[rel] = round(v / v0, 4) if v is not None and v0 else None
    return rows


def measure_side_by_side(base: torch.nn.Module, shares: Sequence[float], example_input: torch.Tensor,
                         num_classes: int, rounds: int = 3, iters: int = 5, warmup: int = 1) -> Dict[float, Dict]:
    """Training cost per iteration of a branch of ``base`` for every share, measured in this process.

    One branch per share (:func:`~filtersurgery.ops.sharing.share`, a fresh ``num_classes``
    head; the cost does not depend on the weights' values). Round 1 measures MACs, trainable
    parameters, peak memory and time (:func:`~filtersurgery.report.cost.training_cost` on a
    batch like ``example_input``); rounds 2.. time only, in alternating order, so that a
    change of the machine's load spreads over all shares. ``sec_per_iter``: the median over
    rounds of each round's median of ``iters`` iterations (``sec_per_iter_rounds``: those
    medians). ``fwd_sec_per_iter`` (``fwd_sec_per_iter_rounds``): the same for the training-mode
    forward pass alone, timed in every round next to the iterations. Returns ``share ->
    {train_macs_per_iter, forward_macs_per_iter, trainable_params, sec_per_iter,
    sec_per_iter_rounds, fwd_sec_per_iter, fwd_sec_per_iter_rounds, peak_mem_mb, peak_mem_source}``.
    """
    if rounds < 1:
        raise ValueError(f"rounds: must be >= 1, got {rounds}")
    branches = {float(s): share(base, float(s), num_classes=num_classes, example_inputs=example_input[:1])
                for s in shares}
    out: Dict[float, Dict] = {}
    for s, br in branches.items():
        c = training_cost(br, example_input, num_classes, iters=iters, warmup=warmup)
        out[s] = {"train_macs_per_iter": c.train_macs, "forward_macs_per_iter": c.forward_macs,
                  "trainable_params": c.trainable_params, "sec_per_iter_rounds": [c.sec_per_iter],
                  "fwd_sec_per_iter_rounds": [_forward_seconds(br, example_input, iters, warmup)],
                  "peak_mem_mb": c.peak_mem_mb, "peak_mem_source": c.peak_mem_source}
    order = list(branches)
    for _ in range(rounds - 1):
        order.reverse()
        for s in order:
            c = training_cost(branches[s], example_input, num_classes, iters=iters, warmup=warmup, memory=False)
            out[s]["sec_per_iter_rounds"].append(c.sec_per_iter)
            out[s]["fwd_sec_per_iter_rounds"].append(_forward_seconds(branches[s], example_input, iters, warmup))
    for v in out.values():
        v["sec_per_iter"] = statistics.median(v["sec_per_iter_rounds"])
        v["fwd_sec_per_iter"] = statistics.median(v["fwd_sec_per_iter_rounds"])
    return out


def _forward_seconds(model: torch.nn.Module, x: torch.Tensor, iters: int, warmup: int) -> float:
    """Median wall time of ``iters`` training-mode forward passes of ``model`` on ``x`` (autograd records
    the graph, as in training; no backward). The model's modes are restored."""
    was = {m: m.training for m in model.modules()}
    model.train()
    cuda = x.device.type == "cuda"
    times = []
    try:
        for i in range(warmup + iters):
            if cuda:
                torch.cuda.synchronize(x.device)
            t0 = time.perf_counter()
            out = model(x)
            if cuda:
                torch.cuda.synchronize(x.device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
            del out
    finally:
        for m, t in was.items():
            m.training = t
    return statistics.median(times)


def with_side_by_side_costs(rows: List[Dict], measured: Mapping[float, Dict]) -> List[Dict]:
    """Copies of the sweep ``rows`` whose measured costs (MACs, trainable parameters, time per iteration,
    peak memory) are those of ``measured[row["trained_as"]]`` (:func:`measure_side_by_side`), with
    :func:`relative_costs` recomputed. The rows themselves are not changed."""
    new = []
    for r in rows:
        m = measured.get(r["trained_as"])
        if m is None:
            raise ValueError(f"measured: no measurement for share {r['trained_as']:g} (row share {r['share']:g})")
        new.append({**r, "train_macs_per_iter": m["train_macs_per_iter"], "trainable_params": m["trainable_params"],
                    "sec_per_iter": _round(m["sec_per_iter"], 5), "peak_mem_mb": _round(m.get("peak_mem_mb"), 2)})
    return relative_costs(new)


def best_per_cost(rows: List[Dict], acc_key: str = "val_acc", cost_key: str = "train_macs_rel") -> Dict:
    """The row with the highest accuracy per unit of relative training cost (``acc_key / cost_key``);
    on a tie the smallest share (rows in share order). Rows without a positive cost are skipped."""
    ok = [r for r in rows if r.get(cost_key)]
    if not ok:
        raise ValueError(f"cost_key: no row has a positive {cost_key!r}")
    return max(ok, key=lambda r: r[acc_key] / r[cost_key])


def saving_gap(row: Dict) -> Dict:
    """Savings of ``row`` against no sharing, in percent: training MACs (``mac_saving``), measured time
    per iteration (``time_saving``), peak memory (``mem_saving``, None if not measured), and
    ``gap = mac_saving - time_saving`` (percentage points; > 0: time saves less than MACs)."""
    if row.get("train_macs_rel") is None or row.get("sec_per_iter_rel") is None:
        raise ValueError("row: needs train_macs_rel and sec_per_iter_rel (relative_costs)")
    mac = 100 * (1 - row["train_macs_rel"])
    t = 100 * (1 - row["sec_per_iter_rel"])
    mem = None if row.get("peak_mem_rel") is None else round(100 * (1 - row["peak_mem_rel"]), 1)
    return {"share": row["share"], "mac_saving": round(mac, 1), "time_saving": round(t, 1), "mem_saving": mem,
            "gap": round(mac - t, 1)}


def time_split(measured: Mapping[float, Dict]) -> Dict[float, Dict]:
    """Where the time of an iteration goes, per share, as ratios to share 0, from
    :func:`measure_side_by_side`'s figures: ``fwd_time_rel``/``fwd_macs_rel`` (the forward pass)
    and ``bwd_time_rel``/``bwd_macs_rel`` (the rest of the iteration: backward and SGD update,
    against backward MACs). Sharing leaves the forward MACs unchanged (``fwd_macs_rel`` 1), but the
    shared prefix runs without autograd recording, so its time can drop."""
    if 0.0 not in measured:
        raise ValueError("measured: no share-0 (no sharing) measurement to take the ratios to")

    def parts(v):
        return (v["fwd_sec_per_iter"], v["sec_per_iter"] - v["fwd_sec_per_iter"], v["forward_macs_per_iter"],
                v["train_macs_per_iter"] - v["forward_macs_per_iter"])

    f0, b0, fm0, bm0 = parts(measured[0.0])
    out = {}
    for k, v in sorted(measured.items()):
        f, b, fm, bm = parts(v)
        out[k] = {"fwd_time_rel": round(f / f0, 4), "fwd_macs_rel": round(fm / fm0, 4),
                  "bwd_time_rel": round(b / b0, 4), "bwd_macs_rel": round(bm / bm0, 4)}
    return out


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


_REL_SERIES = (("train_macs_rel", "training MACs / iter (rel.)", "green", "^"),
               ("sec_per_iter_rel", "measured time / iter (rel.)", "purple", "v"),
               ("peak_mem_rel", "peak memory (rel.)", "brown", "D"))


def plot_sweep(rows: List[Dict], path, max_drop: float = 1.0, title: str = "") -> Path:
    """Accuracy vs sharing (paper Fig. 2b / 4): all-class test and validation accuracy against the
    shared fraction, the chosen configuration marked, and on a second axis every relative cost the
    rows have (training MACs, measured time per iteration, peak memory; ratios to no sharing)."""
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
    series = [(k, lab, c, mk) for k, lab, c, mk in _REL_SERIES if rows[0].get(k) is not None]
    if series:
        ax2 = ax.twinx()
        top = 1.05
        for k, lab, color, mk in series:
            ys = [r.get(k) for r in rows]
            ax2.plot(x, ys, color=color, marker=mk, lw=0.8, alpha=0.6, label=lab)
            top = max(top, 1.05 * max(v for v in ys if v is not None))
        ax2.set_ylabel("cost per training iteration (relative to no sharing)")
        ax2.set_ylim(0, top)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
    else:
        ax.legend(fontsize=7, loc="best")
    ax.grid(alpha=0.3)
    ax.set_title(title, fontsize=9)
    from filtersurgery.report.figures import save_figure

    return save_figure(fig, path)
