"""``filtersurgery sweep-sharing``: the accuracy-vs-sharing curve of partial network sharing (docs/sharing.md).

Trains ``sharing`` for each of ``--shares`` with
:func:`~filtersurgery.methods.sharing.sweep_sharing` (the library function), prints the
sweep as a markdown table (:func:`format_table`) and the chosen share.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

from filtersurgery.cli.run import add_model_data_arguments
from filtersurgery.data.datasets import check_classes, load_dataset
from filtersurgery.engine.trainer import TrainConfig
from filtersurgery.methods.sharing import DEFAULT_SHARES, class_sets_from, sweep_sharing
from filtersurgery.models.factory import build_model

__all__ = ["cmd_sweep", "format_table", "add_parsers"]


def _floats(spec: str) -> List[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (``--shares``; one-line ValueError naming it)."""
    try:
        return [float(s) for s in spec.replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"shares: must be comma-separated numbers in [0, 1], got {spec!r}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    """``filtersurgery sweep-sharing``: train every share, write the curve, pick the share on validation."""
    cfg = TrainConfig(model=args.model, data=args.data, data_root=args.data_root, download=args.download,
                      method="sharing", split="multi", steps=1, epochs=args.epochs, batch_size=args.batch_size,
                      lr=args.lr, subset=args.subset, image_size=args.image_size, device=args.device, amp=args.amp,
                      channels_last=args.channels_last, max_batches=args.max_batches, progress=args.progress)
    cfg.validate()
    build_model(cfg.model, num_classes=10, in_chans=1)  # unknown model -> one-line error before any work
    data = check_classes(load_dataset(cfg.data, root=cfg.data_root, download=cfg.download,
                                      subset_test=args.test_subset, image_size=cfg.image_size))
    sets = class_sets_from(args.class_sets, data.num_classes)
    res = sweep_sharing(cfg, sets, _floats(args.shares), Path(args.out), seeds=args.seeds, data=data,
                        max_drop=args.max_drop, cost=not args.no_cost)
    print(format_table(res["rows"]))
    print(f"chosen: share {res['chosen_share']:g} (largest share with validation accuracy within "
          f"{args.max_drop:g} points of no sharing)")
    print(f"wrote {args.out}/sweep.csv, sweep.json, sweep.png")
    return 0


def format_table(rows: List[Dict]) -> str:
    """A markdown table of the sweep rows."""
    cols = [("share", "share"), ("shared_fraction", "shared"), ("val_acc", "val"), ("test_acc", "test")]
    cols += [(k, k.replace("_test_acc", "")) for k in rows[0] if k.startswith("set") and k.endswith("_test_acc")]
    cols += [(k, n) for k, n in (("train_macs_per_iter", "train MMACs/iter"), ("train_macs_rel", "rel"),
                                  ("trainable_params", "trainable"), ("stored_params", "stored"),
                                  ("sec_per_iter", "s/iter"), ("peak_mem_mb", "peak MB"), ("chosen", "chosen"))
             if k in rows[0]]
    lines = ["| " + " | ".join(n for _, n in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for k, _ in cols:
            v = r.get(k)
            if k == "train_macs_per_iter" and v is not None:
                v = f"{v / 1e6:.1f}"
            elif k == "shared_fraction":
                v = f"{100 * v:.1f}%"
            elif isinstance(v, float) and (k.endswith("acc") or k == "peak_mem_mb"):
                v = f"{v:.2f}"
            elif k in ("trainable_params", "stored_params") and v is not None:
                v = f"{v:,}"
            elif k == "chosen":
                v = "**yes**" if v else ""
            cells.append("" if v is None else str(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def add_parsers(sub) -> None:
    """Register ``sweep-sharing`` with the CLI (this module is listed in ``cli.main.COMMAND_MODULES``)."""
    d = TrainConfig()
    p = sub.add_parser("sweep-sharing", help="accuracy-vs-sharing curve of partial network sharing (docs/sharing.md)")
    add_model_data_arguments(p)
    p.add_argument("--class-sets", default=None, metavar="N,N,...", help="set sizes in label order (default 40/30/30%%)")
    p.add_argument("--shares", default=",".join(f"{s:g}" for s in DEFAULT_SHARES),
                   help="comma-separated shares to train (0 is always added; default %(default)s)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="chosen = largest share with all-class validation accuracy within this many points of "
                        "no sharing (default %(default)s)")
    p.add_argument("--epochs", type=int, default=d.epochs, help="epochs per network (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default 0)")
    p.add_argument("--out", default="runs/sweep_sharing", help="output folder (default %(default)s)")
    p.add_argument("--subset", type=int, default=None, help="N training images per class set")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on a fixed class-balanced subset of N test images")
    p.add_argument("--lr", type=float, default=None,
                   help="branch learning rate (default 1e-3; the base network trains at 0.1)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="images per batch (default %(default)s)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto (default %(default)s)")
    p.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default=d.amp,
                   help="mixed precision: auto = bf16 on CUDA, none on CPU; fp16 uses a GradScaler (default %(default)s)")
    p.add_argument("--channels-last", action="store_true", help="train in the channels_last memory format")
    p.add_argument("--max-batches", type=int, default=None, help="cap batches per epoch (smoke tests)")
    p.add_argument("--no-cost", action="store_true", help="skip the per-configuration cost measurement")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    p.set_defaults(func=cmd_sweep)
