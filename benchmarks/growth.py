"""Incremental growth with look-ahead vs random init vs regular training (docs/method.md §7) on Fashion-MNIST.

For each model (timm resnet18 with in_chans=1, the CIFAR-style ResNet-32) and seed:

- ``regular``:   the full network from scratch for ``--epochs`` epochs (same loop, optimizer and
                 constant learning rate as growth; no termination rule),
- ``lookahead``: growth S1 -> S1+S2 -> ...; each new sub-network is first trained for
                 ``--lookahead-epochs`` with the earlier ones frozen, then everything is trained
                 until the termination rule fires (or ``--epochs``),
- ``random``:    the same growth without look-ahead,
- ``regular-eqflops`` (``--equal-flops``): regular training for as many epochs as cost the
                 look-ahead run's training FLOPs (an equal-compute control).

Reported: final test accuracy (mean ± std over seeds), cumulative training FLOPs (forward +
backward of the training steps, counted with ``torch.utils.flop_counter``; validation passes
not counted) and its ratio to regular training, epochs, and per stage the inference FLOPs,
parameters, width and the accuracy reached when the stage ended. The paper's claim, for
reference: look-ahead reaches regular training's accuracy, random init is a few points
lower, with fewer training FLOPs.

Full size (GPU, the whole Fashion-MNIST training set, 10% of it for validation):
    python benchmarks/growth.py --epochs 30 --window 3 --lookahead-epochs 2 --seeds 0 1 2 \\
        --device cuda --out runs/bench_growth
CPU-sized (2 shared cores: 29 min measured at load average ~6, less on idle cores; labelled as such):
    python benchmarks/growth.py --cpu-small --out runs/bench_growth_cpu
Add the equal-compute control (regular training with the look-ahead run's FLOPs; +11 min):
    python benchmarks/growth.py --cpu-small --equal-flops --out runs/bench_growth_cpu
Only re-print the table of finished runs:
    python benchmarks/growth.py --cpu-small --out runs/bench_growth_cpu --report
Every run is resumable: re-running the same command continues where it stopped.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Dict, List

MODELS = ("timm:resnet18", "cifar:resnet32")
VARIANTS = ("regular", "lookahead", "random")
EQ = "regular-eqflops"  # --equal-flops: regular training with the look-ahead run's training FLOPs
# lr 0.02: the trainer's 0.1 is for batch 256; linear scaling to batch 40 gives 0.016 (not tuned)
CPU_SMALL = dict(subset=400, subset_test=1000, batch_size=40, lr=0.02, epochs=6, window=2, lookahead_epochs=1,
                 device="cpu", threads=1, jobs=2)


def slug(s: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in s).strip("_")


def run_dir(out: Path, model: str, variant: str, seed: int) -> Path:
    return out / slug(model) / variant / f"seed{seed}"


def _eq_epochs(out: Path, model: str, seed: int) -> int:
    """Epochs of regular training that cost the training FLOPs of the look-ahead growth run."""
    reg = json.loads((run_dir(out, model, "regular", seed) / "metrics.json").read_text())["steps"][0]
    look = json.loads((run_dir(out, model, "lookahead", seed) / "metrics.json").read_text())["steps"][0]
    return max(1, round(look["train_flops"] / (reg["train_flops"] / reg["epochs"])))


def _job(a: Dict, model: str, variant: str, seed: int) -> str:
    """One (model, variant, seed) run, in a worker process; returns a one-line summary."""
    import torch

    from filtersurgery.data import load_dataset
    from filtersurgery.methods.growth import GrowthConfig, run_growth
    from filtersurgery.engine.config import TrainConfig

    if a["threads"]:
        torch.set_num_threads(a["threads"])
    data = load_dataset("fashion-mnist", root=a["data_root"], subset_test=a["subset_test"])
    epochs = _eq_epochs(Path(a["out"]), model, seed) if variant == EQ else a["epochs"]
    cfg = TrainConfig(model=model, data="fashion-mnist", method="growth", epochs=epochs,
                      batch_size=a["batch_size"], subset=a["subset"], lr=a["lr"], device=a["device"],
                      progress=False)
    g = GrowthConfig(window=a["window"], gamma=a["gamma"], lookahead_epochs=a["lookahead_epochs"],
                     init="random" if variant == "random" else "lookahead", regular=variant in ("regular", EQ))
    t0 = time.time()
    m = run_growth(cfg, g, run_dir(Path(a["out"]), model, variant, seed), seed=seed, data=data)
    e = m["steps"][0]
    return (f"{model} {variant} seed {seed}: test {e['test_acc']:.2f}%  epochs {e['epochs']}  "
            f"train {e['train_flops'] / 1e12:.3f} TFLOP  ({time.time() - t0:.0f}s)")


# --------------------------------------------------------------------------- report
def _ms(v: List[float], fmt: str = "{:.2f}") -> str:
    if not v:
        return "n/a"
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{fmt.format(statistics.fmean(v))} ± {fmt.format(sd)}"


def collect(out: Path, models, seeds) -> Dict:
    res: Dict = {}
    for model in models:
        for v in VARIANTS + (EQ,):
            for s in seeds:
                p = run_dir(out, model, v, s) / "metrics.json"
                if p.exists():
                    res.setdefault(model, {}).setdefault(v, []).append(json.loads(p.read_text())["steps"][0])
    return res


def report(out: Path, models, seeds, label: str) -> str:
    res = collect(out, models, seeds)
    lines = [f"# Incremental growth vs regular training — {label}", ""]
    for model in models:
        runs = res.get(model, {})
        if not runs:
            continue
        reg_flops = statistics.fmean(e["train_flops"] for e in runs["regular"]) if runs.get("regular") else None
        lines += [f"## {model}", "",
                  "| method | test acc (%) | train FLOPs (T) | vs regular | epochs (all stages) | seeds |",
                  "|---|---|---|---|---|---|"]
        for v in VARIANTS + (EQ,):
            es = runs.get(v, [])
            if not es:
                continue
            fl = [e["train_flops"] / 1e12 for e in es]
            rel = f"{statistics.fmean(e['train_flops'] for e in es) / reg_flops:.2f}x" if reg_flops else "n/a"
            lines.append(f"| {v} | {_ms([e['test_acc'] for e in es])} | {_ms(fl, '{:.3f}')} | {rel} | "
                         f"{_ms([e['epochs'] for e in es], '{:.1f}')} | {len(es)} |")
        lines += ["", "Per stage (growth runs; accuracy when the stage ended and its epochs without look-ahead, "
                  "mean ± std over seeds):", "",
                  "| stage | width | params | inference MFLOPs/img | lookahead: val / test acc, epochs | "
                  "random: val / test acc, epochs |", "|---|---|---|---|---|---|"]
        ref = (runs.get("lookahead") or runs.get("random") or [None])[0]
        if ref is not None:
            for i, st in enumerate(ref["stages"]):
                cells = []
                for v in ("lookahead", "random"):
                    ss = [e["stages"][i] for e in runs.get(v, []) if len(e["stages"]) > i]
                    cells.append(f"{_ms([s['val_acc'] for s in ss])} / {_ms([s['test_acc'] for s in ss])}, "
                                 f"{_ms([s['epochs'] for s in ss], '{:.1f}')}" if ss else "n/a")
                name = "S1" if st["k"] == 1 else f"S1..S{st['k']}"
                lines.append(f"| {name} | {st['width']} | {st['params'] / 1e6:.3f}M | "
                             f"{st['inference_flops'] / 1e6:.1f} | {cells[0]} | {cells[1]} |")
        lines.append("")
    return "\n".join(lines)


def plot(out: Path, models, seed: int) -> None:
    """Validation accuracy vs cumulative training FLOPs (paper Fig. 3, third row), one seed."""
    import csv

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models):
        for v in VARIANTS + (EQ,):
            p = run_dir(out, model, v, seed) / "epochs.csv"
            if not p.exists():
                continue
            rows = [r for r in csv.DictReader(open(p)) if r.get("phase") == "train"]
            ax.plot([int(r["train_flops"]) / 1e12 for r in rows], [float(r["val_acc"]) for r in rows], marker=".", label=v)
        ax.set_title(f"{model} (seed {seed})")
        ax.set_xlabel("cumulative training TFLOPs")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_flops.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-small", action="store_true", help=f"CPU-sized run: {CPU_SMALL}")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=30, help="epoch cap per stage; regular training's epochs")
    p.add_argument("--window", type=int, default=3)
    p.add_argument("--growth-gamma", type=float, default=0.5)
    p.add_argument("--lookahead-epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=None, help="constant learning rate (default 0.1)")
    p.add_argument("--subset", type=int, default=None, help="training images (all of them by default)")
    p.add_argument("--subset-test", type=int, default=None, help="test images (all by default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", default=None)
    p.add_argument("--threads", type=int, default=0, help="torch threads per job (0: torch's default)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (processes)")
    p.add_argument("--out", default="runs/bench_growth")
    p.add_argument("--equal-flops", action="store_true",
                   help=f"also run {EQ}: regular training for as many epochs as cost the look-ahead run's FLOPs")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = p.parse_args(argv)
    a = {"out": args.out, "epochs": args.epochs, "window": args.window, "gamma": args.growth_gamma,
         "lookahead_epochs": args.lookahead_epochs, "lr": args.lr, "subset": args.subset,
         "subset_test": args.subset_test, "batch_size": args.batch_size, "device": args.device,
         "data_root": args.data_root, "threads": args.threads, "jobs": args.jobs}
    if args.cpu_small:
        a.update(CPU_SMALL)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    label = (f"CPU-small config ({a['subset']} training images, {a['subset_test']} test images, "
             f"epochs/stage {a['epochs']}, window {a['window']}, gamma {a['gamma']}, look-ahead {a['lookahead_epochs']} "
             f"epoch(s), batch {a['batch_size']}, constant lr {a['lr'] or 0.1}; NOT the paper's scale)"
             if args.cpu_small else
             f"epochs/stage {a['epochs']}, window {a['window']}, gamma {a['gamma']}, look-ahead {a['lookahead_epochs']}, "
             f"batch {a['batch_size']}, subset {a['subset'] or 'all'}")
    if not args.report:
        t0 = time.time()
        print(f"benchmark: {label}", flush=True)
        rounds = [[(m, v, s) for s in args.seeds for m in args.models for v in VARIANTS]]
        if args.equal_flops:  # needs the regular and look-ahead runs of the same seed
            rounds.append([(m, EQ, s) for s in args.seeds for m in args.models])
        failed = 0
        for jobs in rounds:
            with ProcessPoolExecutor(max_workers=max(1, a["jobs"])) as ex:
                futs = {ex.submit(_job, a, *j): j for j in jobs}
                for f in as_completed(futs):
                    try:
                        print(f.result(), flush=True)
                    except Exception as e:  # noqa: BLE001 - report the failed run, keep the others
                        failed += 1
                        print(f"{futs[f]}: FAILED: {type(e).__name__}: {e}", flush=True)
        print(f"all runs done in {time.time() - t0:.0f}s ({failed} failed)", flush=True)
    text = report(out, args.models, args.seeds, label)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps(collect(out, args.models, args.seeds), indent=1))
    plot(out, args.models, args.seeds[0])
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
