"""Shrink & Perturb and DASH (filtersurgery/ops/shrink_perturb.py, ops/dash.py, docs/warmstart.md) on trained models."""
import copy
from dataclasses import replace
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import filtersurgery as fs
from filtersurgery.data import augment
from filtersurgery.ops import dash as dash_op, shrink_perturb as sp_op
from filtersurgery.data import BatchLoader, load_dataset
from filtersurgery.models.factory import build_model

torch.set_num_threads(1)


def _train(model, x, y, steps=8, lr=0.05, wd=5e-4, batch=32):
    """A few SGD steps (momentum, weight decay) so that weights and gradients are those of a trained model."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=wd)
    model.train()
    for s in range(steps):
        i = (s * batch) % len(y)
        loss = F.cross_entropy(model(x[i : i + batch]), y[i : i + batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def demo():
    d = load_dataset("demo")
    x = augment.normalize(d.train_x[:256], d.mean, d.std)
    return d, x, d.train_y[:256]


@pytest.fixture(scope="module")
def trained_state(demo):
    """``cifar:resnet8`` trained 8 SGD steps on the embedded Fashion-MNIST subset."""
    _, x, y = demo
    torch.manual_seed(0)
    m, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    return _train(m, x, y).state_dict()


@pytest.fixture
def resnet8(trained_state):
    m, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    m.load_state_dict(trained_state)
    return m


def _batches(x, y, sizes):
    out, i = [], 0
    for n in sizes:
        out.append((x[i : i + n], y[i : i + n]))
        i += n
    return out


def _params(m):
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def _buffers(m):
    return {n: b.detach().clone() for n, b in m.named_buffers()}


def _bn_names(m):
    return {n for n, mod in m.named_modules() if isinstance(mod, nn.BatchNorm2d)}


# --------------------------------------------------------------------------- Shrink & Perturb
def test_shrink_is_exact_without_noise_and_bn_stats_reset(resnet8):
    before, bufs = _params(resnet8), _buffers(resnet8)
    rep = fs.warmstart.shrink_perturb(resnet8, shrink=0.4, noise=0.0)
    for n, p in resnet8.named_parameters():  # every parameter, classifier and BN affine included
        assert torch.equal(p.detach(), before[n] * 0.4), n
    assert len(rep) == len(before) and rep.numel == sum(p.numel() for p in before.values())
    assert set(rep.bn_reset) == _bn_names(resnet8)
    for n, b in resnet8.named_buffers():  # reset = the state of a fresh initialization
        fresh = {"running_mean": torch.zeros_like(b), "running_var": torch.ones_like(b),
                 "num_batches_tracked": torch.zeros_like(b)}[n.rsplit(".", 1)[1]]
        assert torch.equal(b, fresh), n
    assert not torch.equal(bufs["stem.1.running_var"], resnet8.stem[1].running_var)  # it was trained: really reset
    r = repr(rep)
    assert "\n" not in r and len(r) < 200 and r.startswith("ShrinkPerturbReport(shrink=0.4, noise=0")


def test_bn_stats_keep(resnet8):
    bufs = _buffers(resnet8)
    rep = fs.warmstart.shrink_perturb(resnet8, 0.5, 0.1, generator=torch.Generator().manual_seed(0), bn_stats="keep")
    assert rep.bn_reset == []
    for n, b in resnet8.named_buffers():
        assert torch.equal(b, bufs[n]), n


def test_excluded_module_keeps_its_bn_stats(resnet8):
    bufs = _buffers(resnet8)
    rep = fs.warmstart.shrink_perturb(resnet8, 0.5, 0.0, exclude="layer1")
    for n, b in resnet8.named_buffers():
        assert torch.equal(b, bufs[n]) == n.startswith("layer1."), n
    assert not any(n.startswith("layer1") for n in rep.bn_reset) and len(rep.bn_reset) == 7


def test_noise_has_the_scale_of_the_default_init(resnet8):
    """init=None: noise = sigma * each layer's reset_parameters() draw (kaiming_uniform(a=sqrt 5): std 1/sqrt(3 fan_in))."""
    before = _params(resnet8)
    lam, sigma = 0.5, 0.1
    rep = fs.warmstart.shrink_perturb(resnet8, lam, sigma, generator=torch.Generator().manual_seed(3))
    assert rep.source == "reset_parameters" and rep.no_init == []
    mods = dict(resnet8.named_modules())
    checked = 0
    for n, p in resnet8.named_parameters():
        added = p.detach() - lam * before[n]
        mod = mods[n.rsplit(".", 1)[0]]
        if isinstance(mod, nn.BatchNorm2d):  # fresh gamma = 1, beta = 0
            assert torch.allclose(added, torch.full_like(added, sigma if n.endswith("weight") else 0.0), atol=1e-6), n
            continue
        fan_in = mod.weight[0].numel()
        if n.endswith("weight") and added.numel() >= 1000:
            expected = sigma / math.sqrt(3 * fan_in)
            assert added.std().item() == pytest.approx(expected, rel=0.1), n
            assert rep.noise_std[n] == pytest.approx(added.std().item(), rel=1e-3)
            assert added.abs().max().item() <= sigma / math.sqrt(fan_in) + 1e-6  # uniform(-1/sqrt(fan_in), +)
            checked += 1
        elif n.endswith("bias"):  # Linear bias: uniform(-1/sqrt(fan_in), 1/sqrt(fan_in))
            assert added.abs().max().item() <= sigma / math.sqrt(fan_in) + 1e-6
    assert checked >= 5


def test_noise_from_an_init_model_is_exactly_sigma_times_it(resnet8):
    before = _params(resnet8)
    torch.manual_seed(11)
    fresh, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)  # kaiming_normal(fan_out), its own scheme
    rep = fs.warmstart.shrink_perturb(resnet8, 0.4, 0.1, init=fresh)
    assert rep.source == "init"
    for n, q in fresh.named_parameters():
        added = resnet8.get_parameter(n).detach() - 0.4 * before[n]
        assert torch.allclose(added, 0.1 * q.detach(), atol=1e-6), n
    w = fresh.layer2[0].conv2.weight
    assert rep.noise_std["layer2.0.conv2.weight"] == pytest.approx(0.1 * w.std().item(), rel=1e-3)
    assert w.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)  # the init's std, fan_out = 32*3*3
    # a callable is called under the generator's seed: same seed, same noise
    a, b = copy.deepcopy(resnet8), copy.deepcopy(resnet8)
    mk = lambda: build_model("cifar:resnet8", num_classes=10, in_chans=1)[0]  # noqa: E731
    fs.warmstart.shrink_perturb(a, init=mk, generator=torch.Generator().manual_seed(5))
    fs.warmstart.shrink_perturb(b, init=mk, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_generator_makes_it_reproducible_and_leaves_global_rng(trained_state):
    def model():
        m, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
        m.load_state_dict(trained_state)
        return m

    a, b, c = model(), model(), model()
    state = torch.get_rng_state()
    fs.warmstart.shrink_perturb(a, generator=torch.Generator().manual_seed(7))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor re-seeded
    fs.warmstart.shrink_perturb(b, generator=torch.Generator().manual_seed(7))
    fs.warmstart.shrink_perturb(c, generator=torch.Generator().manual_seed(8))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.layer1[0].conv1.weight, c.layer1[0].conv1.weight)


def test_norms_exclude_and_frozen_are_left_alone(resnet8):
    before = _params(resnet8)
    resnet8.stem[0].weight.requires_grad_(False)
    rep = fs.warmstart.shrink_perturb(resnet8, 0.4, 0.1, generator=torch.Generator().manual_seed(0), norms=False, exclude="fc")
    bn = _bn_names(resnet8)
    for n, p in resnet8.named_parameters():
        untouched = n.rsplit(".", 1)[0] in bn or n.startswith("fc.") or n == "stem.0.weight"
        assert torch.equal(p.detach(), before[n]) == untouched, n
        assert (n in rep.skipped) == untouched
    assert set(rep.tensors) == set(before) - set(rep.skipped)


def test_parameter_without_init_rule_is_only_shrunk():
    class Scale(nn.Module):  # like timm's layer scale: a raw parameter, no reset_parameters
        def __init__(self):
            super().__init__()
            self.gamma = nn.Parameter(torch.full((4,), 0.5))

        def forward(self, x):
            return x * self.gamma.view(1, -1, 1, 1)

    m = nn.Sequential(nn.Conv2d(3, 4, 3), Scale(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    rep = fs.warmstart.shrink_perturb(m, 0.4, 0.1, generator=torch.Generator().manual_seed(0))
    assert rep.no_init == ["1.gamma"]
    assert torch.equal(m[1].gamma.detach(), torch.full((4,), 0.5) * 0.4)


def test_shrink_perturb_keeps_mode_dtype_memory_format(resnet8):
    m = resnet8.to(torch.bfloat16).to(memory_format=torch.channels_last).eval()
    m.layer1.train()  # mixed flags stay as they are
    flags = {n: mod.training for n, mod in m.named_modules()}
    fs.warmstart.shrink_perturb(m, generator=torch.Generator().manual_seed(0))
    assert {n: mod.training for n, mod in m.named_modules()} == flags
    w = m.layer1[0].conv1.weight
    assert w.dtype == torch.bfloat16 and w.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(p).all() for p in m.parameters())


# --------------------------------------------------------------------------- DASH
def tiny_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def _tiny_setup():
    """``tiny_net`` trained 30 SGD steps (weight decay: trained units align with -grad), and 13 new samples."""
    torch.manual_seed(1)
    x, y = torch.randn(40, 2, 6, 6), torch.randint(0, 5, (40,))
    m = _train(tiny_net(), x, y, steps=30, lr=0.1, wd=5e-3, batch=20)
    torch.manual_seed(2)
    xn, yn = torch.randn(13, 2, 6, 6), torch.randint(0, 5, (13,))
    return m, xn, yn


@pytest.fixture
def tiny():
    return _tiny_setup()


def _neg_grads(model, batches, alpha=None):
    """-grad of the mean loss over all samples (alpha=None) or the EMA of the per-batch -grads, in eval mode."""
    m = copy.deepcopy(model).eval()
    acc = {n: torch.zeros_like(p) for n, p in m.named_parameters()}
    total = sum(len(y) for _, y in batches)
    for x, y in batches:
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
        for n, p in m.named_parameters():
            if alpha is None:
                acc[n] -= p.grad * len(y) / total
            else:
                acc[n] = (1 - alpha) * acc[n] - alpha * p.grad
    return acc


def _cos(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("lam,granularity,alpha", [(0.3, "kernel", None), (0.0, "kernel", None),
                                                   (0.3, "filter", None), (0.1, "kernel", 0.5)])
def test_dash_equals_hand_computation(tiny, lam, granularity, alpha):
    m, x, y = tiny
    batches = _batches(x, y, [5, 5, 3])
    before, bufs = _params(m), _buffers(m)
    G = _neg_grads(m, batches, alpha)
    rep = fs.warmstart.dash(m, batches, lam=lam, granularity=granularity, alpha=alpha)
    assert rep.batches == 3 and rep.samples == 13
    inside = 0
    for name in ("0.weight", "3.weight", "6.weight"):
        W, g, new = before[name], G[name], m.get_parameter(name).detach()
        for o in range(W.shape[0]):
            units = range(W.shape[1]) if (granularity == "kernel" and W.dim() == 4) else [None]
            for i in units:
                w_u, g_u = (W[o], g[o]) if i is None else (W[o, i], g[o, i])
                f = max(lam, min(1.0, _cos(w_u, g_u)))  # the paper's rule: max(lam, cos(w, -grad)) per unit
                inside += lam < f < 1
                got = new[o] if i is None else new[o, i]
                assert torch.allclose(got, f * w_u, rtol=1e-4, atol=1e-7), (name, o, i)
                rf = rep.factors[name][o] if i is None else rep.factors[name][o, i]
                assert float(rf) == pytest.approx(f, abs=1e-5)
    assert inside > 0  # some units are shrunk by their cosine, not by the floor
    for name in ("0.bias", "3.bias", "6.bias"):  # one factor per bias vector
        f = max(lam, min(1.0, _cos(before[name], G[name])))
        assert torch.allclose(m.get_parameter(name).detach(), f * before[name], rtol=1e-4, atol=1e-7)
        assert rep.bias_factors[name] == pytest.approx(f, abs=1e-5)
    for name in ("1.weight", "1.bias"):  # norms are not shrunk
        assert torch.equal(m.get_parameter(name).detach(), before[name])
    for n, b in m.named_buffers():  # eval-mode gradient pass: BN statistics untouched
        assert torch.equal(b, bufs[n]), n
    kernel_shape = (3, 2) if granularity == "kernel" else (3,)
    assert rep.factors["0.weight"].shape == kernel_shape and rep.factors["6.weight"].shape == (5,)
    r = repr(rep)
    assert "\n" not in r and len(r) < 200 and r.startswith(f"DashReport(lam={lam:g}")


def test_dash_mean_gradient_does_not_depend_on_batching(tiny):
    m, x, y = tiny
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    fs.warmstart.dash(a, _batches(x, y, [13]))
    fs.warmstart.dash(b, _batches(x, y, [4, 4, 4, 1]))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_dash_restores_modes_keeps_grads_and_is_deterministic(tiny):
    m, x, y = tiny
    m.train()
    m[1].eval()
    flags = [mod.training for mod in m.modules()]
    m[0].weight.grad = torch.full_like(m[0].weight, 7.0)
    twin = copy.deepcopy(m)
    fs.warmstart.dash(m, _batches(x, y, [7, 6]), bias=False)
    assert [mod.training for mod in m.modules()] == flags
    assert torch.equal(m[0].weight.grad, torch.full_like(m[0].weight, 7.0)) and m[3].weight.grad is None
    fs.warmstart.dash(twin, _batches(x, y, [7, 6]), bias=False)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), twin.parameters()))  # no randomness


def test_dash_exclude_frozen_unused_and_lam_one(tiny):
    m, x, y = tiny
    before = _params(m)
    m[3].weight.requires_grad_(False)
    rep = fs.warmstart.dash(m, _batches(x, y, [13]), exclude="6")
    assert torch.equal(m[3].weight.detach(), before["3.weight"]) and "3.weight" not in rep.factors
    assert torch.equal(m[6].weight.detach(), before["6.weight"]) and "6.weight" not in rep.factors
    assert not torch.equal(m[0].weight.detach(), before["0.weight"])

    class WithAux(nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.aux = tiny_net(), nn.Linear(4, 2)  # aux is not on the forward path

        def forward(self, x):
            return self.body(x)

    w = WithAux()
    rep = fs.warmstart.dash(w, _batches(x, y, [13]))
    assert set(rep.unused) == {"aux.weight", "aux.bias"}
    w2, before2 = copy.deepcopy(m), _params(m)
    fs.warmstart.dash(w2, _batches(x, y, [13]), lam=1.0)
    assert all(torch.equal(p.detach(), before2[n]) for n, p in w2.named_parameters())


def test_dash_with_batchloader_transform_and_bf16_autocast(demo, resnet8):
    d, _, _ = demo
    loader = BatchLoader(d.train_x[:96], d.train_y[:96], 32, shuffle=False)  # uint8 batches, as the trainer's
    norm = lambda xb: augment.normalize(xb, d.mean, d.std)  # noqa: E731
    a = copy.deepcopy(resnet8)
    rep32 = fs.warmstart.dash(a, loader, transform=norm)
    rep16 = fs.warmstart.dash(resnet8, loader, transform=norm, amp=torch.bfloat16)
    assert rep16.samples == 96 and rep16.batches == 3
    assert all(torch.isfinite(p).all() for p in resnet8.parameters())
    assert resnet8.fc.weight.dtype == torch.float32
    assert rep16.mean_factor == pytest.approx(rep32.mean_factor, abs=0.05)


def test_dash_on_a_bf16_channels_last_model(tiny):
    m, x, y = tiny
    ref = copy.deepcopy(m)
    m = m.to(torch.bfloat16).to(memory_format=torch.channels_last)
    rep = fs.warmstart.dash(m, [(x.to(torch.bfloat16), y)])
    assert m[0].weight.dtype == torch.bfloat16 and m[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    rep32 = fs.warmstart.dash(ref, [(x, y)])
    assert rep.mean_factor == pytest.approx(rep32.mean_factor, abs=0.05)


@pytest.mark.parametrize("spec", ["timm:mobilenetv3_small_050", "torchvision:shufflenet_v2_x0_5"])
def test_any_timm_torchvision_cnn(spec):
    """Depthwise / grouped convs, SE convs with biases, Hardswish, channel shuffle: both ops run."""
    torch.manual_seed(0)
    m, _ = build_model(spec, num_classes=4)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    _train(m, x, y, steps=2, lr=0.01, batch=8)
    m.eval()
    before = _params(m)
    rep = fs.warmstart.dash(m, [(x, y)])
    assert not m.training and all(not mod.training for mod in m.modules())
    dw = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d) and mod.groups > 1 and mod.groups == mod.in_channels]
    assert dw and rep.factors[f"{dw[0]}.weight"].shape[1] == 1  # depthwise: one kernel per filter
    assert set(rep.factors) == {f"{n}.weight" for n, mod in m.named_modules() if isinstance(mod, (nn.Conv2d, nn.Linear))}
    sp = fs.warmstart.shrink_perturb(m, generator=torch.Generator().manual_seed(0))
    assert sp.no_init == [] and len(sp) == len(before)
    assert torch.isfinite(m(x)).all()
    fresh, _ = build_model(spec, num_classes=4)
    fs.warmstart.shrink_perturb(m, init=fresh)


def _dash_worker(rank: int, world: int, init_file: str, res: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m, x, y = _tiny_setup()
        mine = _batches(x, y, [4, 4, 4, 1])[rank::world]  # each rank sees its own shard of the new data
        rep = fs.warmstart.dash(m, mine)
        torch.save({"state": m.state_dict(), "samples": rep.samples}, f"{res}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_dash_under_torch_distributed_uses_all_ranks_data(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_dash_worker, args=(2, str(tmp_path / "pg"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    m, x, y = _tiny_setup()
    fs.warmstart.dash(m, _batches(x, y, [13]))  # one process, all the data
    for k, v in m.state_dict().items():
        torch.testing.assert_close(r0["state"][k], r1["state"][k], rtol=0, atol=0, msg=k)  # ranks agree
        torch.testing.assert_close(r0["state"][k], v, rtol=1e-5, atol=1e-6, msg=k)  # = the full-data gradient
    assert (r0["samples"], r1["samples"]) == (8, 5)


# --------------------------------------------------------------------------- the trainer's warm starts
def test_the_baselines_warm_starts_apply_the_ops_with_their_options(tiny):
    from filtersurgery.train import Dash, ShrinkPerturb

    m, _, y = tiny
    x = torch.randint(0, 256, (len(y), 2, 6, 6), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    ctx = _ctx(x, y)
    Dash(lam=0.25).apply(ctx, a, x, y)  # the phase's uint8 images, normalized, in one batch here
    fs.warmstart.dash(b, [(ctx.normalized(x), y)], lam=0.25)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    c, before = copy.deepcopy(m), _params(m)
    ShrinkPerturb(shrink=0.6, noise=0.0).apply(ctx, c, x, y)
    assert torch.equal(c[0].weight.detach(), 0.6 * before["0.weight"])
    assert Dash().flops(10, 7) == 210 and ShrinkPerturb().flops(10, 7) == 0  # DASH's gradient pass is counted


def _ctx(x, y):
    """A phase context for the tiny model: the whole batch in one loader batch, on the CPU, no AMP."""
    from filtersurgery.train import PhaseContext

    return PhaseContext(step=2, name="dash", seed=0, device=torch.device("cpu"), amp=None, channels_last=False,
                        batch_size=len(y), mean=(0.0, 0.0), std=(1.0, 1.0), train_images=lambda: (x, y),
                        accuracy=lambda model: 0.0, example=lambda n=2: x[:n].float(),
                        new_model=lambda seed_offset=0, fresh=False: None)


def test_public_names():
    for n, mod in (("shrink_perturb", sp_op), ("ShrinkPerturbReport", sp_op), ("dash", dash_op), ("DashReport", dash_op)):
        assert n in fs.warmstart.__all__ and getattr(fs.warmstart, n) is getattr(mod, n)


# --------------------------------------------------------------------------- bad inputs
def _nan_weight():
    m = tiny_net()
    with torch.no_grad():
        m[6].weight[1, 2] = float("nan")
    return m


def _data():
    torch.manual_seed(0)
    return [(torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,)))]


def _nan_data():
    x, y = _data()[0]
    x[0, 0, 0, 0] = float("inf")
    return [(x, y)]


BAD = [
    ("shrink=0", lambda: fs.warmstart.shrink_perturb(tiny_net(), shrink=0), r"^shrink: must be in \(0, 1\] \(1 = no shrinking\), got 0$"),
    ("shrink=1.5", lambda: fs.warmstart.shrink_perturb(tiny_net(), shrink=1.5), r"^shrink: must be in \(0, 1\]"),
    ("shrink='a'", lambda: fs.warmstart.shrink_perturb(tiny_net(), shrink="a"), r"^shrink: must be a number in \(0, 1\], got 'a'"),
    ("noise=-0.1", lambda: fs.warmstart.shrink_perturb(tiny_net(), noise=-0.1), r"^noise: must be a finite number >= 0 \(0 = shrink only\), got -0.1"),
    ("noise=inf", lambda: fs.warmstart.shrink_perturb(tiny_net(), noise=float("inf")), r"^noise: must be a finite number >= 0"),
    ("bn_stats='drop'", lambda: fs.warmstart.shrink_perturb(tiny_net(), bn_stats="drop"), r"^bn_stats: must be one of reset, keep, got 'drop'"),
    ("exclude=[1]", lambda: fs.warmstart.shrink_perturb(tiny_net(), exclude=[1]), r"^exclude: must be non-empty parameter-name prefixes"),
    ("init: other architecture", lambda: fs.warmstart.shrink_perturb(tiny_net(), init=nn.Linear(2, 2)), r"^init: has no parameter '0\.weight'"),
    ("init: not a model", lambda: fs.warmstart.shrink_perturb(tiny_net(), init=3), r"^init: must be None, an nn\.Module or a callable"),
    ("generator: a seed", lambda: fs.warmstart.shrink_perturb(tiny_net(), generator=3), r"^generator: must be a torch\.Generator or None, got int"),
    ("shrink_perturb: NaN weight", lambda: fs.warmstart.shrink_perturb(_nan_weight()), 
     r"^model: 1 weight is NaN/Inf \(first: 6\.weight\[1, 2\]\); the model has diverged"),
    ("shrink_perturb: not a model", lambda: fs.warmstart.shrink_perturb("resnet18"), r"^model: expected an nn\.Module, got str"),
    ("lam=1.5", lambda: fs.warmstart.dash(tiny_net(), _data(), lam=1.5), r"^lam: must be in \[0, 1\] \(the smallest shrink factor\), got 1.5$"),
    ("lam=-0.1", lambda: fs.warmstart.dash(tiny_net(), _data(), lam=-0.1), r"^lam: must be in \[0, 1\]"),
    ("lam=None", lambda: fs.warmstart.dash(tiny_net(), _data(), lam=None), r"^lam: must be a number in \[0, 1\], got None"),
    ("alpha=0", lambda: fs.warmstart.dash(tiny_net(), _data(), alpha=0), r"^alpha: must be None \(mean gradient\) or in \(0, 1\]"),
    ("granularity='neuron'", lambda: fs.warmstart.dash(tiny_net(), _data(), granularity="neuron"),
     r"^granularity: must be one of kernel, filter, got 'neuron'"),
    ("max_batches=0", lambda: fs.warmstart.dash(tiny_net(), _data(), max_batches=0), r"^max_batches: must be None or an integer >= 1"),
    ("empty loader", lambda: fs.warmstart.dash(tiny_net(), []), r"^loader: yielded no batches; DASH needs at least one"),
    ("loader=None", lambda: fs.warmstart.dash(tiny_net(), None), r"^loader: must be an iterable of \(inputs, targets\) batches, got NoneType"),
    ("batch is not a pair", lambda: fs.warmstart.dash(tiny_net(), [torch.zeros(2, 2, 6, 6)]), r"^loader: each batch must be a pair"),
    ("dash: NaN weight", lambda: fs.warmstart.dash(_nan_weight(), _data()), r"^model: 1 weight is NaN/Inf \(first: 6\.weight\[1, 2\]\)"),
    ("dash: Inf input -> NaN gradient", lambda: fs.warmstart.dash(tiny_net(), _nan_data()),
     r"^loader: \d+ gradient values are NaN/Inf \(first: 0\.weight\[.*\]\); the loss on the new data is not finite"),
    ("dash: no conv/linear", lambda: fs.warmstart.dash(nn.Sequential(nn.BatchNorm2d(2)), _data()),
     r"^model: Sequential has no trainable Conv1d/2d/3d or Linear weight"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_inputs_one_line(case):
    _, call, pattern = case
    with pytest.raises(ValueError, match=pattern) as e:
        call()
    assert "\n" not in str(e.value)


def test_bad_input_changes_nothing():
    m = _nan_weight()
    before = _params(m)
    for call in (lambda: fs.warmstart.shrink_perturb(m), lambda: fs.warmstart.dash(m, _data())):
        with pytest.raises(ValueError):
            call()
    m2 = tiny_net()
    before2 = _params(m2)
    with pytest.raises(ValueError):
        fs.warmstart.dash(m2, _nan_data())
    for n, p in m2.named_parameters():
        assert torch.equal(p.detach(), before2[n])
    for n, p in m.named_parameters():
        assert torch.allclose(p.detach(), before[n], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------- trainer methods
@pytest.mark.parametrize("method", ["shrink-perturb", "dash"])
def test_trainer_method_applies_the_op_once_then_finetunes(tmp_path, method, monkeypatch):
    from filtersurgery import train

    from filtersurgery.train import Dash, ShrinkPerturb

    calls = []
    kind = ShrinkPerturb if method == "shrink-perturb" else Dash
    real = kind.apply
    monkeypatch.setattr(kind, "apply", lambda self, *a: calls.append(self.name) or real(self, *a))
    data = load_dataset("demo", subset_test=100)
    cfg = train.TrainConfig(model="cifar:resnet8", method=method, steps=3, epochs=1, subset=64, batch_size=32,
                            device="cpu", progress=False, lr=1e-2)
    m = train.multi_step(cfg, tmp_path / method, seed=0, data=data)
    assert [e["phases"] for e in m["steps"]] == [["scratch"], [method], [method]]
    assert calls == [method, method]  # once per step >= 2
    ft = train.multi_step(replace(cfg, method="finetune"), tmp_path / "ft", seed=0, data=data)
    extra = m["steps"][1]["train_flops"] - ft["steps"][1]["train_flops"]
    assert (extra > 0) == (method == "dash")  # DASH's gradient pass over the part is counted
    calls.clear()
    train.multi_step(cfg, tmp_path / method, seed=0, data=data)  # complete: nothing re-applied
    assert calls == []
