"""SST / BST (docs/method.md §1): SP_r schedule (eq. 2-3), early switch, target selection, step(), bad input."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import filtersurgery as fs
from filtersurgery.ops.ranking import rank_filters, remaining_mean, useless_mask
from filtersurgery.tracing.scaling_map import ConvEntry, NormRef, ScalingMap
from filtersurgery.engine.sparse import sparsify  # the public one: trains when given a loader
from filtersurgery.ops.sparsity import Sparsifier, sp_ratio


class Toy(nn.Module):
    """b2 is reached by two convs (c2 + c3, residual-style); b3 by a concatenation (c4 | c5)."""

    def __init__(self):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.c3, self.b2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.c4, self.c5, self.b3 = nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x) + self.c3(x)))
        x = F.relu(self.b3(torch.cat([self.c4(x), self.c5(x)], 1)))
        return self.fc(x.mean((2, 3)))


def toy_map(m, drop=()):
    refs = {"c1": ("b1", 0), "c2": ("b2", 0), "c3": ("b2", 0), "c4": ("b3", 0), "c5": ("b3", 4)}
    convs = {}
    for n, (norm, off) in refs.items():
        conv = getattr(m, n)
        scaled = [] if n in drop else [NormRef(norm, off)]
        convs[n] = ConvEntry(n, conv.out_channels, conv.groups, scaled, None if scaled else "test: dropped")
    return ScalingMap(m, convs, {"b1": "bn", "b2": "bn", "b3": "bn"})


def toy(seed=0):
    """Toy with 24 distinct |gamma| in [0.05, 1.2], some negative."""
    torch.manual_seed(seed)
    m = Toy()
    vals = torch.linspace(0.05, 1.2, 24)[torch.randperm(24)]
    vals[::5] *= -1
    with torch.no_grad():
        for i, b in enumerate((m.b1, m.b2, m.b3)):
            b.weight.copy_(vals[8 * i : 8 * i + 8])
    return m, toy_map(m)


def zero_grads(m):
    for p in m.parameters():
        p.grad = torch.zeros_like(p)


def test_sp_ratio_eq2_eq3():
    # E_max = 30 -> E_cut = 10: SP_r falls linearly from 1 to Target_r, then stays
    assert sp_ratio(0, 0.3, 10) == 1.0
    assert sp_ratio(5, 0.3, 10) == pytest.approx(0.65)
    assert sp_ratio(10, 0.3, 10) == 0.3 and sp_ratio(29, 0.3, 10) == 0.3
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=30)
    got = [sp.set_epoch(e) for e in range(30)]
    want = [(0.3 - 1) / 10 * e + 1 if e < 10 else 0.3 for e in range(30)]
    assert got == pytest.approx(want)
    assert not sp.switched


def test_e_cut_fraction_zero_means_no_ramp():
    """E_cut = 0: SP_r = Target_r from the first epoch, so only the final targets are pushed."""
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=4, e_cut_fraction=0.0)
    assert [sp.set_epoch(e) for e in range(4)] == [0.3] * 4
    assert int(sp.targets.sum()) == math.floor(0.3 * 24 + 0.5)
    assert torch.equal(sp.targets, sp.useless())
    with pytest.raises(ValueError, match=r"e_cut_fraction: must be in \[0, 1\]"):
        sparsify(sm, target_r=0.3, epochs=4, e_cut_fraction=-0.1)


def test_schedule_without_epochs_and_with_total():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3)
    assert sp.sp_r == 0.3  # no schedule length: Target_r from the start
    assert sp.set_epoch(0, total=9) == 1.0
    assert sp.set_epoch(1) == pytest.approx(1 - 0.7 / 3)


def test_bst_targets_everything():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=6, selective=False)
    with torch.no_grad():
        m.b1.weight.zero_()  # would trigger SST's early switch
    for e in range(6):
        assert sp.set_epoch(e) == 1.0
        assert bool(sp.targets.all())
    assert not sp.switched


def test_target_selection_is_smallest_sp_r_fraction():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=30)
    assert sp.n == 24  # b2 reached by two convs: its 8 factors counted once
    sp.set_epoch(5)  # SP_r = 0.65
    k = math.floor(0.65 * 24 + 0.5)
    assert int(sp.targets.sum()) == k
    rk = rank_filters(sm)
    assert set(torch.nonzero(sp.targets).flatten().tolist()) == set(rk.order[:k].tolist())
    assert torch.equal(sp.useless(), useless_mask(sm, 0.3))
    assert int(sp.useless().sum()) == 7


def test_project_sets_the_target_r_smallest_factors_to_exactly_zero():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=30, ranking="global")
    scores = sp.scores()
    k = math.ceil(0.3 * 24)  # 8: at least Target_r of the 24 factors, whatever the rounding
    smallest = torch.sort(scores, stable=True).indices[:k]
    before = {n: getattr(m, n).weight.detach().clone() for n in ("b1", "b2", "b3")}
    moved = sp.project()
    assert moved == {"projected": k, "projected_max": pytest.approx(float(scores[smallest].max()))}
    after = sp.scores()
    assert torch.all(after[smallest] == 0) and int((after == 0).sum()) == k
    assert sp.zero_fraction() >= 0.3
    others = torch.ones(24, dtype=torch.bool)
    others[smallest] = False
    assert torch.equal(after[others], scores[others])  # nothing else moved
    assert any(not torch.equal(before[n], getattr(m, n).weight) for n in before)
    assert sp.project() == {"projected": 0, "projected_max": 0.0}  # idempotent


def test_the_catch_up_raises_the_push_on_the_final_targets_only_during_the_ramp():
    """Ramp-aware push: while SP_r > Target_r, a target outside the Target_r smallest scores keeps config.lam."""
    m, sm = toy()
    sp = fs.ops.sparsity.Sparsifier(sm, fs.ops.sparsity.SparsityConfig(
        target_r=0.3, epochs=9, lam=1e-3, ranking="global", update="proximal", catch_up=0.5))
    zero_grads(m)
    for _ in range(10):
        sp.step()  # counts the steps of epoch 0
    sp.set_epoch(1)  # SP_r = 1 - 0.7 / 3 > Target_r: ramp targets beyond the final 30%
    assert sp.sp_r > 0.3 and sp.lam > 1e-3  # the catch-up raised lam for the final targets
    final = sp.useless()
    push = torch.cat([mk[c].flatten() for mk, c in zip(sp._masks, [sp._chan[i] for i in sp._active])])
    order = torch.cat([torch.arange(off, off + c.numel()) for i, (off, c) in
                       enumerate(zip(sp.factors.offsets, sp._chan)) if i in sp._active])
    per_factor = torch.zeros(24).index_put_((order,), push, accumulate=False)
    ramp_only = sp.targets & ~final
    assert ramp_only.any() and final.any()
    assert torch.allclose(per_factor[final], torch.full((int(final.sum()),), sp.lam))
    assert torch.allclose(per_factor[ramp_only], torch.full((int(ramp_only.sum()),), 1e-3))
    assert torch.all(per_factor[~sp.targets] == 0)
    sp.set_epoch(5)  # past E_cut: every target is a final target, all get the raised lam
    assert sp.sp_r == 0.3 and int(sp.targets.sum()) == int(sp.useless().sum())


def test_early_switch():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=30, ranking="global")
    assert sp.zero_tol == pytest.approx(1e-2 * float(sm.factors.gammas().abs().median()))
    assert sp.set_epoch(1) == pytest.approx(0.93)
    saved = m.b1.weight.detach().clone()
    with torch.no_grad():
        m.b1.weight[:7] = 1e-5  # 7 = round(0.3 * 24) factors converged
    assert sp.set_epoch(2) == 0.3 and sp.switched and sp.switch_epoch == 2
    with torch.no_grad():
        m.b1.weight.copy_(saved)
    assert sp.set_epoch(3) == 0.3  # sticky


def test_step_adds_subgradient_to_targets_only():
    m, sm = toy()
    lam = 1e-2
    sp = sparsify(sm, target_r=0.3, epochs=30, lam=lam, ranking="global")
    sp.set_epoch(5)
    zero_grads(m)
    sp.step()
    got = torch.cat([b.weight.grad for b in (m.b1, m.b2, m.b3)])
    g = sm.factors.gammas()
    want = lam * torch.sign(g) * sp.targets.float()
    assert torch.allclose(got, want)  # b2's factors get lam once, not once per conv path
    assert torch.count_nonzero(m.c1.weight.grad) == 0 and torch.count_nonzero(m.b1.bias.grad) == 0


def test_step_skips_norm_channels_that_are_not_factors():
    m, _ = toy()
    sm = toy_map(m, drop=("c5",))  # b3 channels 4..7 scale no filter
    sp = sparsify(sm, target_r=0.3, epochs=3, lam=0.5, selective=False)
    assert sp.n == 20
    zero_grads(m)
    sp.step()
    assert torch.count_nonzero(m.b3.weight.grad[4:]) == 0
    assert torch.count_nonzero(m.b3.weight.grad[:4]) == 4


def test_step_before_backward_raises():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3)
    with pytest.raises(ValueError, match=r"^step: .*backward"):
        sp.step()


def test_state_dict_resume():
    m, sm = toy()
    sp = sparsify(sm, target_r=0.3, epochs=30, lam=1e-3)
    for e in range(4):
        sp.set_epoch(e)
    state = sp.state_dict()
    sp2 = sparsify(sm, target_r=0.5)
    sp2.load_state_dict(state)
    assert sp2.sp_r == sp.sp_r and sp2.epoch == 3 and sp2.config.lam == 1e-3 and sp2.total == 30
    assert torch.equal(sp2.targets, sp.targets)
    zero_grads(m)
    sp2.step()
    a = torch.cat([b.weight.grad.clone() for b in (m.b1, m.b2, m.b3)])
    zero_grads(m)
    sp.step()
    assert torch.equal(a, torch.cat([b.weight.grad for b in (m.b1, m.b2, m.b3)]))
    assert sp2.set_epoch(4) == pytest.approx(sp.scheduled_sp_r(4))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_bad_target_r(bad):
    m, sm = toy()
    with pytest.raises(ValueError, match=r"^target_r: .*\(0, 1\)"):
        sparsify(sm, target_r=bad)


def test_bad_inputs():
    m, sm = toy()
    with pytest.raises(ValueError, match=r"^lam: "):
        sparsify(sm, lam=-1.0)
    with pytest.raises(ValueError, match=r"^epochs: "):
        sparsify(sm, epochs=0)
    with pytest.raises(ValueError, match=r"^epochs: "):
        sparsify(sm, loader=[(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long))])
    empty = toy_map(m, drop=("c1", "c2", "c3", "c4", "c5"))
    with pytest.raises(ValueError, match=r"^model: .*no scaling factors"):
        sparsify(empty, target_r=0.3)
    with torch.no_grad():
        m.b2.weight[3] = float("nan")
    with pytest.raises(ValueError, match=r"^model: .*NaN/Inf"):
        sparsify(sm, target_r=0.3)


def test_keeps_dtype_mode_memory_format():
    m, sm = toy()
    m = m.double().to(memory_format=torch.channels_last).eval()
    sp = sparsify(sm, target_r=0.3, epochs=4, lam=1e-2)
    out = m(torch.randn(2, 1, 8, 8, dtype=torch.float64, device="cpu").to(memory_format=torch.channels_last))
    out.sum().backward()
    sp.step()
    assert not m.training and m.b1.weight.dtype == torch.float64 and m.b1.weight.grad.dtype == torch.float64
    assert m.c1.weight.is_contiguous(memory_format=torch.channels_last)


def test_loader_form_runs_sst_and_restores_mode():
    m, sm = toy()
    m.eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(4)]
    before = remaining_mean(sm, 0.3)
    sp = sparsify(sm, target_r=0.3, epochs=3, lam=0.05, loader=data)
    assert [h["epoch"] for h in sp.history] == [0, 1, 2]
    assert all(math.isfinite(h["loss"]) for h in sp.history)
    assert sp.history[0]["sp_r"] == 1.0 and sp.history[2]["sp_r"] < 1.0
    assert not m.training
    assert remaining_mean(sm, 0.3) != before


def test_public_api_with_tracer():
    pytest.importorskip("filtersurgery.tracing.tracer")
    m, _ = toy()
    sp = fs.sparsify(m, target_r=0.3)
    assert isinstance(sp, Sparsifier) and sp.n == 24 and sp.sp_r == 0.3
    assert len(fs.rank_filters(m)) == 24
