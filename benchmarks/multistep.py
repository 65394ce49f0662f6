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
import os
import statistics
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import torch

from filtersurgery import MultiStepConfig, TrainConfig, multi_step
from filtersurgery.data import load_dataset
from filtersurgery.report.figures import accuracy_per_step, markdown_table
from filtersurgery.train import plan_step

# name -> TrainConfig and MultiStepConfig overrides (epochs multiplier via "_x")
VARIANTS = {
    "finetune(1e-3)": dict(method="finetune", lr=1e-3),
    "finetune(1e-2)": dict(method="finetune", lr=1e-2),
    "bst": dict(method="bst"),
    "dml": dict(method="dml"),
    "lwm": dict(method="lwm"),
    "framework": dict(method="framework"),
    "joint": dict(method="joint"),
    "shrink-perturb": dict(method="shrink-perturb", lr=1e-2),
    "dash": dict(method="dash", lr=1e-2),
    "finetune(1e-2) 3x epochs": dict(method="finetune", lr=1e-2, _x=3),
    "joint 3x epochs": dict(method="joint", _x=3),
    # fine-tuning given the framework's training FLOPs over steps 2.. (epochs from Phase.flops)
    "finetune(1e-2) equal FLOPs": dict(method="finetune", lr=1e-2, _x="framework"),
}
# the --cpu-medium testbed's comparison
MEDIUM = ["finetune(1e-3)", "finetune(1e-2)", "framework", "joint", "finetune(1e-2) equal FLOPs"]
MEDIUM_SUBSET, MEDIUM_EPOCHS, MEDIUM_STEP1_EPOCHS = 9000, 4, 8
# the paper's regime (--cpu-paper): ~112 training images per class per part, a network that over-fits a part
PAPER = ["finetune(1e-3)", "finetune(1e-2)", "finetune(1e-2) equal FLOPs", "joint", "shrink-perturb", "dash",
         "framework", "framework 1 student"]
PAPER_SUBSET, PAPER_EPOCHS, PAPER_STEP1_EPOCHS = 1125, 15, 150
# the seed-0 screening of the framework's components (validation) ran with one "auto" margin, 3,
# for every SST phase, before the MSL margin was raised to 6: the screening variants keep that setting
_SCREEN = dict(method="framework", lr=1e-2, lam_safety_msl=3.0)
ABLATIONS = {
    "framework lr=1e-3": dict(_SCREEN, lr=1e-3),  # the paper's AOD learning rate
    "framework no-MSL": dict(method="framework", msl=False),
    "framework no-teacher-update": dict(method="framework", teacher_update=False),
    "framework 1 student": dict(method="framework", students=1),
    "framework at_weight=1": dict(method="framework", at_weight=1.0),
    "framework sst_lr=1e-2": dict(method="framework", sst_lr=1e-2, sst_fit_acc=None),  # at every step
    "framework lr=1e-2": dict(_SCREEN),  # the screening baseline
    "framework global ranking": dict(method="framework", ranking="global"),
    "framework lam=1e-4": dict(method="framework", lam=1e-4),
    "framework lr=1e-2 1 student": dict(_SCREEN, students=1),
    "framework lr=1e-2 no-Dri": dict(_SCREEN, students=1, dri=False),
    "framework lr=1e-2 no-SST": dict(_SCREEN, sst=False),
    "framework lr=1e-2 no-MSL": dict(_SCREEN, msl=False),
    "framework lr=1e-2 MSL+CE": dict(_SCREEN, msl_ce=True),
    "framework lr=1e-2 sst_lr=1e-2": dict(_SCREEN, sst_lr=1e-2, sst_fit_acc=None),
    "framework lr=1e-2 global ranking": dict(_SCREEN, ranking="global"),
    # AOD's loss alone (one student, no Dri, no SST): fine-tuning with two views + consistency
    "framework lr=1e-2 AOD only": dict(_SCREEN, students=1, dri=False, sst=False),
    # AOD only without the consistency term: cross-entropy on the mirrored view alone
    "framework lr=1e-2 AOD only alpha=0": dict(_SCREEN, students=1, dri=False, sst=False, alpha=0.0),
    # eq. (7)-(8) weight each student's CE by W_KD (~0.5): twice the lr gives two students the CE step of one
    "framework lr=2e-2": dict(method="framework", lr=2e-2),
    # AOD's B_F view mirrored with probability 1/2 instead of always (CE then also sees unmirrored images)
    "framework flip=random": dict(method="framework", aod_flip="random"),
    "framework lr=1e-2 AOD only flip=random": dict(_SCREEN, students=1, dri=False, sst=False, aod_flip="random"),
    # no SP_r ramp (E_cut = 0): only the Target_r smallest factors are pushed, from SST's first epoch
    "framework e_cut=0": dict(method="framework", e_cut_fraction=0.0),
    # the paper's recipe (MultiStepConfig(recipe="paper"): global |gamma|, subgradient lam 1e-4 with the SP_r ramp,
    # stale BN statistics, attention transfer on every block, AOD at lr 1e-3)
    "framework paper recipe": dict(method="framework", recipe="paper"),
    # the do-no-harm defaults switched back one at a time (docs/method.md, "Do no harm")
    "framework subgradient": dict(method="framework", sst_update="subgradient"),
    "framework stale BN": dict(method="framework", refresh_bn=False),
    # the paper's components taken out one at a time (the defaults otherwise)
    "framework no-SST": dict(method="framework", sst=False),
    "framework 1 student no-Dri": dict(method="framework", students=1, dri=False),
    "framework AOD only": dict(method="framework", students=1, dri=False, sst=False),
    # the defaults before the projection: "auto" margins 1.5 (the largest final target due at 0 after two thirds of
    # SST) and no projection; and with a margin of 2 under MSL only
    "framework margins=1.5 no-project": dict(method="framework", lam_safety=1.5, lam_safety_msl=1.5, sst_project=False),
    "framework msl_safety=2 no-project": dict(method="framework", lam_safety=1.5, lam_safety_msl=2.0, sst_project=False),
    # SST without the final projection of its Target_r smallest factors to exactly 0
    "framework no-project": dict(method="framework", sst_project=False),
    # a margin of 2 with CE too (the first candidate: it zeroed 39% of timm resnet18's factors at step 2)
    "framework margins=2": dict(method="framework", lam_safety=2.0, lam_safety_msl=2.0),
    "framework sst_lr=3e-2": dict(method="framework", sst_lr=3e-2, sst_fit_acc=None),
    # SST hands on its last epoch (the paper) instead of its best epoch at Target_r zeros
    "framework keep=last": dict(method="framework", sst_keep="last"),
    # step 2's SST with CE on Data1 (the paper) instead of under MSL with the step-1 model as its teacher
    "framework CE step2": dict(method="framework", msl_step2=False),
    # SST under MSL without CE on the labels (the paper's MSL: KL + AT only)
    "framework MSL without CE": dict(method="framework", msl_ce=False),
    # SST at --sst-lr with the usual margin even on a model that already fits its training images
    "framework no-fit-rule": dict(method="framework", sst_fit_acc=None),
    # warm-start baselines: the grid their defaults were chosen from (validation, seed 0)
    "shrink-perturb(0.4,0.1)": dict(method="shrink-perturb", lr=1e-2, sp_shrink=0.4, sp_noise=0.1),
    "shrink-perturb(0.8,0.1)": dict(method="shrink-perturb", lr=1e-2, sp_shrink=0.8, sp_noise=0.1),
    "shrink-perturb(0.8,0.01)": dict(method="shrink-perturb", lr=1e-2, sp_shrink=0.8, sp_noise=0.01),
    "shrink-perturb(0.6,0.05)": dict(method="shrink-perturb", lr=1e-2, sp_shrink=0.6, sp_noise=0.05),
    "dash(0.1)": dict(method="dash", lr=1e-2, dash_lam=0.1),
    "dash(0.3)": dict(method="dash", lr=1e-2, dash_lam=0.3),
    "dash(0.5)": dict(method="dash", lr=1e-2, dash_lam=0.5),
}


_CFG_FIELDS = {f.name for f in fields(TrainConfig)}


def configs(base: TrainConfig, ov: dict):
    """``(TrainConfig, MultiStepConfig)`` of a variant's overrides (each field to the dataclass that has it)."""
    cfg = replace(base, **{k: v for k, v in ov.items() if k in _CFG_FIELDS})
    return cfg, MultiStepConfig(**{k: v for k, v in ov.items() if k not in _CFG_FIELDS})


def equal_flops_epochs(cfg: TrainConfig, opts: MultiStepConfig, steps: int) -> int:
    """Epochs per step that give fine-tuning the framework's training FLOPs over steps 2..``steps``."""
    fw = replace(cfg, method="framework")
    ft = replace(cfg, method="finetune")
    def total(c):
        return sum(p.flops(1, 1) for k in range(2, steps + 1) for p in plan_step(c, opts, k))
    return max(1, round(cfg.epochs * total(fw) / total(ft)))


def summary_rows(rows, key: str):
    """Mean ± std over seeds of ``key`` per step (``markdown_table``'s row format)."""
    return [{"step": k, "test_acc_mean": statistics.fmean(e[key] for e in v),
             "test_acc_std": statistics.stdev([e[key] for e in v]) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in sorted(rows.items())]


def summary_table(results, val, cost, reference: str = "finetune(1e-2)") -> str:
    """One row per method: what the ablations are read from (validation), then test and cost.

    ``val steps 2..N``: validation accuracy averaged over steps 2..N and seeds (every choice is
    made on this column); ``test DataN``: test accuracy after the last step, mean ± std over
    seeds; ``FLOPs``: training FLOPs of steps 2..N over ``reference``'s; ``seconds``: wall time
    of steps 2..N per seed (machine load differs between runs: FLOPs are the cost to compare).
    """
    ref = cost.get(reference)
    ref_flops = sum(f for k, (_, f) in ref.items() if k >= 2) if ref else 0.0
    lines = ["", f"Summary (validation decides; FLOPs relative to {reference}):", "",
             "| method | seeds | val steps 2..N | test DataN | FLOPs | seconds |", "|---|---|---|---|---|---|"]
    for name, rows in results.items():
        last = rows[-1]
        later = [r for r in val[name] if r["step"] >= 2]
        v = statistics.fmean(r["test_acc_mean"] for r in later) if later else float("nan")
        flops = sum(f for k, (_, f) in cost[name].items() if k >= 2)
        secs = sum(t for k, (t, _) in cost[name].items() if k >= 2)
        ratio = f"{flops / ref_flops:.1f}x" if ref_flops else "n/a"
        lines.append(f"| {name} | {last['n']} | {v:.2f} | {last['test_acc_mean']:.2f} ± {last['test_acc_std']:.2f} "
                     f"| {ratio} | {secs:.0f} |")
    return "\n".join(lines)


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
        cmd = me + ["--jobs", "1", "--seeds", str(seed), "--methods", *names]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))  # one core per process
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        tail = (r.stdout + r.stderr).strip().splitlines()[-3:]
        print(f"seed {seed} {names}: exit {r.returncode}: " + " | ".join(tail), flush=True)
        return r.returncode

    names = list(variants)
    # longest first (framework-like and equal-FLOPs runs cost ~5x a fine-tuning): shortest makespan
    cost = lambda n: 3 if "framework" in n or "FLOPs" in n else 2 if "joint" in n or " 3x" in n else 1  # noqa: E731
    rest_names = sorted(names[1:], key=lambda n: -cost(n))
    codes, futures = [], []
    with ThreadPoolExecutor(args.jobs) as ex:
        def seed_chain(s):
            """Step 1 of seed ``s`` (shared by every method) with its first method, then queue its other methods:
            the next seed's step 1, queued earlier, starts on the first free worker."""
            codes.append(job(s, names[:1]))
            futures.extend(ex.submit(job, s, [n]) for n in rest_names)

        for f in [ex.submit(seed_chain, s) for s in args.seeds]:
            f.result()
        while any(not f.done() for f in list(futures)):
            time.sleep(1)
        codes.extend(f.result() for f in futures)
    if any(codes):
        print(f"{sum(1 for c in codes if c)} jobs failed", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="timm:resnet18")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--split", choices=["single", "multi"], default="multi")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--step1-epochs", type=int, default=None, help="epochs of step 1 (default --epochs)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--methods", nargs="+", default=None, help="subset of variant names (default all)")
    p.add_argument("--ablation", action="store_true", help="also run the framework ablations")
    p.add_argument("--cpu-small", action="store_true", help="smoke configuration (timm resnet18, 500 images per part)")
    p.add_argument("--cpu-medium", action="store_true",
                   help="the CPU testbed: cifar:resnet8, %d training images per part, %d epochs per phase (step 1: %d), "
                        "batch 64, 2 processes" % (MEDIUM_SUBSET, MEDIUM_EPOCHS, MEDIUM_STEP1_EPOCHS))
    p.add_argument("--cpu-paper", action="store_true",
                   help="the paper's regime on the CPU: cifar:resnet8, %d training + %d validation images per part "
                        "(~112 per class), step 1 %d epochs (it fits Data1 completely), %d epochs per phase, batch 64, "
                        "2 processes" % (PAPER_SUBSET, PAPER_SUBSET // 9, PAPER_STEP1_EPOCHS, PAPER_EPOCHS))
    p.add_argument("--report", action="store_true", help="only print the table of finished runs")
    p.add_argument("--no-report", dest="table", action="store_false",
                   help="train only: no table, plot or table.md (for many processes writing into one --out)")
    p.add_argument("--step1-only", action="store_true", help="only train the shared step-1 models of --seeds")
    p.add_argument("--test-subset", type=int, default=None,
                   help="evaluate on a fixed class-balanced subset of N test images (smoke runs only)")
    p.add_argument("--channels-last", action="store_true", help="channels_last memory format (faster convs on GPUs)")
    p.add_argument("--state-every", type=float, default=0.0,
                   help="write the resumable state at most every N seconds (default 0: after every epoch)")
    p.add_argument("--jobs", type=int, default=None,
                   help="run (seed, method) pairs as this many parallel processes (small models leave a GPU idle)")
    p.add_argument("--out", default="runs/bench_multistep")
    args = p.parse_args(argv)
    if args.cpu_small:
        # 2-core CPU, under an hour for 3 seeds: 500 images per part, 3 epochs per phase,
        # the 3x-epoch joint control (the costliest line) only when asked by --methods;
        # everything else as the full run
        args.epochs, args.subset, args.batch_size = min(args.epochs, 3), args.subset or 500, 64
        args.device = "cpu" if args.device == "auto" else args.device
    if args.cpu_medium:
        # the CPU testbed (docs/trainer.md, "The CPU testbed"): the smallest configuration whose step 1 is
        # well trained (>= 83% test) and whose 5-method comparison runs 3 seeds in ~75 min on 2 cores
        args.model, args.epochs, args.subset, args.batch_size = "cifar:resnet8", MEDIUM_EPOCHS, MEDIUM_SUBSET, 64
        args.step1_epochs = args.step1_epochs or MEDIUM_STEP1_EPOCHS
        args.device = "cpu" if args.device == "auto" else args.device
        args.jobs = args.jobs or 2
    if args.cpu_paper:
        # docs/trainer.md, "The paper's regime": step 1 over-fits Data1, every phase sees ~112 images per class
        args.model, args.epochs, args.subset, args.batch_size = "cifar:resnet8", PAPER_EPOCHS, PAPER_SUBSET, 64
        args.step1_epochs = args.step1_epochs or PAPER_STEP1_EPOCHS
        args.device = "cpu" if args.device == "auto" else args.device
        args.jobs = args.jobs or 2
    default = {k: v for k, v in VARIANTS.items() if not (args.cpu_small and k == "joint 3x epochs")}
    if args.cpu_medium:
        default = {k: VARIANTS[k] for k in MEDIUM}
    if args.cpu_paper:
        default = {k: dict(VARIANTS, **ABLATIONS)[k] for k in PAPER}
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
                       epochs=args.epochs, step1_epochs=args.step1_epochs, subset=args.subset, batch_size=args.batch_size, device=args.device,
                       progress=False, channels_last=args.channels_last, state_every=args.state_every)
    if args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available()):
        torch.backends.cudnn.benchmark = True  # fixed batch shapes: let cuDNN pick the fastest kernels
    args.jobs = args.jobs or 1
    if not args.report and args.jobs > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], args, variants)
    elif not args.report:
        data = load_dataset(args.data, root=args.data_root, subset_test=args.test_subset)
        for seed in args.seeds:
            # step 1 (Data1 from scratch) is the same for every method: train it once per seed
            step1_dir = out / "_step1" / f"seed{seed}"
            if not (step1_dir / "step1.safetensors").exists():  # parallel jobs of one seed only read it
                multi_step(replace(base, method="finetune"), step1_dir, seed=seed, data=data, until_step=1)
            for name, ov in ({} if args.step1_only else variants).items():
                ov = dict(ov)
                x = ov.pop("_x", 1)
                cfg, opts = configs(base, ov)
                epochs = equal_flops_epochs(cfg, opts, steps) if x == "framework" else base.epochs * x
                cfg = replace(cfg, epochs=epochs)
                t0 = time.time()
                multi_step(cfg, out / slug(name) / f"seed{seed}", seed=seed, data=data, options=opts,
                           step1_from=str(step1_dir / "step1.safetensors"))
                print(f"[{time.time() - t0:7.1f}s] seed {seed} {name} done", flush=True)

    if not args.table or args.step1_only:
        return 0
    report(args, variants, out)
    return 0


def collect(out: Path, variants, seeds):
    """``{method: {step: [metrics.json entry per seed]}}`` of the finished runs under ``out``."""
    found = {}
    for name in variants:
        rows = {}
        for seed in seeds:
            mp = out / slug(name) / f"seed{seed}" / "metrics.json"
            if mp.exists():
                for e in json.loads(mp.read_text())["steps"]:
                    rows.setdefault(e["step"], []).append(e)
        if rows:
            found[name] = rows
    return found


def harm_table(found) -> str:
    """Do no harm, per method with an SST phase and step (mean over seeds, and the worst seed's drop below the
    model SST received): validation accuracy of the model SST received, SST's lowest and last epoch, the epoch
    it handed on (``sst_keep="best"``: its epoch number per seed), its fraction of factors at zero (lowest seed),
    and the step's in -> out."""
    lines = ["| method | step | SST in | SST min (worst drop) | SST last (worst drop) | SST out (worst drop) | "
             "kept epoch | zero frac (lowest) | step in -> out | worse |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, rows in found.items():
        for k, v in sorted(rows.items()):
            ssts = [p for e in v for p in e.get("phase_vals") or [] if p["phase"] == "sst"]
            if not ssts:
                continue
            cols = []
            for key in ("val_min", "val_end", "val_out"):  # val_out: absent with keep="last", the last epoch's
                got = [p.get(key, p["val_end"]) for p in ssts]
                worst = min(g - p["val_in"] for g, p in zip(got, ssts))
                cols.append(f"{statistics.fmean(got):.2f} ({worst:+.1f})")
            kept = ", ".join(str(p.get("kept_epoch", "last")) for p in ssts)
            zf = [p.get("zero_frac", float("nan")) for p in ssts]
            io = f"{statistics.fmean(e['val_in'] for e in v):.2f} -> {statistics.fmean(e['val_acc'] for e in v):.2f}"
            lines.append(f"| {name} | {k} | {statistics.fmean(p['val_in'] for p in ssts):.2f} | {' | '.join(cols)} | "
                         f"{kept} | {statistics.fmean(zf):.3f} ({min(zf):.3f}) | {io} | "
                         f"{sum(bool(e.get('worse')) for e in v)}/{len(v)} |")
    return "\n".join(lines)


def report(args, variants, out: Path) -> None:
    """Print the tables of the finished runs (test, validation, training accuracy, cost, do no harm)."""
    found = collect(out, variants, args.seeds)
    results = {n: summary_rows(r, "test_acc") for n, r in found.items()}
    val = {n: summary_rows(r, "val_acc") for n, r in found.items()}
    train = {n: summary_rows({k: v for k, v in r.items() if all("train_acc" in e for e in v)}, "train_acc")
             for n, r in found.items()}
    cost = {n: {k: (statistics.fmean(e["seconds"] for e in v), statistics.fmean(e.get("train_flops", 0) for e in v))
                for k, v in r.items()} for n, r in found.items()}
    label = ("CPU testbed (--cpu-medium)" if args.cpu_medium else "the paper's regime on the CPU (--cpu-paper)"
             if args.cpu_paper else "CPU-sized smoke configuration" if args.cpu_small else "full size")
    print(f"\n## {args.split}-step, {args.model}, {args.data}, {args.epochs} epochs/phase, {args.subset or 'all'} "
          f"training images per part, batch {args.batch_size}, seeds {args.seeds} ({label})\n")
    print("Test accuracy (%), mean ± std over seeds:\n")
    print(markdown_table(results))
    print("\nValidation accuracy (%) on the held-out 10% of the current part (joint: of all parts so far); "
          "every choice is made on these:\n")
    print(markdown_table(val))
    if any(train.values()):
        print("\nTraining accuracy (%) of each step's output on that step's own training images (not augmented):\n")
        print(markdown_table({n: r for n, r in train.items() if r}))
    print("\nCost per step: wall-clock seconds / training TFLOPs (step 1 is shared and trained once per seed):\n")
    steps_all = sorted({k for c in cost.values() for k in c})
    print("| method | " + " | ".join(f"step {s}" for s in steps_all) + " |")
    print("|" + "---|" * (len(steps_all) + 1))
    for name, c in cost.items():
        cells = [f"{c[s][0]:.0f}s / {c[s][1] / 1e12:.2f}" if s in c else "" for s in steps_all]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(summary_table(results, val, cost))
    harm = harm_table(found)
    if harm.count("\n") > 1:
        print("\nDo no harm (validation %, mean over seeds; SST's incoming model is step k-1's output):\n")
        print(harm)
    if results:
        png = accuracy_per_step(results, out / "accuracy.png")
        (out / "table.md").write_text(markdown_table(results) + "\n")
        print(f"\nplot: {png}")


if __name__ == "__main__":
    sys.exit(main())
