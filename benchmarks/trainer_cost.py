"""Cost of the trainer, measured side by side in one run.

Two ratios, each from the same model, data and batch order:

1. AOD step (two students, docs/method.md §3) / single-student step (the same two augmented views,
   CE + consistency, one student). Goal: <= 2.05.
2. The trainer's fine-tune epoch (``train.run_phase``, with its per-epoch validation,
   resumable state and logging) / a minimal hand-written loop (random crop + flip,
   SGD 0.9, wd 5e-4, cosine, the same batches). Goal: <= 1.05.

Variants are interleaved over ``--rounds`` rounds (order rotated each round) so clock
drift hits all alike; reported are the median per-round ratio and its spread (min-max).

    python benchmarks/trainer_cost.py --device cuda --batch-size 256 --batches 200     # GPU
    python benchmarks/trainer_cost.py --cpu-small                                      # CPU-sized
"""
from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from filtersurgery.data import augment
from filtersurgery.data import BatchLoader, load_dataset
from filtersurgery.train import AOD, FineTune, Run, TrainConfig, run_phase


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def trainer_epoch(run: Run, kind: str, students: int, tag: str) -> float:
    """Seconds of one ``run_phase`` epoch of ``kind`` (fresh work folder: nothing resumes)."""
    shutil.rmtree(run.work, ignore_errors=True)
    run.work.mkdir(parents=True)
    model = run.new_model()
    phase = (AOD(f"bench_{tag}", [0], run.cfg.new_lr, 1, students=students) if kind == "aod"
             else FineTune(f"bench_{tag}", [0], run.cfg.new_lr, 1))
    _sync(run.device)
    t0 = time.perf_counter()
    run_phase(run, 2, phase, model)
    _sync(run.device)
    return time.perf_counter() - t0


def hand_loop_epoch(run: Run) -> float:
    """Seconds of a minimal fine-tune epoch written by hand (same batches, no logging)."""
    cfg, dev = run.cfg, run.device
    model = run.new_model()
    x_tr, y_tr = run.part_xy([0], "train")
    loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, device=dev, seed=0, drop_last=len(y_tr) > cfg.batch_size)
    n = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.new_lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=n)
    gen = torch.Generator(device=dev).manual_seed(0)
    model.train()
    _sync(dev)
    t0 = time.perf_counter()
    for i, (xb, yb) in enumerate(loader):
        if i >= n:
            break
        x = augment.normalize(augment.random_crop_flip(xb, generator=gen), run.data.mean, run.data.std)
        with torch.autocast(dev.type, dtype=run.amp, enabled=run.amp is not None):
            loss = F.cross_entropy(model(x).float(), yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    _sync(dev)
    return time.perf_counter() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="timm:resnet18")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--batches", type=int, default=100, help="batches per timed epoch")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--cpu-small", action="store_true", help="CPU-sized: batch 64, 20 batches per epoch, 5 rounds")
    p.add_argument("--data-root", default=None, help="folder holding the Fashion-MNIST files")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--state-every", type=float, default=0.0,
                   help="the trainer's resumable-state interval in seconds (0: after every epoch, the default)")
    p.add_argument("--json", type=Path, default=None, help="also write the ratios and times as JSON here")
    args = p.parse_args(argv)
    if args.cpu_small:
        args.batch_size, args.batches, args.device = 64, 20, "cpu"
    cfg = TrainConfig(model=args.model, device=args.device, batch_size=args.batch_size, max_batches=args.batches,
                      subset=args.batch_size * (args.batches + 1), steps=2, progress=False, method="framework",
                      channels_last=args.channels_last, state_every=args.state_every)
    data = load_dataset("fashion-mnist", root=args.data_root, allow_demo=True)
    tmp = Path(tempfile.mkdtemp(prefix="fs_cost_"))
    run = Run(cfg, 0, tmp, data)
    label = f"{'CPU-sized' if run.device.type == 'cpu' else 'GPU'}: {args.model}, batch {args.batch_size}, {args.batches} batches/epoch"
    print(f"# trainer cost ({label}); torch {torch.__version__}, device {run.device}", flush=True)
    variants = {
        "aod2": lambda: trainer_epoch(run, "aod", 2, "aod2"),
        "aod1": lambda: trainer_epoch(run, "aod", 1, "aod1"),
        "trainer_ft": lambda: trainer_epoch(run, "finetune", 1, "ft"),
        "hand_ft": lambda: hand_loop_epoch(run),
    }
    for f in variants.values():  # warm-up (allocator, kernels)
        f()
    times = {k: [] for k in variants}
    names = list(variants)
    for r in range(args.rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for k in order:
            times[k].append(variants[k]())
        print(f"round {r + 1}: " + "  ".join(f"{k} {times[k][-1]:.2f}s" for k in names), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)

    def ratio(a, b):
        rs = [x / y for x, y in zip(times[a], times[b])]
        return statistics.median(rs), min(rs), max(rs)

    print("\n| ratio | median | spread (min-max) | goal |\n|---|---|---|---|")
    ratios = {}
    for (a, b, goal) in (("aod2", "aod1", "<= 2.05"), ("trainer_ft", "hand_ft", "<= 1.05")):
        m, lo, hi = ratio(a, b)
        ratios[f"{a}/{b}"] = {"median": m, "min": lo, "max": hi, "goal": goal}
        print(f"| {a} / {b} | {m:.3f} | {lo:.3f}-{hi:.3f} | {goal} |")
    print("\nmedian seconds per epoch: " + ", ".join(f"{k} {statistics.median(v):.2f}" for k, v in times.items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"label": label, "torch": torch.__version__, "device": str(run.device),
                                         "ratios": ratios, "seconds": times}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
