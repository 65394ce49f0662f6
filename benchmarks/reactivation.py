"""Kernel reactivation vs plain training, Weight Evolution and Filter Grafting (docs/method.md §5).

Fashion-MNIST, methods ``plain``, ``reactivation``, ``weight-evolution``,
``filter-grafting`` (``filtersurgery.methods.reactivation``), 3 seeds, test accuracy
mean ± std per method (and the paired difference to ``plain``: every method of a seed
starts from the same weights and sees the same batches), and peak memory per method
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS of the worker process while
training, and its increase over the RSS at the start of training). Every (model, seed,
method) runs in its own process, so the memory numbers do not mix. Also reported: seconds per
epoch, the last epoch's train loss and the validation accuracy gained over the last 20% of epochs
(convergence), reactivation's (gamma, E) chosen on validation (``--select-gammas``,
``--select-periods``), and per epoch the fraction of filters meeting C1∧C2 and of kernels meeting C3
(``fractions.csv``, every run; a table of plain vs reactivation in ``results.md``).

Full size (GPU; the paper's schedule: 200 epochs, reactivation every E = 10 epochs):
    python benchmarks/reactivation.py --models timm:resnet18 cifar:resnet32 --epochs 200 \\
        --period 10 --seeds 0 1 2 --out runs/bench_reactivation_full

CPU-small (36 min measured on 2 busy shared cores, ~20 min estimated idle; labelled as such in the output):
    python benchmarks/reactivation.py --cpu-small --out runs/bench_reactivation_cpu
    = cifar:resnet32 only, 1500 training images (+167 validation) of the 60k, 2000 test
      images (class-balanced), 5 epochs, reactivation / WE after epochs 2 and 4 (period 2:
      scaled down with the schedule, the paper uses 10 of 200 epochs), one torch thread
      per run.

CPU-claim (CPU-sized, labelled as such in the output; the configuration that can test the claim on 2 cores):
    python benchmarks/reactivation.py --cpu-claim --out runs/bench_reactivation_claim
    = cifar:resnet32, 2000 training images (+222 validation) of the 60k, the 10k test images, 25 epochs
      of cosine lr from 0.1 (to 0: the last epochs' train loss and validation gain show convergence),
      batch 128, alpha/beta 0.2/0.3, WE every E = 2 epochs (the paper's 10 of 200, scaled), reactivation's
      gamma chosen among {0.1 (the paper's), 0.3} at E = 2 on seed 0's validation accuracy (test
      accuracy never looked at); the other seeds then run with the choice. 2 runs at a time, 1 torch
      thread each. Per run and epoch ``epochs.csv`` logs the fraction of filters meeting C1∧C2 and of
      kernels meeting C3 for every method (``invalid_fractions``); the output tables them, gives time per
      epoch and peak memory, and says so when reactivation had nothing to reactivate.
    Estimate: ~44 min on 2 idle cores (at most ~50 with the two runs contending for memory bandwidth).
    Basis: a timed tiny run (plain + reactivation, 2000 images, 2 epochs, 2 at a time, on cores shared
    with a 2-process job, load average 2.7-3.8): 24.5 s wall per epoch at ~0.5 core per run, i.e. 12
    CPU-s per epoch, and ~39 CPU-s per run outside the epochs (start-up, data, the 10k test images);
    16 model-trainings (plain, WE, 2 reactivation candidates on seed 0 + 2 more seeds, filter grafting
    counting twice) x 25 epochs x 12 s + 13 runs x 39 s = 5300 CPU-s, over 2 cores = 2650 s.

Only re-print the table of finished runs: add ``--report``. Re-running resumes: finished runs are
read back, an interrupted one continues from its last finished epoch, and the choice of gamma is
recomputed from the finished candidate runs.
"""
from __future__ import annotations

import argparse
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List, Optional, Tuple

METHODS = ("plain", "reactivation", "weight-evolution", "filter-grafting")
CPU_SMALL = dict(models=["cifar:resnet32"], epochs=5, period=2, subset=1500, subset_test=2000, threads=1,
                 device="cpu")
# sized from a timed tiny run (module docstring): 3 seeds + the 4-candidate choice <= 60 min on 2 idle cores
CPU_CLAIM = dict(models=["cifar:resnet32"], epochs=25, period=2, subset=2000, subset_test=None, threads=1,
                 device="cpu", jobs=2, select_gammas=[0.1, 0.3], select_periods=[2])
PRESETS = {"cpu_small": CPU_SMALL, "cpu_claim": CPU_CLAIM}


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-small", action="store_true", help="a CPU-sized pipeline check (module docstring)")
    p.add_argument("--cpu-claim", action="store_true",
                   help="the CPU-sized configuration that tests the claim: converged runs, gamma/E chosen on "
                        "validation (module docstring)")
    p.add_argument("--models", nargs="+", default=["timm:resnet18", "cifar:resnet32"])
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--period", type=int, default=10, help="reactivation / WE every E epochs (default %(default)s)")
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.3)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--graft-period", type=int, default=1)
    p.add_argument("--subset", type=int, default=None, help="training images (default: all 54k after the val split)")
    p.add_argument("--subset-test", type=int, default=None, help="class-balanced test subset (default: all 10k)")
    p.add_argument("--batch-size", type=int, default=128, help="(default %(default)s, the paper's)")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run (default: torch's)")
    p.add_argument("--data-root", default=None)
    p.add_argument("--select-gammas", type=float, nargs="+", default=None,
                   help="reactivation: gamma candidates, chosen on validation (default: --gamma only)")
    p.add_argument("--select-periods", type=int, nargs="+", default=None,
                   help="reactivation: period candidates, chosen on validation (default: --period only)")
    p.add_argument("--select-seed", type=int, default=None,
                   help="the seed whose validation accuracy chooses gamma/E (default: the first of --seeds)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel, each in its own process (default 1)")
    p.add_argument("--out", default=None, help="default runs/bench_reactivation[_cpu|_claim]")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON spec
    args = p.parse_args(argv)
    if args.cpu_small and args.cpu_claim:
        p.error("--cpu-small, --cpu-claim: choose one")
    given = set(a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                if a.startswith("--"))
    for name, preset in PRESETS.items():
        if getattr(args, name):
            for k, v in preset.items():
                if k not in given:
                    setattr(args, k, v)
    if args.jobs < 1:
        p.error(f"--jobs: must be >= 1, got {args.jobs}")
    args.select_seed = args.seeds[0] if args.select_seed is None else args.select_seed
    default = ("runs/bench_reactivation_cpu" if args.cpu_small else
               "runs/bench_reactivation_claim" if args.cpu_claim else "runs/bench_reactivation")
    args.out = Path(args.out or default)
    return args


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def run_dir(args, model: str, method: str, seed: int, cand: Optional[Tuple[float, int]] = None) -> Path:
    """``OUT/MODEL/METHOD/seedS``; reactivation: ``OUT/MODEL/reactivation/g{gamma}_E{period}/seedS``."""
    if method == "reactivation":
        g, e = cand if cand is not None else (args.gamma, args.period)
        return args.out / slug(model) / method / f"g{g:g}_E{e}" / f"seed{seed}"
    return args.out / slug(model) / method / f"seed{seed}"


def candidates(args) -> List[Tuple[float, int]]:
    """Reactivation's ``(gamma, period)`` candidates, ``(--gamma, --period)`` first when among them (ties go
    to it in :func:`choose_on_validation`)."""
    grid = list(itertools.product(args.select_gammas or [args.gamma], args.select_periods or [args.period]))
    for g, e in grid:
        if not 0.0 <= g <= 1.0 or e < 1:
            raise ValueError(f"select-gammas/select-periods: need gamma in [0, 1] and period >= 1, got {(g, e)}")
    first = (args.gamma, args.period)
    return ([first] if first in grid else []) + [c for c in grid if c != first]


def _metrics(d: Path) -> Optional[Dict]:
    p = d / "metrics.json"
    return json.loads(p.read_text())["steps"][0] if p.exists() else None


def choose(args, model: str) -> Tuple[Optional[Tuple[float, int]], List[Dict]]:
    """The candidate with the best validation accuracy on ``--select-seed`` (test accuracy never looked at),
    or None while a candidate run is unfinished; and one row per candidate."""
    from filtersurgery.methods.reactivation import choose_on_validation

    rows, pairs = [], []
    for c in candidates(args):
        e = _metrics(run_dir(args, model, "reactivation", args.select_seed, c))
        rows.append({"gamma": c[0], "period": c[1], "val_acc": None if e is None else e["val_acc"]})
        if e is not None:
            pairs.append((c, [e["val_acc"]]))
    if len(pairs) < len(rows):
        return None, rows
    best, _ = choose_on_validation(pairs)
    for r in rows:
        r["chosen"] = (r["gamma"], r["period"]) == best
    return best, rows


# --------------------------------------------------------------------------- one run (own process)
def worker(spec: Dict) -> None:
    import torch

    from filtersurgery.data import load_dataset
    from filtersurgery.methods.reactivation import ReactivationMethodConfig, run_method
    from filtersurgery.engine.config import TrainConfig

    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    data = load_dataset("fashion-mnist", root=spec["data_root"], subset_test=spec["subset_test"])
    cfg = TrainConfig(model=spec["model"], data="fashion-mnist", method=spec["method"], epochs=spec["epochs"],
                      batch_size=spec["batch_size"], lr=spec["lr"], subset=spec["subset"], device=spec["device"],
                      progress=False)
    opts = ReactivationMethodConfig(**spec["options"])
    m = run_method(cfg, opts, Path(spec["out"]), spec["seed"], data)
    e = m["steps"][0]
    print(f"{spec['model']} {spec['method']} seed {spec['seed']}: test {e['test_acc']:.2f}%  "
          f"val {e['val_acc']:.2f}%  peak {e['peak_mem_mb']:.0f} MB  {e['seconds']:.0f}s", flush=True)


def launch(args, model: str, method: str, seed: int, cand: Optional[Tuple[float, int]] = None) -> None:
    """One run in its own process (its peak memory is its own); ``cand``: reactivation's ``(gamma, period)``."""
    g, e = cand if cand is not None else (args.gamma, args.period)
    spec = dict(model=model, method=method, seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                subset=args.subset, subset_test=args.subset_test, device=args.device, threads=args.threads,
                data_root=args.data_root, out=str(run_dir(args, model, method, seed, cand)),
                options=dict(alpha=args.alpha, beta=args.beta, gamma=g if method == "reactivation" else args.gamma,
                             period=e if method == "reactivation" else args.period, graft_period=args.graft_period))
    env = dict(os.environ)
    if args.threads:
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True, env=env)


def run_all(args) -> int:
    """Every run, ``--jobs`` at a time: reactivation's candidates on ``--select-seed`` first, then the other
    methods (longest first), then reactivation's other seeds with the candidate chosen on validation.
    Finished runs return at once, so re-running resumes. Returns the number of failed runs."""
    failed = 0

    def wait(futs) -> None:
        nonlocal failed
        for f in as_completed(futs):
            try:
                f.result()
            except (subprocess.CalledProcessError, OSError) as e:  # report the failed run, keep the others
                failed += 1
                print(f"{futs[f]}: FAILED: {e}", flush=True)

    others = [m for m in ("filter-grafting", "plain", "weight-evolution") if m in args.methods]
    with ThreadPoolExecutor(max_workers=args.jobs) as ex:
        sel, rest = {}, {}
        for model in args.models:
            if "reactivation" in args.methods:
                for c in candidates(args):
                    sel[ex.submit(launch, args, model, "reactivation", args.select_seed, c)] = (model, c)
        for seed in args.seeds:
            for model in args.models:
                for method in others:
                    rest[ex.submit(launch, args, model, method, seed)] = (model, method, seed)
        wait(sel)
        for model in (args.models if "reactivation" in args.methods else []):
            best, _ = choose(args, model)
            if best is None:
                continue
            for seed in args.seeds:
                if seed != args.select_seed:
                    rest[ex.submit(launch, args, model, "reactivation", seed, best)] = (model, "reactivation", seed)
        wait(rest)
    return failed


# --------------------------------------------------------------------------- table
def _ms(v: List[float]) -> str:
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.2f} ± {sd:.2f}"


def epoch_rows(d: Path) -> List[Dict]:
    """``epochs.csv`` of a run as dicts (``extra`` merged in), one per epoch (a re-logged epoch: the last row)."""
    p = d / "epochs.csv"
    if not p.exists():
        return []
    by: Dict[int, Dict] = {}
    with open(p, newline="") as f:
        for r in csv.DictReader(f):
            extra = json.loads(r.get("extra") or "{}")
            by[int(r["epoch"])] = {"epoch": int(r["epoch"]), "lr": float(r["lr"]), "train_loss": float(r["train_loss"]),
                                   "val_acc": float(r["val_acc0"]) if r.get("val_acc0") else None,
                                   "seconds": float(r["seconds"]), **extra}
    return [by[e] for e in sorted(by)]


KEYS = ("test_acc", "val_acc", "seconds", "peak_mem_mb", "base_mem_mb", "mem_kind", "models_trained")


def _run_row(d: Path, seed: int) -> Optional[Dict]:
    """A finished run's metrics, its mean seconds per epoch, last-epoch train loss (per network: filter
    grafting logs the sum over its two), the validation accuracy it gained over its last 20% of epochs
    (about 0 once converged) and its per-epoch log."""
    e = _metrics(d)
    if e is None:
        return None
    log = epoch_rows(d)
    late = log[max(0, round(0.8 * len(log)) - 1)] if log else None
    gain = log[-1]["val_acc"] - late["val_acc"] if log and None not in (log[-1]["val_acc"], late["val_acc"]) else None
    return {"seed": seed, **{k: e[k] for k in KEYS},
            "s_per_epoch": statistics.fmean(r["seconds"] for r in log) if log else None,
            "last_train_loss": log[-1]["train_loss"] / e["models_trained"] if log else None,
            "late_val_gain": gain, "log": log}


def collect(args) -> Dict:
    """``{model: {"methods": {method: [run rows]}, "chosen": (gamma, E) | None, "selection": [rows]}}``."""
    res: Dict = {}
    for model in args.models:
        chosen, sel = choose(args, model) if "reactivation" in args.methods else (None, [])
        by: Dict = {}
        for method in args.methods:
            if method == "reactivation" and chosen is None:
                by[method] = []
                continue
            rows = [_run_row(run_dir(args, model, method, s, chosen), s) for s in args.seeds]
            by[method] = [r for r in rows if r is not None]
        res[model] = {"methods": by, "chosen": chosen, "selection": sel}
    return res


def _mean(v) -> Optional[float]:
    v = [x for x in v if x is not None]
    return statistics.fmean(v) if v else None


def _f(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def fraction_table(args, by: Dict) -> List[str]:
    """Per epoch (every ``max(1, epochs // 10)``-th and the last; mean over seeds): the C1∧C2 filter and C3
    kernel fractions of plain training and reactivation, reactivation's median ratio and rescaled kernels."""
    step = max(1, args.epochs // 10)
    epochs = sorted(set(range(step, args.epochs + 1, step)) | {1, args.epochs})
    logs = {m: [{r["epoch"]: r for r in run["log"]} for run in by.get(m, [])] for m in ("plain", "reactivation")}

    def cell(m, e, k, fmt, scale=1.0):
        v = _mean([lg[e].get(k) for lg in logs[m] if e in lg])
        return _f(None if v is None else scale * v, fmt)

    lines = ["| epoch | lr | plain: C1∧C2 filters (%) | plain: C3 kernels (%) | reactivation: C1∧C2 filters (%) | "
             "reactivation: C3 kernels (%) | median rescale ratio | kernels rescaled |", "|---|---|---|---|---|---|---|---|"]
    for e in epochs:
        lr = _mean([lg[e]["lr"] for m in logs for lg in logs[m] if e in lg])
        pct = [cell(m, e, k, "{:.2f}", 100.0) for m in ("plain", "reactivation") for k in ("frac_c1c2", "frac_c3")]
        lines.append(f"| {e} | {_f(lr, '{:.4f}')} | {' | '.join(pct)} | "
                     f"{cell('reactivation', e, 'ratio_c3_median', '{:.2f}')} | "
                     f"{cell('reactivation', e, 'react_kernels', '{:.0f}')} |")
    return lines


def verdict(by: Dict) -> str:
    """One line: did reactivation find anything to reactivate?"""
    runs = by.get("reactivation", [])
    if not runs:
        return "Reactivation: no finished run yet."
    if not any("react_kernels" in r for run in runs for r in run["log"]):
        return "Reactivation **never ran**: no reactivation epoch before the last (E >= epochs)."
    total = sum(r.get("react_kernels", 0) for run in runs for r in run["log"])
    if total == 0:
        return ("Reactivation had **nothing to do**: no kernel met C1∧C2∧C3 at any reactivation epoch, "
                "so it trained exactly as plain training.")
    ratios = [r["ratio_c3_median"] for run in runs for r in run["log"] if r.get("react_kernels")]
    return (f"Reactivation rescaled {total / len(runs):.0f} kernels per run on average (median of the per-epoch "
            f"median rescale ratios {statistics.median(ratios):.2f}).")


def table(args, res: Dict) -> str:
    label = ("CPU-claim configuration (CPU-sized, not the paper's scale)" if args.cpu_claim else
             "CPU-small configuration (CPU-sized pipeline check)" if args.cpu_small else "full configuration")
    n_train = f"{args.subset} training images" if args.subset else "all 54k training images"
    n_test = f"{args.subset_test} test images" if args.subset_test else "the 10k test images"
    grid = candidates(args)
    lines = [f"Fashion-MNIST, {label}: {n_train} (+{round(args.subset / 9) if args.subset else '6k'} validation), "
             f"{n_test}, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr} cosine; alpha/beta = "
             f"{args.alpha}/{args.beta}; reactivation (gamma, E) chosen on validation of seed {args.select_seed} among "
             f"{', '.join(f'({g:g}, {e})' for g, e in grid)}; WE every {args.period} epochs; grafting every "
             f"{args.graft_period} epoch(s); seeds {' '.join(map(str, args.seeds))}; {args.jobs} run(s) at a time.", ""]
    for model, r in res.items():
        by = r["methods"]
        plain = {x["seed"]: x["test_acc"] for x in by.get("plain", [])}
        kind = next((x["mem_kind"] for rows in by.values() for x in rows), "")
        lines += [f"**{model}** (memory: {kind})", "",
                  "| method | gamma / E | test acc (%) | Δ vs plain (paired) | val acc (%) | last-epoch train loss | "
                  "val gain, last 20% of epochs | peak mem (MB) | mem over start (MB) | s / epoch | n |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for method, rows in by.items():
            opts = (f"{r['chosen'][0]:g} / {r['chosen'][1]}" if r["chosen"] else "-") if method == "reactivation" else (
                f"- / {args.period}" if method == "weight-evolution" else "-")
            if not rows:
                lines.append(f"| {method} | {opts} | - | - | - | - | - | - | - | - | 0 |")
                continue
            d = [x["test_acc"] - plain[x["seed"]] for x in rows if x["seed"] in plain] if method != "plain" else []
            over = [x["peak_mem_mb"] - x["base_mem_mb"] for x in rows if x["base_mem_mb"] is not None]
            lines.append(
                f"| {method} | {opts} | {_ms([x['test_acc'] for x in rows])} | {_ms(d) if d else '-'} | "
                f"{_ms([x['val_acc'] for x in rows])} | {_f(_mean(x['last_train_loss'] for x in rows), '{:.4f}')} | "
                f"{_f(_mean(x['late_val_gain'] for x in rows), '{:+.2f}')} | "
                f"{statistics.fmean(x['peak_mem_mb'] for x in rows):.0f} | {_f(_mean(over), '{:.0f}')} | "
                f"{_f(_mean(x['s_per_epoch'] for x in rows), '{:.1f}')} | {len(rows)} |")
        if r["selection"]:
            lines += ["", f"Reactivation's (gamma, E), chosen on the validation accuracy of seed {args.select_seed} "
                      "(test accuracy not used):", "", "| gamma | E | val acc (%) | chosen |", "|---|---|---|---|"]
            lines += [f"| {x['gamma']:g} | {x['period']} | {_f(x['val_acc'])} | {'yes' if x.get('chosen') else ''} |"
                      for x in r["selection"]]
        lines += ["", "Filters meeting C1∧C2 and kernels meeting C3 (at the epoch's gamma_t), measured after every "
                  "epoch before the method's operation (mean over seeds):", ""] + fraction_table(args, by)
        lines += ["", verdict(by), ""]
    return "\n".join(lines)


def write_fractions(args, res: Dict, path: Path) -> None:
    """Every run's per-epoch log of :func:`~filtersurgery.methods.reactivation.invalid_fractions` as CSV."""
    keys = ("lr", "train_loss", "seconds", "frac_c1c2", "frac_c3", "ratio_c3_median", "react_kernels")
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(("model", "method", "seed", "epoch") + keys)
        for model, r in res.items():
            for method, rows in r["methods"].items():
                for x in rows:
                    for e in x["log"]:
                        w.writerow((model, method, x["seed"], e["epoch"]) + tuple(e.get(k, "") for k in keys))


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if not args.report:
        t0 = time.time()
        failed = run_all(args)
        print(f"total {time.time() - t0:.0f}s ({failed} failed)")
    res = collect(args)
    text = table(args, res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    write_fractions(args, res, args.out / "fractions.csv")
    slim = {m: {**r, "methods": {k: [{kk: vv for kk, vv in x.items() if kk != "log"} for x in rows]
                                 for k, rows in r["methods"].items()}} for m, r in res.items()}
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "results": slim}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
