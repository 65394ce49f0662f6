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
lower, with fewer training FLOPs. The verdict (per seed, then mean ± std): the training FLOPs and
the measured seconds (summed epoch times: training + validation) each variant needs to first reach
the full network's final validation accuracy minus 0.5 points, and the validation accuracy each
has reached within equal FLOPs budgets (0.25, 0.5, 0.75 and 1x regular training's). Look-ahead vs
random initialisation (the paper's second claim) gets its own paired table. ``accuracy_vs_flops.png``:
validation accuracy vs cumulative training FLOPs of every variant and seed on one plot, with the
targets.

Full size (GPU, the whole Fashion-MNIST training set, 10% of it for validation):
    python benchmarks/growth.py --epochs 30 --window 3 --lookahead-epochs 2 --seeds 0 1 2 \\
        --device cuda --out runs/bench_growth
CPU-sized (2 shared cores: 29 min measured at load average ~6, less on idle cores; labelled as such):
    python benchmarks/growth.py --cpu-small --out runs/bench_growth_cpu
CPU-claim (CPU-sized, labelled as such; the configuration that can test the claim on 2 cores):
    python benchmarks/growth.py --cpu-claim --out runs/bench_growth_claim
    = cifar:resnet20 (K = 3 stages), 4500 training images (+500 validation), the 10k test images,
      batch 128, constant lr 0.01, regular training 24 epochs, each growth stage capped at 24
      epochs, window 3 (a stage trains >= 6 epochs), gamma 0.5, 2 look-ahead epochs; 2 runs at a
      time, 1 torch thread each. The lr: a first run at 0.05 (0.1 at batch 256 scaled linearly) was
      stopped after seed 0's regular and look-ahead runs because validation accuracy swung by up to
      25 points between epochs (look-ahead's last stage: 81.0, 77.4, 71.8, 77.2, 61.4), so the
      termination rule fired on noise and the final accuracy was whichever epoch it hit (test 60.6);
      0.01 was taken instead, on that validation evidence alone.
    Estimate: ~30 min on 2 idle cores if growth stages end after ~9 epochs (the rule decides), at
    most ~55 min if every growth stage ran to its 24-epoch cap. Basis: a timed tiny run
    (cifar:resnet20 regular training, 1280 images, batch 128, 3 epochs, 1 thread; it got a whole
    core: 38.0 CPU-s in 39.1 s wall) took 4.4-4.8 s per epoch, i.e. 3.4 ms per training image, and
    ~24 s per run outside the epochs (~40 s for growth's three stage-end test passes); from the
    per-epoch times of a tiny growth run, S1 epochs cost 0.41x a full-network epoch, S1..S2 0.75x,
    look-ahead epochs ~0.45x. Per seed: regular 24 full-epochs + 2 growth runs of (9 x 0.41 + 2 x
    0.45 + 9 x 0.75 + 2 x 0.45 + 9) ~ 21 full-epochs (worst case 24 per stage: 54), at 15.8 CPU-s
    per full-epoch (4500 x 3.4 ms + validation): 3 seeds ~3400 CPU-s (worst ~6450) over 2 cores.
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
# sized from a timed tiny run (module docstring): 3 seeds <= 60 min on 2 idle cores; lr 0.01 on validation: at 0.05
# seed 0's validation accuracy swung by up to 25 points between epochs (module docstring)
CPU_CLAIM = dict(models=["cifar:resnet20"], subset=4500, subset_test=None, batch_size=128, lr=0.01, epochs=24,
                 window=3, lookahead_epochs=2, device="cpu", threads=1, jobs=2)
MARGIN = 0.5  # the verdict's target: the full network's final validation accuracy minus this (points)
BUDGETS = (0.25, 0.5, 0.75, 1.0)  # equal-FLOPs comparison: fractions of regular training's FLOPs


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
                    res.setdefault(model, {}).setdefault(v, []).append({**json.loads(p.read_text())["steps"][0],
                                                                        "seed": s})
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
        for part in (reach_table(out, model, seeds), equal_flops_table(out, model, seeds),
                     lookahead_vs_random(runs, out, model, seeds)):
            lines += [""] + part if part else []
        lines.append("")
    return "\n".join(lines)


def curves(out: Path, model: str, variant: str, seeds) -> Dict[int, Dict]:
    """``{seed: epoch_curve}`` of the finished runs of ``variant``."""
    from filtersurgery.methods.growth import epoch_curve

    return {s: epoch_curve(run_dir(out, model, variant, s)) for s in seeds
            if (run_dir(out, model, variant, s) / "metrics.json").exists()}


def targets(out: Path, model: str, seeds) -> Dict[int, float]:
    """Per seed, the verdict's target: regular training's final validation accuracy minus ``MARGIN``."""
    return {s: c["val_acc"][-1] - MARGIN for s, c in curves(out, model, "regular", seeds).items()}


def reach_table(out: Path, model: str, seeds) -> List[str]:
    """Training FLOPs and measured seconds each variant needs to reach its seed's target (first epoch at or
    above it), mean ± std over the seeds that reached it, and the FLOPs as a multiple of regular's."""
    from filtersurgery.methods.growth import first_reach

    tg = targets(out, model, seeds)
    if not tg:
        return []
    reg = {s: first_reach(c["flops"], c["val_acc"], tg[s]) for s, c in curves(out, model, "regular", seeds).items()}
    lines = [f"Cost of reaching the full network's final validation accuracy - {MARGIN} "
             f"(target per seed: {', '.join(f'{v:.2f}' for v in tg.values())} %):", "",
             "| method | train TFLOPs to target | x regular's (paired) | seconds to target | reached | total TFLOPs |",
             "|---|---|---|---|---|---|"]
    for v in VARIANTS:
        cs = {s: c for s, c in curves(out, model, v, seeds).items() if s in tg}
        if not cs:
            continue
        fl = {s: first_reach(c["flops"], c["val_acc"], tg[s]) for s, c in cs.items()}
        sec = [first_reach(c["seconds"], c["val_acc"], tg[s]) for s, c in cs.items()]
        hit = [s for s, f in fl.items() if f is not None]
        rel = [fl[s] / reg[s] for s in hit if reg.get(s)]
        lines.append(f"| {v} | {_ms([fl[s] / 1e12 for s in hit], '{:.3f}')} | {_ms(rel)} | "
                     f"{_ms([x for x in sec if x is not None], '{:.0f}')} | {len(hit)}/{len(cs)} | "
                     f"{_ms([c['flops'][-1] / 1e12 for c in cs.values()], '{:.3f}')} |")
    return lines


def equal_flops_table(out: Path, model: str, seeds) -> List[str]:
    """Validation accuracy each variant had reached within a FLOPs budget (fractions of regular training's
    total), mean ± std over seeds; a run that ended earlier keeps its final accuracy."""
    from filtersurgery.methods.growth import value_at

    reg = curves(out, model, "regular", seeds)
    if not reg:
        return []
    full = statistics.fmean(c["flops"][-1] for c in reg.values())
    lines = ["Validation accuracy (%) reached within equal training FLOPs (budgets: fractions of regular "
             f"training's {full / 1e12:.3f} TFLOPs; a run that ended earlier keeps its final accuracy; "
             "n/a: its first epoch costs more):", "",
             "| method | " + " | ".join(f"{b:g}x ({b * full / 1e12:.3f} T)" for b in BUDGETS) + " |",
             "|---|" + "---|" * len(BUDGETS)]
    for v in VARIANTS:
        cs = curves(out, model, v, seeds)
        if not cs:
            continue
        cells = []
        for b in BUDGETS:
            got = [value_at(c["flops"], c["val_acc"], b * full) for c in cs.values()]
            cells.append(_ms([x for x in got if x is not None]) + ("" if None not in got else
                                                                     f" ({got.count(None)} n/a)"))
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    return lines


def lookahead_vs_random(res_model: Dict, out: Path, model: str, seeds) -> List[str]:
    """The paper's second claim on its own: look-ahead minus random initialisation of the new stage, paired
    by seed: test and validation accuracy at the end of every stage, training FLOPs and seconds to the
    target, total training FLOPs."""
    from filtersurgery.methods.growth import first_reach

    la = {e["seed"]: e for e in res_model.get("lookahead", [])}
    ra = {e["seed"]: e for e in res_model.get("random", [])}
    both = sorted(set(la) & set(ra))
    if not both:
        return []
    lines = [f"Look-ahead vs random initialisation of each new stage (look-ahead minus random, paired by seed, "
             f"{len(both)} seed(s)):", "", "| quantity | look-ahead | random | difference (paired) |", "|---|---|---|---|"]

    def row(name, a, b, fmt="{:.2f}"):
        d = [x - y for x, y in zip(a, b) if x is not None and y is not None]
        lines.append(f"| {name} | {_ms([x for x in a if x is not None], fmt)} | "
                     f"{_ms([y for y in b if y is not None], fmt)} | {_ms(d, fmt)} |")

    for i in range(min(len(la[s]["stages"]) for s in both)):
        k = la[both[0]]["stages"][i]["k"]
        if k == 1:
            continue  # S1 is trained the same way by both
        for key in ("test_acc", "val_acc"):
            row(f"S1..S{k}: {key.replace('_acc', '')} acc at stage end (%)",
                [la[s]["stages"][i][key] for s in both], [ra[s]["stages"][i][key] if len(ra[s]["stages"]) > i else None
                                                          for s in both])
    tg = targets(out, model, both)
    cl, cr = curves(out, model, "lookahead", both), curves(out, model, "random", both)
    for what, key, scale, fmt in (("train TFLOPs to target", "flops", 1e12, "{:.3f}"),
                                  ("seconds to target", "seconds", 1.0, "{:.0f}")):
        if tg:
            a = [first_reach(cl[s][key], cl[s]["val_acc"], tg[s]) for s in both if s in tg]
            b = [first_reach(cr[s][key], cr[s]["val_acc"], tg[s]) for s in both if s in tg]
            n_a, n_b = sum(x is not None for x in a), sum(x is not None for x in b)
            row(f"{what} (seeds that reached it: {n_a} / {n_b})", [None if x is None else x / scale for x in a],
                [None if x is None else x / scale for x in b], fmt)
    row("total train TFLOPs", [la[s]["train_flops"] / 1e12 for s in both], [ra[s]["train_flops"] / 1e12 for s in both],
        "{:.3f}")
    return lines


def plot(out: Path, models, seeds) -> Path:
    """Validation accuracy vs cumulative training FLOPs (paper Fig. 3, third row): every variant and seed
    (look-ahead epochs included), and each seed's target (regular's final validation accuracy - MARGIN)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from filtersurgery.report.figures import save_figure

    colors = {"regular": "tab:blue", "lookahead": "tab:green", "random": "tab:red", EQ: "tab:gray"}
    fig, axes = plt.subplots(1, len(models), figsize=(7 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for v in VARIANTS + (EQ,):
            for i, (s, c) in enumerate(curves(out, model, v, seeds).items()):
                ax.plot([f / 1e12 for f in c["flops"]], c["val_acc"], marker=".", ms=3, lw=1, alpha=0.8,
                        color=colors[v], label=v if i == 0 else None)
        for i, t in enumerate(targets(out, model, seeds).values()):
            ax.axhline(t, color="k", ls=":", lw=0.8, label=f"regular's final val - {MARGIN}" if i == 0 else None)
        ax.set_title(f"{model} (seeds {' '.join(map(str, seeds))})")
        ax.set_xlabel("cumulative training TFLOPs")
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out / "accuracy_vs_flops.png")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cpu-small", action="store_true", help=f"CPU-sized pipeline check: {CPU_SMALL}")
    p.add_argument("--cpu-claim", action="store_true",
                   help=f"CPU-sized configuration that can test the claim (module docstring): {CPU_CLAIM}")
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
    p.add_argument("--out", default=None, help="default runs/bench_growth[_claim]")
    p.add_argument("--equal-flops", action="store_true",
                   help=f"also run {EQ}: regular training for as many epochs as cost the look-ahead run's FLOPs")
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    args = p.parse_args(argv)
    if args.cpu_small and args.cpu_claim:
        p.error("--cpu-small, --cpu-claim: choose one")
    args.out = args.out or ("runs/bench_growth_claim" if args.cpu_claim else "runs/bench_growth")
    a = {"out": args.out, "epochs": args.epochs, "window": args.window, "gamma": args.growth_gamma,
         "lookahead_epochs": args.lookahead_epochs, "lr": args.lr, "subset": args.subset,
         "subset_test": args.subset_test, "batch_size": args.batch_size, "device": args.device,
         "data_root": args.data_root, "threads": args.threads, "jobs": args.jobs}
    preset = CPU_SMALL if args.cpu_small else CPU_CLAIM if args.cpu_claim else {}
    given = {x.split("=")[0].lstrip("-").replace("-", "_") for x in (argv if argv is not None else sys.argv[1:])
             if x.startswith("--")}
    a.update({k: v for k, v in preset.items() if k != "models" and k not in given})  # explicit flags win
    if "models" in preset and "models" not in given:
        args.models = preset["models"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    size = (f"{a['subset'] or 'all'} training images, {a['subset_test'] or 'all 10k'} test images, "
            f"epochs/stage {a['epochs']}, window {a['window']}, gamma {a['gamma']}, look-ahead {a['lookahead_epochs']} "
            f"epoch(s), batch {a['batch_size']}, constant lr {a['lr'] or 0.1}")
    label = (f"CPU-small config ({size}; a pipeline check, NOT the paper's scale)" if args.cpu_small else
             f"CPU-claim config (CPU-sized: {size}; {a['jobs']} runs at a time; NOT the paper's scale)"
             if args.cpu_claim else size)
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
    plot(out, args.models, args.seeds)
    print(text)
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {out / 'accuracy_vs_flops.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
