"""Selective sparsity training (SST) and diverse re-initialization (Dri) in your own loop.

A timm CNN, a plain PyTorch training loop (DataLoader, SGD, cosine schedule) and three
calls into filtersurgery:

1. ``sp = filtersurgery.sparsify(model, target_r=0.3, epochs=E)`` traces the model once
   (every conv filter -> the BatchNorm gamma that scales it) and returns a Sparsifier;
   ``sp.set_epoch(e)`` at the start of each epoch sets SP_r (eq. 2-3) and re-selects the
   target factors, ``sp.step()`` between ``loss.backward()`` and ``opt.step()`` adds
   ``lam * sign(gamma)`` to the gradients of the targets only (eq. 1);
2. ``sp.useless()``: the ``target_r`` fraction of factors with the smallest score after SST
   (|gamma| over the mean |gamma| of its own norm: timm's norms do not share one scale),
   i.e. the filters that can be given to new data;
3. ``filtersurgery.rescale(model, target_r=0.3, I=0.1)``: Dri (eq. 4) gives each useless
   factor a score drawn from the allowed rank range ``(target_r + I, 1 - I)``, mapped back
   to its own norm's scale.

Usage (Fashion-MNIST; the embedded 6000-image subset is used when the full set is absent):

    python examples/sparsify_timm_backbone.py                       # resnet18, CPU-sized defaults
    python examples/sparsify_timm_backbone.py --model resnet50 --epochs 30 --train-images 60000 --device cuda
    python examples/sparsify_timm_backbone.py --smoke               # seconds; what the tests run

The default ``--lam 1e-4`` is docs/method.md §1's (network slimming's) value for long schedules;
with only a few epochs few factors reach ~0 (printed below), pass e.g. ``--lam 1e-2``
to see SST separate the factors within a short run.
"""
import argparse
import os
import time

import timm
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import filtersurgery
from filtersurgery.ops.ranking import remaining_mean
from filtersurgery.data import load_dataset


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet18", help="any timm CNN name (random init)")
    p.add_argument("--epochs", type=int, default=3, help="epochs of plain training, then the same number of SST epochs")
    p.add_argument("--train-images", type=int, default=6000, help="training images used (class-balanced)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--target-r", type=float, default=0.3, help="Target_r: fraction of factors SST drives to 0")
    p.add_argument("--lam", type=float, default=1e-4, help="lambda of the L1 subgradient")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default="runs/examples/sparsify", help="folder for the gamma histogram PNG")
    p.add_argument("--smoke", action="store_true", help="tiny configuration on CPU (seconds), for the tests")
    args = p.parse_args()
    if args.smoke:
        args.model, args.epochs, args.train_images, args.batch_size, args.device = "test_resnet", 1, 256, 64, "cpu"
        args.lam = 1e-2
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a busy CI machine
    return args


def loaders(args):
    """Ordinary float tensors and DataLoaders: nothing here is specific to filtersurgery."""
    data = load_dataset("fashion-mnist", allow_demo=True, subset_test=200 if args.smoke else None)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(data.train_y), generator=g)[: args.train_images]
    mean, std = data.mean[0], data.std[0]
    to_float = lambda x: (x.float() / 255 - mean) / std  # noqa: E731
    train = TensorDataset(to_float(data.train_x[idx]), data.train_y[idx])
    test = TensorDataset(to_float(data.test_x), data.test_y)
    return (DataLoader(train, batch_size=args.batch_size, shuffle=True, generator=g, drop_last=True),
            DataLoader(test, batch_size=512), data)


@torch.no_grad()
def evaluate(model, loader, device):
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
        total += len(y)
    model.train(was_training)
    return 100.0 * correct / total


def train_epochs(model, loader, args, sp=None):
    """Your training loop. With a Sparsifier ``sp`` it is SST; without, plain CE training."""
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    model.train()
    for epoch in range(args.epochs):
        t0 = time.time()
        if sp is not None:
            sp.set_epoch(epoch)  # SP_r schedule (eq. 2-3); re-selects the target factors
        total = 0.0
        for x, y in loader:
            x, y = x.to(args.device), y.to(args.device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            if sp is not None:
                sp.step()  # grad += lam * sign(gamma) on the targets only (with AMP: after scaler.unscale_(opt))
            opt.step()
            total += loss.item()
        sched.step()
        msg = f"  epoch {epoch + 1}/{args.epochs}  loss {total / len(loader):.3f}  ({time.time() - t0:.0f}s)"
        if sp is not None:
            msg += f"  SP_r {sp.sp_r:.2f}  targets {int(sp.targets.sum())}/{sp.n}  ~0: {int(sp.converged().sum())}"
        print(msg)


def main():
    args = get_args()
    torch.manual_seed(0)
    train_loader, test_loader, data = loaders(args)
    print(f"data: {data.name}, {len(train_loader.dataset)} training images; model: timm {args.model}; device {args.device}")
    model = timm.create_model(args.model, pretrained=False, num_classes=data.num_classes, in_chans=data.in_chans)
    model = model.to(args.device)

    # 1. the "pre-trained" model: plain training
    print("plain training")
    train_epochs(model, train_loader, args)
    acc_pre = evaluate(model, test_loader, args.device)
    before = filtersurgery.rank_filters(model).abs_gamma.clone()

    # 2. SST: the same loop with a Sparsifier
    sp = filtersurgery.sparsify(model, target_r=args.target_r, epochs=args.epochs, lam=args.lam)
    sm = sp.scaling_map
    print(f"SST: {len(sm.mapped)} convs mapped to {sp.n} scaling factors "
          f"({len(sm.unscaled)} unscaled, coverage {sm.coverage:.0%}); target_r {args.target_r}, lam {args.lam}")
    train_epochs(model, train_loader, args, sp=sp)
    acc_sst = evaluate(model, test_loader, args.device)

    # 3. the useless factors and the conv filters they scale
    useless = sp.useless()
    rk = filtersurgery.rank_filters(model, scales=sp.scales)  # ranked in the units SST used
    print(f"useless factors: {int(useless.sum())} of {sp.n} (mean |gamma| {rk.abs_gamma[: int(useless.sum())].mean():.4f}; "
          f"remaining mean {remaining_mean(model, args.target_r):.4f})")  # |gamma|
    for j in range(3):
        print(f"  rank {j}: {rk.location(j)} |gamma| {rk.abs_gamma[j]:.2e} scales {rk.filters(j)[:3]}")

    # 4. Dri: new, in-range gammas for the useless factors (the model is then trained on new data)
    rep = filtersurgery.rescale(model, target_r=args.target_r, I=0.1, generator=torch.Generator().manual_seed(0),
                                 scales=sp.scales)
    acc_dri = evaluate(model, test_loader, args.device)
    print(f"Dri (I=0.1): {len(rep)} gammas re-drawn from the rank range "
          f"({args.target_r + 0.1:.1f}, 0.9) = scores in [{rep.range[0]:.3f}, {rep.range[1]:.3f}] x their norm's mean")
    print(f"test accuracy: plain {acc_pre:.2f}%  after SST {acc_sst:.2f}%  after Dri {acc_dri:.2f}% "
          f"(Dri disturbs the old data's features; training on new data follows)")

    from filtersurgery.report.plots import gamma_histogram

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "gamma_hist.png")
    gamma_histogram({"before SST": before, "after SST": rk.abs_gamma}, path, target_r=args.target_r)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
