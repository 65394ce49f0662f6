"""blocks() / capture_blocks() on the tracer issue's model list, plus hook hygiene."""

import pytest
import timm
import torch
import torchvision
from torch import nn

from filtersurgery.distill import losses as L
from filtersurgery.distill.blockfeats import blocks, capture_blocks

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


# ------------------------------------------------------- stages where timm/torchvision do not put them
class Unit(nn.Module):
    """A residual unit with two convs (stride on the first)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.n2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, stride, bias=False) if (cin, stride) != (cout, 1) else nn.Identity()

    def forward(self, x):
        return torch.relu(self.n2(self.c2(torch.relu(self.n1(self.c1(x))))) + self.skip(x))


class HolderStages(nn.Module):
    """Stages three levels deep in holders that are never called (a plain module, a ModuleDict), odd names."""

    def __init__(self):
        super().__init__()
        self.entry = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.trunk = nn.Module()
        self.trunk.levels = nn.ModuleDict({
            "lvl_a": nn.Sequential(Unit(16, 16), Unit(16, 16)),
            "lvl_b": nn.Sequential(Unit(16, 32, 2), Unit(32, 32)),
            "zz": nn.Sequential(Unit(32, 64, 2), Unit(64, 64)),
        })
        self.exit = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))

    def forward(self, x):
        x = self.entry(x)
        for level in self.trunk.levels.values():
            x = level(x)
        return self.exit(x)


class CalledEncoderDictGroups(nn.Module):
    """A called encoder that walks a ModuleList of ModuleDict groups ({"down", "body"}) and returns a list."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            widths = [(8, 16), (16, 24), (24, 32), (32, 48)]
            self.groups = nn.ModuleList(
                nn.ModuleDict({"down": nn.Sequential(nn.Conv2d(a, b, 2, 2), nn.BatchNorm2d(b)),
                               "body": nn.Sequential(Unit(b, b), Unit(b, b))})
                for a, b in widths
            )

        def forward(self, x):
            outs = []
            for g in self.groups:
                x = g["body"](g["down"](x))
                outs.append(x)
            return outs

    def __init__(self):
        super().__init__()
        self.pre = nn.Conv2d(3, 8, 3, 1, 1)
        self.encoder = self.Encoder()
        self.heads = nn.ModuleList(nn.Conv2d(c, 5, 1) for c in (16, 24, 32, 48))

    def forward(self, x):
        return {f"p{i}": h(f) for i, (h, f) in enumerate(zip(self.heads, self.encoder(torch.relu(self.pre(x)))))}


class EncoderWithModelOutput(nn.Module):
    """A Hugging Face-style encoder: two stages at two resolutions in a called container that returns a dict (a
    ``ModelOutput``). It spans one resolution change only, but its output is no feature map: it cannot be a block."""

    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.stages = nn.ModuleList([nn.Sequential(Unit(8, 8), Unit(8, 8)),
                                         nn.Sequential(Unit(8, 16, 2), Unit(16, 16))])

        def forward(self, x):
            for stage in self.stages:
                x = stage(x)
            return {"last_hidden_state": x}

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2))
        self.encoder = self.Encoder()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        return self.head(self.encoder(self.stem(x))["last_hidden_state"].mean((2, 3)))


@pytest.mark.parametrize("cls,expected", [
    (HolderStages, ["trunk.levels.lvl_a", "trunk.levels.lvl_b", "trunk.levels.zz"]),
    (CalledEncoderDictGroups, [f"encoder.groups.{i}.body" for i in range(4)]),
    (EncoderWithModelOutput, ["encoder.stages.0", "encoder.stages.1"]),
])
def test_blocks_of_nested_oddly_named_stages(cls, expected):
    torch.manual_seed(0)
    model = cls().eval()
    x = torch.randn(2, 3, 64, 64)
    names = blocks(model, x)
    assert names == expected
    assert blocks(cls().train()) == expected  # default probe input (224); training mode restored
    with capture_blocks(model, names) as feats:
        model(x)
        sizes = [f.shape[-1] for f in feats.values()]
        assert list(feats) == names and sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes)
    # on a trained copy (a few SGD steps move the gammas): the same blocks, AT loss flows
    trained = cls()
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    for _ in range(2):
        out = trained(x)
        loss = sum(o.pow(2).mean() for o in (out.values() if isinstance(out, dict) else [out]))
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained.eval()
    assert blocks(trained, x) == expected
    with torch.no_grad(), capture_blocks(model, names) as ft:
        model(x)
        ft = dict(ft)
    with capture_blocks(trained, names) as fs_:
        trained(x)
        loss = L.at_loss(ft, fs_)
        loss.backward()
    assert torch.isfinite(loss) and loss.item() > 0


HF = {  # class name -> (config kwargs (small, random weights), expected blocks)
    "ResNetForImageClassification": (
        dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], layer_type="basic"),
        [f"resnet.encoder.stages.{i}" for i in range(4)]),
    "ConvNextForImageClassification": (
        dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1]),
        [f"convnext.encoder.stages.{i}" for i in range(4)]),
    "RegNetForImageClassification": (
        dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 2, 1], groups_width=8),
        [f"regnet.encoder.stages.{i}" for i in range(4)]),
    "MobileNetV2ForImageClassification": (
        dict(depth_multiplier=0.35),
        ["mobilenet_v2.conv_stem", "mobilenet_v2.layer.1", "mobilenet_v2.layer.4", "mobilenet_v2.layer.11",
         "mobilenet_v2.layer.15"]),
    "EfficientNetForImageClassification": (  # B0 (the default config is B7)
        dict(width_coefficient=1.0, depth_coefficient=1.0, hidden_dim=1280, image_size=128),
        [f"efficientnet.encoder.blocks.{i}" for i in (0, 2, 4, 10, 15)]),
}


@pytest.mark.parametrize("cls_name", list(HF))
def test_blocks_and_trace_on_transformers_cnns(cls_name):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    from filtersurgery import trace

    kwargs, expected = HF[cls_name]
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("ForImageClassification", "Config"))
    torch.manual_seed(0)
    model = cls(config_cls(num_labels=10, **kwargs)).eval()
    x = torch.randn(1, 3, 128, 128)
    names = blocks(model, x)
    assert names == expected
    with torch.no_grad(), capture_blocks(model, names) as feats:
        model(x)
        sizes = [f.shape[-1] for f in feats.values()]
    assert sizes == sorted(sizes, reverse=True) and len(set(sizes)) == len(sizes) == len(names)
    sm = trace(model, x)  # the tracer maps these models too (ConvNeXt's channels-first LayerNorm included)
    assert len(sm.mapped) > 0 and sm.coverage == 1.0, sm.unscaled

