"""Frozen batch norms (torchvision FrozenBatchNorm2d, timm FrozenBatchNormAct2d): mapped, marked frozen,
read-only / in-place operations work, gradient operations refuse; unfreeze_norms / freeze_norms."""

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.ops import FrozenBatchNorm2d

import filtersurgery as fs
from filtersurgery.tracing.norm_kinds import norm_kind
from filtersurgery.tracing.norms import freeze_norms, unfreeze_norms
from filtersurgery.tracing.scaling_map import check_trainable
from conftest import ROOT


def train_a_bit(model, steps=3, size=32, classes=10, seed=0):
    """A few SGD steps on random data: gammas, betas and running statistics move away from init."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(8, 3, size, size), torch.randint(0, classes, (8,))
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def bn_state(model):
    """``{name: tensor}`` of every norm's weight, bias and running statistics."""
    keys = ("weight", "bias", "running_mean", "running_var")
    return {f"{n}.{k}": getattr(m, k).detach().clone() for n, m in model.named_modules()
            if norm_kind(m) in ("bn", "frozen") for k in keys}


def trained_resnet18(seed=0):
    torch.manual_seed(seed)
    m = torchvision.models.resnet18(weights=None, num_classes=10)
    return train_a_bit(m)


def test_frozen_resnet50_is_mapped_and_marked_frozen():
    m = torchvision.models.resnet50(weights=None, norm_layer=FrozenBatchNorm2d)
    sm = fs.trace(m)
    assert len(sm) == 53 and len(sm.mapped) == 53 and sm.coverage == 1.0 and not sm.unscaled
    fv = sm.factors
    assert fv.numel == 26560 and fv.n_frozen == 26560 and all(fv.frozen)
    assert fv.frozen_mask().all() and fv.frozen_mask().numel() == fv.numel
    assert len(sm.frozen_norms) == 53 and sm.frozen_norms[0] == "bn1"
    js = sm.to_json()
    assert js[0]["scaled_by"] == [{"norm": "bn1", "offset": 0, "frozen": True}]
    # the same architecture with trainable norms gives the same map, without the marks
    ref = fs.trace(torchvision.models.resnet50(weights=None))
    assert [e.scaled_by for e in ref] == [e.scaled_by for e in sm]
    assert ref.factors.n_frozen == 0 and ref.frozen_norms == [] and "frozen" not in str(ref.to_json())


def test_gradient_operations_refuse_with_count_and_fix():
    m = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    sm = fs.trace(m)
    for call in (lambda: fs.sparsify(m), lambda: fs.sparsify(sm, target_r=0.5, epochs=3),
                 lambda: fs.ops.sparsity.Sparsifier(sm, fs.ops.sparsity.SparsityConfig())):
        with pytest.raises(ValueError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith("model: 4800 of 4800 scaling factors are frozen")
        assert "FrozenBatchNorm2d" in msg and "sparsify" in msg and "filtersurgery.unfreeze_norms(model)" in msg
    with pytest.raises(ValueError, match=r"^model: 4800 of 4800 .* and the trainer needs"):
        check_trainable(sm, "the trainer")
    check_trainable(fs.trace(torchvision.models.resnet18(weights=None)))  # nothing frozen: no error
    with pytest.raises(ValueError, match=r"^scaling_map: expected a ScalingMap \(filtersurgery.trace\(model\)\), got ResNet$"):
        check_trainable(m)


def test_partly_frozen_model_refuses_with_the_frozen_count():
    m = trained_resnet18()
    m.layer4 = freeze_norms(m.layer4)
    sm = fs.trace(m)
    n4 = sum(mod.weight.numel() for mod in m.layer4.modules() if isinstance(mod, FrozenBatchNorm2d))
    assert sm.factors.n_frozen == n4 == 2560 and sm.factors.numel == 4800
    assert all(n.startswith("layer4.") for n in sm.frozen_norms)
    mask = sm.factors.frozen_mask()
    assert [sm.factors.locate(k)[0].startswith("layer4.") for k in range(sm.factors.numel)] == mask.tolist()
    with pytest.raises(ValueError, match=r"^model: 2560 of 4800 scaling factors are frozen \(5 FrozenBatchNorm2d norms, first: layer4.0.bn1\)"):
        fs.sparsify(sm)


def test_read_only_and_in_place_operations_work_on_frozen_factors():
    trained = trained_resnet18()
    frozen = freeze_norms(trained_resnet18())  # same seed: the same trained values, frozen
    sm_t, sm_f = fs.trace(trained), fs.trace(frozen)
    assert sm_f.factors.n_frozen == sm_f.factors.numel == 4800
    assert torch.equal(sm_t.factors.gammas(), sm_f.factors.gammas())
    # ranking
    rk_t, rk_f = fs.rank_filters(sm_t), fs.rank_filters(sm_f)
    assert torch.equal(rk_t.order, rk_f.order) and torch.equal(rk_t.abs_gamma, rk_f.abs_gamma)
    assert torch.equal(fs.ops.ranking.useless_mask(sm_f, 0.3), fs.ops.ranking.useless_mask(sm_t, 0.3))
    assert fs.ops.ranking.remaining_mean(sm_f) == pytest.approx(fs.ops.ranking.remaining_mean(sm_t))
    fs.ops.checks.check_finite(frozen)
    # verify (read-only)
    v = fs.verify(sm_f, (3, 32, 32), filters_per_conv=2)
    assert v.ok and v.filters == 40
    # rescale writes the frozen buffers in place, exactly as it writes trainable gammas
    before = sm_f.factors.gammas()
    rep_t = fs.rescale(sm_t, 0.3, 0.1, generator=torch.Generator().manual_seed(1))
    rep_f = fs.rescale(sm_f, 0.3, 0.1, generator=torch.Generator().manual_seed(1))
    assert len(rep_f) == 1440 and rep_f.locations == rep_t.locations and torch.equal(rep_f.new, rep_t.new)
    after = sm_f.factors.gammas()
    assert torch.equal(after, sm_t.factors.gammas())
    changed = torch.nonzero(after != before).flatten()
    assert set(changed.tolist()) <= set(rep_f.factors.tolist()) and changed.numel() > 1000
    assert all(isinstance(frozen.get_submodule(n), FrozenBatchNorm2d) for n, _ in rep_f.locations[:5])
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert_same_affine_map(frozen.double()(x), trained.double()(x))


def assert_same_affine_map(y, y_ref):
    """``y`` equals ``y_ref`` up to float64 rounding.

    A frozen norm computes ``x * scale + shift`` with ``scale = w / sqrt(var + eps)`` folded
    in advance, a BatchNorm ``(x - mean) / sqrt(var + eps) * w + b``: the same affine map in
    another order of operations. In float32 the two differ by rounding that compounds over
    the network's ~20 norms and depends on the CPU's kernels (5e-5 on one machine, 1e-4 on
    another); in float64 that rounding is ~1e-13 relative, so a tolerance of 1e-9 relative to
    the output's scale holds on any machine and still catches any real difference (a wrong
    eps, a missing running mean: 1e-3 or more).
    """
    assert y.dtype == y_ref.dtype == torch.float64
    scale = float(y_ref.abs().max())
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-9 * max(scale, 1.0))


@pytest.mark.parametrize("kind", ["torchvision", "timm_act"])
def test_freeze_unfreeze_preserve_eval_outputs_of_a_trained_model(kind):
    if kind == "torchvision":
        model = trained_resnet18()
        frozen_cls, trainable_cls = FrozenBatchNorm2d, nn.BatchNorm2d
    else:  # timm's BatchNormAct2d <-> FrozenBatchNormAct2d
        from timm.layers import BatchNormAct2d, FrozenBatchNormAct2d

        model = train_a_bit(timm.create_model("efficientnet_b0", pretrained=False, num_classes=10))
        frozen_cls, trainable_cls = FrozenBatchNormAct2d, BatchNormAct2d
    model = model.double()  # float64: the comparison below is exact up to its own rounding, on any CPU
    state = bn_state(model)
    n_norms = sum(isinstance(m, trainable_cls) for m in model.modules())
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y0 = model(x)
    assert freeze_norms(model) is model
    assert sum(isinstance(m, frozen_cls) for m in model.modules()) == n_norms
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not model.training  # modes kept
    with torch.no_grad():
        y1 = model(x)
    assert_same_affine_map(y1, y0)
    assert {k: torch.equal(v, bn_state(model)[k]) for k, v in state.items()} == dict.fromkeys(state, True)
    # gammas are buffers now: nothing trainable in the norms
    assert all(not isinstance(getattr(m, "weight", None), nn.Parameter) for m in model.modules() if isinstance(m, frozen_cls))
    assert unfreeze_norms(model) is model
    norms = [m for m in model.modules() if isinstance(m, trainable_cls)]
    assert len(norms) == n_norms and all(m.weight.requires_grad and not m.training for m in norms)
    assert all(m.momentum == 0.1 for m in norms)
    with torch.no_grad():
        y2 = model(x)
    assert torch.equal(y2, y0)  # the same module types with bit-identical state: bit-identical outputs
    assert all(torch.equal(v, bn_state(model)[k]) for k, v in state.items())


def test_unfreeze_torchvision_native_frozen_model_and_train_its_gammas():
    """torchvision's own FrozenBatchNorm2d (no num_features/affine attributes), as a detector builds it."""
    torch.manual_seed(0)
    ref = trained_resnet18()
    m = torchvision.models.resnet18(weights=None, num_classes=10, norm_layer=FrozenBatchNorm2d)
    state = {k: v for k, v in ref.state_dict().items() if not k.endswith("num_batches_tracked")}
    m.load_state_dict(state)
    m.eval().double()  # float64: see assert_same_affine_map
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        y0 = m(x)
    sm = fs.trace(m)
    assert sm.factors.n_frozen == 4800
    unfreeze_norms(m)
    assert type(m.bn1) is nn.BatchNorm2d and m.bn1.num_features == 64 and m.bn1.eps == 1e-5
    assert m.bn1.weight.dtype == torch.float64
    with torch.no_grad():
        assert_same_affine_map(m(x), y0)
    # the map traced before follows the new modules
    assert sm.factors.n_frozen == 0 and sm.frozen_norms == [] and sm.factors.params[0] is m.bn1.weight
    sp = fs.sparsify(sm, target_r=0.3, epochs=3, lam=1e-2)
    g0 = sm.factors.gammas()
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
    m.train()
    for _ in range(2):
        loss = F.cross_entropy(m(torch.randn(4, 3, 32, 32, dtype=torch.float64)), torch.randint(0, 10, (4,)))
        opt.zero_grad()
        loss.backward()
        sp.step()
        opt.step()
    assert not torch.equal(sm.factors.gammas(), g0)  # the gammas train now
    freeze_norms(m)
    assert sm.factors.n_frozen == 4800 and isinstance(m.bn1, FrozenBatchNorm2d)


def test_conversion_keeps_device_dtype_sharing_and_momentum():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4, momentum=0.01, eps=1e-3)
            self.seq = nn.Sequential(self.bn)  # the same norm registered twice

        def forward(self, x):
            return self.seq(self.b(torch.relu(self.bn(self.a(x)))))

    m = Shared().double().train()
    freeze_norms(m)
    assert isinstance(m.bn, FrozenBatchNorm2d) and m.seq[0] is m.bn and m.bn.eps == 1e-3
    assert m.bn.weight.dtype == torch.float64 and m.bn.training
    unfreeze_norms(m)
    assert type(m.bn) is nn.BatchNorm2d and m.seq[0] is m.bn and m.bn.momentum == 0.01 and m.bn.eps == 1e-3
    assert m.bn.weight.dtype == torch.float64 and m.bn.num_batches_tracked.dtype == torch.long and m.bn.training
    assert len(list(m.parameters())) == 6  # 2 convs (w, b) + one shared norm (w, b)


def test_degenerate_inputs_warn_or_raise():
    with pytest.warns(UserWarning, match="unfreeze_norms: ResNet has no frozen batch norm; nothing to unfreeze"):
        unfreeze_norms(torchvision.models.resnet18(weights=None))
    with pytest.warns(UserWarning, match="freeze_norms: SqueezeNet has no BatchNorm2d; nothing to freeze"):
        freeze_norms(torchvision.models.squeezenet1_1(weights=None))

    class FrozenBatchNorm2dOther(nn.Module):  # another library's frozen BN: left alone, said so
        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.ones(3))

        def forward(self, x):
            return x * self.weight.view(1, -1, 1, 1)

    m = nn.Sequential(nn.Conv2d(3, 3, 1), FrozenBatchNorm2dOther())
    with pytest.warns(UserWarning, match=r"left 1 norm\(s\) as they are .*FrozenBatchNorm2dOther.*first: 1"):
        unfreeze_norms(m)
    no_stats = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False))
    with pytest.warns(UserWarning, match="track_running_stats=False"):
        freeze_norms(no_stats)
    assert type(no_stats[1]) is nn.BatchNorm2d
    with pytest.raises(ValueError, match="^model: expected an nn.Module, got str$"):
        unfreeze_norms("resnet18")
    with pytest.raises(ValueError, match="^model: expected an nn.Module"):
        freeze_norms(None)
    # a norm as the whole model: the converted norm is returned
    bn = nn.BatchNorm2d(5).eval()
    fb = freeze_norms(bn)
    assert isinstance(fb, FrozenBatchNorm2d) and type(unfreeze_norms(fb)) is nn.BatchNorm2d


def test_inspect_table_and_json_mark_frozen_refs():
    from filtersurgery.cli.zoo import _inspect_json, _table

    m = torchvision.models.resnet18(weights=None, norm_layer=FrozenBatchNorm2d)
    sm = fs.trace(m)
    table = _table(sm)
    assert "bn1@0 (frozen)" in table and "layer4.1.bn2@0 (frozen)" in table
    js = _inspect_json(sm, "torchvision", "resnet18")
    assert all(r.get("frozen") is True for c in js["convs"] for r in c["scaled_by"])


def test_detection_doc_example_runs():
    """The code block of docs/detection.md, as written (unfreeze, sparsify, rescale, freeze again)."""
    import re

    text = (ROOT / "docs" / "detection.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    scope = {}
    exec(compile(blocks[0], "docs/detection.md", "exec"), scope)  # its own asserts check the numbers
    det, sm = scope["det"], scope["sm"]
    assert isinstance(det.backbone.body.bn1, FrozenBatchNorm2d) and sm.factors.n_frozen == 26560
    assert scope["sp"].history[-1]["epoch"] == 1
    with pytest.raises(ValueError) as e:  # the refusal quoted by the page is the real one
        fs.sparsify(sm)
    assert f"\n{e.value}\n" in text
