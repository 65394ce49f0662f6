"""Kernel reactivation in your own training loop, against the same loop without it.

Two copies of one CIFAR ResNet (same initial weights, same batches, same augmentation)
are trained on Fashion-MNIST with SGD 0.9 / wd 5e-4 / cosine lr from 0.1 (the kernel
reactivation paper's setting). One of them gets, once per epoch after the epoch,

    cb = ReactivationCallback(model, period=E, alpha=0.2, beta=0.3, gamma=0.1, lr0=0.1)
    cb(current_lr)      # after epochs E, 2E, ...: invalid kernels get the L1 norm of their filter's best kernel

(``filtersurgery.reactivation.reactivate_kernels`` under the hood, docs/method.md §5: invalid filters are in the
lowest ``alpha`` by mean |w| model-wide AND the lowest ``beta`` of their layer; inside
them the ``gamma * lr_t / lr_0`` smallest-L1 kernels are rescaled by ``Best_L1 / L1``).
No reactivation after the last epoch: nothing would train the reactivated kernels.

    python examples/kernel_reactivation.py                                   # CPU-sized defaults
    python examples/kernel_reactivation.py --model cifar:resnet32 --epochs 200 --period 10 --train-images 0 --device cuda
    python examples/kernel_reactivation.py --smoke                           # seconds; the tests run this

``--period`` should scale with ``--epochs`` (the paper reactivates every 10 of 200 epochs).
One seed on a short schedule is noise-level: see docs/reactivation.md for the benchmark.
"""
import argparse
import copy
import time

import torch
import torch.nn.functional as F

import filtersurgery
from filtersurgery.data.augment import normalize, random_crop_flip
from filtersurgery.data import BatchLoader, load_dataset


def get_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="cifar:resnet20", help="cifar:resnetDEPTH, timm:NAME or torchvision:NAME")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--period", type=int, default=2, help="E: reactivate after every E-th epoch")
    p.add_argument("--alpha", type=float, default=0.2)
    p.add_argument("--beta", type=float, default=0.3)
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--train-images", type=int, default=6000, help="training images (class-balanced); 0 = all")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--smoke", action="store_true", help="tiny configuration on CPU (seconds), for the tests")
    args = p.parse_args()
    if args.smoke:
        args.model, args.epochs, args.period, args.train_images, args.batch_size = "cifar:resnet8", 2, 1, 128, 32
        args.device = "cpu"
        torch.set_num_threads(1)  # tiny tensors: one thread is faster, and fair to a busy CI machine
    return args


def train(model, data, x, y, args, callback=None):
    """An ordinary training loop; ``callback(lr)`` runs after every epoch but the last."""
    dev = torch.device(args.device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    loader = BatchLoader(x, y, args.batch_size, shuffle=True, device=dev, seed=0, drop_last=True)
    aug = torch.Generator(device=dev).manual_seed(0)  # the same augmentation stream for both runs
    model.train()
    for epoch in range(args.epochs):
        t0 = time.time()
        loader.set_epoch(epoch)
        for xb, yb in loader:
            xb = normalize(random_crop_flip(xb, generator=aug), data.mean, data.std)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        msg = f"  epoch {epoch + 1}/{args.epochs}  last loss {loss.item():.3f}  lr {sched.get_last_lr()[0]:.4f}  ({time.time() - t0:.0f}s)"
        if callback is not None and epoch < args.epochs - 1:
            rep = callback(sched.get_last_lr()[0])  # None, or a ReactivationReport
            if rep is not None:
                msg += f"  reactivated {rep.kernels} kernels in {rep.invalid_filters} filters (gamma_t {rep.gamma_t:.3f})"
        print(msg)
    return model


@torch.no_grad()
def test_accuracy(model, data, device):
    model.eval()
    correct = 0
    for i in range(0, len(data.test_y), 500):
        xb = normalize(data.test_x[i:i + 500].to(device), data.mean, data.std)
        correct += (model(xb).argmax(1).cpu() == data.test_y[i:i + 500]).sum().item()
    model.train()
    return 100.0 * correct / len(data.test_y)


def main():
    args = get_args()
    data = load_dataset("fashion-mnist", allow_demo=True, subset_test=200 if args.smoke else None)
    n = args.train_images or len(data.train_y)
    idx = torch.randperm(len(data.train_y), generator=torch.Generator().manual_seed(0))[:n]
    x, y = data.train_x[idx], data.train_y[idx]
    print(f"data: {data.name}, {n} training images; model {args.model}; device {args.device}")

    torch.manual_seed(0)
    model, _ = filtersurgery.build_model(args.model, num_classes=data.num_classes, in_chans=data.in_chans)
    model = model.to(args.device)
    twin = copy.deepcopy(model)  # identical initial weights

    print("plain training")
    train(twin, data, x, y, args)
    print(f"kernel reactivation every {args.period} epoch(s), (alpha, beta, gamma) = ({args.alpha}, {args.beta}, {args.gamma})")
    cb = filtersurgery.reactivation.ReactivationCallback(model, period=args.period, alpha=args.alpha, beta=args.beta,
                                            gamma=args.gamma, lr0=args.lr)
    train(model, data, x, y, args, callback=cb)

    print(f"test accuracy: plain {test_accuracy(twin, data, args.device):.2f}%  "
          f"reactivation {test_accuracy(model, data, args.device):.2f}%  "
          f"({len(cb.history)} reactivations; one seed, short schedule: differences of ~1 point are noise)")
    if cb.history:
        print(cb.history[-1].table())


if __name__ == "__main__":
    main()
