"""Fig. 3 of the multistep paper at full size: SST vs BST from the same trained model.

A timm resnet18 (``in_chans=1``) is trained from scratch on Data1 (the first half of a
seeded, class-balanced 1:1 split of the Fashion-MNIST training set, docs/method.md §8), then
sparsity-trained on Data1 twice from the same weights and with the same data order:
SST (``selective=True``) and BST (``selective=False``, network slimming). Printed per
network: the mean |gamma| of the remaining factors (without the Target_r smallest) and its
ratio to the value before sparsity training (goal for SST: >= 0.9), the fraction of
factors at ~0, the validation accuracy (10% of Data1) and, for reference, the accuracy on
the official test set (reported, never used for a choice). Writes the Fig. 3 PNG.

lambda: ``--lam`` takes one or more values, each run as its own BST/SST pair from the same
pre-trained model (default 1e-4, the library default, and 1e-3 at full size; 1e-3 and
``auto`` for ``--cpu-small``). ``auto`` keeps lambda x (number of sparsity steps) equal to
network slimming's CIFAR schedule (1e-4 x 300 epochs x 196 steps): the same total L1 pull
in a short run. The PNG (``--png``) shows the first lambda; the others go to ``--out``.

    python benchmarks/sst_vs_bst.py --device cuda --out runs/sst_vs_bst          # >= 30 SST epochs
    python benchmarks/sst_vs_bst.py --cpu-small --out runs/sst_vs_bst_cpu         # minutes on a CPU
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from filtersurgery.data import load_dataset, split_parts
from filtersurgery.report.plots import gamma_histogram
from filtersurgery.ops.ranking import remaining_mean
from filtersurgery.ops.sparsity import sparsify
from filtersurgery.tracing.tracer import trace

PAPER_L1_PULL = 1e-4 * 300 * 196  # lambda x steps of network slimming's CIFAR-100 schedule

FULL = dict(subset=None, pre_epochs=30, epochs=30, batch_size=256, lams=["1e-4", "1e-3"])
CPU_SMALL = dict(subset=2000, pre_epochs=4, epochs=8, batch_size=64, lams=["1e-3", "auto"])


class DeviceLoader:
    """Shuffled, horizontally flipped batches of in-memory tensors; epoch ``e`` uses seed ``seed + e``."""

    def __init__(self, x, y, batch_size, seed, augment=True):
        self.x, self.y, self.bs, self.seed, self.augment, self.epoch = x, y, batch_size, seed, augment, 0

    def __len__(self):
        return (len(self.y) + self.bs - 1) // self.bs

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        perm = torch.randperm(len(self.y), generator=g).to(self.y.device)
        flip = (torch.rand(len(self.y), generator=g) < 0.5).to(self.y.device)
        for i in range(0, len(perm), self.bs):
            j = perm[i : i + self.bs]
            xb = self.x[j]
            if self.augment:
                xb = torch.where(flip[j, None, None, None], xb.flip(3), xb)
            yield xb, self.y[j]


@torch.no_grad()
def accuracy(model, x, y, bs=1000) -> float:
    was = model.training
    model.eval()
    hits = sum(int((model(x[i : i + bs]).argmax(1) == y[i : i + bs]).sum()) for i in range(0, len(y), bs))
    model.train(was)
    return hits / len(y)


def pretrain(model, loader, epochs, device):
    """From scratch: SGD lr 0.1, momentum 0.9, wd 1e-4, cosine (paper IV-B, first training)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()


def summary(model, sm, target_r, pre_mean, pre_median, val, test) -> dict:
    g = sm.factors.gammas().abs()
    mean = remaining_mean(sm, target_r, ranking="global")  # Fig. 3 is in the paper's |gamma| units
    return {
        "remaining_mean": mean,
        "ratio_to_pre": mean / pre_mean,
        "frac_zero": float((g <= 0.05 * pre_median).float().mean()),
        "val_acc": accuracy(model, *val),
        "test_acc": accuracy(model, *test),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--cpu-small", action="store_true", help="2000 Data1 images, 4 + 8 epochs, batch 64")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--subset", type=int, default=None, help="Data1 training images (default: all of Data1)")
    ap.add_argument("--pre-epochs", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None, help="SST/BST epochs (E_max; default 30)")
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--lam", nargs="+", default=None, help="lambda values ('auto' allowed)")
    ap.add_argument("--target-r", type=float, default=0.3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1 on cpu)")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--out", type=Path, default=Path("runs/sst_vs_bst"), help="folder for results.json")
    ap.add_argument("--png", type=Path, default=Path("docs/fig3_gamma_hist.png"))
    args = ap.parse_args(argv)
    cfg = dict(CPU_SMALL if args.cpu_small else FULL)
    for k in ("subset", "pre_epochs", "epochs", "batch_size"):
        if getattr(args, k) is not None:
            cfg[k] = getattr(args, k)
    if args.lam:
        cfg["lams"] = args.lam
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    torch.manual_seed(args.seed)

    d = load_dataset("fashion-mnist", root=args.data_root)
    (tr, va), _ = split_parts(d.train_y, 2, seed=args.seed, subset=cfg["subset"])

    def prep(x):
        return ((x.float() / 255 - d.mean[0]) / d.std[0]).to(device)

    x1, y1 = prep(d.train_x[tr]), d.train_y[tr].to(device)
    val = (prep(d.train_x[va]), d.train_y[va].to(device))
    test = (prep(d.test_x), d.test_y.to(device))
    steps = cfg["epochs"] * ((len(y1) + cfg["batch_size"] - 1) // cfg["batch_size"])
    lams = {v: PAPER_L1_PULL / steps if v == "auto" else float(v) for v in cfg["lams"]}
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    head = (f"sst_vs_bst on {dev_name}: timm {args.model} in_chans=1, Fashion-MNIST Data1 {len(y1)} train / {len(va)} val, "
            f"{cfg['pre_epochs']} pre-train + {cfg['epochs']} sparsity epochs, batch {cfg['batch_size']}, "
            f"lam {', '.join(f'{v:.3g}' + (' (auto)' if k == 'auto' else '') for k, v in lams.items())}, Target_r {args.target_r}, seed {args.seed}"
            f"{' [CPU-SMALL]' if args.cpu_small else ''}")
    print(head, flush=True)

    model = timm.create_model(args.model, pretrained=False, in_chans=1, num_classes=10).to(device)
    t = time.perf_counter()
    pretrain(model, DeviceLoader(x1, y1, cfg["batch_size"], seed=args.seed * 1000), cfg["pre_epochs"], device)
    t_pre = time.perf_counter() - t
    sm_pre = trace(model, x1[:1])
    pre_mean = remaining_mean(sm_pre, args.target_r, ranking="global")
    pre_median = float(sm_pre.factors.gammas().abs().median())
    rows = {"pre-trained": summary(model, sm_pre, args.target_r, pre_mean, pre_median, val, test) | {"seconds": t_pre}}
    args.out.mkdir(parents=True, exist_ok=True)
    for i, lam in enumerate(lams.values()):
        nets = {"pre-trained": model}
        for kind, selective in (("BST", False), ("SST", True)):
            name = f"{kind} lam={lam:.3g}"
            net = copy.deepcopy(model)
            t = time.perf_counter()
            sp = sparsify(net, target_r=args.target_r, epochs=cfg["epochs"], lam=lam, selective=selective, ranking="global",
                          loader=DeviceLoader(x1, y1, cfg["batch_size"], seed=args.seed * 1000 + 1), device=device)
            secs = time.perf_counter() - t
            rows[name] = summary(net, sp.scaling_map, args.target_r, pre_mean, pre_median, val, test) | {
                "seconds": secs, "early_switch_epoch": sp.switch_epoch, "final_sp_r": sp.sp_r, "factors": sp.n, "lam": lam}
            nets[kind] = net
            print(f"done {name}", file=sys.stderr, flush=True)
        png = args.png if i == 0 else args.out / f"fig3_gamma_hist_lam{lam:.3g}.png"
        png.parent.mkdir(parents=True, exist_ok=True)
        gamma_histogram(nets, png, target_r=args.target_r,
                        title=f"{args.model}, lam {lam:.3g}{' (CPU-small)' if args.cpu_small else ''}")

    print(f"{'network':16s} {'remaining mean':>14s} {'ratio to pre':>12s} {'frac ~0':>8s} {'val acc':>8s} {'test acc':>8s} {'seconds':>8s}  early switch")
    for name, r in rows.items():
        sw = r.get("early_switch_epoch")
        print(f"{name:16s} {r['remaining_mean']:14.4f} {r['ratio_to_pre']:12.3f} {r['frac_zero']:8.3f} {r['val_acc']:8.4f} "
              f"{r['test_acc']:8.4f} {r['seconds']:8.1f}  {'-' if name == 'pre-trained' else ('epoch %d' % sw if sw is not None else 'no')}")
    print(f"frac ~0: |gamma| <= 5% of the pre-trained median ({0.05 * pre_median:.4g}); remaining = without the "
          f"{args.target_r:.0%} smallest; goal: SST ratio >= 0.9 and frac ~0 >= {args.target_r}. PNG: {args.png}")
    (args.out / "results.json").write_text(json.dumps({"header": head, "config": cfg | {"lams": lams}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
