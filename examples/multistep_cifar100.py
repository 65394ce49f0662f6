"""The multi-step framework vs fine-tuning on CIFAR-100 (the multistep paper's setting).

CIFAR-100's training set is split 1:1:1:1 (docs/method.md §8); step 1 trains Data1 from scratch,
steps 2-4 see only their own part. ``framework`` = SST (+ the multi-step loss from step
3) -> Dri x2 -> AOD -> the better student on validation; ``finetune`` = cross-entropy on
the new part at lr 1e-2 (the library default; the paper: 1e-3). Model: the CIFAR
ResNet-32 of the paper's Table 7 (``cifar:resnet32``), batch 256, SGD 0.9 / wd 5e-4 / cosine (paper IV-B).

The data is not shipped: the script runs when ``DATA_ROOT/cifar-100-python`` exists
(torchvision's layout) and otherwise exits with a one-line message saying how to get it.

    python examples/multistep_cifar100.py --data-root ~/data --download           # fetch it once (network)
    python examples/multistep_cifar100.py --data-root ~/data --device cuda         # 30 epochs per phase
    python examples/multistep_cifar100.py --data-root ~/data --epochs 300 --seeds 0 1 2 --device cuda   # paper length
    python examples/multistep_cifar100.py --data-root ~/data --smoke              # seconds, CPU; the tests run this

Re-running the same command resumes from the last finished epoch.
"""
import argparse
import statistics
import sys
from pathlib import Path

import torch

from filtersurgery.data import load_dataset
from filtersurgery.report.figures import accuracy_per_step, markdown_table
from filtersurgery import TrainConfig, multi_step


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=None,
                   help="folder holding cifar-100-python/ (default $FILTERSURGERY_DATA or ~/.cache/filtersurgery/data)")
    p.add_argument("--download", action="store_true", help="let torchvision download CIFAR-100 into --data-root")
    p.add_argument("--model", default="cifar:resnet32", help="cifar:resnetDEPTH, timm:NAME or torchvision:NAME")
    p.add_argument("--methods", nargs="+", default=["finetune", "framework"],
                   help="any of framework, finetune, bst, dml, lwm, joint")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--epochs", type=int, default=30, help="epochs per phase (paper: 300)")
    p.add_argument("--subset", type=int, default=0, help="training images per part; 0 = the whole part")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default="runs/examples/multistep_cifar100")
    p.add_argument("--smoke", action="store_true", help="tiny configuration on CPU (seconds), for the tests")
    args = p.parse_args()
    if args.smoke:  # 3 steps so that step 3 exercises the multi-step loss (MSL)
        args.model, args.steps, args.epochs, args.subset, args.batch_size = "cifar:resnet8", 3, 1, 64, 32
        args.device, args.out = "cpu", args.out + "_smoke"
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a busy CI machine
    return args


def main():
    args = get_args()
    try:
        data = load_dataset("cifar100", root=args.data_root, download=args.download,
                            subset_test=200 if args.smoke else None)
    except FileNotFoundError as e:  # one line: where it looked and how to get the files
        print(f"multistep_cifar100: {e}", file=sys.stderr)
        return 1
    print(f"data: {data.name} ({len(data.train_y)} train / {len(data.test_y)} test) from {data.source}")

    results = {}
    for method in args.methods:
        cfg = TrainConfig(
            model=args.model, data="cifar100", data_root=args.data_root, method=method, steps=args.steps,
            epochs=args.epochs, subset=args.subset or None, batch_size=args.batch_size, device=args.device,
            progress=False, max_batches=2 if args.smoke else None,
        )
        per_step = {}
        for seed in args.seeds:
            # the step-1 model (Data1 from scratch) is the same for every method of a seed: train it once
            first = Path(args.out) / args.methods[0] / f"seed{seed}" / "step1.safetensors"
            # multi_step resumes a killed run and refuses a folder holding a run with other settings
            m = multi_step(cfg, Path(args.out) / method / f"seed{seed}", seed=seed, data=data,
                           step1_from=str(first) if method != args.methods[0] else None)
            for e in m["steps"]:
                per_step.setdefault(e["step"], []).append(e["test_acc"])
                print(f"{method:>9} seed {seed} step {e['step']}: test {e['test_acc']:.2f}%  "
                      f"val {e['val_acc']:.2f}%  ({e['seconds']:.0f}s)")
        results[method] = [{"step": k, "test_acc_mean": statistics.fmean(v),
                            "test_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0} for k, v in sorted(per_step.items())]

    print()
    print(markdown_table(results))
    png = accuracy_per_step(results, Path(args.out) / "accuracy.png")
    print(f"\nplot: {png}; checkpoints and metrics.json under {args.out}/<method>/seed<S>/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
