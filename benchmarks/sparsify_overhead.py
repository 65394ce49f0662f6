"""Training-step overhead of ``Sparsifier.step()`` against torch-pruning's ``BNScalePruner.regularize``.

For each timm model, three variants of one SGD training step are timed on the same model:

    plain   forward, backward, optimizer.step()
    sst     plain + ``sp.step()`` (filtersurgery, SP_r = Target_r: 30% of the factors)
    tp      plain + ``BNScalePruner.regularize(model, reg)`` (torch-pruning, every BN)

The variants are interleaved: each of ``--rounds`` rounds times every variant for
``--iters`` steps (the order rotates from round to round), so drifts in clock speed hit
all of them alike. Reported: median ms/step over rounds, the spread (min-max over
rounds, in % of the median) and the overhead vs plain as the median of the per-round
ratios. On CUDA: batch 256 at 64x64, bf16 autocast, channels_last; on CPU a smaller
default (batch 8 at 64x64, fp32). ``sp.step()`` is also run once under
``torch.cuda.set_sync_debug_mode("error")`` to check that it never syncs with the host.

    python benchmarks/sparsify_overhead.py --device cuda --out runs/sparsify_overhead.json
    python benchmarks/sparsify_overhead.py --device cpu --models resnet18 resnet50
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
import torch_pruning as tp

from filtersurgery.ops.sparsity import sparsify
from filtersurgery.tracing.tracer import trace

MODELS = ["resnet18", "resnet50", "mobilenetv2_100", "efficientnet_b0"]
VARIANTS = ["plain", "sst", "tp"]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build(name: str, device: torch.device, size: int, batch: int):
    """Model, optimizer, a fixed batch, the Sparsifier and the torch-pruning pruner."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=100).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    model.train()
    x = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        x = x.to(memory_format=torch.channels_last)
    y = torch.randint(0, 100, (batch,), device=device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, weight_decay=1e-4)
    sm = trace(model, x[:1])
    sp = sparsify(sm, target_r=0.3, epochs=90, lam=1e-4)
    sp.set_epoch(30)  # past E_cut: SP_r = Target_r
    pruner = tp.pruner.BNScalePruner(model, x[:1], importance=tp.importance.BNScaleImportance(), reg=1e-4)
    return model, opt, x, y, sp, pruner


def make_step(model, opt, x, y, sp, pruner, variant: str, device: torch.device):
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()

    def step():
        with amp:
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if variant == "sst":
            sp.step()
        elif variant == "tp":
            pruner.regularize(model, reg=1e-4)
        opt.step()

    return step


def time_steps(step, iters: int, device: torch.device) -> float:
    sync(device)
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync(device)
    return (time.perf_counter() - t) / iters * 1e3


def check_no_sync(sp, model, x, y, device) -> str:
    if device.type != "cuda":
        return "n/a (cpu)"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    sync(device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        sp.step()
        return "none"
    except RuntimeError as e:
        return f"SYNC: {str(e).splitlines()[0]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        model.zero_grad(set_to_none=True)


def time_op(fn, device, reps: int = 50) -> float:
    """Median microseconds of ``fn()`` alone (grads already populated), over 5 blocks of ``reps``."""
    out = []
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        out.append((time.perf_counter() - t) / reps * 1e6)
    return statistics.median(out)


def bench_model(name, device, size, batch, rounds, iters, warmup):
    model, opt, x, y, sp, pruner = build(name, device, size, batch)
    steps = {v: make_step(model, opt, x, y, sp, pruner, v, device) for v in VARIANTS}
    for v in VARIANTS:
        time_steps(steps[v], warmup, device)
    times = {v: [] for v in VARIANTS}
    for r in range(rounds):
        order = VARIANTS[r % 3 :] + VARIANTS[: r % 3]
        for v in order:
            times[v].append(time_steps(steps[v], iters, device))
    res = {"model": name, "factors": sp.n, "targets": int(sp.targets.sum()), "host_sync_in_sp_step": check_no_sync(sp, model, x, y, device)}
    make_step(model, opt, x, y, sp, pruner, "plain", device)()  # populate grads (zero_grad then backward)
    res["op_us"] = {"sst": time_op(sp.step, device), "tp": time_op(lambda: pruner.regularize(model, reg=1e-4), device)}
    for v in VARIANTS:
        med = statistics.median(times[v])
        res[v] = {"median_ms": med, "spread_pct": (max(times[v]) - min(times[v])) / med * 100, "rounds_ms": times[v]}
        if v != "plain":
            ratios = [a / b - 1 for a, b in zip(times[v], times["plain"])]
            res[v]["overhead_pct"] = statistics.median(ratios) * 100
            res[v]["overhead_range_pct"] = (min(ratios) * 100, max(ratios) * 100)
    return res


def table(results, header: str) -> str:
    rows = [header, f"{'model':17s} {'plain ms':>9s} {'sst ms':>9s} {'tp ms':>9s} {'sst overhead':>22s} {'tp overhead':>22s} {'spread%':>8s} {'sp.step us':>10s} {'tp.reg us':>10s}  host sync in sp.step()"]
    for r in results:
        spread = max(r[v]["spread_pct"] for v in VARIANTS)
        ov = lambda v: f"{r[v]['overhead_pct']:+6.2f}% [{r[v]['overhead_range_pct'][0]:+.1f},{r[v]['overhead_range_pct'][1]:+.1f}]"  # noqa: E731
        rows.append(f"{r['model']:17s} {r['plain']['median_ms']:9.2f} {r['sst']['median_ms']:9.2f} {r['tp']['median_ms']:9.2f} "
                    f"{ov('sst'):>22s} {ov('tp'):>22s} {spread:8.1f} {r['op_us']['sst']:10.1f} {r['op_us']['tp']:10.1f}  {r['host_sync_in_sp_step']}")
    rows.append("overhead: median over rounds of (variant / plain - 1) [min, max over rounds]; spread: max over variants of (max-min)/median;")
    rows.append("sp.step us / tp.reg us: the regularizer alone (after one backward), median of 5 blocks of 50 calls")
    return "\n".join(rows)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--batch-size", type=int, default=None, help="default 256 on cuda, 8 on cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--iters", type=int, default=None, help="steps per variant per round (default 20 cuda, 3 cpu)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.rounds < 5:
        raise SystemExit("--rounds: at least 5 rounds are needed for a meaningful median")
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    batch = args.batch_size or (256 if cuda else 8)
    iters = args.iters or (20 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    if cuda:
        torch.backends.cudnn.benchmark = True
    desc = torch.cuda.get_device_name(device) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    header = (f"sparsify_overhead on {desc}: batch {batch}, {args.size}x{args.size}, "
              f"{'bf16 autocast, channels_last' if cuda else 'fp32'}, {args.rounds} rounds x {iters} steps, "
              f"torch {torch.__version__}, timm {timm.__version__}, torch-pruning {getattr(tp, '__version__', '?')}")
    results = []
    for name in args.models:
        results.append(bench_model(name, device, args.size, batch, args.rounds, iters, warmup))
        print(f"done {name}", file=sys.stderr, flush=True)
    print(table(results, header))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": header, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
