"""The multi-step framework vs fine-tuning on Fashion-MNIST, through ``filtersurgery.train``.

The training set is split into ``--steps`` equal, class-balanced parts (docs/method.md §8). Step 1
trains Data1 from scratch; every later step sees only its own part:

- ``finetune``: the previous model trained on the new part with cross-entropy (lr 1e-2, the
  library default for every multi-step method's new-data phase);
- ``framework``: SST (selective sparsity training; from step 3 with the multi-step loss,
  distilling from the previous model) -> two students by Dri (I = 0.1, 0.2) -> AOD on the
  new part -> the better student on the new part's validation split.

Test accuracy on the official test set is printed after every step. ``filtersurgery
demo`` runs the same comparison with fixed CPU-sized settings.

    python examples/multistep_fashion_mnist.py                                  # CPU-sized defaults
    python examples/multistep_fashion_mnist.py --epochs 30 --subset 0 --seeds 0 1 2 --device cuda   # full size
    python examples/multistep_fashion_mnist.py --smoke                          # seconds; the tests run this

Re-running the same command resumes from the last finished epoch (``--out`` keeps the state).
"""
import argparse
import statistics
from pathlib import Path

import torch

from filtersurgery.data import load_dataset
from filtersurgery.report.figures import accuracy_per_step, markdown_table
from filtersurgery import TrainConfig, multi_step


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="timm:resnet18", help="timm:NAME, torchvision:NAME or cifar:resnetDEPTH")
    p.add_argument("--steps", type=int, default=4, help="data parts = steps (1:1:1:1 by default)")
    p.add_argument("--epochs", type=int, default=3, help="epochs per phase (paper: 300 on CIFAR-100)")
    p.add_argument("--subset", type=int, default=1200, help="training images per part; 0 = the whole part")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST idx files (else the usual places)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--out", default="runs/examples/multistep_fashion_mnist")
    p.add_argument("--smoke", action="store_true", help="tiny configuration on CPU (seconds), for the tests")
    args = p.parse_args()
    if args.smoke:  # 3 steps so that step 3 exercises the multi-step loss (MSL)
        args.model, args.steps, args.epochs, args.subset, args.batch_size = "cifar:resnet8", 3, 1, 64, 32
        args.device, args.out = "cpu", args.out + "_smoke"
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a busy CI machine
    return args


def main():
    args = get_args()
    # the full dataset when it is found, else the embedded 6000/1000 subset (with a warning)
    data = load_dataset("fashion-mnist", root=args.data_root, allow_demo=True, subset_test=200 if args.smoke else None)
    print(f"data: {data.name} ({len(data.train_y)} train / {len(data.test_y)} test) from {data.source}")

    data_name = "demo" if data.name == "fashion-mnist-demo" else "fashion-mnist"  # recorded in metrics.json

    results = {}
    for method in ("finetune", "framework"):
        cfg = TrainConfig(
            model=args.model, data=data_name, method=method, steps=args.steps, epochs=args.epochs,
            subset=args.subset or None, batch_size=args.batch_size, device=args.device,
            progress=False, max_batches=2 if args.smoke else None,
        )
        per_step = {}
        for seed in args.seeds:
            # the step-1 model (Data1 from scratch) is the same for every method of a seed: train it once
            step1 = Path(args.out) / "finetune" / f"seed{seed}" / "step1.safetensors"
            # multi_step resumes a killed run and refuses a folder holding a run with other settings
            m = multi_step(cfg, Path(args.out) / method / f"seed{seed}", seed=seed, data=data,
                           step1_from=str(step1) if method != "finetune" else None)
            for e in m["steps"]:
                per_step.setdefault(e["step"], []).append(e["test_acc"])
                print(f"{method:>9} seed {seed} step {e['step']}: test {e['test_acc']:.2f}%  "
                      f"val {e['val_acc']:.2f}%  ({e['seconds']:.0f}s, phases {'+'.join(e['phases']) or 'reused'})")
        results[method] = [{"step": k, "test_acc_mean": statistics.fmean(v),
                            "test_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0} for k, v in sorted(per_step.items())]

    print()
    print(markdown_table(results))
    png = accuracy_per_step(results, Path(args.out) / "accuracy.png")
    print(f"\nplot: {png}; checkpoints (stepK.safetensors) and metrics.json under {args.out}/<method>/seed<S>/")


if __name__ == "__main__":
    main()
