"""Your own model in the trainer: an nn.Module instance or a zero-argument factory wherever a model name
is accepted (the framework and every multi-step baseline), recorded by architecture fingerprint so a
resume with another architecture is refused; a Hugging Face ``transformers`` CNN whose forward returns a
``ModelOutput``."""
import json

import pytest
import torch
from torch import nn

from filtersurgery import train
from filtersurgery.data import load_dataset
from filtersurgery.models.user import Logits, fingerprint, model_id


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn(self.conv(x)))


class NestedNet(nn.Module):
    """A hand-written CNN with nested containers (stem, a ModuleDict of stages, a head)."""

    def __init__(self, width=8, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stages = nn.ModuleDict({"a": nn.Sequential(Block(width)),
                                     "b": nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1),
                                                        nn.BatchNorm2d(2 * width), nn.ReLU(), Block(2 * width))})
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.stages["b"](self.stages["a"](self.stem(x)))
        return self.head(x.mean((2, 3)))


@pytest.fixture(scope="module")
def demo():
    return load_dataset("demo")


def tiny(model, method="framework", **kw):
    return train.TrainConfig(model=model, data="demo", steps=2, method=method, epochs=1, subset=8, batch_size=4,
                             max_batches=1, device="cpu", progress=False, **kw)


@pytest.mark.parametrize("method", list(train.METHODS))
def test_every_multistep_method_trains_a_users_module(method, demo, tmp_path, one_thread):
    torch.manual_seed(0)
    net = NestedNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    m = train.multi_step(tiny(net, method), tmp_path, seed=0, data=demo)
    assert [e["step"] for e in m["steps"]] == [1, 2]
    assert m["config"]["model"] == f"user:NestedNet:{fingerprint(net)}"
    json.loads((tmp_path / "metrics.json").read_text())  # the record is JSON
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())  # the user's module is untouched


def test_an_instance_starts_step1_from_its_own_weights_a_factory_from_a_seeded_init(demo, tmp_path):
    torch.manual_seed(1)
    net = NestedNet()
    run = train.Run(tiny(net), 0, tmp_path, demo)
    a, b = run.new_model(), run.new_model()
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), net.state_dict().values()))
    fresh = run.new_model(fresh=True)  # Shrink & Perturb's noise: re-initialized
    assert not torch.equal(fresh.head.weight, net.head.weight)
    run2 = train.Run(tiny(NestedNet), 0, tmp_path, demo)  # the class itself: a zero-argument factory
    c, d = run2.new_model(), run2.new_model()
    assert torch.equal(c.head.weight, d.head.weight)  # seeded by the run's seed
    run3 = train.Run(tiny(NestedNet), 1, tmp_path, demo)
    assert not torch.equal(run3.new_model().head.weight, c.head.weight)


def test_resume_with_another_architecture_is_refused_in_one_line(demo, tmp_path):
    train.multi_step(tiny(NestedNet(width=8), "finetune"), tmp_path, seed=0, data=demo, until_step=1)
    with pytest.raises(ValueError) as e:
        train.multi_step(tiny(NestedNet(width=16), "finetune"), tmp_path, seed=0, data=demo)
    msg = str(e.value)
    assert msg.startswith(f"out: {tmp_path} holds a run with model='user:NestedNet:") and "\n" not in msg
    # the same architecture (other weights) resumes
    m = train.multi_step(tiny(NestedNet(width=8), "finetune"), tmp_path, seed=0, data=demo)
    assert [e["step"] for e in m["steps"]] == [1, 2]


def test_a_model_with_the_wrong_number_of_classes_is_refused_before_anything_is_written(demo, tmp_path):
    with pytest.raises(ValueError, match=r"^model: outputs shape \(2, 7\) on a batch of 2, the data has 10 classes"):
        train.multi_step(tiny(NestedNet(classes=7)), tmp_path / "x", seed=0, data=demo)
    with pytest.raises(ValueError, match=r"^model: fails on the data's 1x28x28 images: RuntimeError: Given groups"):
        train.multi_step(tiny(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(10))), tmp_path / "x",
                         seed=0, data=demo)
    with pytest.raises(ValueError, match="^model: the factory 'f' returned int, not an nn.Module"):
        def f():
            return 3
        train.multi_step(tiny(f), tmp_path / "x", seed=0, data=demo)
    with pytest.raises(ValueError, match="^model: expected a model name, an nn.Module or a zero-argument function"):
        tiny(42).validate()
    assert not (tmp_path / "x").exists()


def test_model_id_names_the_class_and_hashes_the_architecture():
    a, b = NestedNet(8), NestedNet(8)
    assert model_id(a) == model_id(b) and model_id(a) != model_id(NestedNet(16))
    assert model_id("timm:resnet18") == "timm:resnet18"
    assert model_id(Logits(a)) == model_id(a)


@pytest.mark.parametrize("cls_name", ["ResNetForImageClassification", "MobileNetV2ForImageClassification"])
def test_a_transformers_cnn_with_a_model_output_trains_in_the_framework(cls_name, demo, tmp_path, one_thread):
    transformers = pytest.importorskip("transformers", reason="Hugging Face transformers is not installed")
    cls = getattr(transformers, cls_name)
    config_cls = getattr(transformers, cls_name.replace("ForImageClassification", "Config"))
    if cls_name.startswith("ResNet"):
        config = config_cls(num_channels=1, num_labels=10, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    else:
        config = config_cls(num_channels=1, num_labels=10, image_size=28, depth_multiplier=0.25)
    torch.manual_seed(0)
    net = cls(config)
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 1, 28, 28))
    net.train()
    assert not isinstance(out, torch.Tensor) and out.logits.shape == (1, 10)  # a ModelOutput
    m = train.multi_step(tiny(net), tmp_path, seed=0, data=demo)
    assert [e["step"] for e in m["steps"]] == [1, 2] and m["steps"][1]["phases"] == ["sst", "aod"]
    assert m["config"]["model"].startswith(f"user:{cls_name}:")


def test_sharing_refuses_a_user_model_in_one_line(demo, tmp_path):
    from filtersurgery.methods import sharing

    cfg = tiny(NestedNet(), "sharing")
    with pytest.raises(ValueError, match="^model: sharing builds one network per class set"):
        sharing.run_method(cfg, None, tmp_path, 0, demo)
