"""Fig. 3 of the multistep paper on real data (CPU-sized): SST vs BST from the same trained model.

A 4-conv BN net is trained briefly on 2000 Fashion-MNIST training images; SST and BST
then run from the same weights with the same data order. SST must end with at least
Target_r of the factors at ~0 while the mean of its remaining factors stays well above
BST's. The run is short (8 epochs), so lambda is large: it comes from the trainer's
``lam="auto"`` rule (:func:`lam_for_budget` with its CE safety factor 3, ~2.5e-2 here),
not the 1e-4 default that goes with full-length schedules (see benchmarks/sst_vs_bst.py).
A fixed 2e-2 left the 43rd target at 0.13 after 8 epochs: the rule exists for that.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import filtersurgery as fs
from filtersurgery.report.plots import gamma_histogram
from filtersurgery.ops.checks import fraction_count
from filtersurgery.ops.ranking import remaining_mean
from filtersurgery.tracing.tracer import trace

N, BS, PRE_EPOCHS, SST_EPOCHS, LAM_SAFETY, TARGET_R = 2000, 64, 3, 8, 3.0, 0.3


def small_cnn():
    def cbr(i, o):
        return [nn.Conv2d(i, o, 3, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

    torch.manual_seed(0)
    return nn.Sequential(*cbr(1, 16), nn.MaxPool2d(2), *cbr(16, 32), nn.MaxPool2d(2), *cbr(32, 32), *cbr(32, 64),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class Shuffled:
    """Re-iterable loader over in-memory tensors; epoch ``e`` uses permutation seed ``seed + e``."""

    def __init__(self, x, y, bs, seed):
        self.x, self.y, self.bs, self.seed, self.epoch = x, y, bs, seed, 0

    def __iter__(self):
        perm = torch.randperm(len(self.y), generator=torch.Generator().manual_seed(self.seed + self.epoch))
        self.epoch += 1
        for i in range(0, len(perm), self.bs):
            j = perm[i : i + self.bs]
            yield self.x[j], self.y[j]


@pytest.fixture(scope="module")
def data():
    from filtersurgery.data import load_dataset

    try:
        d = load_dataset("fashion-mnist")
    except FileNotFoundError as e:
        pytest.skip(f"Fashion-MNIST files not available: {e}")
    idx = torch.randperm(len(d.train_y), generator=torch.Generator().manual_seed(0))[:N]
    x = (d.train_x[idx].float() / 255 - d.mean[0]) / d.std[0]
    return x, d.train_y[idx]




@pytest.mark.slow  # end-to-end
def test_sst_keeps_remaining_factors_bst_shrinks_them(data, tmp_path, one_thread):
    x, y = data
    model = small_cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, PRE_EPOCHS)
    loader = Shuffled(x, y, BS, seed=0)
    for _ in range(PRE_EPOCHS):
        for xb, yb in loader:
            opt.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            opt.step()
        sched.step()

    pre = trace(model)
    pre_mean = remaining_mean(pre, TARGET_R, ranking="global")
    pre_median = float(pre.factors.gammas().abs().median())
    lam = fs.ops.sparsity.lam_for_budget(model, TARGET_R, lr=0.1, steps=SST_EPOCHS * -(-N // BS), safety=LAM_SAFETY, ranking="global")
    results = {}
    for name, selective in (("SST", True), ("BST", False)):
        net = copy.deepcopy(model)
        sp = fs.sparsify(net, target_r=TARGET_R, epochs=SST_EPOCHS, lam=lam, selective=selective, ranking="global",
                         loader=Shuffled(x, y, BS, seed=1))
        g = sp.factors.gammas().abs()
        results[name] = {"net": net, "mean": remaining_mean(sp.scaling_map, TARGET_R, ranking="global"),
                         "n_zero": int((g <= 0.05 * pre_median).sum()), "n": g.numel(), "sp": sp}

    sst, bst = results["SST"], results["BST"]
    print(f"pre mean {pre_mean:.3f}; SST mean {sst['mean']:.3f} zero {sst['n_zero']}/{sst['n']}; "
          f"BST mean {bst['mean']:.3f} zero {bst['n_zero']}/{bst['n']}")
    assert sst["sp"].history[-1]["sp_r"] == TARGET_R and bst["sp"].history[-1]["sp_r"] == 1.0
    # >= Target_r of the factors at ~0 (|gamma| <= 5% of the median before SST)
    assert sst["n_zero"] >= fraction_count(TARGET_R, sst["n"]), (sst["n_zero"], sst["n"])
    # the remaining factors: SST keeps their mean well above BST's
    assert sst["mean"] > 2.0 * bst["mean"], (sst["mean"], bst["mean"], pre_mean)
    assert sst["mean"] > 0.4 * pre_mean, (sst["mean"], pre_mean)

    stats = gamma_histogram({"pre-trained": model, "BST": bst["net"], "SST": sst["net"]}, tmp_path / "fig3.png",
                            target_r=TARGET_R)
    assert (tmp_path / "fig3.png").stat().st_size > 10_000
    assert stats["SST"]["mean_remaining"] == pytest.approx(sst["mean"], rel=1e-5)
    assert stats["pre-trained"]["mean_remaining"] == pytest.approx(pre_mean, rel=1e-5)
