"""Kernel reactivation (docs/method.md §5): C1 ∩ C2 ∩ C3 selection, ratio-preserving rescale, no-ops, 1x1 skipped."""
import pytest
import torch
from torch import nn

from filtersurgery.ops.reactivation import KernelReactivation, reactivate_kernels

# kernel scales s[c, i]: every weight of kernel (c, i) is +-s, so mean|w[c]| = mean_i s and L1 = 9 s
A = [[0.01, 0.02, 0.03, 0.10],  # mean .04  C1, C2 -> invalid
     [0.02, 0.04, 0.05, 0.09],  # mean .05  C1, C2 -> invalid
     [0.05, 0.06, 0.07, 0.10],  # mean .07  C1 only (3rd in its layer)
     [0.20, 0.20, 0.20, 0.20]]  # mean .20
B = [[0.03, 0.06, 0.07, 0.08],  # mean .06  C1, C2 -> invalid
     [0.50, 0.50, 0.50, 0.50],  # mean .50  C2 only
     [0.60, 0.60, 0.60, 0.60],
     [0.70, 0.70, 0.70, 0.70]]


def hand_model():
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("a", nn.Conv2d(4, 4, 3, padding=1, bias=False))
    m.add_module("b", nn.Conv2d(4, 4, 3, padding=1, bias=False))
    m.add_module("p", nn.Conv2d(4, 4, 1, bias=False))  # 1x1: tiny weights, but never touched
    with torch.no_grad():
        for conv, s in ((m.a, A), (m.b, B)):
            sign = torch.randint(0, 2, conv.weight.shape).float() * 2 - 1
            conv.weight.copy_(sign * torch.tensor(s)[:, :, None, None])
        m.p.weight.fill_(1e-3)
    return m


def kernel_l1(w):
    return w.detach().abs().flatten(2).sum(2)


def test_selection_c1_c2_c3_and_ratio_preservation():
    m = hand_model()
    old_a, old_b, old_p = (x.weight.detach().clone() for x in (m.a, m.b, m.p))
    rep = reactivate_kernels(m, alpha=0.5, beta=0.5, gamma=0.5)
    # C1 (4 of 8 filters model-wide): a0 a1 a2 b0; C2 (2 per layer): a0 a1 | b0 b1; C3: 2 smallest kernels
    assert (rep.layers["a"].c1, rep.layers["a"].invalid_filters, rep.layers["a"].kernels) == (3, 2, 4)
    assert (rep.layers["b"].c1, rep.layers["b"].invalid_filters, rep.layers["b"].kernels) == (1, 1, 2)
    assert "p" not in rep.layers and rep.kernels == 6 and bool(rep)
    assert torch.equal(m.p.weight, old_p)
    expected = {("a", 0): [0, 1], ("a", 1): [0, 1], ("b", 0): [0, 1]}
    for name, old in (("a", old_a), ("b", old_b)):
        new = getattr(m, name).weight.detach()
        l1_old, l1_new = kernel_l1(old), kernel_l1(new)
        for c in range(4):
            chosen = expected.get((name, c), [])
            best = l1_old[c].max()
            for i in range(4):
                if i in chosen:  # proportional to the old kernel, with L1 = Best_L1
                    r = best / l1_old[c, i]
                    assert torch.allclose(new[c, i], old[c, i] * r)
                    assert float(l1_new[c, i]) == pytest.approx(float(best), rel=1e-6)
                else:
                    assert torch.equal(new[c, i], old[c, i])


def test_gamma_follows_lr_ratio_and_callback():
    m = hand_model()
    rep = reactivate_kernels(m, alpha=0.5, beta=0.5, gamma=0.5, lr_ratio=0.5)  # gamma_t = .25: 1 of 4 kernels
    assert rep.gamma_t == 0.25 and rep.kernels == 3
    m = hand_model()
    cb = KernelReactivation(m, alpha=0.5, beta=0.5, gamma=0.5, period=2)
    assert cb.on_epoch_end(0, lr=0.05, lr0=0.1) is None
    rep = cb.on_epoch_end(1, lr=0.05, lr0=0.1)
    assert rep.gamma_t == 0.25 and rep.kernels == 3 and cb.history == [rep]


@pytest.mark.parametrize("kw", [dict(alpha=0.0), dict(gamma=0.1), dict(gamma=0.5, lr_ratio=0.0)])
def test_noop_when_nothing_qualifies(kw):
    m = hand_model()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    args = dict(alpha=0.5, beta=0.5, gamma=0.5)
    args.update(kw)
    rep = reactivate_kernels(m, **args)  # gamma=0.1 of 4 kernels rounds to 0
    assert not rep and rep.kernels == 0
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_zero_kernel_is_left_alone():
    m = hand_model()
    with torch.no_grad():
        m.a.weight[0, 0] = 0
    rep = reactivate_kernels(m, alpha=0.5, beta=0.5, gamma=0.5)
    assert rep.layers["a"].skipped_zero == 1 and rep.layers["a"].kernels == 3
    assert torch.count_nonzero(m.a.weight[0, 0]) == 0


def test_keeps_dtype_memory_format_mode_and_works_on_any_cnn():
    torchvision = pytest.importorskip("torchvision")
    m = torchvision.models.resnet18(weights=None, num_classes=10).to(memory_format=torch.channels_last).eval()
    m = m.to(torch.bfloat16)
    rep = reactivate_kernels(m)  # defaults (0.2, 0.3, 0.1)
    assert rep.kernels > 0 and rep.invalid_filters > 0
    assert all(r.filters == m.get_submodule(n).out_channels for n, r in rep.layers.items())
    assert not any(n.endswith("downsample.0") for n in rep.layers)  # 1x1 convs are not candidates
    assert not m.training and m.conv1.weight.dtype == torch.bfloat16
    assert m.layer1[0].conv1.weight.is_contiguous(memory_format=torch.channels_last)


def test_bad_inputs():
    m = hand_model()
    with pytest.raises(ValueError, match=r"^alpha: .*\[0, 1\]"):
        reactivate_kernels(m, alpha=1.5)
    with pytest.raises(ValueError, match=r"^beta: "):
        reactivate_kernels(m, beta=-0.1)
    with pytest.raises(ValueError, match=r"^lr_ratio: "):
        reactivate_kernels(m, lr_ratio=-1)
    with pytest.raises(ValueError, match=r"^period: "):
        KernelReactivation(m, period=0)
    with pytest.raises(ValueError, match=r"^model: "):
        reactivate_kernels("resnet18")
