"""Diverse re-initialization (docs/method.md §2, eq. 4) and the global ranking it uses."""
import pytest
import torch
from torch import nn

from filtersurgery.ops.ranking import rank_filters
from filtersurgery.ops.reinit import allowed_range, rescale
from filtersurgery.tracing.scaling_map import ConvEntry, NormRef, ScalingMap


def net(n_norms=4, width=25, seed=0):
    """Conv -> BN chain with 100 factors of distinct |gamma| (after an 'SST': 30 near 0)."""
    torch.manual_seed(seed)
    layers, convs, kinds = nn.ModuleDict(), {}, {}
    cin = 3
    for i in range(n_norms):
        layers[f"c{i}"] = nn.Conv2d(cin, width, 3, padding=1, bias=False)
        layers[f"b{i}"] = nn.BatchNorm2d(width)
        convs[f"c{i}"] = ConvEntry(f"c{i}", width, 1, [NormRef(f"b{i}", 0)])
        kinds[f"b{i}"] = "bn"
        cin = width
    n = n_norms * width
    vals = torch.cat([torch.linspace(1e-4, 3e-3, 30), torch.linspace(0.2, 2.0, n - 30)])[torch.randperm(n)]
    vals[1::3] *= -1  # negative gammas: ranking is by |gamma|
    with torch.no_grad():
        for i in range(n_norms):
            layers[f"b{i}"].weight.copy_(vals[i * width : (i + 1) * width])
            layers[f"b{i}"].bias.uniform_(-1, 1)
    return layers, ScalingMap(layers, convs, kinds)


def test_rank_filters_is_global_ascending_abs():
    m, sm = net()
    rk = rank_filters(sm, ranking="global")
    g = sm.factors.gammas().abs()
    assert len(rk) == 100
    assert torch.equal(rk.abs_gamma, g[rk.order])
    assert bool((rk.abs_gamma[1:] >= rk.abs_gamma[:-1]).all())
    norm, ch = rk.location(0)
    assert float(m[norm].weight[ch].detach().abs()) == pytest.approx(float(rk.abs_gamma[0]))
    assert rk.filters(0) == [(norm.replace("b", "c"), ch)]


@pytest.mark.parametrize("I", [0.1, 0.2])
def test_dri_values_within_allowed_rank_range(I):
    m, sm = net()
    g0 = sm.factors.gammas().clone()
    betas0 = torch.cat([m[f"b{i}"].bias.detach().clone() for i in range(4)])
    srt = g0.abs().sort().values
    rep = rescale(sm, target_r=0.3, I=I, generator=torch.Generator().manual_seed(1), ranking="global")
    # eq. (4): rank quantile (j + 1/2)/n in (0.3 + I, 1 - I)
    pool = srt[[j for j in range(100) if 0.3 + I < (j + 0.5) / 100 < 1 - I]]
    assert rep.pool_size == pool.numel() and rep.range == (float(pool[0]), float(pool[-1]))
    assert len(rep) == 30
    assert set(rep.factors.tolist()) == set(g0.abs().argsort()[:30].tolist())  # the useless ones
    assert bool((rep.new > 0).all())
    assert all(bool((pool == v).any()) for v in rep.new)  # every new value is one of R's gammas
    g1 = sm.factors.gammas()
    assert torch.equal(g1[rep.factors], rep.new)
    assert torch.equal(rep.old, g0[rep.factors])
    others = torch.ones(100, dtype=torch.bool)
    others[rep.factors] = False
    assert torch.equal(g1[others], g0[others])  # nothing else changed
    assert torch.equal(torch.cat([m[f"b{i}"].bias.detach() for i in range(4)]), betas0)  # betas kept
    for (norm, ch), v in zip(rep.locations, rep.new):
        assert float(m[norm].weight.detach()[ch]) == float(v)


def test_dri_reproducible_and_diverse():
    _, sm1 = net()
    _, sm2 = net()
    _, sm3 = net()
    a = rescale(sm1, 0.3, 0.1, generator=torch.Generator().manual_seed(7))
    b = rescale(sm2, 0.3, 0.1, generator=torch.Generator().manual_seed(7))
    c = rescale(sm3, 0.3, 0.1, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a.new, b.new)
    assert not torch.equal(a.new, c.new)


def test_dri_reset_bias_and_dtype_device_mode():
    m, sm = net()
    m.double().eval()
    rep = rescale(sm, 0.3, 0.2, reset_bias=True)
    assert not m.training and m["b0"].weight.dtype == torch.float64
    for norm, ch in rep.locations:
        assert float(m[norm].bias.detach()[ch]) == 0.0


def test_allowed_range_edges():
    assert allowed_range(10, 0.3, 0.1).tolist() == [4, 5, 6, 7, 8]  # q = .45 .. .85
    assert allowed_range(10, 0.3, 0.0).tolist() == [3, 4, 5, 6, 7, 8, 9]


def test_dri_bad_inputs():
    m, sm = net()
    with pytest.raises(ValueError, match=r"^I: .*target_r \+ I < 1 - I"):
        rescale(sm, target_r=0.3, I=0.35)
    with pytest.raises(ValueError, match=r"^I: "):
        rescale(sm, target_r=0.3, I=-0.1)
    with pytest.raises(ValueError, match=r"^target_r: "):
        rescale(sm, target_r=1.0)
    empty = ScalingMap(m, {"c0": ConvEntry("c0", 25, 1, [], "test")}, {})
    with pytest.raises(ValueError, match=r"^model: .*no scaling factors"):
        rescale(empty)
    with torch.no_grad():
        m["b1"].weight[0] = float("inf")
    with pytest.raises(ValueError, match=r"^model: .*NaN/Inf"):
        rescale(sm)
