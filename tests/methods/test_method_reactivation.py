"""Kernel reactivation as a training method: selection against a brute-force C1∩C2∩C3
reference, per-epoch callbacks, Weight Evolution, Filter Grafting, and one tiny CLI run per method.

tests/ops/test_reactivation.py covers the hand-built 4x4 selection, ratio preservation, the
op-level no-ops and bad inputs of ``reactivate_kernels``; these tests do not repeat them.
"""
import csv
import json
import math

import pytest
import torch
from torch import nn

from filtersurgery.engine import checkpoint
from filtersurgery.models.cifar_resnet import cifar_resnet
from filtersurgery.cli.main import main as cli_main
from filtersurgery.ops.filter_grafting import graft, graft_coefficient, layer_entropy, paired_layers
from filtersurgery.engine.callbacks import GraftingCallback, ReactivationCallback, WeightEvolutionCallback
from filtersurgery.methods.reactivation import ReactivationMethodConfig, choose_on_validation, invalid_fractions
from filtersurgery.ops.reactivation import reactivate_kernels
from filtersurgery.ops.weight_evolution import evolve_weights


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def mixed_model(seed=0):
    """3x3, 5x5, grouped 3x3, 1x1 (tiny weights) and a stride-2 3x3 conv; random weights, no ties."""
    torch.manual_seed(seed)
    m = nn.Sequential()
    m.add_module("c3", nn.Conv2d(3, 8, 3, padding=1, bias=False))
    m.add_module("c5", nn.Conv2d(8, 6, 5, padding=2))
    m.add_module("g", nn.Conv2d(6, 10, 3, padding=1, groups=2, bias=False))
    m.add_module("p", nn.Conv2d(10, 12, 1, bias=False))
    m.add_module("s", nn.Conv2d(12, 7, 3, stride=2, bias=False))
    with torch.no_grad():
        for conv in m:
            scale = torch.rand(conv.out_channels, 1, 1, 1) * 2 + 0.05  # spread filter magnitudes
            conv.weight.mul_(scale)
        m.p.weight.mul_(1e-3)
    return m


def brute_force_kernels(m, alpha, beta, gamma_t):
    """Independent reference of eq. (1): the set of (conv, filter, kernel) in C1 ∩ C2 ∩ C3."""
    rnd = lambda f, n: int(math.floor(f * n + 0.5))  # noqa: E731
    convs = [(n, c.weight.detach()) for n, c in m.named_modules() if isinstance(c, nn.Conv2d) and c.kernel_size != (1, 1)]
    filters = [(float(w[f].abs().mean()), n, f) for n, w in convs for f in range(w.shape[0])]
    c1 = {(n, f) for _, n, f in sorted(filters)[: rnd(alpha, len(filters))]}
    out = set()
    for n, w in convs:
        own = sorted((float(w[f].abs().mean()), f) for f in range(w.shape[0]))
        c2 = {f for _, f in own[: rnd(beta, len(own))]}
        for f in range(w.shape[0]):
            if (n, f) in c1 and f in c2:
                l1 = sorted((float(w[f, i].abs().sum()), i) for i in range(w.shape[1]))
                out |= {(n, f, i) for _, i in l1[: rnd(gamma_t, len(l1))]}
    return out


@pytest.mark.parametrize("alpha,beta,gamma,lr_ratio", [(0.2, 0.3, 0.1, 1.0), (0.5, 0.5, 0.5, 0.6),
                                                       (0.6, 0.3, 1.0, 0.3), (1.0, 1.0, 0.4, 1.0)])
def test_selection_matches_brute_force_c1_c2_c3(alpha, beta, gamma, lr_ratio):
    m = mixed_model()
    before = {n: c.weight.detach().clone() for n, c in m.named_children()}
    want = brute_force_kernels(m, alpha, beta, gamma * lr_ratio)
    rep = reactivate_kernels(m, alpha, beta, gamma, lr_ratio=lr_ratio)
    changed = {(n, f, i) for n, c in m.named_children() for f in range(c.out_channels)
               for i in range(c.weight.shape[1]) if not torch.equal(c.weight[f, i], before[n][f, i])}
    assert changed == want and rep.kernels == len(want)
    assert rep.invalid_filters == len({(n, f) for n, f, _ in brute_force_kernels(m, alpha, beta, 1.0)})
    assert torch.equal(m.p.weight, before["p"])  # 1x1: never, even with the smallest weights
    for n, f, i in want:  # rescaled to the filter's best kernel L1, weight ratios kept
        best = before[n][f].abs().flatten(1).sum(1).max()
        assert float(getattr(m, n).weight.detach()[f, i].abs().sum()) == pytest.approx(float(best), rel=1e-5)


@pytest.mark.parametrize("alpha,beta,gamma_t", [(0.2, 0.3, 0.1), (0.5, 0.5, 0.5), (1.0, 1.0, 0.4)])
def test_invalid_fractions_match_brute_force_and_change_nothing(alpha, beta, gamma_t):
    m = mixed_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    got = invalid_fractions(m, alpha, beta, gamma_t)
    convs = [c for c in m if c.kernel_size != (1, 1)]
    n_filters, n_kernels = sum(c.out_channels for c in convs), sum(c.weight.shape[0] * c.weight.shape[1] for c in convs)
    kernels = brute_force_kernels(m, alpha, beta, gamma_t)
    filters = {(n, f) for n, f, _ in brute_force_kernels(m, alpha, beta, 1.0)}
    assert got["frac_c1c2"] == pytest.approx(len(filters) / n_filters, abs=1e-6)
    assert got["frac_c3"] == pytest.approx(len(kernels) / n_kernels, abs=1e-6) and kernels
    w = {n: c.weight.detach() for n, c in m.named_children()}
    ratios = torch.tensor(sorted(float(w[n][f].abs().flatten(1).sum(1).max() / w[n][f, i].abs().sum())
                                 for n, f, i in kernels))
    assert got["ratio_c3_median"] == pytest.approx(float(ratios.median()), abs=1e-3)  # torch: the lower middle
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in before.items())
    assert got["frac_c3"] * n_kernels == pytest.approx(reactivate_kernels(m, alpha, beta, gamma_t).kernels, abs=1e-3)


def test_invalid_fractions_nothing_to_reactivate_and_bad_inputs():
    m = mixed_model()
    got = invalid_fractions(m, 0.2, 0.3, 0.0)  # gamma_t 0 (lr 0): C3 empty
    assert got["frac_c1c2"] > 0 and got["frac_c3"] == 0 and got["ratio_c3_median"] is None
    assert invalid_fractions(nn.Sequential(nn.Conv2d(3, 4, 1)), 0.2, 0.3, 0.1) == \
        {"frac_c1c2": 0.0, "frac_c3": 0.0, "ratio_c3_median": None}  # 1x1 only: no candidates
    with pytest.raises(ValueError, match=r"^gamma_t: "):
        invalid_fractions(m, 0.2, 0.3, 1.5)
    with pytest.raises(ValueError, match=r"^model: "):
        invalid_fractions("net", 0.2, 0.3, 0.1)


def test_choose_on_validation_mean_and_ties():
    assert choose_on_validation([("a", [80.0, 82.0]), ("b", [83.0]), ("c", [79.0, 90.0])]) == ("c", 84.5)
    assert choose_on_validation([((0.1, 10), [81.0]), ((0.3, 10), [81.0])]) == ((0.1, 10), 81.0)  # tie: the first
    with pytest.raises(ValueError, match=r"^candidates: "):
        choose_on_validation([])
    with pytest.raises(ValueError, match=r"^candidates: "):
        choose_on_validation([("a", [])])


def test_reactivation_callback_follows_cosine_lr_and_skips_1x1():
    m = cifar_resnet(8, num_classes=10, in_chans=1)
    with torch.no_grad():  # make the 1x1 shortcut convs the weakest filters of the model
        for n, c in m.named_modules():
            if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1):
                c.weight.mul_(1e-4)
    ones = {n: c.weight.detach().clone() for n, c in m.named_modules()
            if isinstance(c, nn.Conv2d) and c.kernel_size == (1, 1)}
    assert ones
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=6)
    cb = ReactivationCallback(m, period=2, alpha=1.0, beta=1.0, gamma=0.5)  # lr0: first call
    got = []
    for epoch in range(6):
        opt.step()  # (no gradients: a no-op) then the scheduler, as in a training loop
        sched.step()
        lr = sched.get_last_lr()[0]
        rep = cb(lr)
        got.append(None if rep is None else rep.gamma_t)
    lr0 = 0.1 * (1 + math.cos(math.pi / 6)) / 2
    lrs = [0.1 * (1 + math.cos(math.pi * (e + 1) / 6)) / 2 for e in range(6)]
    assert got[0::2] == [None] * 3
    assert got[1::2] == pytest.approx([0.5 * lrs[e] / lr0 for e in (1, 3, 5)])
    assert got[5] == 0 and not cb.history[-1] and cb.history[0].kernels > 0
    assert all(torch.equal(m.get_submodule(n).weight, w) for n, w in ones.items())
    rep = cb(0.05, epoch=9)  # explicit 0-based epoch after a resume: 10th epoch -> due
    assert rep is not None and rep.gamma_t == pytest.approx(0.5 * 0.05 / lr0) and cb.epoch == 10
    with pytest.raises(ValueError, match=r"^lr: "):
        cb(-1.0)
    with pytest.raises(ValueError, match=r"^epoch: "):
        cb(0.1, epoch=-1)
    with pytest.raises(ValueError, match=r"^period: "):
        ReactivationCallback(m, period=0)
    with pytest.raises(ValueError, match=r"^lr0: "):
        ReactivationCallback(m, lr0=0)
    with pytest.raises(ValueError, match=r"^period: "):
        ReactivationMethodConfig(period=0).validate()


def test_weight_evolution_replaces_one_weight_per_kernel():
    m = mixed_model(1)
    before = {n: c.weight.detach().clone() for n, c in m.named_children()}
    rep = evolve_weights(m, alpha=0.5, beta=0.5)
    want = {(n, f) for n, f, _ in brute_force_kernels(before_model(before), 0.5, 0.5, 1.0)}
    assert rep.invalid_filters == len(want) > 0
    assert torch.equal(m.p.weight, before["p"])
    for n, lay in rep.layers.items():
        old, new = before[n], getattr(m, n).weight.detach()
        best = int(old.abs().flatten(1).mean(1).argmax())
        assert lay.best_filter == best and torch.equal(new[best], old[best])
        for f in range(old.shape[0]):
            if (n, f) not in want:
                assert torch.equal(new[f], old[f])
                continue
            for i in range(old.shape[1]):
                o, w = old[f, i].flatten(), new[f, i].flatten()
                diff = torch.nonzero(o != w).flatten().tolist()
                j = int(o.abs().argmin())
                donor = old[best, i].flatten()[old[best, i].abs().flatten().argmax()]
                assert diff == [j] and w[j] == donor  # only the inferior weight, set to the donor's largest
    assert rep.weights == sum(getattr(m, n).weight.shape[1] for n, _ in want)
    m2 = mixed_model(1)
    sd = {k: v.clone() for k, v in m2.state_dict().items()}
    assert not evolve_weights(m2, alpha=0.0)
    assert all(torch.equal(v, m2.state_dict()[k]) for k, v in sd.items())
    cb = WeightEvolutionCallback(m2, period=3, alpha=0.5, beta=0.5)
    assert [cb() is not None for _ in range(6)] == [False, False, True, False, False, True]


def before_model(weights):
    m = mixed_model(1)
    with torch.no_grad():
        for n, w in weights.items():
            getattr(m, n).weight.copy_(w)
    return m


class Named(nn.Module):
    """Same layers as ``tiny_seq`` under unrelated names (FG matches by module type, not names)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(4, 6, 1)
        self.head = nn.Linear(6, 3)


def tiny_seq():
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 6, 1), nn.Linear(6, 3))


def test_layer_entropy_and_coefficient():
    assert layer_entropy(torch.arange(10.0)) == pytest.approx(math.log(10))
    assert layer_entropy(torch.tensor([0.0, 0.0, 1.0, 1.0])) == pytest.approx(math.log(2))
    assert layer_entropy(torch.full((5, 5), 0.3)) == 0.0
    assert graft_coefficient(1.0, 1.0) == 0.5
    assert graft_coefficient(2.0, 1.0) == pytest.approx(0.7, abs=1e-3)  # 0.5 + a/2 when saturated
    assert graft_coefficient(1.0, 1.001) == pytest.approx(0.4 / math.pi * math.atan(-0.5) + 0.5)
    assert graft_coefficient(1.3, 1.2) + graft_coefficient(1.2, 1.3) == pytest.approx(1.0)


def test_graft_mixes_matched_layers_only():
    torch.manual_seed(0)
    a, b = tiny_seq(), Named()
    with torch.no_grad():
        b.norm.weight.uniform_(0.5, 1.5)
    wa = [x.detach().clone() for x in a.parameters()]
    wb = {k: v.detach().clone() for k, v in b.named_parameters()}
    pairs = paired_layers(a, b)
    assert [(na, nb) for na, _, nb, _ in pairs] == [("0", "stem"), ("2", "mix"), ("3", "head")]
    rep = graft(a, b)
    for (na, ma, nb, mb), lay in zip(pairs, rep.layers):
        ca = graft_coefficient(layer_entropy(wa[list(dict(a.named_parameters())).index(na + ".weight")]),
                               layer_entropy(wb[nb + ".weight"]))
        assert lay.coef_a == pytest.approx(ca) and lay.coef_b == pytest.approx(1 - ca)
        old_a = dict(zip(dict(a.named_parameters()), wa))
        for p in ("weight", "bias"):
            exp = ca * old_a[f"{na}.{p}"] + (1 - ca) * wb[f"{nb}.{p}"]
            assert torch.allclose(getattr(ma, p), exp, atol=1e-6)
            assert torch.allclose(getattr(mb, p), exp, atol=1e-6)  # two networks: equal right after grafting
    assert torch.equal(a[1].weight, wa[2]) and torch.equal(b.norm.weight, wb["norm.weight"])  # norms untouched
    with pytest.raises(ValueError, match=r"^model_b: "):
        graft(a, a)
    with pytest.raises(ValueError, match=r"^model_b: "):
        graft(a, nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 6, 3), nn.Linear(6, 3)))
    cb = GraftingCallback(a, b, period=2)
    assert cb() is None and cb() is not None and len(cb.history) == 1


# --------------------------------------------------------------------------- CLI
TINY = ["--model", "cifar:resnet8", "--data", "demo", "--epochs", "2", "--subset", "48", "--batch-size", "16",
        "--max-batches", "2", "--device", "cpu", "--no-progress", "--seeds", "0"]


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    import filtersurgery.data as fsdata

    real, calls = fsdata.load_dataset, []

    def fewer_test_images(name, **kw):
        d = real(name, **{**kw, "subset_test": 100})
        calls.append(len(d.test_y))
        return d

    fsdata.load_dataset = fewer_test_images  # the name the CLI reads when it runs
    root = tmp_path_factory.mktemp("react")
    runs = {}
    try:
        for method, extra in (("plain", []), ("reactivation", ["--reactivation-period", "1", "--reactivation-gamma", "0.5"]),
                              ("reactivation-off", ["--reactivation-period", "1", "--reactivation-gamma", "0"]),
                              ("weight-evolution", ["--reactivation-period", "1"]), ("filter-grafting", [])):
            out = root / method
            rc = cli_main(["run", "--method", method.replace("-off", ""), "--out", str(out), *TINY, *extra])
            assert rc == 0
            runs[method] = out / "seed0"
        assert calls == [100] * 5  # every run loaded the shrunken data set
        yield runs
    finally:
        fsdata.load_dataset = real


def _log(d):
    """The per-epoch ``extra`` items of ``epochs.csv``."""
    with open(d / "epochs.csv", newline="") as f:
        return [json.loads(r["extra"] or "{}") for r in csv.DictReader(f)]


@pytest.mark.parametrize("method", ["plain", "reactivation", "weight-evolution", "filter-grafting"])
def test_cli_method_writes_metrics(cli_runs, method):
    d = cli_runs[method]
    m = json.loads((d / "metrics.json").read_text())
    (e,) = m["steps"]
    assert e["step"] == 1 and 0 <= e["test_acc"] <= 100 and 0 <= e["val_acc"] <= 100 and e["seconds"] >= 0
    assert e["peak_mem_mb"] > 0 and e["mem_kind"].startswith("cpu") and e["train_images"] == 48
    assert e["models_trained"] == (2 if method == "filter-grafting" else 1)
    assert m["config"]["method"] == method and m["config"]["method_options"]["alpha"] == 0.2
    assert (d / "step1.safetensors").exists() and not (d / ".work" / "state.pt").exists()
    log = _log(d)
    diag = {"frac_c1c2", "frac_c3", "ratio_c3_median"}  # every epoch, every method
    assert len(log) == 2 and set(log[1]) == diag  # no operation after the last epoch
    assert 0 < log[0]["frac_c1c2"] <= 0.2 and 0 <= log[0]["frac_c3"] <= 1
    key = {"plain": None, "reactivation": "react_kernels", "weight-evolution": "we_weights",
           "filter-grafting": "graft_layers"}[method]
    assert (set(log[0]) == diag) if key is None else log[0][key] > 0


def test_cli_reactivation_noop_equals_plain(cli_runs):
    """gamma = 0: no kernel qualifies, so training is bit-identical to plain (same init, batches, augmentation)."""
    assert _log(cli_runs["reactivation-off"])[0]["react_kernels"] == 0
    a = checkpoint.load_state_dict(cli_runs["plain"] / "step1.safetensors")
    b = checkpoint.load_state_dict(cli_runs["reactivation-off"] / "step1.safetensors")
    c = checkpoint.load_state_dict(cli_runs["reactivation"] / "step1.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_resume_and_option_guard(cli_runs, capsys):
    d = cli_runs["reactivation"]
    before = (d / "metrics.json").read_text()
    rc = cli_main(["run", "--method", "reactivation", "--out", str(d.parent), *TINY, "--reactivation-period", "1", "--reactivation-gamma", "0.5"])
    assert rc == 0 and (d / "metrics.json").read_text() == before  # finished: returned, not retrained
    rc = cli_main(["run", "--method", "reactivation", "--out", str(d.parent), *TINY, "--reactivation-period", "1", "--reactivation-gamma", "0.3"])
    assert rc == 2 and "gamma=0.5" in capsys.readouterr().err
