"""Kernel reactivation vs plain training, Weight Evolution and Filter Grafting (docs/method.md §5).

Fashion-MNIST, methods ``plain``, ``reactivation``, ``weight-evolution``,
``filter-grafting`` (``filtersurgery.methods.reactivation``), 3 seeds, test accuracy
mean ± std per method (and the paired difference to ``plain``: every method of a seed
starts from the same weights and sees the same batches), and peak memory per method
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: peak RSS of the worker process while
training, and its increase over the RSS at the start of training). Every (model, seed,
method) runs in its own process, so the memory numbers do not mix.

Full size (GPU; the paper's schedule: 200 epochs, reactivation every E = 10 epochs):
    python benchmarks/reactivation.py --models timm:resnet18 cifar:resnet32 --epochs 200 \\
        --period 10 --seeds 0 1 2 --out runs/bench_reactivation_full

CPU-small (36 min measured on 2 busy shared cores, ~20 min estimated idle; labelled as such in the output):
    python benchmarks/reactivation.py --cpu-small --out runs/bench_reactivation_cpu
    = cifar:resnet32 only, 1500 training images (+167 validation) of the 60k, 2000 test
      images (class-balanced), 5 epochs, reactivation / WE after epochs 2 and 4 (period 2:
      scaled down with the schedule, the paper uses 10 of 200 epochs), one torch thread
      per run.

Only re-print the table of finished runs: add ``--report``. Re-running resumes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

METHODS = ("plain", "reactivation", "weight-evolution", "filter-grafting")
CPU_SMALL = dict(models=["cifar:resnet32"], epochs=5, period=2, subset=1500, subset_test=2000, threads=1,
                 device="cpu")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu-small", action="store_true", help="the CPU-sized configuration (module docstring)")
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
    p.add_argument("--out", default=None, help="default runs/bench_reactivation[_cpu]")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one run, JSON spec
    args = p.parse_args(argv)
    if args.cpu_small:
        given = set(a.split("=")[0].lstrip("-").replace("-", "_") for a in (argv if argv is not None else sys.argv[1:])
                    if a.startswith("--"))
        for k, v in CPU_SMALL.items():
            if k not in given:
                setattr(args, k, v)
    args.out = Path(args.out or ("runs/bench_reactivation_cpu" if args.cpu_small else "runs/bench_reactivation"))
    return args


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def run_dir(args, model: str, method: str, seed: int) -> Path:
    return args.out / slug(model) / method / f"seed{seed}"


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


def launch(args, model: str, method: str, seed: int) -> None:
    spec = dict(model=model, method=method, seed=seed, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                subset=args.subset, subset_test=args.subset_test, device=args.device, threads=args.threads,
                data_root=args.data_root, out=str(run_dir(args, model, method, seed)),
                options=dict(alpha=args.alpha, beta=args.beta, gamma=args.gamma, period=args.period,
                             graft_period=args.graft_period))
    env = dict(os.environ)
    if args.threads:
        env.setdefault("OMP_NUM_THREADS", str(args.threads))
    subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], check=True, env=env)


# --------------------------------------------------------------------------- table
def _ms(v: List[float]) -> str:
    if not v:
        return "-"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{statistics.fmean(v):.2f} ± {sd:.2f}"


def collect(args) -> Dict:
    res: Dict = {}
    for model in args.models:
        for method in args.methods:
            rows = []
            for s in args.seeds:
                p = run_dir(args, model, method, s) / "metrics.json"
                if p.exists():
                    e = json.loads(p.read_text())["steps"][0]
                    rows.append({"seed": s, **{k: e[k] for k in ("test_acc", "val_acc", "seconds", "peak_mem_mb",
                                                                   "base_mem_mb", "mem_kind", "models_trained")}})
            res.setdefault(model, {})[method] = rows
    return res


def table(args, res: Dict) -> str:
    label = "CPU-small" if args.cpu_small else "full"
    n_train = f"{args.subset} training images" if args.subset else "all 54k training images"
    n_test = f"{args.subset_test} test images" if args.subset_test else "the 10k test images"
    lines = [f"Fashion-MNIST, {label} configuration: {n_train}, {n_test}, {args.epochs} epochs, batch "
             f"{args.batch_size}, lr {args.lr} cosine; alpha/beta/gamma = {args.alpha}/{args.beta}/{args.gamma}, "
             f"period E = {args.period} epochs (paper: 10 of 200), grafting every {args.graft_period} epoch(s); "
             f"seeds {' '.join(map(str, args.seeds))}.", ""]
    for model, by in res.items():
        plain = {r["seed"]: r["test_acc"] for r in by.get("plain", [])}
        kind = next((r["mem_kind"] for rows in by.values() for r in rows), "")
        lines += [f"**{model}** (memory: {kind})", "",
                  "| method | test acc (%) | Δ vs plain (paired) | val acc (%) | peak mem (MB) | mem over start (MB) | s / run | n |",
                  "|---|---|---|---|---|---|---|---|"]
        for method, rows in by.items():
            if not rows:
                lines.append(f"| {method} | - | - | - | - | - | - | 0 |")
                continue
            d = [r["test_acc"] - plain[r["seed"]] for r in rows if r["seed"] in plain] if method != "plain" else []
            over = [r["peak_mem_mb"] - r["base_mem_mb"] for r in rows if r["base_mem_mb"] is not None]
            over_cell = f"{statistics.fmean(over):.0f}" if over else "-"
            lines.append(
                f"| {method} | {_ms([r['test_acc'] for r in rows])} | {_ms(d) if d else '-'} | "
                f"{_ms([r['val_acc'] for r in rows])} | {statistics.fmean(r['peak_mem_mb'] for r in rows):.0f} | "
                f"{over_cell} | {statistics.fmean(r['seconds'] for r in rows):.0f} | {len(rows)} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv)
    if args.worker:
        worker(json.loads(args.worker))
        return 0
    if not args.report:
        t0 = time.time()
        for seed in args.seeds:  # seed-major: a cut-short run still has every method for the first seeds
            for model in args.models:
                for method in args.methods:
                    launch(args, model, method, seed)
        print(f"total {time.time() - t0:.0f}s")
    res = collect(args)
    text = table(args, res)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.md").write_text(text + "\n")
    (args.out / "results.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                        "results": res}, indent=2))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
