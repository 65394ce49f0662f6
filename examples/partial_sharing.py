"""Partial network sharing: add new classes without the old data and without forgetting.

Fashion-MNIST's classes arrive in three sets: 0-3, then 4-6, then 7-9 (docs/method.md §6).

1. a base network is trained on set 1 only;
2. for each new set, ``branch = filtersurgery.sharing.share(base, share=0.8, num_classes=3)`` is
   a copy of the base whose first 80% of conv parameters (forward order) are frozen and
   shared, with a fresh classifier; only the rest is trained, on the new set's images only;
3. ``BranchedNet(base, classes=[0, 1, 2, 3]).add_branch(branch, classes=[4, 5, 6])...``
   holds the shared trunk once, computes it once per input and predicts over all classes
   by the largest softmax probability of the branches.

It prints the accuracy over all 10 classes, the accuracy within each set, and what
sharing saves per training iteration (``filtersurgery.sharing.training_cost``: MACs counted with
torch.utils.flop_counter, trainable and stored parameters).

    python examples/partial_sharing.py                            # CPU-sized defaults
    python examples/partial_sharing.py --share 0 --epochs 30 --images-per-set 0 --device cuda   # no sharing, full size
    python examples/partial_sharing.py --smoke                    # seconds; the tests run this

The accuracy-vs-sharing curve (several shares, chosen on validation) is
``filtersurgery sweep-sharing``; see docs/sharing.md.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import filtersurgery
from filtersurgery.data.augment import normalize, random_crop_flip
from filtersurgery.data import BatchLoader, load_dataset

CLASS_SETS = [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar:resnet20", help="cifar:resnetDEPTH, timm:NAME or torchvision:NAME")
    p.add_argument("--share", type=float, default=0.8, help="fraction of conv parameters shared with the base, in [0, 1]")
    p.add_argument("--epochs", type=int, default=4, help="epochs per network")
    p.add_argument("--images-per-set", type=int, default=1500, help="training images per class set; 0 = all")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1, help="learning rate of the base (from scratch)")
    p.add_argument("--branch-lr", type=float, default=0.01, help="learning rate of the branches")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny configuration on CPU (seconds), for the tests")
    args = p.parse_args()
    if args.smoke:
        args.model, args.epochs, args.images_per_set, args.batch_size, args.device = "cifar:resnet8", 1, 64, 32, "cpu"
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a busy CI machine
    return args


def images_of(classes, x, y, n, seed=0):
    """The images of ``classes`` (labels renumbered 0..len-1); ``n`` of them at random (0 = all)."""
    keep = torch.nonzero(torch.isin(y, torch.tensor(classes))).flatten()
    if n:
        keep = keep[torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed))[:n]]
    local = torch.searchsorted(torch.tensor(classes), y[keep])
    return x[keep], local


def train(model, data, x, y, lr, args):
    """An ordinary loop over the trainable parameters (the shared ones have requires_grad=False)."""
    dev = torch.device(args.device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    loader = BatchLoader(x, y, args.batch_size, shuffle=True, device=dev, seed=0, drop_last=len(y) > args.batch_size)
    gen = torch.Generator(device=dev).manual_seed(0)
    model.train()  # a branch keeps its shared BatchNorms in eval mode: their statistics stay the base's
    for epoch in range(args.epochs):
        t0 = time.time()
        loader.set_epoch(epoch)
        for xb, yb in loader:
            loss = F.cross_entropy(model(normalize(random_crop_flip(xb, generator=gen), data.mean, data.std)), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        print(f"  epoch {epoch + 1}/{args.epochs}  last loss {loss.item():.3f}  ({time.time() - t0:.0f}s)")
    return model


@torch.no_grad()
def predict(net, data, x, device):
    net.eval()
    out = torch.cat([net(normalize(x[i:i + 500].to(device), data.mean, data.std)).argmax(1).cpu()
                     for i in range(0, len(x), 500)])
    return out


def main():
    args = get_args()
    data = load_dataset("fashion-mnist", allow_demo=True, subset_test=300 if args.smoke else None)
    print(f"data: {data.name}; class sets {CLASS_SETS}; model {args.model}; share {args.share}; device {args.device}")

    # 1. the base: set 1 only, from scratch
    torch.manual_seed(0)
    base, _ = filtersurgery.build_model(args.model, num_classes=len(CLASS_SETS[0]), in_chans=data.in_chans)
    base = base.to(args.device)
    print(f"base on classes {CLASS_SETS[0]}")
    train(base, data, *images_of(CLASS_SETS[0], data.train_x, data.train_y, args.images_per_set), args.lr, args)
    net = filtersurgery.sharing.BranchedNet(base, classes=CLASS_SETS[0])

    # 2. one branch per new set: shared trunk frozen, the rest trained on the new set only
    example = torch.zeros(args.batch_size, data.in_chans, data.size, data.size, device=args.device)
    for classes in CLASS_SETS[1:]:
        branch = filtersurgery.sharing.share(base, share=args.share, num_classes=len(classes))
        plan = filtersurgery.sharing.share_plan(branch)
        print(f"branch for classes {classes}: {plan.n_shared_layers}/{len(plan.layers)} conv layers shared "
              f"({plan.shared_fraction:.0%} of conv parameters), cut at {plan.cut}")
        train(branch, data, *images_of(classes, data.train_x, data.train_y, args.images_per_set), args.branch_lr, args)
        net.add_branch(branch, classes=classes)  # checks that the shared tensors are bit-identical to the base's

    # 3. the updated network over all classes
    pred = predict(net, data, data.test_x, args.device)
    print(f"all-class test accuracy (max softmax probability over {net.num_classes} classes): "
          f"{100.0 * (pred == data.test_y).float().mean():.2f}%")
    for k, classes in enumerate(CLASS_SETS):  # within a set: that branch alone on its own classes
        x, y = images_of(classes, data.test_x, data.test_y, 0)
        with torch.no_grad():
            logits = torch.cat([net.branch_outputs(normalize(x[i:i + 500].to(args.device), data.mean, data.std))[k].cpu()
                                for i in range(0, len(x), 500)])
        print(f"  set {k + 1} {classes}: within-set accuracy {100.0 * (logits.argmax(1) == y).float().mean():.2f}%")

    # 4. what sharing saves per training iteration
    unshared = filtersurgery.sharing.share(base, share=0.0, num_classes=3)  # the same branch with nothing shared
    full = filtersurgery.sharing.training_cost(unshared, example, num_classes=3, measure=False)
    part = filtersurgery.sharing.training_cost(branch, example, num_classes=3, measure=False)
    stored = sum(p.numel() for p in net.parameters())
    print(f"per training iteration (batch {args.batch_size}): {part.train_macs / 1e6:.0f} MMACs with sharing vs "
          f"{full.train_macs / 1e6:.0f} without ({part.train_macs / full.train_macs:.2f}x); trainable parameters "
          f"{part.trainable_params:,} vs {full.trainable_params:,}; stored for all {len(CLASS_SETS)} sets: {stored:,}")


if __name__ == "__main__":
    main()
