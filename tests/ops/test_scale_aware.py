"""The framework on real backbones: per-norm ranking, Dri mapped back to each norm, the SST
budget (lam="auto"), attention transfer and LwM on spatial blocks, DML that diverges,
per-phase seeds and fp32 decisions. Every operation is checked on a *trained* timm model
(timm zero-initialises the last BN of each residual branch, so its norms do not share one
scale) as well as where a fresh one matters."""
import copy
import csv
import warnings
from collections import Counter
from dataclasses import replace

import pytest
import timm
import torch
import torch.nn.functional as F

import filtersurgery as fs

from filtersurgery.data import augment
from filtersurgery.distill import losses
from filtersurgery.distill.blockfeats import block_sizes, spatial_blocks
from filtersurgery.data import load_dataset
from filtersurgery.ops.ranking import factor_scores, rank_filters, useless_mask
from filtersurgery.ops.sparsity import lam_for_budget, sparsify
from filtersurgery.engine import checkpoint, run as engine_run
from filtersurgery.train import DML, SST, MultiStepConfig, Run, TrainConfig, phase_seed, run_phase


def _train(model, steps=25, size=28, lr=0.05, seed=0):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    x = torch.randn(32, 1, size, size)
    y = torch.randint(0, 10, (32,))
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def trained_timm():
    """timm resnet10t (zero_init_last=True), 1 input channel, trained a little: its last-BN
    gammas moved off 0 but stay far below the other norms'."""
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=10, in_chans=1)
    return _train(m, steps=25)


def _kinds(sm, mask):
    fv = sm.factors
    return Counter(fv.locate(int(k))[0].rsplit(".", 1)[-1] for k in torch.nonzero(mask).flatten())


def test_global_ranking_only_finds_zero_initialised_norms(trained_timm):
    sm = fs.trace(trained_timm)
    g = _kinds(sm, useless_mask(sm, 0.3, ranking="global"))
    p = _kinds(sm, useless_mask(sm, 0.3, ranking="per-norm"))
    assert set(g) == {"bn2"}  # the paper's rule: timm's zero-initialised channels, nothing else
    assert len(p) >= 2 and p["bn2"] < sum(g.values())  # per-norm: spread over the norms


def test_per_norm_scores_are_relative_to_own_norm(trained_timm):
    sm = fs.trace(trained_timm)
    fv = sm.factors
    score, scale = factor_scores(fv, "per-norm")
    g = fv.gammas().abs()
    assert torch.allclose(score * scale, g, rtol=1e-5, atol=1e-12)
    for i, (p, c, off) in enumerate(zip(fv.params, fv.channels, fv.offsets)):
        s = score[off: off + c.numel()]
        assert abs(float(s.mean()) - 1.0) < 1e-4  # mean score of every norm is 1
    rk = rank_filters(sm, "per-norm")
    assert torch.all(rk.score[1:] >= rk.score[:-1]) and rk.ranking == "per-norm"
    assert len(repr(rk)) < 200


@pytest.mark.parametrize("ranking", ["global", "per-norm"])
def test_dri_maps_the_drawn_value_back_to_the_own_norm(trained_timm, ranking):
    model = copy.deepcopy(trained_timm)
    mods = dict(model.named_modules())
    before = {n: m.weight.detach().abs().max().item() for n, m in mods.items() if isinstance(m, torch.nn.BatchNorm2d)}
    rep = fs.rescale(model, 0.3, 0.1, generator=torch.Generator().manual_seed(0), ranking=ranking)
    lift = max(float(rep.new[i]) / before[n] for i, (n, _) in enumerate(rep.locations))
    if ranking == "global":
        assert lift > 5  # the paper's rule lifts zero-initialised channels far above their own layer
    else:
        assert lift < 2.0  # in per-norm units the new gamma stays within its norm's range
        assert rep.range[0] > 0.5 and rep.range[1] < 5  # R in units of the norm mean
    assert len(repr(rep)) < 200


def test_rescale_warns_on_a_degenerate_range():
    torch.manual_seed(0)
    m = timm.create_model("resnet10t", num_classes=10, in_chans=1, zero_init_last=False)  # untrained: all gammas 1
    with pytest.warns(UserWarning, match="degenerate"):
        fs.rescale(m, 0.3, 0.1, ranking="global")


def test_early_switch_at_epoch0_says_so_on_untrained_zero_init():
    m = timm.create_model("resnet10t", num_classes=10, in_chans=1)  # bn2 gammas exactly 0
    with pytest.warns(UserWarning, match="already <= zero_tol before SST"):
        sp = sparsify(m, target_r=0.3, epochs=10, ranking="global")
    assert sp.switched and sp.switch_epoch == 0


def test_early_switch_does_not_fire_at_epoch0_on_trained_timm_per_norm(trained_timm):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sp = sparsify(copy.deepcopy(trained_timm), target_r=0.3, epochs=10, ranking="per-norm")
    assert not sp.switched and sp.zero_fraction() < 0.3


def test_per_norm_l1_push_is_lam_times_norm_scale(trained_timm):
    model = copy.deepcopy(trained_timm)
    sp = sparsify(model, target_r=0.3, epochs=None, lam=1e-2, ranking="per-norm")
    for p in sp.factors.params:
        p.grad = torch.zeros_like(p)
    sp.step()
    fv = sp.factors
    grads = torch.cat([p.grad[c] for p, c in zip(fv.params, fv.channels)])
    expected = torch.where(sp.targets, 1e-2 * sp.scales * torch.sign(fv.gammas()), torch.zeros(()))
    assert torch.allclose(grads, expected, atol=1e-9)


def test_lam_for_budget_formula(trained_timm):
    sm = fs.trace(trained_timm)
    score, _ = factor_scores(sm.factors, "per-norm")
    q = float(torch.quantile(score.double(), 0.3))
    lam = lam_for_budget(sm, 0.3, lr=0.1, steps=500, momentum=0.9, safety=2.0, ranking="per-norm")
    # a constant push lam through PyTorch's SGD (momentum 0.9) under a per-step cosine moves by 2 q
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=500)
    for _ in range(500):
        p.grad = torch.full_like(p, lam)
        opt.step()
        sched.step()
    assert float(-p) == pytest.approx(2.0 * q, rel=1e-4)
    assert lam == pytest.approx(2 * 2.0 * q * 0.1 / (0.1 * 500), rel=0.05)  # the long-schedule form
    with pytest.raises(ValueError, match="^lr: "):
        lam_for_budget(sm, 0.3, lr=0.0, steps=10)


@pytest.fixture(scope="module")
def demo():
    return load_dataset("demo", subset_test=200)


def test_auto_lam_budget_carries_the_targets_to_zero(trained_timm):
    """The rule's arithmetic: with the cross-entropy gradient switched off (so only the L1 push
    acts), SGD with momentum and a cosine schedule over ``steps`` drives >= Target_r of the
    factors to zero_tol with ``lam_for_budget(..., safety=1.5)``, and a tenth of it does not."""
    def run(fraction):
        model = copy.deepcopy(trained_timm)
        steps, lr = 600, 0.1
        lam = fraction * lam_for_budget(model, 0.3, lr=lr, steps=steps, momentum=0.9, safety=1.5, ranking="per-norm")
        sp = sparsify(model, target_r=0.3, epochs=3, lam=lam, ranking="per-norm")
        params = list(sp.factors.params)
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        for t in range(steps):
            if t % 200 == 0:
                sp.set_epoch(t // 200)
            for p in params:
                p.grad = torch.zeros_like(p)
            sp.step()
            opt.step()
            sched.step()
        return sp.zero_fraction()

    assert run(1.0) >= 0.3
    assert run(0.1) < 0.3


def test_sst_logs_its_schedule_and_the_zero_fraction_it_reached(tmp_path, demo):
    cfg = TrainConfig(model="cifar:resnet8", method="framework", steps=2, epochs=3, subset=128, batch_size=64,
                      device="cpu", progress=False, max_batches=2)
    run = Run(cfg, 0, tmp_path, demo)
    run.work.mkdir(parents=True)
    phase = SST("sst", [0], 0.1, 3)
    _, handoff = run_phase(run, 2, phase, run.new_model())
    rows = [r for r in csv.DictReader(open(tmp_path / "epochs.csv")) if r["phase"] == "sst"]
    sp = phase.sparsifier
    assert [float(r["sp_r"]) for r in rows] == [round(h["sp_r"], 4) for h in sp.history]  # the ramp as run
    assert float(rows[0]["sp_r"]) == 1.0 and float(rows[-1]["sp_r"]) == 0.3
    assert float(rows[-1]["zero_frac"]) == round(sp.zero_fraction(), 4) >= 0.3  # the catch-up got there in time
    assert torch.equal(handoff["scales"], sp.scales.cpu())  # what Dri receives


def test_spatial_blocks_skip_maps_without_spatial_information():
    m = timm.create_model("resnet18", num_classes=10, in_chans=1)
    x = torch.randn(2, 1, 28, 28)
    sizes = block_sizes(m, x)
    assert [hw for hw in sizes.values()] == [(7, 7), (4, 4), (2, 2), (1, 1)]
    assert spatial_blocks(m, x, 4) == ["layer1", "layer2"]
    assert spatial_blocks(m, x, 2)[-1] == "layer3"  # LwM's Grad-CAM block: the last map larger than 1x1
    with pytest.raises(ValueError, match=r"^at_min_size: no block has a map of at least 8x8") as e:
        spatial_blocks(m, x, 8, arg="at_min_size")
    assert "\n" not in str(e.value) and "layer4 1x1" in str(e.value)
    assert m.training  # mode restored


def test_at_on_a_1x1_map_has_no_gradient_and_on_4x4_it_has():
    t = torch.randn(8, 16, 1, 1)
    s = torch.randn(8, 16, 1, 1, requires_grad=True)
    losses.at_loss([t], [s]).backward()
    assert float(s.grad.abs().max()) == 0.0
    t4, s4 = torch.randn(8, 16, 4, 4), torch.randn(8, 16, 4, 4, requires_grad=True)
    losses.at_loss([t4], [s4]).backward()
    assert float(s4.grad.abs().max()) > 0.0


def test_dml_students_diverge_and_kl_has_a_gradient(tmp_path, demo):
    cfg = TrainConfig(model="cifar:resnet8", method="dml", steps=2, epochs=1, subset=128, batch_size=32,
                      device="cpu", progress=False, max_batches=3)
    run = Run(cfg, 0, tmp_path, demo)
    run.work.mkdir(parents=True)
    start = run.new_model()
    xb, yb = run.part_xy([1], "train")
    xb, yb = xb[:32], yb[:32]
    students = [copy.deepcopy(start), copy.deepcopy(start)]
    gen = torch.Generator().manual_seed(0)
    loss = DML("dml", [1], 1e-2, 1).batch_loss(run.context(2, "dml", [1]), students, xb, yb, gen)
    loss.backward()
    # the KL term alone: the peer's prediction on its own view differs, so the gradient is non-zero
    x1 = augment.normalize(augment.random_crop_flip(xb, generator=torch.Generator().manual_seed(1)),
                              demo.mean, demo.std)
    x2 = augment.normalize(augment.random_crop_flip(xb, generator=torch.Generator().manual_seed(2)),
                              demo.mean, demo.std)
    a = students[0](x1)
    kl = losses.kl_div(students[1](x2), a)
    g = torch.autograd.grad(kl, a)[0]
    assert float(g.abs().max()) > 0
    out, _ = run_phase(run, 2, DML("dml", [1], 1e-2, 1), start)
    assert any(not torch.equal(a, b) for a, b in zip(out.state_dict().values(), start.state_dict().values()))
    # after a phase the two students are different networks (own augmentation draws)
    st = torch.load(run.work / checkpoint.STATE_FILE, weights_only=False)["model"]
    diffs = [float((st[f"s0.{k}"].float() - st[f"s1.{k}"].float()).abs().max())
             for k in start.state_dict() if f"s0.{k}" in st and st[f"s0.{k}"].is_floating_point()]
    assert max(diffs) > 1e-4


def test_phase_seeds_differ_between_phases_of_a_step():
    assert phase_seed(0, 2, "sst") != phase_seed(0, 2, "aod")
    assert phase_seed(0, 2, "sst") == phase_seed(0, 2, "sst")
    assert phase_seed(0, 2, "sst", "order:") != phase_seed(0, 2, "sst")


def test_decisions_are_evaluated_in_fp32(tmp_path, demo, monkeypatch):
    cfg = TrainConfig(model="cifar:resnet8", steps=2, epochs=1, subset=64, device="cpu", amp="bf16", progress=False)
    run = Run(cfg, 0, tmp_path, demo)
    seen = []
    monkeypatch.setattr(engine_run, "evaluate", lambda *a, **k: seen.append(k.get("amp")) or 50.0)
    run.acc(run.new_model(), [0])
    run.acc(run.new_model())
    assert run.amp is torch.bfloat16 and seen == [None, None]


def test_config_validates_new_options():
    for bad, msg in ((dict(ranking="local"), "^ranking: "), (dict(lam="often"), "^lam: "),
                     (dict(at_min_size=0), "^at_min_size: "), (dict(lam_safety=0.0), "^lam_safety: "),
                     (dict(aod_flip="never"), "^aod_flip: "), (dict(e_cut_fraction=1.5), "^e_cut_fraction: "),
                     (dict(sst_update="sometimes"), "^sst_update: "), (dict(refresh_bn_batches=0), "^refresh_bn_batches: ")):
        with pytest.raises(ValueError, match=msg):
            replace(MultiStepConfig(), **bad).validate()
    with pytest.raises(ValueError, match="^step1_epochs: "):
        replace(TrainConfig(), step1_epochs=0).validate()


def test_dri_after_sst_uses_the_scales_sst_ranked_with():
    """A norm that SST drove towards 0 is useless as a whole and is re-drawn at its former
    scale; without SST's scales its mean would shrink with it and hide it."""
    from filtersurgery.models.factory import build_model

    torch.manual_seed(0)
    m, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
    sm = fs.trace(m)
    sp = sparsify(sm, target_r=0.3, epochs=4, lam=1e-3, ranking="per-norm")
    bn = m.layer1[0].bn2
    former = float(bn.weight.abs().mean())
    with torch.no_grad():
        bn.weight.fill_(1e-3)  # what SST did to this norm
    useless = sp.useless()
    rep = fs.rescale(sm, 0.3, 0.1, generator=torch.Generator().manual_seed(0), ranking="per-norm", scales=sp.scales)
    assert set(rep.factors.tolist()) == set(torch.nonzero(useless).flatten().tolist())
    assert all(any(n == "layer1.0.bn2" and c == ch for n, c in rep.locations) for ch in range(bn.weight.numel()))
    assert float(bn.weight.min()) > 0.3 * former  # revived at its former scale, not left near 0
    with pytest.raises(ValueError, match="^scales: one per scaling factor"):
        fs.rescale(sm, 0.3, 0.1, ranking="per-norm", scales=sp.scales[:3])


def _grad_norm(term, params):
    gs = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
    return sum(float(g.abs().sum()) for g in gs if g is not None)


def test_every_loss_term_has_a_gradient_on_a_trained_timm_model(trained_timm):
    """AOD (CE, JS to the peer, consistency), MSL (KL, AT on the spatial blocks) and LwM's
    Grad-CAM term all move a student built from a trained timm model, on a realistic batch;
    Dri's two students differ."""
    torch.manual_seed(1)
    x = torch.randn(16, 1, 28, 28)
    y = torch.randint(0, 10, (16,))
    s1, s2 = copy.deepcopy(trained_timm), copy.deepcopy(trained_timm)
    fs.rescale(s1, 0.3, 0.1, generator=torch.Generator().manual_seed(0), ranking="per-norm")
    fs.rescale(s2, 0.3, 0.2, generator=torch.Generator().manual_seed(1), ranking="per-norm")
    diff = max(float((a - b).abs().max()) for a, b in zip(s1.parameters(), s2.parameters()))
    assert diff > 1e-3  # the two students are different networks
    xf, xc = augment.two_views((x * 40 + 128).clamp(0, 255).to(torch.uint8), generator=torch.Generator().manual_seed(2))
    xf, xc = xf.float() / 255, xc.float() / 255
    o1f, o1c, o2f, o2c = s1(xf), s1(xc), s2(xf), s2(xc)
    _, _, parts = losses.aod_losses(o1f, o1c, o2f, o2c, y)
    p1 = list(s1.parameters())
    ce1 = F.cross_entropy(o1f, y)
    kd1 = losses.js_div(o1f, o2f.detach())
    cr1 = losses.consistency_loss(o1f, o1c)
    for name, term in (("CE", ce1), ("JS to the peer", kd1), ("consistency", cr1)):
        assert _grad_norm(term, p1) > 0, name
    # MSL: a student one SGD step away from its teacher
    teacher = copy.deepcopy(trained_timm).eval()
    student = copy.deepcopy(trained_timm)
    opt = torch.optim.SGD(student.parameters(), lr=0.05)
    F.cross_entropy(student(x), y).backward()
    opt.step()
    names = spatial_blocks(student, x[:2], 4)
    with torch.no_grad(), fs.distill.capture_blocks(teacher, names) as tf:
        tl = teacher(x)
        tfeat = [tf[n].float() for n in names]
    with fs.distill.capture_blocks(student, names) as sf:
        sl = student(x)
        sfeat = [sf[n].float() for n in names]
        ps = list(student.parameters())
        assert _grad_norm(losses.kl_div(tl, sl), ps) > 0
        assert _grad_norm(losses.at_loss(tfeat, sfeat), ps) > 0
    # LwM: Grad-CAM on the last block larger than 1x1 (layer3, 2x2 here)
    last = spatial_blocks(student, x[:2], 2)[-1:]
    with fs.distill.capture_blocks(teacher, last) as tf:
        tl = teacher(x.clone().requires_grad_(True))
        tfeat = tf[last[0]]
        with fs.distill.capture_blocks(student, last) as sf:
            sl = student(x)
            full = losses.lwm_loss(sl, tl, y, sf[last[0]], tfeat, beta=0.0, gamma=1.0)
            ce_only = F.cross_entropy(sl, y)
            ad = full - ce_only
            assert float(ad.detach()) > 0 and _grad_norm(ad, list(student.parameters())) > 0
