"""Paper-Table-7-style benchmark: multi-step (1:1:1:1) or single-step (1:1) on Fashion-MNIST.

Methods: finetune (lr 1e-3), finetune (lr 1e-2), bst, dml, lwm, framework, joint, plus the
equal-compute controls (finetune lr 1e-2 and joint with 3x the epochs) and, with
``--ablation``, framework variants (no MSL, no teacher update, one student, at_weight 1,
SST at lr 1e-2 instead of the paper's 0.1).
Step 1 (training Data1 from scratch) is identical for every method of a seed, so it is
trained once per seed and shared.

Full size (GPU):
    python benchmarks/multistep.py --epochs 30 --seeds 0 1 2 --out runs/bench_multi
CPU-sized (labelled as such in the output):
    python benchmarks/multistep.py --cpu-small --out runs/bench_multi_cpu
Only re-print the table of finished runs:
    python benchmarks/multistep.py --out runs/bench_multi --report
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from filtersurgery.data import load_dataset
from filtersurgery.report import accuracy_per_step, markdown_table
from filtersurgery.train import TrainConfig, multi_step

# name -> TrainConfig overrides (epochs multiplier via "_x")
VARIANTS = {
    "finetune(1e-3)": dict(method="finetune", lr=1e-3),
    "finetune(1e-2)": dict(method="finetune", lr=1e-2),
    "bst": dict(method="bst"),
    "dml": dict(method="dml"),
    "lwm": dict(method="lwm"),
    "framework": dict(method="framework"),
    "joint": dict(method="joint"),
    "finetune(1e-2) 3x epochs": dict(method="finetune", lr=1e-2, _x=3),
    "joint 3x epochs": dict(method="joint", _x=3),
}
ABLATIONS = {
    "framework no-MSL": dict(method="framework", msl=False),
    "framework no-teacher-update": dict(method="framework", teacher_update=False),
    "framework 1 student": dict(method="framework", students=1),
    "framework at_weight=1": dict(method="framework", at_weight=1.0),
    "framework sst_lr=1e-2": dict(method="framework", sst_lr=1e-2),
    "framework lr=1e-2": dict(method="framework", lr=1e-2),
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def run_parallel(argv, args, variants) -> None:
    """Run step 1 per seed, then every (seed, variant) as its own process, ``--jobs`` at a time."""
    import subprocess
    from concurrent.futures import ThreadPoolExecutor

    def strip(a, flags):
        out, skip = [], False
        for x in a:
            if skip and not x.startswith("--"):
                continue
            skip = x in flags
            if not skip:
                out.append(x)
        return out

    rest = strip(list(argv), {"--jobs", "--seeds", "--methods", "--ablation"})
    me = [sys.executable, __file__] + rest

    def job(seed, names):
        cmd = me + ["--seeds", str(seed), "--methods", *names]
        r = subprocess.run(cmd, capture_output=True, text=True)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        print(f"seed {seed} {names}: exit {r.returncode}: " + " | ".join(tail), flush=True)
        return r.returncode

    names = list(variants)
    with ThreadPoolExecutor(args.jobs) as ex:  # step 1 per seed first (shared by every method)
        list(ex.map(lambda s: job(s, names[:1]), args.seeds))
    with ThreadPoolExecutor(args.jobs) as ex:
        codes = list(ex.map(lambda sn: job(*sn), [(s, [n]) for s in args.seeds for n in names[1:]]))
    if any(codes):
        print(f"{sum(1 for c in codes if c)} jobs failed", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:resnet18")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", choices=["single", "multi"], default="multi")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="+", default=None, help="subset of variant names (default all)")
    p.add_argument("--ablation", action="store_true", help="also run the framework ablations")
    p.add_argument("--cpu-small", action="store_true", help="CPU-sized configuration (few epochs, subset)")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("--no-report", dest="table", action="store_false",
                   help="train only: no table, plot or table.md (for many processes writing into one --out)")
    p.add_argument("--step1-only", action="store_true", help="only train the shared step-1 models of --seeds")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on a fixed class-balanced subset of N test images (smoke runs only)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPUs)")
    p.add_argument("--state-every", type=float, default=0.0,
                   help="write the resumable state at most every N seconds (default 0: after every epoch)")
    p.add_argument("--jobs", type=int, default=1,
                   help="run (seed, method) pairs as this many parallel processes (small models leave a GPU idle)")
    p.add_argument("--out", default="runs/bench_multistep")
    args = p.parse_args(argv)
    if args.cpu_small:
        # 2-core CPU, under an hour for 3 seeds: 500 images per part, 3 epochs per phase,
        # the 3x-epoch joint control (the costliest line) only when asked by --methods;
        # everything else as the full run
        args.epochs, args.subset, args.batch_size = min(args.epochs, 3), args.subset or 500, 64
        args.device = "cpu" if args.device == "auto" else args.device
    default = {k: v for k, v in VARIANTS.items() if not (args.cpu_small and k == "joint 3x epochs")}
    variants = dict(default, **(ABLATIONS if args.ablation else {}))
    if args.methods:
        known = dict(VARIANTS, **ABLATIONS)
        unknown = [m for m in args.methods if m not in known]
        if unknown:
            p.error(f"--methods: unknown {unknown}; choose from {list(known)}")
        variants = {k: known[k] for k in args.methods}
    out = Path(args.out)
    steps = 2 if args.split == "single" else 4
    base = TrainConfig(model=args.model, data=args.data, data_root=args.data_root, split=args.split, steps=steps,
                       epochs=args.epochs, subset=args.subset, batch_size=args.batch_size, device=args.device,
                       progress=False, channels_last=args.channels_last, state_every=args.state_every)
    if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()):
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick the fastest kernels
    if not args.report and args.jobs > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], args, variants)
    elif not args.report:
        data = load_dataset(args.data, root=args.data_root, subset_test=args.test_subset)
        for seed in args.seeds:
            # step 1 (Data1 from scratch) is the same for every method: train it once per seed
            step1_dir = out / "_step1" / f"seed{seed}"
            multi_step(replace(base, method="finetune"), step1_dir, seed=seed, data=data, until_step=1)
            for name, ov in ({} if args.step1_only else variants).items():
                ov = dict(ov)
                x = ov.pop("_x", 1)
                cfg = replace(base, epochs=base.epochs * x, **ov)
                t0 = time.time()
                multi_step(cfg, out / slug(name) / f"seed{seed}", seed=seed, data=data,
                           step1_from=str(step1_dir / "step1.safetensors"))
                print(f"[{time.time() - t0:7.1f}s] seed {seed} {name} done", flush=True)

    if not args.table or args.step1_only:
        return 0
    results, cost = {}, {}
    for name in variants:
        rows = {}
        for seed in args.seeds:
            mp = out / slug(name) / f"seed{seed}" / "metrics.json"
            if not mp.exists():
                continue
            for e in json.loads(mp.read_text())["steps"]:
                rows.setdefault(e["step"], []).append(e)
        if not rows:
            continue
        results[name] = [
            {"step": k, "test_acc_mean": statistics.fmean(e["test_acc"] for e in v),
             "test_acc_std": statistics.stdev([e["test_acc"] for e in v]) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in sorted(rows.items())
        ]
        cost[name] = {k: (statistics.fmean(e["seconds"] for e in v), statistics.fmean(e.get("train_flops", 0) for e in v))
                      for k, v in rows.items()}
    label = "CPU-sized configuration" if args.cpu_small else "full size"
    print(f"\n## {args.split}-step, {args.model}, {args.data}, {args.epochs} epochs/phase, seeds {args.seeds} ({label})\n")
    print("Test accuracy (%), mean ± std over seeds:\n")
    print(markdown_table(results))
    print("\nCost per step: wall-clock seconds / training TFLOPs (step 1 is shared and trained once per seed):\n")
    steps_all = sorted({k for c in cost.values() for k in c})
    print("| method | " + " | ".join(f"step {s}" for s in steps_all) + " |")
    print("|" + "---|" * (len(steps_all) + 1))
    for name, c in cost.items():
        cells = [f"{c[s][0]:.0f}s / {c[s][1] / 1e12:.2f}" if s in c else "" for s in steps_all]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if results:
        png = accuracy_per_step(results, out / "accuracy.png")
        (out / "table.md").write_text(markdown_table(results) + "\n")
        print(f"\nplot: {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
