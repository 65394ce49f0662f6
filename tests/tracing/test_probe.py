"""The probe helpers: example input, call order, train/eval modes kept (filtersurgery.tracing.probe)."""
import pytest
import timm
import torch
from torch import nn

from filtersurgery.distill.blockfeats import blocks
from filtersurgery.models.factory import build_model
from filtersurgery.ops.growth import partition
from filtersurgery.tracing.probe import (call_order, default_input_size, device_dtype, eval_mode, example_input,
                                         preserve_mode)


class Block(nn.Module):
    def __init__(self, c_in, c_out, stride=1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Nested(nn.Module):
    """stem -> stages[0] -> stages[1] -> act (called again) -> head; ``act`` runs twice."""

    def __init__(self, c=1):
        super().__init__()
        self.stem = Block(c, 8)
        self.stages = nn.ModuleList([Block(8, 16, 2), Block(16, 32, 2)])
        self.act = nn.ReLU()
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 5))

    def forward(self, x):
        x = self.act(self.stem(x))
        for s in self.stages:
            x = s(x)
        return self.head(self.act(x))


def _flags(model):
    return {n: m.training for n, m in model.named_modules()}


def _mixed(model):
    model.train()
    model.stem.bn.eval()
    model.stages[1].eval()
    model.head[2].eval()
    return _flags(model)


# --------------------------------------------------------------------------- modes
@pytest.mark.parametrize("train", [None, True, False])
def test_preserve_mode_restores_every_submodule(train):
    m = Nested()
    before = _mixed(m)
    with preserve_mode(m, train=train) as got:
        assert got is m
        if train is None:
            assert _flags(m) == before  # nothing changed on entry
            m.eval()
        else:
            assert all(f == train for f in _flags(m).values())
    assert _flags(m) == before


def test_modes_restored_after_an_exception():
    m = Nested()
    before = _mixed(m)
    with pytest.raises(RuntimeError, match="inside"):
        with eval_mode(m):
            assert not any(_flags(m).values())
            m.stages.train()  # the body changes modes, then fails
            raise RuntimeError("inside")
    assert _flags(m) == before
    with pytest.raises(RuntimeError, match="channels"):  # a failing forward in eval mode: restored as well
        with eval_mode(m):
            m(torch.randn(1, 2, 8, 8))
    assert _flags(m) == before


def test_flags_written_back_without_calling_train():
    m = Nested()
    calls = []
    m.stages.train = lambda mode=True: calls.append(mode)  # a module whose train() is overridden (pinned)
    m.stages.training = False
    with preserve_mode(m):
        m.stages.training = True
    assert calls == [] and m.stages.training is False


# --------------------------------------------------------------------------- call order
def test_call_order_of_a_nested_model():
    m = Nested()
    with eval_mode(m), call_order(m) as order, torch.no_grad():
        m(torch.randn(2, 1, 16, 16))
    names = order.names()
    assert names[:6] == ["", "stem", "stem.conv", "stem.bn", "stem.act", "act"]
    assert names.index("stages.0") < names.index("stages.0.conv") < names.index("stages.1") < names.index("head")
    assert "stages" not in names  # a ModuleList is never called itself
    first = order.first_calls()
    assert first["act"][1] == 2 and first["stem"][1] == 1 and first[""] == (0, 1)
    starts, ends = order.starts(), order.ends()
    assert len(starts["act"]) == len(ends["act"]) == 2
    # one event counter: a child's call lies inside its parent's
    assert starts["stem"][0] < starts["stem.conv"][0] <= ends["stem.conv"][0] < ends["stem"][0]
    assert ends[""][0] == max(e for v in ends.values() for e in v)
    shapes = {c.name: c.shape for c in order.calls}
    assert shapes["stages.1"] == (2, 32, 4, 4) and shapes["head"] == (2, 5)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())


def test_call_order_subset_unwrapped_and_hooks_removed_after_an_exception():
    m = Nested()
    with call_order(nn.DataParallel(m), ["stages.0", "head"]) as order, torch.no_grad():
        m(torch.randn(1, 1, 16, 16))
    assert order.names() == ["stages.0", "head"]
    with pytest.raises(RuntimeError):
        with call_order(m):
            m(torch.randn(1, 3, 16, 16))  # wrong channels: the forward fails
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in m.modules())
    with pytest.raises(ValueError, match=r"^modules: not modules of Nested: \['nope'\]$"):
        with call_order(m, ["stem", "nope"]):
            pass


# --------------------------------------------------------------------------- example input
def test_example_input_one_and_three_channel_timm_models():
    one = timm.create_model("resnet18", pretrained=False, in_chans=1, num_classes=3)
    three = timm.create_model("resnet18", pretrained=False, num_classes=3)
    assert default_input_size(one) == (1, 224, 224) and default_input_size(three) == (3, 224, 224)
    x1, x3 = example_input(one), example_input(three, batch=2)
    assert x1.shape == (1, 1, 224, 224) and x3.shape == (2, 3, 224, 224)
    assert x1.dtype == torch.float32 and x1.device.type == "cpu"
    # the same seeded draw every time, equal to a randn from a fresh generator seeded 0
    assert torch.equal(x1, torch.randn(1, 1, 224, 224, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(example_input(one), x1) and not torch.equal(example_input(one, seed=1), x1)
    cifar, _ = build_model("cifar:resnet20", num_classes=10, in_chans=1)
    assert example_input(cifar).shape == (1, 1, 32, 32)


def test_example_input_space_to_depth_stem_timm_model():
    with torch.device("meta"):
        m = timm.create_model("tresnet_m", pretrained=False, num_classes=3)
    first = next(c for c in m.modules() if isinstance(c, nn.Conv2d))
    assert first.in_channels == 48  # 16 * in_chans behind the space-to-depth stem
    x = example_input(m)
    assert x.shape == (1, 3, 224, 224) and x.device.type == "meta"


def test_example_input_device_dtype_and_sizes():
    m = Nested().double()
    assert device_dtype(m) == (torch.device("cpu"), torch.float64)
    x = example_input(m, (1, 16, 16), batch=3)
    assert x.shape == (3, 1, 16, 16) and x.dtype == torch.float64
    assert example_input(None, (3, 8, 8), dtype=torch.float16).dtype == torch.float16
    g = torch.Generator().manual_seed(5)
    a, b = example_input(None, (3, 8, 8), generator=g), example_input(None, (3, 8, 8), generator=g)
    assert not torch.equal(a, b)  # a generator passed in advances
    for bad, arg in [(dict(input_size=(3, 8)), "input_size"), (dict(input_size=(3, 0, 8)), "input_size"),
                     (dict(input_size=(3, 8, 8), batch=0), "batch"), (dict(), "input_size"),
                     (dict(input_size=(3, 8, 8), generator="global"), "generator")]:
        with pytest.raises(ValueError, match=f"^{arg}: ") as e:
            example_input(None, **bad)
        assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- global RNG
def test_the_global_rng_is_untouched():
    m = Nested()
    net, _ = build_model("cifar:resnet20", num_classes=10, in_chans=3)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    x = example_input(m, (1, 32, 32))
    with eval_mode(m), call_order(m), torch.no_grad():
        m(x)
    assert blocks(net) == ["layer1", "layer2", "layer3"]  # the probe forward pass of block discovery
    part = partition(net)  # growth's probe input and call order
    assert part.K == 3 and part.probe_shape == (3, 32, 32)
    assert torch.equal(torch.get_rng_state(), state)


def test_generator_none_draws_from_the_global_rng_as_before():
    m = Nested()
    torch.manual_seed(7)
    x = example_input(m, (1, 8, 8), generator=None)
    after = torch.rand(3)
    torch.manual_seed(7)
    assert torch.equal(x, torch.randn(1, 1, 8, 8)) and torch.equal(after, torch.rand(3))
