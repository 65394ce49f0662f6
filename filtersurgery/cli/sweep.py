"""``filtersurgery sweep-sharing``: the accuracy-vs-sharing curve of partial network sharing (docs/sharing.md).

Trains ``sharing`` for each of ``--shares`` with
:func:`~filtersurgery.methods.sharing_sweep.sweep_sharing` (the library function), prints the
sweep as a markdown table (:func:`format_table`) and the chosen share.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Dict, List

from filtersurgery.cli.options import add_options, options_from_args
from filtersurgery.cli.run import add_model_data_arguments
from filtersurgery.data import check_classes, load_dataset
from filtersurgery.engine.config import TrainConfig
from filtersurgery.methods.sharing import DEFAULT_SHARES, SharingConfig, class_sets_from
from filtersurgery.methods.sharing_sweep import sweep_sharing
from filtersurgery.models.factory import build_model

__all__ = ["cmd_sweep", "format_table", "add_parsers"]

# the TrainConfig flags of sweep-sharing (besides --model/--data/...), and the help of those it reads its own way
_TRAIN_FIELDS = ("epochs", "subset", "lr", "batch_size", "device", "amp", "channels_last", "max_batches", "progress")
_TRAIN_HELP = {"epochs": "epochs per network (default %(default)s)",
               "subset": "N training images per class set",
               "lr": "branch learning rate (default 1e-3; the base network trains at 0.1)",
               "batch_size": "images per batch (default %(default)s)"}


def _floats(spec: str) -> List[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]`` (``--shares``; one-line ValueError naming it)."""
    try:
        return [float(s) for s in spec.replace(" ", "").split(",") if s]
    except ValueError:
        raise ValueError(f"shares: must be comma-separated numbers in [0, 1], got {spec!r}") from None


def cmd_sweep(args: argparse.Namespace) -> int:
    """``filtersurgery sweep-sharing``: train every share, write the curve, pick the share on validation."""
    cfg = options_from_args(TrainConfig, args, method="sharing", split="multi", steps=1)
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
    """Register ``sweep-sharing`` with the CLI (this module is listed in ``cli.main.COMMAND_MODULES``).

    Its training flags are TrainConfig's (the help of those it reads differently replaced)."""
    p = sub.add_parser("sweep-sharing", help="accuracy-vs-sharing curve of partial network sharing (docs/sharing.md)")
    add_model_data_arguments(p)
    add_options(p, SharingConfig, only=("class_sets",), help={"class_sets": "set sizes in label order (default 40/30/30%%)"})
    p.add_argument("--shares", default=",".join(f"{s:g}" for s in DEFAULT_SHARES),
                   help="comma-separated shares to train (0 is always added; default %(default)s)")
    p.add_argument("--max-drop", type=float, default=1.0,
                   help="chosen = largest share with all-class validation accuracy within this many points of "
                        "no sharing (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default 0)")
    p.add_argument("--out", default="runs/sweep_sharing", help="output folder (default %(default)s)")
    p.add_argument("--test-subset", type=int, default=None, help="evaluate on a fixed class-balanced subset of N test images")
    add_options(p, TrainConfig, only=_TRAIN_FIELDS, help=_TRAIN_HELP)
    p.add_argument("--no-cost", action="store_true", help="skip the per-configuration cost measurement")
    p.set_defaults(func=cmd_sweep)
