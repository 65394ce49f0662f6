"""Build the embedded demo subset ``filtersurgery/data/_datafiles/fashion_mnist_subset.npz``.

A class-balanced random subset of the official Fashion-MNIST files: 600 training images
per class from the training set and 100 test images per class from the test set (seed 0),
uint8, stored with ``numpy.savez_compressed``. Not shipped in the wheel; rerun with

    python benchmarks/make_demo_subset.py [--data-root DIR] [--train 6000] [--test 1000]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

from filtersurgery.data.images import _balanced_subset
from filtersurgery.data.sources import load_fashion_mnist

OUT = os.path.join(os.path.dirname(__file__), "..", "filtersurgery", "data", "_datafiles", "fashion_mnist_subset.npz")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", default=None, help="folder with the 4 Fashion-MNIST idx files")
    ap.add_argument("--train", type=int, default=6000, help="training images (class-balanced)")
    ap.add_argument("--test", type=int, default=1000, help="test images (class-balanced)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=OUT)
    args = ap.parse_args()
    full = load_fashion_mnist(args.data_root)
    tr = _balanced_subset(full.train_y, args.train, seed=args.seed)
    te = _balanced_subset(full.test_y, args.test, seed=args.seed + 1)
    np.savez_compressed(
        args.out,
        train_x=full.train_x[tr].numpy(), train_y=full.train_y[tr].numpy().astype(np.uint8),
        test_x=full.test_x[te].numpy(), test_y=full.test_y[te].numpy().astype(np.uint8),
        train_index=tr.numpy().astype(np.int32), test_index=te.numpy().astype(np.int32),
    )
    print(f"wrote {os.path.abspath(args.out)} ({os.path.getsize(args.out) / 1e6:.2f} MB) from {full.source}: "
          f"{len(tr)} train / {len(te)} test")


if __name__ == "__main__":
    main()
