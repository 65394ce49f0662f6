"""Partial network sharing (docs/method.md §6): share(), BranchedNet, the cost model, the CLI methods and the sweep."""
import argparse
import csv
import json

import pytest
import torch
from torch import nn

from filtersurgery.engine import checkpoint
from filtersurgery.models.cifar_resnet import cifar_resnet
from filtersurgery.data import load_dataset
from filtersurgery.cli.sweep import add_parsers
from filtersurgery.methods.sharing import class_sets_from, class_subset
from filtersurgery.methods.sharing_sweep import (best_per_cost, choose, measure_side_by_side, plot_sweep,
                                                 relative_costs, saving_gap, time_split, with_side_by_side_costs)
from filtersurgery.ops.branched import BranchedNet
from filtersurgery.ops.sharing import (branch_state_dict, is_pinned, load_branch, max_prob_combine, plan_share, share,
                                      share_plan)
from filtersurgery.report.cost import training_cost
from filtersurgery.engine.run import evaluate

X = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(0))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _base(n=4):
    torch.manual_seed(0)
    m = cifar_resnet(8, num_classes=n, in_chans=1)
    # non-trivial BN statistics, as after training
    m.train()
    with torch.no_grad():
        for _ in range(2):
            m(torch.randn(8, 1, 16, 16))
    return m.eval()


def _train(branch, steps=4, n_out=3):
    opt = torch.optim.SGD([p for p in branch.parameters() if p.requires_grad], lr=0.1, momentum=0.9, weight_decay=5e-4)
    branch.train()
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(8, 1, 16, 16, generator=g)
        y = torch.randint(0, n_out, (8,), generator=g)
        loss = nn.functional.cross_entropy(branch(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return branch


class Reversed(nn.Module):
    """Modules registered in the opposite order of their use."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)

    def forward(self, x):
        return self.head(self.c3(self.c2(self.c1(x))).mean((2, 3)))


def test_plan_follows_forward_order_and_fraction():
    m = Reversed()
    p = plan_share(m, 0.5, torch.zeros(1, 1, 8, 8))
    assert p.layers == ["c1", "c2", "c3"] and p.classifier == "head"
    sizes = [40, 296, 584]  # weights + biases
    assert p.n_shared_layers == 2 and p.shared_params == 336 and p.cut == "c3"
    assert p.shared_fraction == pytest.approx(336 / sum(sizes))
    assert plan_share(m, 0.0, torch.zeros(1, 1, 8, 8)).n_shared_layers == 0
    full = plan_share(m, 1.0, torch.zeros(1, 1, 8, 8))
    assert full.n_shared_layers == 3 and full.cut == "head" and "head" not in full.frozen


def test_share_freezes_prefix_and_leaves_model_untouched():
    base = _base()
    base.train()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    br = share(base, 0.5, num_classes=3, example_inputs=X[:1])
    assert base.training and all(m.training for m in base.modules())  # modes restored exactly
    assert all(p.requires_grad for p in base.parameters()) and not any(is_pinned(m) for m in base.modules())
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    plan = share_plan(br)
    assert plan.shared[:2] == ["stem", "layer1"] and 0 < plan.shared_fraction <= 0.5
    mods = dict(br.named_modules())
    frozen = {id(p) for n in plan.frozen for p in mods[n].parameters(recurse=False)}
    for p in br.parameters():
        assert p.requires_grad == (id(p) not in frozen)
    assert br.fc.out_features == 3 and br.fc.weight.requires_grad
    with pytest.raises(ValueError, match="share"):
        share(base, 1.5)
    with pytest.raises(ValueError, match="num_classes"):
        share(base, 0.5, num_classes=0)


def test_frozen_params_and_bn_buffers_bit_identical_after_branch_training():
    base = _base()
    br = share(base, 0.6, num_classes=3, example_inputs=X[:1])
    plan = share_plan(br)
    trainable_bn = [n for n, m in br.named_modules() if isinstance(m, nn.BatchNorm2d) and n not in plan.pinned]
    rm_before = br.get_submodule(trainable_bn[0]).running_mean.clone()
    _train(br)
    assert br.training
    b_mods, base_mods = dict(br.named_modules()), dict(base.named_modules())
    n_checked = 0
    for n in plan.frozen:
        own = list(b_mods[n].parameters(recurse=False)) + list(b_mods[n].buffers(recurse=False))
        ref = list(base_mods[n].parameters(recurse=False)) + list(base_mods[n].buffers(recurse=False))
        for a, b in zip(own, ref):
            assert torch.equal(a, b), n
            n_checked += 1
    assert n_checked > 10
    for n in plan.pinned:  # kept in eval although the branch is in train mode
        assert not b_mods[n].training
    assert br.get_submodule(trainable_bn[0]).training
    assert not torch.equal(br.get_submodule(trainable_bn[0]).running_mean, rm_before)  # trainable BN did update
    last_conv = plan.layers[-1]
    assert not torch.equal(b_mods[last_conv].weight, base_mods[last_conv].weight)


def test_pins_follow_train_eval_and_evaluate_restores_modes():
    base = _base()
    br = share(base, 0.5, num_classes=3, example_inputs=X[:1])
    plan = share_plan(br)
    br.train()
    assert not br.get_submodule(plan.pinned[0]).training and br.fc.training
    br.eval()
    assert not any(m.training for m in br.modules())
    br.train()
    assert br.fc.training and not br.get_submodule(plan.pinned[0]).training


def test_old_classes_unchanged_by_adding_a_branch():
    base = _base()
    x, y = (X * 40 + 128).clamp(0, 255).to(torch.uint8), torch.tensor([0, 1, 2, 3, 0, 1])
    data = argparse.Namespace(mean=[0.0], std=[1.0])
    net = BranchedNet(base, [0, 1, 2, 3]).eval()
    before = net.branch_outputs(X)[0].clone()
    acc_before = evaluate(net.trunk, x, y, data, torch.device("cpu"))
    br = _train(share(base, 0.6, num_classes=3, example_inputs=X[:1]))
    net.add_branch(br, [4, 5, 6]).eval()
    outs = net.branch_outputs(X)
    assert torch.equal(outs[0], before)
    assert torch.equal(outs[0], base(X))  # the user's base network: unchanged too
    assert evaluate(net.trunk, x, y, data, torch.device("cpu")) == acc_before
    # the all-class output restricted to the old classes is the old branch's softmax
    assert torch.allclose(net(X)[:, :4], torch.log_softmax(before, 1), atol=1e-6)


def test_max_prob_combination_hand_built():
    a = torch.tensor([[10.0, 9.0], [3.0, -3.0]])  # softmax row 0: .731/.269, row 1: .998/.002
    b = torch.tensor([[5.0, 0.0], [0.0, 0.0]])  # softmax row 0: .993/.007, row 1: .5/.5
    out = max_prob_combine([a, b], [[0, 1], [2, 3]])
    # row 0: the largest logit (10, class 0) loses to the largest probability (.993, class 2)
    assert out.argmax(1).tolist() == [2, 0]
    assert torch.allclose(out.exp()[0], torch.tensor([0.7311, 0.2689, 0.9933, 0.0067]), atol=1e-4)
    # non-contiguous class ids, a class no branch covers
    out = max_prob_combine([a, b], [[3, 1], [0, 4]], num_classes=6)
    assert out.argmax(1).tolist() == [0, 3] and torch.isinf(out[:, [2, 5]]).all()
    with pytest.raises(ValueError, match="class_sets"):
        max_prob_combine([a, b], [[0, 1], [1, 2]])


def test_trunk_computed_once_and_outputs_match_separate_networks():
    base = _base()
    b1 = _train(share(base, 0.5, num_classes=3, example_inputs=X[:1]))
    b2 = _train(share(base, 0.8, num_classes=2, example_inputs=X[:1]), n_out=2)
    net = BranchedNet(base, [0, 1, 2, 3]).add_branch(b1, [4, 5, 6]).add_branch(b2, [7, 8]).eval()
    calls = {"stem.0": 0, "layer2.0.conv1": 0}  # convs inside shared modules: count their computations
    for n in calls:
        net.trunk.get_submodule(n).register_forward_hook(lambda m, a, o, n=n: calls.__setitem__(n, calls[n] + 1))
    with torch.no_grad():
        outs = net.branch_outputs(X)
    assert calls == {"stem.0": 1, "layer2.0.conv1": 1}
    for o, m in zip(outs, (base, b1, b2)):
        m.eval()
        assert torch.allclose(o, m(X), atol=1e-6)
    assert net(X).shape == (6, 9) and net.predict(X).max() <= 8
    # the trunk is held once: parameters count it once
    n_own = sum(len(branch_state_dict(b)) for b in (b1, b2))
    assert n_own > 0
    stored = sum(p.numel() for p in net.parameters())
    assert stored < 3 * sum(p.numel() for p in base.parameters())
    assert not any(p.requires_grad for p in net.parameters())


def test_add_branch_checks_shared_part_and_classes():
    base = _base()
    br = share(base, 0.5, num_classes=3, example_inputs=X[:1])
    with torch.no_grad():
        br.stem[0].weight.add_(1e-3)
    net = BranchedNet(base, [0, 1, 2, 3])
    with pytest.raises(ValueError, match="differs from the trunk"):
        net.add_branch(br, [4, 5, 6])
    ok = share(base, 0.5, num_classes=3, example_inputs=X[:1])
    with pytest.raises(ValueError, match="classes"):
        net.add_branch(ok, [3, 4, 5])  # 3 belongs to the base
    with pytest.raises(ValueError, match="outputs"):
        net.add_branch(ok, [4, 5])
    with pytest.raises(ValueError, match="share"):
        net.add_branch(base, [4, 5, 6, 7])


def test_branch_state_dict_roundtrip():
    base = _base()
    br = _train(share(base, 0.5, num_classes=3, example_inputs=X[:1])).eval()
    sd = branch_state_dict(br)
    assert not any(k.startswith(("stem.", "layer1.")) for k in sd) and "fc.weight" in sd
    again = load_branch(base, sd, 0.5, num_classes=3, example_inputs=X[:1]).eval()
    assert torch.equal(again(X), br(X))
    with pytest.raises(ValueError, match="missing"):  # a branch sharing less needs more of its own tensors
        load_branch(base, sd, 0.0, num_classes=3, example_inputs=X[:1])
    unshared = branch_state_dict(share(base, 0.0, num_classes=3, example_inputs=X[:1]))
    with pytest.raises(ValueError, match="unexpected"):  # never overwrite what the base shares
        load_branch(base, unshared, 0.5, num_classes=3, example_inputs=X[:1])


def test_training_cost_counts_frozen_layers_without_weight_gradients():
    base = _base()
    x = torch.randn(4, 1, 16, 16)
    full = training_cost(share(base, 0.0, 3, X[:1]), x, measure=False)
    half = training_cost(share(base, 0.5, 3, X[:1]), x, measure=False)
    head_only = training_cost(share(base, 1.0, 3, X[:1]), x, measure=False)
    assert full.forward_macs == half.forward_macs == head_only.forward_macs
    assert full.backward_macs > half.backward_macs > head_only.backward_macs
    assert head_only.backward_macs == 4 * 64 * 3  # the classifier's weight gradient only
    assert 1.9 < full.backward_macs / full.forward_macs < 2.1  # grad input + grad weight ~ 2x forward
    assert head_only.trainable_params == 64 * 3 + 3 < half.trainable_params < full.trainable_params
    measured = training_cost(share(base, 0.5, 3, X[:1]), x, iters=2, warmup=1)
    assert measured.sec_per_iter > 0 and (measured.peak_mem_mb is None or measured.peak_mem_mb > 0)


def test_training_cost_of_a_model_whose_last_map_is_1x1():
    """The output width is read in eval mode: a train-mode BatchNorm on a 1x1 map of one
    image raised "Expected more than 1 value per channel when training"."""
    from filtersurgery.models.cifar_resnet import cifar_resnet

    torch.manual_seed(0)
    base = cifar_resnet(8, num_classes=4, in_chans=1)  # 4x4 input -> layer3 runs on 1x1 maps
    x = torch.randn(2, 1, 4, 4)
    base.train()
    cost = training_cost(base, x, measure=False)  # num_classes not given: probed with one image
    assert cost.forward_macs > 0 and cost.backward_macs > 0
    assert base.training and all(m.training for m in base.modules())  # the model's modes are untouched
    br = share(base, 0.5, num_classes=3, example_inputs=x[:1])
    assert training_cost(br, x, iters=1, warmup=0).sec_per_iter > 0


def test_class_sets_and_subsets():
    assert class_sets_from("4,3,3", 10) == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert class_sets_from(None, 100)[0] == list(range(40))
    for bad in ("4,3,4", "10", "a,b", "0,3"):
        with pytest.raises(ValueError, match="class_sets"):
            class_sets_from(bad, 10)
    d = load_dataset("demo", subset_test=100)
    sub = class_subset(d, [4, 5, 6], remap=True)
    assert sub.num_classes == 3 and set(sub.train_y.tolist()) == {0, 1, 2} and sub.mean == d.mean
    assert set(class_subset(d, [4, 5, 6], remap=False).test_y.tolist()) == {4, 5, 6}


def test_choose_largest_share_within_drop():
    rows = [{"share": 0.0, "shared_fraction": 0.0, "val_acc": 80.0}, {"share": 0.5, "shared_fraction": 0.45, "val_acc": 79.5},
            {"share": 0.8, "shared_fraction": 0.75, "val_acc": 79.2}, {"share": 0.9, "shared_fraction": 0.85, "val_acc": 70.0}]
    assert choose(rows, 1.0)["share"] == 0.8
    assert choose(rows, 0.1)["share"] == 0.0
    assert choose(rows, 20)["share"] == 0.9


def _cost_rows():
    """Sweep rows as ``sweep_sharing`` writes them (shares 0.9 and 0.99 trained once, as 0.9)."""
    base = {"val_acc": 80.0, "test_acc": 79.0, "stored_params": 300}
    return [{**base, "share": 0.0, "shared_fraction": 0.0, "trained_as": 0.0, "train_macs_per_iter": 1000,
             "sec_per_iter": 2.0, "peak_mem_mb": 100.0, "trainable_params": 100},
            {**base, "share": 0.5, "shared_fraction": 0.45, "trained_as": 0.5, "val_acc": 79.0,
             "train_macs_per_iter": 500, "sec_per_iter": 1.2, "peak_mem_mb": None, "trainable_params": 50},
            {**base, "share": 0.9, "shared_fraction": 0.85, "trained_as": 0.9, "val_acc": 70.0,
             "train_macs_per_iter": 400, "sec_per_iter": 0.6, "peak_mem_mb": 40.0, "trainable_params": 10},
            {**base, "share": 0.99, "shared_fraction": 0.85, "trained_as": 0.9, "val_acc": 70.0,
             "train_macs_per_iter": 400, "sec_per_iter": 0.6, "peak_mem_mb": 40.0, "trainable_params": 10}]


def test_relative_costs_are_ratios_to_share_zero():
    rows = relative_costs(_cost_rows())
    assert [r["train_macs_rel"] for r in rows] == [1.0, 0.5, 0.4, 0.4]
    assert [r["sec_per_iter_rel"] for r in rows] == [1.0, 0.6, 0.3, 0.3]
    assert [r["peak_mem_rel"] for r in rows] == [1.0, None, 0.4, 0.4]  # not measured: no ratio
    assert rows[2]["trainable_rel"] == 0.1 and rows[2]["stored_rel"] == 1.0
    with pytest.raises(ValueError, match="rows"):
        relative_costs(_cost_rows()[1:])


def test_side_by_side_costs_replace_per_run_ones_by_trained_as():
    rows = _cost_rows()
    m = {0.0: {"train_macs_per_iter": 1000, "trainable_params": 100, "sec_per_iter": 1.0, "peak_mem_mb": 50.0},
         0.5: {"train_macs_per_iter": 500, "trainable_params": 50, "sec_per_iter": 0.5, "peak_mem_mb": 20.0},
         0.9: {"train_macs_per_iter": 400, "trainable_params": 10, "sec_per_iter": 0.25, "peak_mem_mb": 10.0}}
    side = with_side_by_side_costs(rows, m)
    assert [r["sec_per_iter"] for r in side] == [1.0, 0.5, 0.25, 0.25]  # 0.99 gets 0.9's measurement
    assert [r["sec_per_iter_rel"] for r in side] == [1.0, 0.5, 0.25, 0.25]
    assert [r["peak_mem_rel"] for r in side] == [1.0, 0.4, 0.2, 0.2]
    assert rows[0]["sec_per_iter"] == 2.0 and "sec_per_iter_rel" not in rows[0]  # the input rows are untouched
    with pytest.raises(ValueError, match="measured"):
        with_side_by_side_costs(rows, {0.0: m[0.0]})


def test_best_per_cost_and_saving_gap():
    rows = relative_costs(_cost_rows())
    # val acc / relative MACs: 80, 158, 175, 175 -> 0.9 (the tie with 0.99 goes to the smaller share)
    assert best_per_cost(rows)["share"] == 0.9
    assert best_per_cost(rows, acc_key="test_acc", cost_key="sec_per_iter_rel")["share"] == 0.9
    rows[2]["train_macs_rel"] = rows[3]["train_macs_rel"] = 0.5
    assert best_per_cost(rows)["share"] == 0.5  # 79 / 0.5 > 70 / 0.5
    with pytest.raises(ValueError, match="cost_key"):
        best_per_cost(rows, cost_key="nothing")
    g = saving_gap(relative_costs(_cost_rows())[1])
    assert g == {"share": 0.5, "mac_saving": 50.0, "time_saving": 40.0, "mem_saving": None, "gap": 10.0}
    g = saving_gap(relative_costs(_cost_rows())[2])
    assert g["mac_saving"] == 60.0 and g["time_saving"] == 70.0 and g["gap"] == -10.0 and g["mem_saving"] == 60.0
    with pytest.raises(ValueError, match="row"):
        saving_gap(_cost_rows()[1])


def test_time_split_against_share_zero():
    m = {0.0: {"fwd_sec_per_iter": 1.0, "sec_per_iter": 3.0, "forward_macs_per_iter": 100, "train_macs_per_iter": 300},
         0.5: {"fwd_sec_per_iter": 0.5, "sec_per_iter": 1.5, "forward_macs_per_iter": 100, "train_macs_per_iter": 150}}
    sp = time_split(m)
    assert sp[0.0] == {"fwd_time_rel": 1.0, "fwd_macs_rel": 1.0, "bwd_time_rel": 1.0, "bwd_macs_rel": 1.0}
    assert sp[0.5] == {"fwd_time_rel": 0.5, "fwd_macs_rel": 1.0, "bwd_time_rel": 0.5, "bwd_macs_rel": 0.25}
    with pytest.raises(ValueError, match="measured"):
        time_split({0.5: m[0.5]})


def test_measure_side_by_side_and_cost_plot(tmp_path):
    base = _base()
    x = torch.randn(4, 1, 16, 16)
    m = measure_side_by_side(base, [0.0, 0.5, 1.0], x, 3, rounds=2, iters=1, warmup=0)
    assert list(m) == [0.0, 0.5, 1.0]
    assert m[0.0]["train_macs_per_iter"] > m[0.5]["train_macs_per_iter"] > m[1.0]["train_macs_per_iter"]
    assert m[0.0]["forward_macs_per_iter"] == m[1.0]["forward_macs_per_iter"]
    for v in m.values():
        assert len(v["sec_per_iter_rounds"]) == len(v["fwd_sec_per_iter_rounds"]) == 2
        assert v["sec_per_iter"] > 0 and 0 < v["fwd_sec_per_iter"]
    assert all(not mod.training for mod in base.modules())  # the base is untouched (eval mode)
    assert training_cost(base, x, iters=1, warmup=0, memory=False).peak_mem_mb is None
    rows = with_side_by_side_costs([{"share": s, "shared_fraction": s, "trained_as": s, "val_acc": 50.0,
                                     "test_acc": 49.0, "stored_params": 1, "chosen": int(s == 0.5)} for s in m], m)
    assert (plot_sweep(rows, tmp_path / "claim.png")).stat().st_size > 1000
    with pytest.raises(ValueError, match="rounds"):
        measure_side_by_side(base, [0.0], x, 3, rounds=0)


TINY = ["--data", "demo", "--model", "cifar:resnet8", "--class-sets", "4,3,3", "--epochs", "1", "--subset", "32",
        "--batch-size", "16", "--max-batches", "1", "--device", "cpu", "--no-progress"]


def test_cli_sharing_and_class_finetune_tiny(tmp_path):
    from filtersurgery.cli.main import main

    out = tmp_path / "sh"
    assert main(["run", "--method", "sharing", "--share", "0.8", "--out", str(out)] + TINY) == 0
    m = json.loads((out / "seed0" / "metrics.json").read_text())
    e = m["steps"][0]
    assert len(m["steps"]) == 1 and 0 <= e["test_acc"] <= 100 and e["shared_fraction"] <= 0.8
    assert [r["classes"] for r in m["per_set"]] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert all({"test_acc", "test_acc_all", "val_acc"} <= set(r) for r in m["per_set"])
    assert m["cost"]["train_macs_per_iter"] < m["cost"]["base_train_macs_per_iter"]
    assert m["config"]["share"] == 0.8 and m["config"]["class_sets"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    for k in (1, 2, 3):
        assert (out / "seed0" / f"step{k}.safetensors").exists()
    sd2 = checkpoint.load_state_dict(out / "seed0" / "step2.safetensors")
    assert "fc.weight" in sd2 and not any(k.startswith("stem.") for k in sd2)  # only the branch's own tensors
    rows = (out / "seed0" / "epochs.csv").read_text()
    assert main(["run", "--method", "sharing", "--share", "0.8", "--out", str(out)] + TINY) == 0  # resumes: no training
    assert (out / "seed0" / "epochs.csv").read_text() == rows
    assert main(["run", "--method", "sharing", "--share", "0.5", "--out", str(out)] + TINY) == 2  # other settings: refused
    out2 = tmp_path / "ft"
    assert main(["run", "--method", "class-finetune", "--out", str(out2)] + TINY) == 0
    m2 = json.loads((out2 / "seed0" / "metrics.json").read_text())
    assert len(m2["per_set"]) == 3 and "test_acc" in m2["steps"][0]


def test_sweep_sharing_cli_tiny(tmp_path):
    parser = argparse.ArgumentParser()
    add_parsers(parser.add_subparsers(dest="command"))
    out = tmp_path / "sweep"
    args = parser.parse_args(["sweep-sharing", "--shares", "0.5,1", "--test-subset", "100", "--out", str(out)] + TINY)
    assert args.func(args) == 0
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert [float(r["share"]) for r in rows] == [0.0, 0.5, 1.0]  # 0 (no sharing) always included
    assert sum(int(r["chosen"]) for r in rows) == 1
    assert float(rows[2]["train_macs_rel"]) < float(rows[1]["train_macs_rel"]) < 1.0
    assert int(rows[2]["trainable_params"]) < int(rows[0]["trainable_params"])
    assert int(rows[2]["stored_params"]) < int(rows[0]["stored_params"])
    assert (out / "sweep.png").stat().st_size > 1000
    res = json.loads((out / "sweep.json").read_text())
    assert res["chosen_share"] == choose(res["rows"], 1.0)["share"]
    # the base network is trained once and reused
    b0 = checkpoint.load_state_dict(out / "share0.00" / "seed0" / "step1.safetensors")
    b1 = checkpoint.load_state_dict(out / "share0.50" / "seed0" / "step1.safetensors")
    assert all(torch.equal(b0[k], b1[k]) for k in b0)


def test_timm_model_branch_matches_and_shares_trunk():
    from filtersurgery.models.factory import build_model

    torch.manual_seed(0)
    base, _ = build_model("timm:resnet10t", num_classes=4, in_chans=1)
    base.eval()
    x = torch.randn(2, 1, 32, 32)
    br = share(base, 0.5, num_classes=3, example_inputs=x[:1])
    plan = share_plan(br)
    assert plan.layers[0] == "conv1.0" and plan.classifier == "fc" and "layer1" in plan.shared
    with torch.no_grad():
        br.fc.weight.normal_()
    net = BranchedNet(base, [0, 1, 2, 3]).add_branch(br, [4, 5, 6]).eval()
    with torch.no_grad():
        outs = net.branch_outputs(x)
        assert torch.allclose(outs[0], base(x), atol=1e-5) and torch.allclose(outs[1], br.eval()(x), atol=1e-5)
