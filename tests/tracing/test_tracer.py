"""filtersurgery.trace: conv filter -> norm channel maps (docs/method.md §0)."""
import copy

import pytest
import torch
from torch import nn

from filtersurgery.tracing.probe import default_input_size
from filtersurgery.tracing.tracer import trace
from filtersurgery.tracing.verify import verify
from filtersurgery.tracing.scaling_map import NormRef, ScalingMap, is_structural


def refs(sm, name):
    return [(r.norm, r.offset) for r in sm[name].scaled_by]


# ---------------------------------------------------------------- tiny models
class Residual(nn.Module):
    """Post-activation basic block: conv2 -> bn2 -> + x; the norm right after the conv wins."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.head = nn.Conv2d(c, c, 1)
        self.bn3 = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 4)

    def forward(self, x):
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(y)) + x)
        x = self.bn3(self.head(x))
        return self.fc(x.mean((2, 3)))


class PreAct(nn.Module):
    """Pre-activation ResNet: conv2 -> add -> next block's bn1 (fewest adds wins)."""

    def __init__(self, c=8):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.blocks = nn.ModuleList()
        for _ in range(2):
            b = nn.Module()
            b.bn1, b.conv1 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
            b.bn2, b.conv2 = nn.BatchNorm2d(c), nn.Conv2d(c, c, 3, padding=1)
            self.blocks.append(b)
        self.norm = nn.BatchNorm2d(c)
        self.fc = nn.Linear(c, 3)

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            y = b.conv1(torch.relu(b.bn1(x)))
            x = x + b.conv2(torch.relu(b.bn2(y)))
        return self.fc(torch.relu(self.norm(x)).mean((2, 3)))


class Mobile(nn.Module):
    """pw conv -> depthwise conv -> bn (no norm in between); grouped conv mixes."""

    def __init__(self):
        super().__init__()
        self.pw = nn.Conv2d(3, 12, 1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.bn = nn.BatchNorm2d(12)
        self.pre = nn.Conv2d(12, 12, 1)
        self.grouped = nn.Conv2d(12, 12, 3, padding=1, groups=3)
        self.bn2 = nn.BatchNorm2d(12)

    def forward(self, x):
        x = torch.relu(self.bn(self.dw(self.pw(x))))
        return self.bn2(self.grouped(torch.relu(self.pre(x))))


class Dense(nn.Module):
    """Concatenation: each new feature is scaled in every later norm at its offset."""

    def __init__(self):
        super().__init__()
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.convs = nn.ModuleList([nn.Conv2d(6 + 4 * i, 4, 3, padding=1) for i in range(3)])
        self.norms = nn.ModuleList([nn.BatchNorm2d(6 + 4 * i) for i in range(4)])

    def forward(self, x):
        feats = [self.conv0(x)]
        for norm, conv in zip(self.norms, self.convs):
            feats.append(conv(torch.relu(norm(torch.cat(feats, 1)))))
        return self.norms[3](torch.cat(feats, 1))


class SplitSlice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 1)
        self.b = nn.Conv2d(3, 6, 1)
        self.bn = nn.BatchNorm2d(6)
        self.c = nn.Conv2d(3, 8, 1)
        self.bn_c = nn.BatchNorm2d(8)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)[:, 4:]  # a is sliced away, b lands at 0
        lo, hi = torch.split(torch.cat([self.c(x), y], 1), [8, 6], 1)
        return self.bn_c(lo) + self.bn(hi).mean()


# ------------------------------------------------------------------- tests
def test_residual_add_norm_right_after_conv_wins():
    sm = trace(Residual(), torch.randn(1, 3, 16, 16))
    assert refs(sm, "conv2") == [("bn2", 0)]
    assert refs(sm, "stem") == [("bn0", 0)]
    assert refs(sm, "head") == [("bn3", 0)]
    assert sm.coverage == 1.0 and not sm.unscaled


def test_preactivation_resnet_fewest_adds():
    sm = trace(PreAct(), torch.randn(1, 3, 16, 16))
    assert refs(sm, "stem") == [("blocks.0.bn1", 0)]
    assert refs(sm, "blocks.0.conv1") == [("blocks.0.bn2", 0)]
    assert refs(sm, "blocks.0.conv2") == [("blocks.1.bn1", 0)]  # not the final norm (2 adds)
    assert refs(sm, "blocks.1.conv2") == [("norm", 0)]


def test_depthwise_passes_grouped_mixes():
    sm = trace(Mobile(), torch.randn(1, 3, 16, 16))
    assert refs(sm, "pw") == [("bn", 0)]  # through the depthwise conv
    assert refs(sm, "dw") == [("bn", 0)]
    assert refs(sm, "grouped") == [("bn2", 0)]
    assert sm["grouped"].groups == 3
    assert sm.unscaled["pre"].startswith("no norm downstream") and "grouped" in sm.unscaled["pre"]
    assert sm.coverage == 1.0


def test_concat_offsets_several_norms():
    sm = trace(Dense(), torch.randn(1, 3, 8, 8))
    assert refs(sm, "conv0") == [("norms.0", 0), ("norms.1", 0), ("norms.2", 0), ("norms.3", 0)]
    assert refs(sm, "convs.0") == [("norms.1", 6), ("norms.2", 6), ("norms.3", 6)]
    assert refs(sm, "convs.2") == [("norms.3", 14)]
    assert sm.scaled_by("convs.1", 3) == [("norms.2", 13), ("norms.3", 13)]
    fv = sm.factors
    assert fv.numel == 6 + 10 + 14 + 18
    assert verify(sm, (3, 8, 8)).ok


def test_torchvision_densenet_offsets():
    from torchvision.models import DenseNet

    m = DenseNet(growth_rate=4, block_config=(3, 2), num_init_features=8, bn_size=2, num_classes=5)
    sm = trace(m, torch.randn(1, 3, 32, 32))
    name = "features.denseblock1.denselayer1.conv2"
    assert refs(sm, name) == [
        ("features.denseblock1.denselayer2.norm1", 8),
        ("features.denseblock1.denselayer3.norm1", 8),
        ("features.transition1.norm", 8),
    ]
    assert refs(sm, "features.conv0") == [("features.norm0", 0)]
    assert sm.coverage == 1.0
    v = verify(sm, (3, 32, 32))
    assert v.ok and v.filters > 0


def test_split_and_slice_offsets():
    sm = trace(SplitSlice(), torch.randn(1, 3, 8, 8))
    assert refs(sm, "b") == [("bn", 0)]
    assert refs(sm, "c") == [("bn_c", 0)]
    assert not sm["a"].mapped and is_structural(sm.unscaled["a"])
    assert verify(sm, (3, 8, 8)).ok


class DualPath(nn.Module):
    """DPN-style block: one conv's output is sliced into a residual part and a dense part."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 1)  # 4 residual channels + 2 dense
        self.c = nn.Conv2d(3, 7, 1)  # 4 residual + 3 dense
        self.bn = nn.BatchNorm2d(9)  # cat(resid 4, dense 2 + 3)
        self.glu = nn.Conv2d(3, 8, 1)  # chunk: both halves reach bn_glu at channel c mod 4
        self.bn_glu = nn.BatchNorm2d(4)
        self.drop = nn.Conv2d(3, 4, 1)  # half of it is sliced away: reported, not half-mapped
        self.bn_drop = nn.BatchNorm2d(2)

    def forward(self, x):
        s = self.stem(x)
        out = self.c(x)
        resid = s[:, :4] + out[:, :4]
        dense = torch.cat([s[:, 4:], out[:, 4:]], 1)
        a, b = self.glu(x).chunk(2, 1)
        return self.bn(torch.cat([resid, dense], 1)).mean() + self.bn_glu(a * b.sigmoid()).mean() + self.bn_drop(self.drop(x)[:, :2]).mean()


def test_dual_path_pieces():
    sm = trace(DualPath(), torch.randn(1, 3, 8, 8))
    # c: filters 0-3 (residual, one add) -> bn 0-3; filters 4-6 (dense, no add) -> bn 6-8
    got = [(r.norm, r.offset, r.first, r.count) for r in sm["c"].scaled_by]
    assert got == [("bn", 0, 0, 4), ("bn", 2, 4, 3)]
    assert sm.scaled_by("c", 5) == [("bn", 7)] and sm.scaled_by("c", 1) == [("bn", 1)]
    # stem: residual filters 0-3 -> bn 0-3 (one add), dense 4-5 -> bn 4-5: one whole ref
    assert refs(sm, "stem") == [("bn", 0)] and sm["stem"].scaled_by[0].count is None
    assert [(r.offset, r.first, r.count) for r in sm["glu"].scaled_by] == [(0, 0, 4), (-4, 4, 4)]
    assert not sm["drop"].mapped and "Slice(cuts the filters" in sm.unscaled["drop"]
    js = {e["name"]: e for e in sm.to_json()}
    assert js["c"]["scaled_by"] == [{"norm": "bn", "offset": 0, "filters": [0, 4]}, {"norm": "bn", "offset": 2, "filters": [4, 7]}]
    assert js["stem"]["scaled_by"] == [{"norm": "bn", "offset": 0}]
    assert sm.factors.numel == 9 + 4
    assert verify(sm, (3, 8, 8), filters_per_conv=8).ok


def test_batchnormact_and_layernorm2d():
    from timm.layers import BatchNormAct2d, LayerNorm2d

    m = nn.Sequential(
        nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 8, 3), LayerNorm2d(8),
        nn.Conv2d(8, 4, 1), nn.GroupNorm(2, 4),
    )
    sm = trace(m, torch.randn(1, 3, 16, 16))
    assert refs(sm, "0") == [("1", 0)]
    assert refs(sm, "2") == [("3", 0)]
    assert refs(sm, "4") == [("5", 0)]
    assert sm.norm_kinds == {"1": "bn", "3": "ln2d", "5": "gn"}
    assert verify(sm, (3, 16, 16)).ok


def test_convnext_permute_layernorm():
    from torchvision.models.convnext import CNBlock, LayerNorm2d

    m = nn.Sequential(nn.Conv2d(3, 8, 4, stride=4), LayerNorm2d(8), CNBlock(8, 1e-6, 0.0), CNBlock(8, 1e-6, 0.0))
    sm = trace(m, torch.randn(1, 3, 32, 32))
    assert refs(sm, "0") == [("1", 0)]
    assert refs(sm, "2.block.0") == [("2.block.2", 0)]  # dwconv -> Permute -> nn.LayerNorm (last dim)
    assert sm.norm_kinds["2.block.2"] == "ln" and sm.norm_kinds["1"] == "ln2d"
    assert verify(sm, (3, 32, 32)).ok


def test_se_convs_and_classifier_conv_are_unscaled():
    from timm.layers import SqueezeExcite

    m = nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), SqueezeExcite(16, rd_ratio=0.25),
        nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.AdaptiveAvgPool2d(1), nn.Conv2d(16, 5, 1), nn.Flatten(),
    )
    sm = trace(m, torch.randn(1, 3, 16, 16))
    assert sm.unscaled["3.fc1"] == "SE gate: no norm downstream"
    assert sm.unscaled["3.fc2"] == "SE gate: no norm downstream"
    assert sm.unscaled["7"] == "classifier conv: output reaches the model output without a norm"
    assert refs(sm, "0") == [("1", 0)] and refs(sm, "4") == [("5", 0)]
    assert sm.coverage == 1.0


def test_frozen_and_non_affine_norms():
    from torchvision.ops import FrozenBatchNorm2d

    m = nn.Sequential(nn.Conv2d(3, 4, 1), FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, affine=False),
                      nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))
    sm = trace(m, torch.randn(1, 3, 8, 8))
    assert refs(sm, "0") == [("1", 0)] and sm.frozen_norms == ["1"]  # mapped, marked frozen
    assert sm.factors.frozen == [True, False] and sm.factors.n_frozen == 4
    assert sm.unscaled["2"] == "norm has no affine weight"
    assert refs(sm, "4") == [("5", 0)]
    assert sm.coverage == 1.0


def test_squeezenet_all_unscaled_no_error():
    import torchvision

    sm = trace(torchvision.models.squeezenet1_0(weights=None))
    assert len(sm) == 26 and not sm.mapped
    assert set(sm.unscaled.values()) == {"no norm in the model"}
    assert sm.factors.numel == 0


def test_coverage_is_none_when_nothing_is_mappable():
    import torchvision

    sm = trace(torchvision.models.squeezenet1_0(weights=None))
    assert sm.coverage is None and "coverage=n/a" in repr(sm)  # n/a, not 100%
    only_plain = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, affine=False)), torch.randn(1, 3, 8, 8))
    assert only_plain.unscaled == {"0": "norm has no affine weight"} and only_plain.coverage is None
    # one tracer miss makes it a number again: 0 of 1 mappable conv mapped
    miss = trace(nn.Sequential(nn.Conv2d(3, 4, 1), nn.LayerNorm([4, 8, 8])), torch.randn(1, 3, 8, 8))
    assert miss.coverage == 0.0 and "coverage=0.000" in repr(miss)


def _state(model):
    return (
        [(n, m.training) for n, m in model.named_modules()],
        [(n, p.requires_grad, p.dtype, p.device, p.is_contiguous(memory_format=torch.channels_last)) for n, p in model.named_parameters()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def test_model_state_unchanged():
    m = Residual().double().to(memory_format=torch.channels_last)
    m.train()
    m.bn1.eval()
    m.conv1.weight.requires_grad_(False)
    before = _state(m)
    for x in (None, torch.randn(2, 3, 16, 16, dtype=torch.double)):  # real-tensor and meta-device traces
        sm = trace(m, x)
        after = _state(m)
        assert before[0] == after[0] and before[1] == after[1]
        assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
        assert m.bn0.num_batches_tracked.item() == 0
        assert refs(sm, "conv2") == [("bn2", 0)]
    # the default input is inferred: C from the first conv, HxW 224 (no timm cfg), traced reduced
    assert default_input_size(m) == (3, 224, 224) and trace(m).input_size == (3, 64, 64)


def test_real_tensor_fallback_leaves_state_unchanged():
    class DataDependent(Residual):  # .item() cannot run on the meta device -> real-tensor trace
        def forward(self, x):
            if x.abs().sum().item() > -1:
                return super().forward(x)
            return x

    m = DataDependent().train()
    for p in m.parameters():
        p.requires_grad_(False)
    before = _state(m)
    sm = trace(m)
    after = _state(m)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(torch.equal(before[2][k], after[2][k]) for k in before[2])
    assert refs(sm, "conv2") == [("bn2", 0)] and sm.coverage == 1.0


def test_frozen_parameters_same_map():
    m = PreAct()
    ref = trace(m, torch.randn(1, 3, 16, 16))
    for p in m.parameters():
        p.requires_grad_(False)
    sm = trace(m, torch.randn(1, 3, 16, 16))
    assert sm.to_json() == ref.to_json()
    assert not any(p.requires_grad for p in m.parameters())


def test_wrapped_and_compiled_models():
    m = Residual()
    ref = trace(m).to_json()
    dp = nn.DataParallel(m)
    sm = trace(dp)
    assert sm.module is m and sm.to_json() == ref  # names without the "module." prefix
    compiled = torch.compile(m)  # lazily compiled: tracing uses _orig_mod, nothing is compiled
    sm = trace(compiled)
    assert sm.module is m and sm.to_json() == ref


def test_bad_input_shape_one_line_error():
    with pytest.raises(ValueError, match=r"expected shape \(N, 3, H, W\)") as e:
        trace(Residual(), torch.randn(1, 1, 16, 16))
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="expected shape"):
        trace(Residual(), torch.randn(1, 3, 16))


def test_timm_in_chans_and_size_independence():
    import timm

    m = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=3)
    sm = trace(m)
    assert default_input_size(m) == (1, 224, 224) and sm.input_size == (1, 64, 64)
    small = trace(m, torch.randn(1, 1, 32, 32))
    assert small.to_json() == sm.to_json()
    assert sm.coverage == 1.0 and len(sm.mapped) == 20


def test_default_channels_space_to_depth_stem_and_replaced_stem():
    import timm

    # TResNet's space-to-depth stem: the first conv sees 16 * in_chans channels
    m = timm.create_model("tresnet_m", pretrained=False, num_classes=3)
    first = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    assert first.in_channels == 48
    assert default_input_size(m)[0] == 3
    sm = trace(m)
    assert sm.coverage == 1.0 and len(sm.mapped) > 0
    # a user-replaced stem conv wins over the stale in_chans attribute
    r = timm.create_model("resnet18", pretrained=False, num_classes=3)
    r.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    assert default_input_size(r)[0] == 1
    assert trace(r).coverage == 1.0


def test_verify_detects_a_wrong_offset():
    import timm

    m = timm.create_model("resnet18", pretrained=False, num_classes=3)
    sm = trace(m)
    v = verify(sm, (3, 32, 32), filters_per_conv=2)
    assert v.ok and v.filters == 40
    convs = copy.deepcopy(sm.convs)
    convs["layer1.0.conv1"].scaled_by = [NormRef("layer1.0.bn1", 1)]
    bad = ScalingMap(sm.module, {k: v for k, v in convs.items() if k == "layer1.0.conv1"}, sm.norm_kinds)
    bad.input_size = sm.input_size
    wrong = verify(bad, (3, 32, 32), filters_per_conv=2)
    assert len(wrong.mismappings) == 2 and "layer1.0.bn1" in wrong.mismappings[0]


class SharedNormSeq(nn.Module):
    """One BN normalizes conv a's output and, after conv b, b's output: one module, two calls."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        return self.fc(torch.relu(self.bn(self.b(y))).mean((2, 3)))


class SharedNormBranches(nn.Module):
    """Two parallel branches through one BN, summed."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c, self.bn2 = nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8)

    def forward(self, x):
        return self.bn2(self.c(self.bn(self.a(x)) + self.bn(self.b(x))))


@pytest.mark.parametrize("cls", [SharedNormSeq, SharedNormBranches])
def test_verify_shared_norm_called_twice(cls):
    torch.manual_seed(0)
    m = cls()
    sm = trace(m, torch.randn(1, 3, 16, 16))
    assert refs(sm, "a") == [("bn", 0)] and refs(sm, "b") == [("bn", 0)]
    assert sm.factors.numel == 8 + (8 if cls is SharedNormBranches else 0)  # a shared channel is one factor
    v = verify(sm, (3, 16, 16), filters_per_conv=8)
    assert v.ok and v.filters == len(sm.mapped) * 8, v.mismappings
    # trained: gammas, betas and running statistics away from their init
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(3):
        out = m(torch.randn(4, 3, 16, 16))
        loss = (out * torch.randn_like(out)).mean()  # a random direction: every parameter moves
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert (m.bn.weight - 1).abs().max() > 1e-4 and (m.bn.running_mean != 0).all()
    assert verify(trace(m, torch.randn(1, 3, 16, 16)), (3, 16, 16), filters_per_conv=8).ok
    # a wrong offset on the shared norm is still found, in every call
    bad = ScalingMap(m, {"a": copy.deepcopy(sm["a"])}, sm.norm_kinds)
    bad["a"].scaled_by = [NormRef("bn", 1)]
    wrong = verify(bad, (3, 16, 16), filters_per_conv=3)
    assert len(wrong.mismappings) == 3
    if cls is SharedNormSeq:  # call 1: channel c moved, not c + 1; call 2: the whole window (mixed by conv b)
        assert wrong.mismappings[0] == "a[0] -> bn[1]: channels [2, 3, 4, 5, 6, 7] changed too (it changes alone in none of the norm's 2 calls)"


def test_layernorm_channels_first_data_format_is_mapped():
    """A LayerNorm subclass applied channels-first (Hugging Face's ConvNextLayerNorm) is a 2d norm."""

    class ChannelsFirstLN(nn.LayerNorm):
        def __init__(self, c):
            super().__init__(c)
            self.data_format = "channels_first"

        def forward(self, x):
            return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    m = nn.Sequential(nn.Conv2d(3, 6, 2, 2), ChannelsFirstLN(6), nn.Conv2d(6, 4, 1), nn.BatchNorm2d(4))
    sm = trace(m, torch.randn(1, 3, 8, 8))
    assert refs(sm, "0") == [("1", 0)] and sm.norm_kinds["1"] == "ln2d" and sm.coverage == 1.0
    assert verify(sm, (3, 8, 8), filters_per_conv=6).ok
