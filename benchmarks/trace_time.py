"""Per-model ``filtersurgery.trace`` time on CPU for the tracer table of docs/tracer.md.

    python benchmarks/trace_time.py [--repeat 3] [--threads 1] [--check-real] [MODEL ...]

Prints, per model, the best and median wall time of ``trace(model)`` (default input,
i.e. the meta-device trace at the model's own input size), the number of convs and the
coverage. ``--check-real`` also traces with a real input tensor of the full default size
and checks that the map is identical. Models are built with random weights.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from filtersurgery.models.factory import build_model
from filtersurgery.tracing.scaling_map import format_coverage
from filtersurgery.tracing.probe import default_input_size
from filtersurgery.tracing.tracer import trace

ISSUE_MODELS = [
    "timm:resnet18", "timm:resnet50", "timm:resnext50_32x4d", "timm:wide_resnet50_2", "timm:mobilenetv2_100",
    "timm:mobilenetv3_large_100", "timm:efficientnet_b0", "timm:regnety_008", "timm:densenet121",
    "timm:ghostnet_100", "timm:convnext_nano", "timm:resnetv2_50", "timm:inception_v3", "timm:vgg11_bn",
    "torchvision:resnet18", "torchvision:mobilenet_v3_small", "torchvision:efficientnet_b0",
    "torchvision:densenet121", "torchvision:shufflenet_v2_x1_0", "torchvision:googlenet",
    "torchvision:convnext_tiny", "torchvision:regnet_y_400mf", "torchvision:squeezenet1_0",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="*", default=ISSUE_MODELS)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: stable on shared CPUs)")
    ap.add_argument("--check-real", action="store_true", help="compare with a real full-size input trace")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), best/median of {args.repeat}")
    worst, same = 0.0, True
    for spec in args.specs:
        model, _ = build_model(spec)
        trace(model)  # warm-up (imports, meta kernels)
        times = []
        for _ in range(args.repeat):
            t = time.perf_counter()
            sm = trace(model)
            times.append(time.perf_counter() - t)
        line = (
            f"{spec:<36} best {min(times):.3f}s  median {statistics.median(times):.3f}s  "
            f"convs {len(sm):4d}  coverage {format_coverage(sm.coverage, '7.2%'):>7}"
        )
        if args.check_real:
            real = trace(model, torch.randn(1, *default_input_size(model)))
            ok = real.to_json() == sm.to_json()
            same &= ok
            line += f"  real-input map {'identical' if ok else 'DIFFERS'}"
        print(line, flush=True)
        worst = max(worst, statistics.median(times))
    print(f"slowest median: {worst:.3f}s" + ("" if not args.check_real else f"; maps identical: {same}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
