"""Backbones with dict / list outputs: torchvision detection (FPN) and segmentation backbones, timm
``features_only`` models. ``trace``, ``blocks`` and ``sparsify`` work on them (regression tests)."""
import pytest
import timm
import torch
import torchvision
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

import filtersurgery as fs


def _outputs(out):
    """The feature maps of a dict / list / tensor output."""
    if isinstance(out, dict):
        return list(out.values())
    return list(out) if isinstance(out, (list, tuple)) else [out]


def sst_steps(model, sm, x, steps=2):
    """A few SGD steps with SST on a loss over every output map; returns the Sparsifier."""
    sp = fs.sparsify(sm, target_r=0.3, epochs=steps, lam=1e-2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    for epoch in range(steps):
        sp.set_epoch(epoch)
        loss = sum(f.pow(2).mean() for f in _outputs(model(x)))
        opt.zero_grad()
        loss.backward()
        sp.step()
        opt.step()
    return sp


def test_detection_fpn_backbone_frozen_then_unfrozen():
    torch.manual_seed(0)
    bb = resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)  # FrozenBatchNorm2d
    x = torch.randn(2, 3, 64, 64)
    sm = fs.trace(bb)
    assert (len(sm), len(sm.mapped), sm.coverage) == (28, 20, 1.0)
    assert sorted(sm.unscaled) == [f"fpn.{k}_blocks.{i}.0" for k in ("inner", "layer") for i in range(4)]
    assert all(r.startswith("classifier conv") for r in sm.unscaled.values())  # FPN convs: no norm, a reason
    assert sm.factors.n_frozen == sm.factors.numel == 4800
    assert fs.distill.blocks(bb) == ["body.layer1", "body.layer2", "body.layer3", "body.layer4"]
    with pytest.raises(ValueError, match="4800 of 4800 scaling factors are frozen"):
        fs.sparsify(sm)
    fs.unfreeze_norms(bb)
    g0 = sm.factors.gammas()
    sp = sst_steps(bb, sm, x)
    assert sp.n == 4800 and not torch.equal(sm.factors.gammas(), g0)
    assert fs.distill.blocks(bb.eval(), x) == ["body.layer1", "body.layer2", "body.layer3", "body.layer4"]
    rep = fs.rescale(sm, 0.3, 0.1)
    assert len(rep) == 1440
    fs.freeze_norms(bb)
    assert fs.trace(bb).to_json() == sm.to_json()  # frozen again: the same map, marked frozen


def test_segmentation_backbone_dict_output():
    torch.manual_seed(0)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3)
    bb = seg.backbone  # IntermediateLayerGetter: {"low": ..., "high": ...}
    x = torch.randn(2, 3, 64, 64)
    sm = fs.trace(bb)
    assert sm.coverage == 1.0 and len(sm.mapped) == 46 and sm.factors.n_frozen == 0
    assert set(sm.unscaled.values()) == {"SE gate: no norm downstream"}
    assert fs.distill.blocks(bb) == ["1", "3", "6", "15"]
    # the whole segmentation model: the head runs after the trunk and is not a block
    assert fs.distill.blocks(seg) == ["backbone.1", "backbone.3", "backbone.6", "backbone.15"]
    g0 = sm.factors.gammas()
    sst_steps(bb, sm, x)
    assert not torch.equal(sm.factors.gammas(), g0)


@pytest.mark.parametrize("name,expected", [
    ("resnet18", ["layer1", "layer2", "layer3", "layer4"]),
    ("efficientnet_b0", ["blocks.1", "blocks.2", "blocks.4", "blocks.6"]),
])
def test_timm_features_only_list_output(name, expected):
    torch.manual_seed(0)
    kw = {"out_indices": (1, 2, 3, 4)} if name == "efficientnet_b0" else {}
    m = timm.create_model(name, features_only=True, pretrained=False, **kw)
    x = torch.randn(2, 3, 64, 64)
    sm = fs.trace(m)
    assert sm.coverage == 1.0 and len(sm.mapped) > 0
    assert fs.distill.blocks(m) == expected
    g0 = sm.factors.gammas()
    sst_steps(m, sm, x)
    assert not torch.equal(sm.factors.gammas(), g0)
    # frozen with timm's converter (FrozenBatchNormAct2d for efficientnet): mapped, marked, refused
    fs.freeze_norms(m)
    fsm = fs.trace(m)
    assert [e.scaled_by for e in fsm] == [e.scaled_by for e in sm] and fsm.factors.n_frozen == fsm.factors.numel
    with pytest.raises(ValueError, match=r"scaling factors are frozen \(\d+ (FrozenBatchNorm2d|FrozenBatchNormAct2d)"):
        fs.sparsify(fsm)
    assert fs.distill.blocks(m) == expected
