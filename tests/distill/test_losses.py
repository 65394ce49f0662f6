"""Distillation losses against hand computations (values and gradients).

Reference values are computed with numpy / closed-form gradients, not with the functions
under test.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.distill import losses as L

torch.manual_seed(0)


def _np(t):
    return t.detach().double().numpy()


def _softmax(z, T=1.0):
    z = z / T
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _kl(p, q):  # batchmean KL(P || Q)
    return float((p * (np.log(p) - np.log(q))).sum(1).mean())


def _softmax_backward(p, g):
    """d/dz of sum_i g_i * p_i(z) for p = softmax(z): p * (g - <p, g>)."""
    return p * (g - (p * g).sum(1, keepdims=True))


def _logits(n=3, k=5, scale=2.0, grad=True):
    return (torch.randn(n, k, dtype=torch.float64) * scale).requires_grad_(grad)


# ---------------------------------------------------------------------------------------
# attention transfer
# ---------------------------------------------------------------------------------------


def _att_np(x):
    x = _np(x)
    q = (x ** 2).mean(1).reshape(x.shape[0], -1)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def test_attention_map_by_hand():
    x = torch.tensor([[[[1.0, 2.0], [0.0, -1.0]], [[3.0, 0.0], [1.0, 1.0]]]])  # 1x2x2x2
    q = np.array([(1 + 9) / 2, (4 + 0) / 2, (0 + 1) / 2, (1 + 1) / 2])
    np.testing.assert_allclose(L.attention_map(x)[0].numpy(), q / np.linalg.norm(q), rtol=1e-6)
    # channel-free: any width gives an (N, H*W) unit-norm map
    a = L.attention_map(torch.randn(4, 7, 3, 5))
    assert a.shape == (4, 15)
    np.testing.assert_allclose(a.norm(dim=1).numpy(), 1.0, rtol=1e-6)
    with pytest.raises(ValueError, match="x"):
        L.attention_map(torch.randn(4, 7))


def test_at_loss_by_hand_and_gradients():
    ft = [torch.randn(2, 4, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 8, 2, 2, dtype=torch.float64, requires_grad=True)]
    fs = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True), torch.randn(2, 5, 2, 2, dtype=torch.float64, requires_grad=True)]
    want = np.mean([((_att_np(t) - _att_np(s)) ** 2).mean() for t, s in zip(ft, fs)])
    got = L.at_loss(ft, fs)
    assert got.item() == pytest.approx(want, rel=1e-10)
    got.backward()
    assert all(t.grad is None for t in ft)  # teacher detached
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in fs)
    # the student's analytic gradient matches finite differences
    t0 = [t.detach() for t in ft]
    assert torch.autograd.gradcheck(lambda a, b: L.at_loss(t0, [a, b]), [s.detach().requires_grad_() for s in fs])
    # dicts with the same names pair by name; identical features give 0
    d = {"b": fs[1], "a": fs[0]}
    assert L.at_loss({"a": ft[0], "b": ft[1]}, d).item() == pytest.approx(want, rel=1e-10)
    assert L.at_loss(fs, fs).item() == 0.0


def test_at_loss_resize_rule():
    t = torch.rand(2, 6, 4, 4, dtype=torch.float64)
    s = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    q = (_np(t) ** 2).mean(1)  # 2x4x4: pool the larger energy map over 2x2 cells
    pooled = q.reshape(2, 2, 2, 2, 2).mean(axis=(2, 4)).reshape(2, -1)
    a_t = pooled / np.linalg.norm(pooled, axis=1, keepdims=True)
    want = ((a_t - _att_np(s)) ** 2).mean()
    assert L.at_loss([t], [s]).item() == pytest.approx(want, rel=1e-10)
    assert L.at_loss([s], [t]).item() == pytest.approx(want, rel=1e-10)  # symmetric rule
    with pytest.raises(ValueError, match="resize=False"):
        L.at_loss([t], [s], resize=False)
    with pytest.raises(ValueError, match="feats_s"):
        L.at_loss([t, t], [s])
    with pytest.raises(ValueError, match="batch size"):
        L.at_loss([t], [s[:1]])


# ---------------------------------------------------------------------------------------
# KL / JS / consistency
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [1.0, 4.0])
def test_kl_div_by_hand(T):
    zt, zs = _logits(), _logits()
    pt, ps = _softmax(_np(zt), T), _softmax(_np(zs), T)
    got = L.kl_div(zt, zs, T)
    assert got.item() == pytest.approx(_kl(pt, ps) * T * T, rel=1e-10)
    got.backward()
    assert zt.grad is None  # teacher detached
    # d/dz_s [T^2 KL(P_T || softmax(z_s / T))] = T (P_S - P_T) / N
    np.testing.assert_allclose(zs.grad.numpy(), T * (ps - pt) / zs.shape[0], rtol=1e-8, atol=1e-12)
    with pytest.raises(ValueError, match="T"):
        L.kl_div(zt, zs, 0.0)
    with pytest.raises(ValueError, match="p_student_logits"):
        L.kl_div(zt, zs[:, :3])


def test_js_div_by_hand_gradient_only_into_first_argument():
    zp, zq = _logits(), _logits()
    p, q = _softmax(_np(zp)), _softmax(_np(zq))
    m = (p + q) / 2
    want = 0.5 * _kl(p, m) + 0.5 * _kl(q, m)
    got = L.js_div(zp, zq)
    assert got.item() == pytest.approx(want, rel=1e-10)
    assert L.js_div(zq, zp).item() == pytest.approx(want, rel=1e-10)  # symmetric value
    got.backward()
    assert zq.grad is None  # the peer is detached
    # dJS/dP_i = log(P_i / M_i) / 2 with Q fixed, chained through the softmax
    grad = _softmax_backward(p, 0.5 * np.log(p / m)) / zp.shape[0]
    np.testing.assert_allclose(zp.grad.numpy(), grad, rtol=1e-8, atol=1e-12)
    assert L.js_div(zp, zp).item() == pytest.approx(0.0, abs=1e-12)
    # temperature: T^2 * JS of the softened distributions
    ps, qs = _softmax(_np(zp), 3.0), _softmax(_np(zq), 3.0)
    ms = (ps + qs) / 2
    assert L.js_div(zp, zq, T=3.0).item() == pytest.approx(9 * (0.5 * _kl(ps, ms) + 0.5 * _kl(qs, ms)), rel=1e-10)


def test_consistency_loss_by_hand_both_views_get_gradients():
    zf, zc = _logits(), _logits()
    pf, pc = _softmax(_np(zf)), _softmax(_np(zc))
    got = L.consistency_loss(zf, zc)
    assert got.item() == pytest.approx(_kl(pf, pc), rel=1e-10)
    got.backward()
    n = zf.shape[0]
    np.testing.assert_allclose(zc.grad.numpy(), (pc - pf) / n, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(zf.grad.numpy(), _softmax_backward(pf, np.log(pf) - np.log(pc)) / n, rtol=1e-8, atol=1e-12)


# ---------------------------------------------------------------------------------------
# AOD (eqs. 6-8)
# ---------------------------------------------------------------------------------------


def test_aod_weights_detached():
    ce1 = torch.tensor(0.3, requires_grad=True)
    ce2 = torch.tensor(0.9, requires_grad=True)
    w1, w2 = L.aod_weights(ce1 * 1, ce2 * 1)
    assert (w1.item(), w2.item()) == (pytest.approx(0.25), pytest.approx(0.75))
    assert not w1.requires_grad and not w2.requires_grad
    w1, w2 = L.aod_weights(torch.tensor(0.0), torch.tensor(0.0))
    assert (w1.item(), w2.item()) == (0.5, 0.5)
    w1, w2 = L.aod_weights(1, 3)  # python numbers are fine
    assert (w1.item(), w2.item()) == (0.25, 0.75)


def test_aod_losses_by_hand_and_gradients():
    n, k = 4, 6
    z1f, z1c, z2f, z2c = (_logits(n, k) for _ in range(4))
    y = torch.tensor([0, 3, 5, 1])
    alpha = 0.5
    p1f, p1c, p2f, p2c = (_softmax(_np(z)) for z in (z1f, z1c, z2f, z2c))
    onehot = np.eye(k)[y.numpy()]
    ce1 = float(-np.log(p1f[np.arange(n), y.numpy()]).mean())
    ce2 = float(-np.log(p2f[np.arange(n), y.numpy()]).mean())
    w1, w2 = ce1 / (ce1 + ce2), ce2 / (ce1 + ce2)
    m = (p1f + p2f) / 2
    js = 0.5 * _kl(p1f, m) + 0.5 * _kl(p2f, m)
    want1 = w2 * ce1 + w1 * js + alpha * _kl(p1f, p1c)
    want2 = w1 * ce2 + w2 * js + alpha * _kl(p2f, p2c)

    l1, l2, parts = L.aod_losses(z1f, z1c, z2f, z2c, y, alpha=alpha)
    assert l1.item() == pytest.approx(want1, rel=1e-10)
    assert l2.item() == pytest.approx(want2, rel=1e-10)
    assert parts["w1"].item() == pytest.approx(w1) and parts["w2"].item() == pytest.approx(w2)
    assert parts["ce1"].item() == pytest.approx(ce1) and parts["kd2"].item() == pytest.approx(js)
    assert all(not v.requires_grad for v in parts.values())

    l1.backward()
    assert z2f.grad is None and z2c.grad is None  # L_1 never reaches student 2
    # gradient of L_1 wrt z_1F, weights constant: w2 dCE + w1 dJS + alpha dCR
    g = w2 * (p1f - onehot) / n
    g = g + w1 * _softmax_backward(p1f, 0.5 * np.log(p1f / m)) / n
    g = g + alpha * _softmax_backward(p1f, np.log(p1f) - np.log(p1c)) / n
    np.testing.assert_allclose(z1f.grad.numpy(), g, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(z1c.grad.numpy(), alpha * (p1c - p1f) / n, rtol=1e-8, atol=1e-12)
    z1f.grad = z1c.grad = None
    l2.backward()
    assert z1f.grad is None and z1c.grad is None  # L_2 never reaches student 1
    with pytest.raises(ValueError, match="alpha"):
        L.aod_losses(z1f, z1c, z2f, z2c, y, alpha=-1)


# ---------------------------------------------------------------------------------------
# MSL (eq. 9)
# ---------------------------------------------------------------------------------------


def test_msl_loss_by_hand():
    zt, zs = _logits(2, 4), _logits(2, 4)
    ft = [torch.randn(2, 8, 4, 4, dtype=torch.float64, requires_grad=True)]
    fs = [torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)]
    at = ((_att_np(ft[0]) - _att_np(fs[0])) ** 2).mean()
    kl = _kl(_softmax(_np(zt)), _softmax(_np(zs)))
    got = L.msl_loss(zt, zs, ft, fs)
    assert got.item() == pytest.approx(kl + 1e3 * at, rel=1e-10)
    got.backward()
    assert zt.grad is None and ft[0].grad is None and fs[0].grad is not None
    assert L.msl_loss(zt, zs, ft, fs, at_weight=0).item() == pytest.approx(kl, rel=1e-10)
    with pytest.raises(ValueError, match="at_weight"):
        L.msl_loss(zt, zs, ft, fs, at_weight=-1.0)


# ---------------------------------------------------------------------------------------
# baselines: DML, LwM
# ---------------------------------------------------------------------------------------


def test_dml_loss_by_hand():
    zi, zj = _logits(), _logits()
    y = torch.tensor([1, 0, 4])
    pi, pj = _softmax(_np(zi)), _softmax(_np(zj))
    n = 3
    ce = float(-np.log(pi[np.arange(n), y.numpy()]).mean())
    got = L.dml_loss(zi, zj, y)
    assert got.item() == pytest.approx(ce + _kl(pj, pi), rel=1e-10)
    got.backward()
    assert zj.grad is None
    np.testing.assert_allclose(zi.grad.numpy(), ((pi - np.eye(5)[y.numpy()]) + (pi - pj)) / n, rtol=1e-8, atol=1e-12)


class _Net(nn.Module):
    """conv -> feature map A -> global average pool -> linear: Grad-CAM has a closed form."""

    def __init__(self, width=4, classes=3):
        super().__init__()
        self.conv = nn.Conv2d(2, width, 3, padding=1)
        self.fc = nn.Linear(width, classes)

    def forward(self, x):
        a = torch.relu(self.conv(x))
        return self.fc(a.mean((2, 3))), a


def _cam_np(a, w, c):
    """Grad-CAM for logits = W @ mean_hw(A) + b: d logit_c / dA_k = W[c, k] / HW."""
    a = _np(a)
    hw = a.shape[2] * a.shape[3]
    out = []
    for n in range(a.shape[0]):
        wk = _np(w)[c[n]] / hw
        m = np.maximum((wk[:, None, None] * a[n]).sum(0), 0).reshape(-1)
        out.append(m / max(np.linalg.norm(m), 1e-12))
    return np.stack(out)


def test_gradcam_map_by_hand():
    torch.manual_seed(1)
    net = _Net().double()
    logits, a = net(torch.randn(3, 2, 5, 5, dtype=torch.float64))
    c = torch.tensor([0, 2, 1])
    m = L.gradcam_map(a, logits, c, create_graph=False)
    np.testing.assert_allclose(m.numpy(), _cam_np(a, net.fc.weight, c.numpy()), rtol=1e-8, atol=1e-12)
    assert not m.requires_grad
    assert L.gradcam_map(a, logits, c, create_graph=True).requires_grad
    with pytest.raises(ValueError, match="features"):
        L.gradcam_map(a.detach(), logits, c)
    with pytest.raises(ValueError, match="class_idx"):
        L.gradcam_map(a, logits, c[:2])


def test_lwm_loss_by_hand_and_attention_gradient_nonzero():
    torch.manual_seed(2)
    teacher, student = _Net(width=6).double(), _Net(width=4).double()
    for p in teacher.parameters():
        p.requires_grad_(False)  # frozen teacher
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 0])
    zt, at = teacher(x.clone().requires_grad_())  # input with grad: Grad-CAM of a frozen model
    zs, as_ = student(x)
    top = _np(zt).argmax(1)
    pt, ps = _softmax(_np(zt)), _softmax(_np(zs))
    ce = float(-np.log(ps[np.arange(4), y.numpy()]).mean())
    l_ad = float(np.abs(_cam_np(at, teacher.fc.weight, top) - _cam_np(as_, student.fc.weight, top)).sum(1).mean())
    assert l_ad > 0
    got = L.lwm_loss(zs, zt, y, as_, at, beta=1.0, gamma=1.0)
    assert got.item() == pytest.approx(ce + _kl(pt, ps) + l_ad, rel=1e-8)
    got.backward()
    assert all(p.grad is None for p in teacher.parameters())

    # L_AD alone reaches the student's parameters (incl. the classifier, only through the
    # create_graph Grad-CAM weights): zero would mean the map was detached
    student.zero_grad()
    zt, at = teacher(x.clone().requires_grad_())
    zs, as_ = student(x)
    ad = L.lwm_loss(zs, zt, y, as_, at, beta=0.0, gamma=1.0) - F.cross_entropy(zs, y)
    ad.backward()
    assert student.fc.weight.grad.abs().sum() > 0
    assert student.conv.weight.grad.abs().sum() > 0
    # spatial sizes may differ: pooled like AT
    zs2, as2 = student(F.avg_pool2d(x, 2, ceil_mode=True))
    assert math.isfinite(L.lwm_loss(zs2, zt, y, as2, at).item())
