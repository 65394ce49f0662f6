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
from filtersurgery.methods.sharing_sweep import sweep_sharing
from filtersurgery.engine.config import TrainConfig

CPU_SMALL = dict(model="cifar:resnet20", epochs=4, subset=1500, test_subset=2000, batch_size=128, device="cpu",
                 seeds=[0], threads=1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cifar:resnet32")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--data-root", default=None)
    p.add_argument("--class-sets", default="4,3,3")
    p.add_argument("--shares", default=",".join(f"{s:g}" for s in DEFAULT_SHARES))
    p.add_argument("--max-drop", type=float, default=1.0)
    p.add_argument("--lr-grid", default="1e-3,1e-2", help="branch/fine-tuning lrs tried at share 0 (chosen on val)")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--subset", type=int, default=None, help="training images per class set")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--cpu-small", action="store_true", help="CPU-sized configuration (few epochs, subsets)")
    p.add_argument("--out", default="runs/bench_sharing")
    args = p.parse_args(argv)
    if args.cpu_small:
        for k, v in CPU_SMALL.items():
            setattr(args, k, v)
    if args.threads:
        torch.set_num_threads(args.threads)
    label = "CPU-small" if args.cpu_small else "full"
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
    val = {}
    for lr in lrs:
        accs = []
        for seed in args.seeds:
            first = out / f"lr{lrs[0]:g}" / "share0.00" / f"seed{seed}" / "step1.safetensors"
            m = run_sharing(replace(cfg, lr=lr), sets, 0.0, out / f"lr{lr:g}" / "share0.00" / f"seed{seed}", seed, data,
                            base_from=None if lr == lrs[0] else first)
            accs.append(m["steps"][0]["val_acc"])
        val[lr] = statistics.fmean(accs)
        print(f"lr {lr:g}: no-sharing all-class val acc {val[lr]:.2f}", flush=True)
    lr = max(lrs, key=lambda v: val[v])
    print(f"chosen lr (validation): {lr:g}", flush=True)

    # 2. the sweep (its share-0 runs are the ones above)
    res = sweep_sharing(replace(cfg, lr=lr), sets, [float(s) for s in args.shares.split(",")], out / f"lr{lr:g}",
                        seeds=args.seeds, data=data, max_drop=args.max_drop,
                        title=f"[{label}] {args.model}, {data.name}, sets {[len(s) for s in sets]}")

    # 3. whole-network fine-tuning on each new set
    ft = [run_class_finetune(replace(cfg, lr=lr, method="class-finetune"), sets, out / "class-finetune" / f"seed{s}",
                             s, data) for s in args.seeds]

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
             f"branch lr {lr:g} (chosen on validation from {lrs}), device {cfg.device}, "
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
    lines += ["", f"Total wall time: {time.time() - t_start:.0f} s."]
    text = "\n".join(lines)
    print(text, flush=True)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({"label": label, "lr": lr, "lr_val": val, "sweep": res,
                                                  "comparison": comp}, indent=2))
    print(f"wrote {out}/results.md, {out}/results.json, {out}/lr{lr:g}/sweep.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
