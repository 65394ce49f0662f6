"""blocks() / capture_blocks() on the tracer issue's model list, plus hook hygiene."""
import gc
import weakref

import pytest
import timm
import torch
import torchvision
from torch import nn

from filtersurgery import losses as L
from filtersurgery.blockfeats import blocks, capture_blocks

TIMM = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenetv2_100",
    "mobilenetv3_large_100", "efficientnet_b0", "regnety_008", "densenet121", "ghostnet_100",
    "convnext_nano", "resnetv2_50", "inception_v3", "vgg11_bn",
]
TV = [
    "resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x1_0",
    "googlenet", "convnext_tiny", "regnet_y_400mf",
]
EXPECTED = {  # pins the rules of blocks() on a few families
    "timm:resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "timm:vgg11_bn": ["features.6", "features.13", "features.20", "features.27"],
    "timm:regnety_008": ["s1", "s2", "s3", "s4"],
    "tv:resnet18": ["layer1", "layer2", "layer3", "layer4"],
    "tv:shufflenet_v2_x1_0": ["stage2", "stage3", "stage4"],
    "tv:regnet_y_400mf": [f"trunk_output.block{i}" for i in range(1, 5)],
    "tv:densenet121": [f"features.denseblock{i}" for i in range(1, 5)],
    "tv:convnext_tiny": ["features.1", "features.3", "features.5", "features.7"],
    "tv:efficientnet_b0": ["features.1", "features.2", "features.3", "features.5", "features.7"],
    "tv:googlenet": ["conv3", "inception3b", "inception4e", "inception5b"],
}


def _build(spec):
    src, name = spec.split(":")
    if src == "timm":
        return timm.create_model(name, pretrained=False, num_classes=10)
    kw = {"init_weights": True} if name == "googlenet" else {}
    return getattr(torchvision.models, name)(weights=None, num_classes=10, **kw)


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("spec", [f"timm:{n}" for n in TIMM] + [f"tv:{n}" for n in TV])
def test_blocks_capture_and_attention_alignment(spec):
    torch.manual_seed(0)
    teacher = _build(spec).eval()
    student = _build(spec).eval()  # same architecture, other random weights
    size = 128 if spec == "timm:inception_v3" else 64
    x = torch.randn(2, 3, size, size)

    hooks = _n_hooks(teacher)
    names = blocks(teacher)
    assert _n_hooks(teacher) == hooks and not teacher.training  # probe leaves no trace
    assert len(names) >= 3 and len(set(names)) == len(names)
    assert set(names) <= dict(teacher.named_modules()).keys()
    if spec in EXPECTED:
        assert names == EXPECTED[spec]
    assert blocks(student) == names

    with torch.no_grad(), capture_blocks(teacher, names) as ft:
        teacher(x)
        ft = dict(ft)  # keep a copy beyond the with block (capture clears its own dict)
    with capture_blocks(student, names) as fs:
        student(x)
        assert list(fs) == names  # filled in forward order
        sizes = [f.shape[-1] for f in fs.values()]
        assert all(f.dim() == 4 and f.shape[0] == 2 for f in fs.values())
        assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)  # one block per resolution
        for n in names:  # aligned block by block: same attention-map size, unit norm
            a_t, a_s = L.attention_map(ft[n]), L.attention_map(fs[n])
            assert a_t.shape == a_s.shape
        loss = L.at_loss(ft, fs, resize=False)
        assert torch.isfinite(loss) and loss.item() > 0
        loss.backward()  # student features keep their graph
    assert len(fs) == 0 and _n_hooks(student) == hooks
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    # identical weights: the attention maps coincide on every block
    student.load_state_dict(teacher.state_dict())
    with torch.no_grad(), capture_blocks(student, names) as f2:
        student(x)
        assert L.at_loss(ft, f2).item() == pytest.approx(0.0, abs=1e-10)
