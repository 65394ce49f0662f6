"""Partial network sharing benchmark (docs/method.md §6).

Class-incremental Fashion-MNIST (class sets 4,3,3 in label order, the paper's CIFAR-10
split): the accuracy-vs-sharing sweep (``sweep_sharing``: base trained once, one branch
per new set for every share, the chosen configuration = largest share within
``--max-drop`` points of no sharing on *validation* accuracy), the no-sharing reference
(share 0) and whole-network fine-tuning on each new set (``class-finetune``, forgets).

The branch/fine-tuning learning rate is chosen on validation: every value of ``--lr-grid``
is tried for the no-sharing reference (share 0) and the one with the best all-class
validation accuracy is used for the whole sweep and for class-finetune (docs/method.md §9: 1e-3 is
the paper's fine-tuning lr, 1e-2 the tuned variant).

Full size (GPU):
    python benchmarks/sharing.py --model cifar:resnet32 --epochs 30 --seeds 0 1 2 --out runs/bench_sharing
Paper-like CIFAR-100 (50 base classes, then 10, 20, 20):
    python benchmarks/sharing.py --model cifar:resnet32 --data cifar100 --class-sets 50,10,20,20 \
        --epochs 30 --seeds 0 1 2 --out runs/bench_sharing_c100
CPU-sized (labelled as such in the output; ~15-25 min on 2 shared cores):
    python benchmarks/sharing.py --cpu-small --out runs/bench_sharing_cpu
CPU-sized for the cost claim (labelled "CPU-claim"; cifar:resnet20, 6 epochs, 2000 images per class set,
2000 test images, batch 128, 1 thread, seeds 0 1 2, branch lr chosen on seed 0, no class-finetune baseline):
    python benchmarks/sharing.py --cpu-claim --out runs/bench_sharing_claim
  Sized from a first attempt at 4000 images per set, which trained at ~2.4 s per iteration with the
  reactivation benchmark's two runs on the same 2 cores (a 6-epoch set-run at share 0 took 390-465 s, ~3.5x
  the earlier estimate) and was stopped. Per seed: the base, two share-0 class sets, four distinct shared
  prefixes (0.99 shares what 0.9 shares in resnet20) x two sets at ~0.35 of share 0's time per iteration,
  plus the second lr on seed 0: ~20 set-runs of 84 iterations. Measured: 1264 s (21 min) for the 3 seeds,
  side-by-side timing included, with the reactivation benchmark's two runs on the same 2 cores (2026-12-03).

Every run resumes: re-running a command reuses each finished network (``progress.json`` and the step
checkpoints of every share/seed folder; an interrupted run continues at its next class set) and only
re-measures the costs.

Training cost per share, side by side: after training, the branch of every distinct shared prefix is
timed in this one process, in interleaved rounds (``--time-rounds`` x ``--time-iters`` SGD iterations),
with its peak memory, MACs and trainable parameters, as ratios to share 0 (table, ``claim.png``,
``results.json``), then the share with the best accuracy per unit of training cost, the time-vs-MAC saving
gap and where the time goes. The library has no energy or memory-access model; none is reported.
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
from filtersurgery.cli.sweep import format_table
from filtersurgery.methods.sharing import DEFAULT_SHARES, class_sets_from, run_class_finetune, run_sharing
from filtersurgery.methods.sharing_sweep import (best_per_cost, measure_side_by_side, plot_sweep, saving_gap,
                                                 sweep_sharing, time_split, with_side_by_side_costs)
from filtersurgery.models.factory import build_model
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.run import resolve_device
from filtersurgery.tracing.probe import example_input

CPU_SMALL = dict(model="cifar:resnet20", epochs=4, subset=1500, test_subset=2000, batch_size=128, device="cpu",
                 seeds=[0], threads=1)
CPU_CLAIM = dict(model="cifar:resnet20", epochs=6, subset=2000, test_subset=2000, batch_size=128, device="cpu",
                 seeds=[0, 1, 2], threads=1, no_finetune=True)  # sized in the module docstring


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar:resnet32")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--class-sets", default="4,3,3")
    p.add_argument("--shares", default=",".join(f"{s:g}" for s in DEFAULT_SHARES))
    p.add_argument("--max-drop", type=float, default=1.0)
    p.add_argument("--lr-grid", default="1e-3,1e-2", help="branch/fine-tuning lrs tried at share 0 (chosen on val)")
    p.add_argument("--select-seed", type=int, default=None,
                   help="the seed on which --lr-grid is tried (default: the first of --seeds)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subset", type=int, default=None, help="training images per class set")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu-small", action="store_true", help="CPU-sized configuration (few epochs, subsets)")
    p.add_argument("--cpu-claim", action="store_true",
                   help="CPU-sized configuration for the cost claim: 3 seeds in <= 60 min on 2 cores (docstring)")
    p.add_argument("--no-finetune", action="store_true", help="skip the class-finetune baseline")
    p.add_argument("--time-rounds", type=int, default=3, help="side-by-side timing: interleaved rounds per share")
    p.add_argument("--time-iters", type=int, default=10, help="side-by-side timing: iterations per round")
    p.add_argument("--out", default="runs/bench_sharing")
    args = p.parse_args(argv)
    if args.cpu_small and args.cpu_claim:
        raise ValueError("cpu_claim: --cpu-small and --cpu-claim are two presets, pass one")
    for on, preset in ((args.cpu_small, CPU_SMALL), (args.cpu_claim, CPU_CLAIM)):
        if on:
            for k, v in preset.items():
                setattr(args, k, v)
    if args.time_rounds < 1 or args.time_iters < 1:
        raise ValueError(f"time_rounds: --time-rounds and --time-iters must be >= 1, got {args.time_rounds}, "
                         f"{args.time_iters}")
    if args.threads:
        torch.set_num_threads(args.threads)
    label = "CPU-small" if args.cpu_small else "CPU-claim" if args.cpu_claim else "full"
    t_start = time.time()
    out = Path(args.out)
    data = load_dataset(args.data, root=args.data_root, subset_test=args.test_subset)
    sets = class_sets_from(args.class_sets, data.num_classes)
    cfg = TrainConfig(model=args.model, data=args.data, data_root=args.data_root, method="sharing", epochs=args.epochs,
                      batch_size=args.batch_size, subset=args.subset, device=args.device, progress=False)
    print(f"[{label}] {args.model} on {data.name} ({len(data.train_y)} train / {len(data.test_y)} test images), "
          f"class sets {[len(s) for s in sets]}, {args.epochs} epochs, subset {args.subset} per set, seeds {args.seeds}",
          flush=True)

    # 1. the branch lr, chosen on validation at share 0 (the no-sharing reference)
    lrs = [float(v) for v in args.lr_grid.split(",") if v]
    select = args.seeds[0] if args.select_seed is None else args.select_seed
    first = out / f"lr{lrs[0]:g}" / "share0.00" / f"seed{select}" / "step1.safetensors"
    val = {}
    for lr in lrs:
        m = run_sharing(replace(cfg, lr=lr), sets, 0.0, out / f"lr{lr:g}" / "share0.00" / f"seed{select}", select, data,
                        base_from=None if lr == lrs[0] else first)
        val[lr] = m["steps"][0]["val_acc"]
        print(f"lr {lr:g}: no-sharing all-class val acc {val[lr]:.2f} (seed {select})", flush=True)
    lr = max(lrs, key=lambda v: val[v])
    print(f"chosen lr (validation): {lr:g}", flush=True)

    # 2. the sweep (its share-0 runs are the ones above)
    res = sweep_sharing(replace(cfg, lr=lr), sets, [float(s) for s in args.shares.split(",")], out / f"lr{lr:g}",
                        seeds=args.seeds, data=data, max_drop=args.max_drop,
                        title=f"[{label}] {args.model}, {data.name}, sets {[len(s) for s in sets]}")

    # 3. whole-network fine-tuning on each new set
    ft = [] if args.no_finetune else [
        run_class_finetune(replace(cfg, lr=lr, method="class-finetune"), sets, out / "class-finetune" / f"seed{s}",
                           s, data) for s in args.seeds]

    # 4. every configuration's training cost measured side by side in this process, as ratios to share 0
    t_cost = time.time()
    measured = side_by_side(cfg, sets, data, sorted({r["trained_as"] for r in res["rows"]}), args.time_rounds,
                            args.time_iters)
    side = with_side_by_side_costs(res["rows"], measured)
    t_cost = time.time() - t_cost
    plot_sweep(side, out / "claim.png", max_drop=args.max_drop,
               title=f"[{label}] {args.model}, {data.name}: accuracy and relative cost (measured side by side)")

    rows = res["rows"]
    chosen = next(r for r in rows if r["chosen"])
    share0 = rows[0]

    def per_set(metrics_list, key):
        return [round(statistics.fmean(m["per_set"][i][key] for m in metrics_list), 2) for i in range(len(sets))]

    def sharing_runs(share):
        trained = next(r for r in rows if r["share"] == share)["trained_as"]
        return [json.loads((out / f"lr{lr:g}" / f"share{trained:.2f}" / f"seed{s}" / "metrics.json").read_text())
                for s in args.seeds]

    comp = []
    for name, ms in (("no sharing (share 0)", sharing_runs(0.0)),
                     (f"sharing, chosen share {chosen['share']:g}", sharing_runs(chosen["share"])),
                     ("class-finetune (forgets)", ft)):
        if not ms:
            continue
        comp.append({"method": name,
                     "test_acc": round(statistics.fmean(m["steps"][0]["test_acc"] for m in ms), 2),
                     "val_acc": round(statistics.fmean(m["steps"][0]["val_acc"] for m in ms), 2),
                     "per_set_within": per_set(ms, "test_acc"), "per_set_all_class": per_set(ms, "test_acc_all"),
                     "train_macs_per_iter": ms[0]["cost"]["train_macs_per_iter"],
                     "stored_params": ms[0]["stored_params"]})
    lines = [f"## Partial network sharing [{label}]", "",
             f"`python benchmarks/sharing.py {' '.join(sys.argv[1:] if argv is None else argv)}` — {args.model}, "
             f"{data.name}, class sets {[len(s) for s in sets]}, {args.epochs} epochs per network, "
             f"{args.subset or 'all'} training images per set, {len(data.test_y)} test images, seeds {args.seeds}, "
             f"branch lr {lr:g} (chosen on seed {select}'s validation from {lrs}), device {cfg.device}, "
             f"{torch.get_num_threads()} thread(s).", "",
             "### Accuracy vs sharing (all-class accuracy of the updated network; per-set = within the set)", "",
             format_table(rows), "",
             f"Chosen: share {chosen['share']:g} ({100 * chosen['shared_fraction']:.1f}% of conv parameters shared): the "
             f"largest share whose validation accuracy is within {args.max_drop:g} points of no sharing "
             f"({share0['val_acc']:.2f}). MACs per training iteration at batch {args.batch_size} "
             f"(torch.utils.flop_counter), s/iter measured, peak MB: "
             f"{'CUDA max_memory_allocated' if cfg.device != 'cpu' else 'CPU profiler memory timeline'}.", "",
             "### Against no sharing and whole-network fine-tuning", "",
             "| method | all-class test | val | per-set test (within set) | per-set test (all-class prediction) | "
             "train MMACs/iter | stored params |", "|---|---|---|---|---|---|---|"]
    for c in comp:
        lines.append(f"| {c['method']} | {c['test_acc']} | {c['val_acc']} | {c['per_set_within']} | "
                     f"{c['per_set_all_class']} | {c['train_macs_per_iter'] / 1e6:.0f} | {c['stored_params']:,} |")
    lines += ["", f"### Training cost measured side by side (one process, interleaved) [{label}]", "",
              claim_table(side), ""]
    lines += claim_lines(side, measured, chosen, args, cfg, t_cost)
    lines += ["", f"Total wall time: {time.time() - t_start:.0f} s (this invocation; finished runs are reused)."]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({
        "label": label, "lr": lr, "lr_val": val, "sweep": res, "comparison": comp, "side_by_side": side,
        "measured": {f"{k:g}": v for k, v in measured.items()},
        "best_per_cost": {k: best_per_cost(side, cost_key=k)["share"] for k in ("train_macs_rel", "sec_per_iter_rel")},
        "saving_gap": [saving_gap(r) for r in side if r["share"] > 0]}, indent=2))
    print(f"wrote {out}/results.md, {out}/results.json, {out}/lr{lr:g}/sweep.png, {out}/claim.png", flush=True)
    return 0


def side_by_side(cfg: TrainConfig, sets, data, shares, rounds: int, iters: int):
    """:func:`measure_side_by_side` for the branch of the last class set (as the sweep's per-run cost) of a
    fresh ``cfg.model`` base, on ``cfg.device``, at the training batch size."""
    dev = resolve_device(cfg.device)
    torch.manual_seed(0)
    base, _ = build_model(cfg.model, num_classes=len(sets[0]), in_chans=data.in_chans)
    base = base.to(dev).eval()
    x = example_input(None, (data.in_chans, data.size, data.size), batch=cfg.batch_size, device=dev)
    return measure_side_by_side(base, shares, x, len(sets[-1]), rounds=rounds, iters=iters)


def _ratio(v, rel, fmt):
    return "" if v is None else f"{v:{fmt}} ({rel:.2f})" if rel is not None else f"{v:{fmt}}"


def _pct(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def claim_table(rows) -> str:
    """Markdown table of the side-by-side rows: accuracy, each cost with its ratio to share 0, parameters."""
    out = ["| share | shared | val | test | train MMACs/iter (rel) | s/iter (rel) | peak MB (rel) | trainable "
           "(rel) | stored (rel) | val acc / rel MACs |", "|" + "---|" * 10]
    for r in rows:
        mark = " (chosen)" if r.get("chosen") else ""
        out.append(f"| {r['share']:g}{mark} | {100 * r['shared_fraction']:.1f}% | {r['val_acc']:.2f} | "
                   f"{r['test_acc']:.2f} ± {r.get('test_acc_std', 0):.2f} | "
                   f"{_ratio(r['train_macs_per_iter'] / 1e6, r['train_macs_rel'], '.0f')} | "
                   f"{_ratio(r['sec_per_iter'], r['sec_per_iter_rel'], '.3f')} | "
                   f"{_ratio(r['peak_mem_mb'], r['peak_mem_rel'], '.0f')} | "
                   f"{_ratio(r['trainable_params'], r['trainable_rel'], ',')} | "
                   f"{_ratio(r['stored_params'], r['stored_rel'], ',')} | "
                   f"{r['val_acc'] / r['train_macs_rel']:.1f} |")
    return "\n".join(out)


def claim_lines(side, measured, chosen, args, cfg, t_cost: float):
    """The summary lines: best accuracy per unit of training cost, time saving against MAC saving and
    why, what the energy figure is, and how the costs were measured."""
    lines = []
    for key, what in (("train_macs_rel", "training MACs per iteration"),
                      ("sec_per_iter_rel", "measured time per iteration")):
        b = best_per_cost(side, cost_key=key)
        lines.append(f"Best accuracy per unit of training cost ({what}, on validation accuracy): share {b['share']:g} "
                     f"(val {b['val_acc']:.2f}, test {b['test_acc']:.2f} vs {side[0]['test_acc']:.2f} without sharing, "
                     f"at {b[key]:.2f}x the cost).")
    gaps = [saving_gap(r) for r in side if r["share"] > 0]
    savings = "; ".join(f"share {g['share']:g}: {g['mac_saving']:.0f} / {g['time_saving']:.0f} / "
                        f"{_pct(g['mem_saving'])}, gap {g['gap']:+.0f} pts" for g in gaps)
    lines.append(f"Savings against share 0 (MACs / measured time / peak memory, %; gap = MAC - time saving): "
                 f"{savings}.")
    m0 = measured[0.0]
    split = time_split(measured)
    parts = "; ".join(f"share {k:g}: forward {v['fwd_time_rel']:.2f} ({v['fwd_macs_rel']:.2f}), backward + update "
                      f"{v['bwd_time_rel']:.2f} ({v['bwd_macs_rel']:.2f})" for k, v in split.items() if k > 0)
    lines.append(f"Why time and MAC savings differ: sharing removes backward work only (no weight gradients for shared "
                 f"layers, no input gradients before the first trained one) and leaves the forward MACs unchanged, "
                 f"but the shared prefix's forward runs without autograd recording (no activations kept for backward, "
                 f"hence the lower peak memory), and the MAC count leaves out elementwise work (BatchNorm, ReLU, "
                 f"additions, the SGD update) and per-operation overhead. Without sharing the forward is "
                 f"{100 * m0['forward_macs_per_iter'] / m0['train_macs_per_iter']:.0f}% of an iteration's MACs and "
                 f"{100 * m0['fwd_sec_per_iter'] / m0['sec_per_iter']:.0f}% of its measured time. Measured time as a "
                 f"ratio to share 0 (MACs in brackets): {parts}.")
    lines.append("Energy / memory access: the library has no energy or memory-access model (training MACs stand in for "
                 "the paper's RTL energy model, docs/sharing.md); peak memory is not memory access.")
    spread = max(max(v["sec_per_iter_rounds"]) / min(v["sec_per_iter_rounds"]) for v in measured.values())
    lines.append(f"Costs: the last class set's branch of a fresh {args.model} at batch {args.batch_size} on "
                 f"{resolve_device(cfg.device)}, {torch.get_num_threads()} thread(s); per share {args.time_rounds} "
                 f"interleaved rounds of {args.time_iters} SGD iterations, median of round medians (largest max/min "
                 f"over rounds of one share: {spread:.2f}); peak memory: {m0['peak_mem_source']}; {t_cost:.0f} s.")
    return lines


if __name__ == "__main__":
    sys.exit(main())
