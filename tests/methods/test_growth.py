"""Incremental growth with look-ahead (docs/method.md §7): partition, grow, freezing, termination rule, CLI."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from filtersurgery.engine import checkpoint
from filtersurgery.cli.main import main as cli_main
from filtersurgery.data import load_dataset
from filtersurgery.ops.growth import (LinearHead, frozen_stages, grow, partition, should_grow, stop_epoch,
                                  train_flops_per_image, window_angle, window_angles)
from filtersurgery.methods.growth import GrowthConfig, epoch_curve, first_reach, plan, run_growth, value_at
from filtersurgery.models.factory import build_model
from filtersurgery.engine.config import TrainConfig

X28 = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(1))


# --------------------------------------------------------------------------- partition / grow
@pytest.mark.parametrize("spec, K, widths", [
    ("timm:resnet18", 4, [64, 128, 256, 512]),
    ("torchvision:resnet18", 4, [64, 128, 256, 512]),
    ("cifar:resnet32", 3, [16, 32, 64]),
])
def test_partition_stages_and_truncated_heads(spec, K, widths):
    torch.manual_seed(0)
    model, _ = build_model(spec, num_classes=7, in_chans=1)
    part = partition(model, example_inputs=X28[:1])
    assert part.K == K and part.widths == widths and part.num_classes == 7
    assert part.names[0][-1] in ("layer1",) and part.names[-1][-1] == f"layer{K}"
    assert any("conv" in n or "stem" in n for n in part.names[0][:-1])  # the stem is part of S1
    model.eval()
    for k in range(1, K + 1):
        net = grow(part, k).eval()
        assert net.k == k
        out = net(X28)
        assert out.shape == (2, 7)
        if k < K:
            assert isinstance(net.head, LinearHead) and net.head.fc.in_features == widths[k - 1]
            assert net.head.fc.out_features == 7
        else:  # the full network with the model's own head is the model itself
            assert net.head is part.head
            torch.testing.assert_close(out, model(X28))
    # the stages are the model's modules, shared: growing keeps the trained weights
    assert grow(part, 2).stages[0] is grow(part, 3).stages[0]
    assert {id(p) for p in grow(part, K).stages.parameters()} <= {id(p) for p in model.parameters()}


def test_partition_and_grow_bad_inputs():
    model, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    part = partition(model)
    for bad in (0, part.K + 1, 1.5):
        with pytest.raises(ValueError, match="^k: must be an int in"):
            grow(part, bad)
    with pytest.raises(ValueError, match="^stage_names: not modules"):
        partition(model, stage_names=["layer1", "nope"])
    with pytest.raises(ValueError, match="^model: cannot partition"):
        partition(model, stage_names=["layer2", "layer1"])

    class Functional(torch.nn.Module):  # a forward with a functional op between stages
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
            self.b = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, 2), torch.nn.BatchNorm2d(8))
            self.fc = torch.nn.Linear(8, 3)

        def forward(self, x):
            x = self.b(self.a(x) * 2.0)
            return self.fc(x.mean((2, 3)))

    with pytest.raises(ValueError, match="^model: cannot partition Functional") as e:
        partition(Functional(), stage_names=["a", "b"], example_inputs=X28[:1])
    assert "\n" not in str(e.value)


# --------------------------------------------------------------------------- look-ahead freezing
def test_frozen_stages_unchanged_during_lookahead():
    torch.manual_seed(0)
    model, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    part = partition(model, example_inputs=X28[:1])
    net = grow(part, 2)
    net.train()
    s1 = {k: v.clone() for k, v in net.stages[0].state_dict().items()}  # weights and BN buffers
    s2 = {k: v.clone() for k, v in net.stages[1].state_dict().items()}
    head = {k: v.clone() for k, v in net.head.state_dict().items()}
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(2))
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    with frozen_stages(net, 1):
        assert not any(p.requires_grad for p in net.stages[0].parameters())
        assert not net.stages[0].training and net.stages[1].training
        opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        net.train()  # a trainer calling train() keeps the frozen stage in eval mode
        assert not net.stages[0].training
        assert all(p.grad is None for p in net.stages[0].parameters())
    for k, v in net.stages[0].state_dict().items():
        torch.testing.assert_close(v, s1[k], rtol=0, atol=0, msg=k)
    assert any(not torch.equal(v, s2[k]) for k, v in net.stages[1].state_dict().items())
    assert any(not torch.equal(v, head[k]) for k, v in net.head.state_dict().items())
    # restored on exit
    assert all(p.requires_grad for p in net.parameters()) and net.frozen == 0
    assert all(m.training for m in net.modules())
    with pytest.raises(ValueError, match="^n: must be an int in"):
        with frozen_stages(net, 2):
            pass


def test_train_flops_frozen_stages_cost_forward_only():
    torch.manual_seed(0)
    model, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    part = partition(model, example_inputs=X28[:1])
    net = grow(part, 3)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    full = train_flops_per_image(net, (1, 28, 28))
    with frozen_stages(net, 2):
        look = train_flops_per_image(net, (1, 28, 28))
    for k, v in net.state_dict().items():  # counting touches nothing
        assert torch.equal(v, before[k]), k
    small = train_flops_per_image(grow(part, 1), (1, 28, 28))
    assert 0 < small < look < full
    assert all(p.grad is None for p in net.parameters())


# --------------------------------------------------------------------------- termination rule
def test_window_angle_is_the_angle_of_a_least_squares_line():
    assert window_angle([0.5, 0.6, 0.7]) == pytest.approx(math.degrees(math.atan(0.1)))
    assert window_angle([0.5, 0.7, 0.6]) == pytest.approx(math.degrees(math.atan(0.05)))
    assert window_angle([0.8, 0.8]) == 0.0
    assert window_angle([0.9, 0.8]) < 0
    with pytest.raises(ValueError, match="^acc:"):
        window_angle([0.5])


def test_termination_rule_on_a_hand_made_curve():
    # window 3: slopes 0.10, 0.08, 0.02 per epoch -> fires after window 3 (0.02 <= 0.5 * 0.08), not 2
    curve = [0.50, 0.60, 0.70, 0.72, 0.80, 0.88, 0.88, 0.90, 0.92, 0.93]
    a = window_angles(curve, 3)
    assert len(a) == 3 and a[0] > a[1] > a[2] > 0
    assert [should_grow(curve[:e], 3, 0.5) for e in range(1, 11)] == [False] * 8 + [True, False]
    assert stop_epoch(curve, 3, 0.5) == 9
    assert stop_epoch(curve, 3, 0.2) is None  # 0.02 > 0.2 * 0.08 (in angles)
    # a drop fires at once whatever gamma; the first window never fires
    assert stop_epoch([0.5, 0.6, 0.7, 0.70, 0.69, 0.68], 3, 0.0) == 6
    assert stop_epoch([0.7, 0.6, 0.5], 3, 1.0) is None
    # steady improvement never fires with gamma < 1
    assert stop_epoch([0.1 * i for i in range(9)], 3, 0.99) is None
    for bad in (dict(window=1, gamma=0.5), dict(window=3, gamma=1.5)):
        with pytest.raises(ValueError, match="^(window|gamma): must"):
            should_grow(curve, **bad)


def test_first_reach_and_value_at_read_a_curve():
    flops, acc = [10, 20, 20, 35, 50], [40.0, 61.0, 59.0, 75.0, 74.5]
    assert first_reach(flops, acc, 60.0) == 20 and first_reach(flops, acc, 75.0) == 35
    assert first_reach(flops, acc, 75.1) is None and first_reach([], [], 1.0) is None
    assert value_at(flops, acc, 5) is None  # the first epoch already costs more
    assert value_at(flops, acc, 20) == 59.0 and value_at(flops, acc, 34.9) == 59.0
    assert value_at(flops, acc, 1e9) == 74.5  # a run that ended earlier keeps its last value
    with pytest.raises(ValueError, match="^ys: "):
        first_reach([1, 2], [50.0], 10.0)
    with pytest.raises(ValueError, match="^xs: "):
        value_at([2, 1], [50.0, 60.0], 10.0)


def test_epoch_curve_reads_epochs_csv(tmp_path):
    head = "stage,phase,epoch,lr,train_loss,val_acc,angle,train_flops,seconds\n"
    rows = ["1,train,1,0.1,2.0,40.0,,100,1.5", "1,train,2,0.1,1.5,50.0,3.0,200,1.5",
            "2,lookahead,1,0.1,1.2,55.0,,260,1.0", "2,lookahead,1,0.1,1.2,56.0,,260,1.25",  # re-logged: last row
            "2,train,1,0.1,1.0,60.0,,400,2.0"]
    (tmp_path / "epochs.csv").write_text(head + "\n".join(rows) + "\n")
    c = epoch_curve(tmp_path)
    assert c["stage"] == [1, 1, 2, 2] and c["phase"] == ["train", "train", "lookahead", "train"]
    assert c["val_acc"] == [40.0, 50.0, 56.0, 60.0] and c["flops"] == [100, 200, 260, 400]
    assert c["seconds"] == [1.5, 3.0, 4.25, 6.25]
    assert first_reach(c["flops"], c["val_acc"], 55.5) == 260
    with pytest.raises(ValueError, match="^out_dir: "):
        epoch_curve(tmp_path / "missing")


def test_plan():
    assert plan(3, GrowthConfig()) == [(1, "train"), (2, "lookahead"), (2, "train"), (3, "lookahead"), (3, "train")]
    assert plan(3, GrowthConfig(init="random")) == [(1, "train"), (2, "train"), (3, "train")]
    assert plan(3, GrowthConfig(regular=True)) == [(3, "train")]
    with pytest.raises(ValueError, match="^init: must be one of lookahead, random"):
        GrowthConfig(init="zeros").validate()


# --------------------------------------------------------------------------- runs
TINY = dict(model="cifar:resnet8", data="demo", method="growth", epochs=4, subset=40, batch_size=20, max_batches=1,
            device="cpu", progress=False)


@pytest.fixture(scope="module")
def demo():
    return load_dataset("demo", subset_test=100)


def _killed_then_resumed(monkeypatch, cfg, gcfg, out, demo, at: int = 6):
    """Run growth into ``out`` killed (KeyboardInterrupt) in its ``at``-th epoch (6: inside stage 2), then
    re-run it to the end; returns the finished run's metrics."""
    import filtersurgery.methods.growth as mg

    real, calls = mg._train_epoch, [0]

    def dying(*a, **k):
        calls[0] += 1
        if calls[0] == at:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(mg, "_train_epoch", dying)
    with pytest.raises(KeyboardInterrupt):
        run_growth(cfg, gcfg, out, seed=0, data=demo)
    monkeypatch.setattr(mg, "_train_epoch", real)
    return run_growth(cfg, gcfg, out, seed=0, data=demo)


def test_resume_after_interruption_matches_uninterrupted(tmp_path, demo, monkeypatch):
    cfg, gcfg = TrainConfig(**TINY), GrowthConfig(window=2, gamma=0.5, lookahead_epochs=1)
    ref = run_growth(cfg, gcfg, tmp_path / "ref", seed=0, data=demo)
    e = ref["steps"][0]
    assert [s["k"] for s in e["stages"]] == [1, 2, 3] and e["K"] == 3
    assert [s["lookahead_epochs"] for s in e["stages"]] == [0, 1, 1]
    assert all(2 <= s["epochs"] <= 4 and s["stopped"] in ("rule", "cap") for s in e["stages"])
    fl = [s["inference_flops"] for s in e["stages"]]
    assert fl == sorted(fl) and fl[0] > 0
    cum = [s["train_flops_cum"] for s in e["stages"]]
    assert cum == sorted(cum) and e["train_flops"] == cum[-1]

    res = _killed_then_resumed(monkeypatch, cfg, gcfg, tmp_path / "run", demo)
    r = res["steps"][0]
    assert [(h["k"], h["phase"], h["epochs"]) for h in r["phases"]] == [(h["k"], h["phase"], h["epochs"]) for h in e["phases"]]
    assert r["train_flops"] == e["train_flops"] and r["test_acc"] == e["test_acc"]
    a = checkpoint.load_state_dict(tmp_path / "ref" / "step1.safetensors")
    b = checkpoint.load_state_dict(tmp_path / "run" / "step1.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)
    rows = (tmp_path / "run" / "epochs.csv").read_text().splitlines()[1:]
    assert len(rows) == sum(h["epochs"] for h in e["phases"])  # no epoch trained twice
    # the final checkpoint is the model itself
    model, _ = build_model("cifar:resnet8", num_classes=10, in_chans=1)
    model.load_state_dict(b)
    # a finished run is returned as it is; other growth options refuse the folder
    assert run_growth(cfg, gcfg, tmp_path / "run", seed=0, data=demo)["steps"] == res["steps"]
    with pytest.raises(ValueError, match="^out: .* growth options"):
        run_growth(cfg, GrowthConfig(window=3), tmp_path / "run", seed=0, data=demo)


def test_regular_baseline_trains_the_full_network_for_all_epochs(tmp_path, demo):
    cfg = TrainConfig(**{**TINY, "epochs": 2})
    m = run_growth(cfg, GrowthConfig(regular=True), tmp_path / "reg", seed=0, data=demo)
    e = m["steps"][0]
    assert [(s["k"], s["epochs"], s["stopped"]) for s in e["stages"]] == [(3, 2, "cap")]
    assert e["init"] == "regular"
    c = epoch_curve(tmp_path / "reg")  # what the benchmark reads back
    assert c["flops"][-1] == e["train_flops"] and c["val_acc"][-1] == pytest.approx(e["val_acc"], abs=1e-3)


def test_cli_growth_run(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["run", "--no-progress", "--method", "growth", "--model", "cifar:resnet8", "--data", "demo",
            "--epochs", "2", "--growth-window", "2", "--growth-lookahead-epochs", "1", "--growth-gamma", "0.5", "--growth-init", "random",
            "--subset", "20", "--batch-size", "10", "--max-batches", "1", "--device", "cpu", "--out", str(out)]
    assert cli_main(args) == 0
    m = json.loads((out / "seed0" / "metrics.json").read_text())
    e = m["steps"][0]
    assert len(m["steps"]) == 1 and e["step"] == 1 and 0 <= e["test_acc"] <= 100
    assert m["config"]["growth"] == {"window": 2, "gamma": 0.5, "lookahead_epochs": 1, "init": "random", "regular": False}
    assert [s["lookahead_epochs"] for s in e["stages"]] == [0, 0, 0]
    assert (out / "seed0" / "step1.safetensors").exists() and (out / "seed0" / "stage2.safetensors").exists()
    assert (out / "summary.json").exists()
    capsys.readouterr()
    assert cli_main(args[:-2] + ["--growth-window", "1", "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "window" in err[0]


def test_growth_saves_through_the_epoch_driver_with_state_every(tmp_path, demo, monkeypatch):
    """``state_every`` holds growth's rows back as it does the trainer's; a kill between saves resumes from the
    last save and ends with the same weights and the same epochs.csv rows (seconds aside) as a run saved every epoch."""
    import csv

    gcfg = GrowthConfig(window=2, gamma=0.5, lookahead_epochs=1)
    run_growth(TrainConfig(**TINY), gcfg, tmp_path / "ref", seed=0, data=demo)
    cfg = TrainConfig(**TINY, state_every=3600.0)  # only the last epoch of each phase is saved
    _killed_then_resumed(monkeypatch, cfg, gcfg, tmp_path / "run", demo)
    a = checkpoint.load_state_dict(tmp_path / "ref" / "step1.safetensors")
    b = checkpoint.load_state_dict(tmp_path / "run" / "step1.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)

    def rows(d):
        with open(d / "epochs.csv", newline="") as f:
            return [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(f)]

    assert rows(tmp_path / "run") == rows(tmp_path / "ref")
