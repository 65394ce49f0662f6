"""What a new user meets in the first hour: the ``run`` banner and estimate, resume and
Ctrl-C messages, data refused or resized with a message, close-match model names, short
reprs, help on every flag, ``inspect --json`` totals, no leftover ``.work/`` folders."""
import json
import re
import warnings

import numpy as np
import pytest
import torch

from conftest import run_cli, subcommands, tiny_run_args

import filtersurgery as fs
from filtersurgery import train
from filtersurgery.cli import console
from filtersurgery.engine import trainer
from filtersurgery.data import datasets as data
from filtersurgery.data import imagefolder, images
from filtersurgery.models.cifar_resnet import cifar_resnet
from filtersurgery.models.factory import build_model

torch.set_num_threads(1)


def run_args(out, *extra, epochs="2"):
    return tiny_run_args(out, *extra, epochs=epochs)


cli = run_cli


# ------------------------------------------------------------------ banner, estimate, resume, Ctrl-C
def test_run_banner_estimate_and_already_complete(tmp_path, capsys):
    out = tmp_path / "o"
    rc, stdout, _ = cli(run_args(out, "--steps", "2", "--method", "finetune", epochs="1"), capsys)
    assert rc == 0
    head = stdout.splitlines()
    assert head[0] == "filtersurgery run: method finetune, model cifar:resnet20, seeds 0"
    text = "\n".join(head[:10])
    assert "device   cpu (amp none)" in text
    assert "data     fashion-mnist-demo from " in text and "6000 train / 1000 test images" in text
    assert "images   per part: 8 train + 1 val (--subset 8)" in text
    assert "batches  1 per epoch (batch size 4, capped by --max-batches 1)" in text
    assert "epochs   1 per phase; 2 step(s): scratch | finetune" in text
    assert f"output   {out}" in text
    assert re.search(r"estimate about \d+ (s|min) \(.* s per batch of 4 timed on cpu", text), text
    assert "resuming" not in stdout and "already complete" not in stdout  # a fresh run says neither
    assert not (out / "seed0" / ".work").exists()  # no empty .work/ left behind

    rc, stdout, _ = cli(run_args(out, "--steps", "2", "--method", "finetune", epochs="1"), capsys)
    assert rc == 0
    assert "estimate nothing left to train" in stdout
    assert f"seed 0: already complete ({out / 'seed0' / 'metrics.json'})" in stdout
    assert re.search(r"seed 0 step 2: .*\(\d+s, earlier run\)", stdout)


def test_ctrl_c_prints_one_line_and_rerun_says_where_it_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    real = trainer.Run.log_epoch

    def log_then_interrupt(self, row):  # Ctrl-C right after the first epoch's state is saved
        real(self, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Run, "log_epoch", log_then_interrupt)
    rc, _, err = cli(run_args(out), capsys)
    lines = err.strip().splitlines()
    assert rc == 130 and len(lines) == 1, lines
    assert lines[0] == (f"filtersurgery run: interrupted; finished epochs and steps are saved in {out / 'seed0'} "
                        f"(resume state in {out / 'seed0' / '.work'}); run the same command again to resume")
    assert train.resume_point(out / "seed0") == {"step": 1, "phase": "scratch", "epoch": 1}

    monkeypatch.setattr(trainer.Run, "log_epoch", real)
    rc, stdout, _ = cli(run_args(out), capsys)
    assert rc == 0
    assert "seed 0: resuming at step 1 (scratch), epoch 2 of 2" in stdout
    assert re.search(r"estimate about \d+ (s|min) left", stdout)
    rows = (out / "seed0" / "epochs.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:3] for r in rows[:2]] == [["1", "scratch", "1"], ["1", "scratch", "2"]]


def test_resume_point_after_finished_steps(tmp_path):
    cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=3, method="finetune", epochs=1, subset=8,
                            batch_size=4, max_batches=1, device="cpu", progress=False)
    d = data.load_dataset("demo")
    train.multi_step(cfg, tmp_path, seed=0, data=d, until_step=1)
    plan = console.plan_run(cfg, d)
    r = console.find_resume(tmp_path, cfg)
    assert r.done_steps == [1] and not r.complete and r.state is None
    assert console.resume_line(0, tmp_path, r, plan) == "seed 0: resuming at step 2 (finetune), epoch 1 of 1 (steps 1 done earlier)"
    assert console.estimate_seconds(plan, 1.0, cfg, 1000, skip=r) < console.estimate_seconds(plan, 1.0, cfg, 1000)
    assert console.resume_line(0, tmp_path / "new", console.find_resume(tmp_path / "new", cfg), plan) is None


def test_plan_and_estimate_count_phase_costs():
    cfg = train.TrainConfig(method="framework", steps=3, epochs=2, subset=100, batch_size=10)
    d = data.load_dataset("demo")
    plan = console.plan_run(cfg, d)
    assert [(p.step, p.name) for p in plan] == [(1, "scratch"), (2, "sst"), (2, "aod"), (3, "sst"), (3, "aod")]
    assert all(p.train_images == 100 and p.batches == 10 for p in plan)
    factors = {p.kind: p.factor for p in plan}
    assert factors["scratch"] == 1 and factors["aod"] == 4 and factors["sst_msl"] == pytest.approx(4 / 3)
    assert [p.kind for p in plan if p.name == "sst"] == ["sst_msl", "sst_msl"]  # step 2's SST too: msl_step2
    # 1 s per batch: 2 epochs x 10 batches x (1 + 4/3 + 4 + 4/3 + 4), plus validation and test passes
    sec = console.estimate_seconds(plan, 1.0, cfg, n_test=0)
    assert 20 * (9 + 8 / 3) <= sec < 20 * (9 + 8 / 3) + 10
    assert console.format_duration(40) == "40 s" and console.format_duration(600) == "10 min"
    assert console.format_duration(3 * 3600) == "3.0 h"


def test_estimate_keeps_the_random_streams():
    cfg = train.TrainConfig(model="cifar:resnet20", batch_size=4)
    d = data.load_dataset("demo")
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sec = console.timed_batch(cfg, d, torch.device("cpu"), None)
    assert sec > 0 and torch.equal(torch.rand(3), expected)


def test_progress_bars_name_the_method(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(trainer, "_progress", lambda it, desc, total, enable: seen.append(desc) or it)
    cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=2, method="finetune", epochs=1, subset=8,
                            batch_size=4, max_batches=1, device="cpu")
    train.multi_step(cfg, tmp_path, seed=0, data=data.load_dataset("demo"))
    assert seen == ["finetune seed0 step1 scratch ep1/1", "finetune seed0 step2 finetune ep1/1"]


# ------------------------------------------------------------------ data
def _folder(root, classes=("cat", "dog"), size=(12, 12), n=3, sizes=None):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for ci, c in enumerate(classes):
            d = root / split / c
            d.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[(i + ci) % len(sizes)] if sizes else size
                Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def test_one_class_image_folder_is_refused(tmp_path, capsys):
    root = _folder(tmp_path / "one", classes=("only",))
    with pytest.raises(ValueError, match=r"^data: image folder .*train has 1 class folder\(s\) \(only\); a classifier "
                                         r"needs at least 2 classes"):
        data.load_dataset(f"imagefolder:{root}")
    rc, _, err = cli(run_args(tmp_path / "o", "--data", f"imagefolder:{root}"), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "at least 2 classes" in err
    assert not (tmp_path / "o").exists()


def test_data_with_one_class_of_training_images_is_refused():
    x = torch.zeros(4, 1, 4, 4, dtype=torch.uint8)
    one = data.ImageData(x, torch.zeros(4, dtype=torch.int64), x, torch.zeros(4, dtype=torch.int64), 2, 1, 4,
                         [0.5], [0.2], "toy")
    with pytest.raises(ValueError, match=r"^data: toy has 1 class\(es\) with training images"):
        images.check_classes(one)


def test_missing_image_folder_does_not_exist(tmp_path, capsys):
    rc, _, err = cli(run_args(tmp_path / "o", "--data", f"imagefolder:{tmp_path}/nowhere"), capsys)
    assert rc == 2 and re.search(r"error: data: image folder .*nowhere does not exist", err), err


def test_image_size_defaults_to_the_images_own_size(tmp_path):
    root = _folder(tmp_path / "f", size=(12, 12))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no resizing, no warning
        d = data.load_dataset(f"imagefolder:{root}")
    assert d.size == 12 and d.in_chans == 1 and tuple(d.train_x.shape) == (6, 1, 12, 12)
    with pytest.warns(UserWarning, match=r"resizing 12 of 12 images to 8x8 .*the images are 12x12"):
        d8 = data.load_dataset(f"imagefolder:{root}", image_size=8)
    assert d8.size == 8


def test_mixed_image_sizes_are_resized_to_224_with_a_warning(tmp_path):
    root = _folder(tmp_path / "f", sizes=((12, 9), (7, 16)), n=2)
    sizes = imagefolder._image_sizes([str(p) for p in sorted(root.rglob("*.png"))])
    assert imagefolder.output_size(sizes, None)[0] == imagefolder.DEFAULT_IMAGE_SIZE
    assert "the images have 2 different sizes" in imagefolder.output_size(sizes, None)[1]
    assert imagefolder.output_size([(12, 9)] * 3, None) == (9, "")  # one shared non-square size: cropped, not resized
    with pytest.raises(ValueError, match=r"^image_size: must be an integer >= 1"):
        imagefolder.output_size(sizes, 0)


def test_run_image_size_flag(tmp_path, capsys):
    root = _folder(tmp_path / "f", size=(12, 12), n=6)
    out = tmp_path / "o"
    rc, stdout, err = cli(["run", "--model", "cifar:resnet20", "--data", f"imagefolder:{root}", "--image-size", "8",
                           "--steps", "2", "--method", "finetune", "--epochs", "1", "--batch-size", "4",
                           "--max-batches", "1", "--device", "cpu", "--no-progress", "--out", out], capsys)
    assert rc == 0, err
    assert "1x8x8" in stdout
    warned = [line for line in err.splitlines() if "warning" in line]
    assert warned == [f"filtersurgery run: warning: image folder: resizing 24 of 24 images to 8x8 (shorter side, "
                      f"bilinear, then centre crop; the images are 12x12); set the size with --image-size / image_size="]
    rc, _, err = cli(run_args(tmp_path / "o2", "--image-size", "8"), capsys)
    assert rc == 2 and "image_size: only image folders are resized" in err


# ------------------------------------------------------------------ model names
@pytest.mark.parametrize("spec,hint", [
    ("timm:efficentnet_b0", "did you mean timm:efficientnet_b0"),
    ("efficentnet_b0", "did you mean timm:efficientnet_b0"),
    ("torchvision:resnt50", "did you mean torchvision:resnet50"),
    ("timm:convnext_tinny", "did you mean timm:convnext_tiny"),
    ("torchvision:resnet10t", "'resnet10t' is a timm model: use timm:resnet10t"),
    ("timm:zzzzqqq", "no close match"),
])
def test_unknown_model_names_get_close_matches(spec, hint):
    with pytest.raises(ValueError) as e:
        build_model(spec)
    msg = str(e.value)
    assert msg.startswith("spec: unknown ") and hint in msg and "\n" not in msg
    assert "'*resnet*'" not in msg


# ------------------------------------------------------------------ reprs
def _reports():
    torch.manual_seed(0)
    m = cifar_resnet(20, num_classes=10, in_chans=3)
    sm = fs.trace(m)
    x = torch.randn(2, 3, 8, 8)
    br = fs.sharing.share(m, 0.5, num_classes=3, example_inputs=x[:1])
    from filtersurgery.ops.sharing import share_plan
    from filtersurgery.report.cost import training_cost
    from filtersurgery.tracing.verify import verify

    return {
        "RescaleReport": fs.rescale(m, generator=torch.Generator().manual_seed(0)),
        "FilterRanking": fs.rank_filters(m),
        "ReactivationReport": fs.reactivation.reactivate_kernels(m),
        "EvolutionReport": fs.reactivation.evolve_weights(m),
        "GraftReport": fs.reactivation.graft(m, cifar_resnet(20, num_classes=10, in_chans=3)),
        "SharePlan": share_plan(br),
        "TrainingCost": training_cost(br, x, measure=False),
        "VerifyResult": verify(sm, (3, 8, 8), filters_per_conv=1),
        "FactorView": sm.factors,
        "ScalingMap": sm,
        "Sparsifier": fs.sparsify(m),
        "ImageData": data.load_dataset("demo"),
        "PlannedPhase": console.plan_run(train.TrainConfig(), data.load_dataset("demo"))[0],
    }


def test_every_report_has_a_short_one_line_repr():
    for name, obj in _reports().items():
        text = repr(obj)
        assert type(obj).__name__ == name
        assert text.startswith(name + "(") and "\n" not in text and len(text) < 200, (name, len(text), text[:300])


# ------------------------------------------------------------------ help, inspect
_subcommands = subcommands


def test_every_flag_of_every_subcommand_has_help():
    missing = [f"{cmd} {a.option_strings or a.dest}" for cmd, p in _subcommands().items() for a in p._actions
               if a.dest != "help" and not (a.help or "").strip()]
    assert not missing, missing


def test_run_help_names_cifar_models_and_true_lr_defaults():
    p = _subcommands()["run"]
    helps = {a.dest: a.help for a in p._actions}
    assert "cifar:resnetDEPTH" in helps["model"]
    assert "default 1e-3" in helps["lr"] and "plain" in helps["lr"] and "training lr (default 0.1)" in helps["lr"]
    from filtersurgery.methods.reactivation import method_phase, ReactivationMethodConfig

    assert method_phase(train.TrainConfig(method="plain"), ReactivationMethodConfig()).lr == 0.1
    assert train.TrainConfig().new_lr == 1e-3


def test_inspect_json_has_input_size_and_totals(capsys):
    rc, out, _ = cli(["inspect", "cifar:resnet20", "--input-size", "3", "16", "16", "--json"], capsys)
    obj = json.loads(out)
    assert rc == 0 and obj["input_size"] == [3, 16, 16]
    assert obj["totals"] == {"convs": 21, "mapped": 21, "unscaled": 0, "scaling_factors": 784}
    assert len(obj["convs"]) == obj["totals"]["convs"]


def test_inspect_input_size_errors_name_the_flag(capsys):
    rc, _, err = cli(["inspect", "cifar:resnet20", "--input-size", "1", "32", "32"], capsys)
    assert rc == 2 and "error: input_size (--input-size): expected shape (N, 3, H, W)" in err
    assert "example_inputs" not in err


@pytest.mark.slow  # end-to-end
def test_demo_trains_step1_once_prints_steps_as_they_finish_and_a_verdict(tmp_path, capsys):
    from filtersurgery.cli.main import main as cli_main

    out = tmp_path / "demo"
    assert cli_main(["demo", "--steps", "3", "--subset", "64", "--epochs", "1", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("filtersurgery demo: fine-tuning (lr 1e-2) vs the framework, model cifar:resnet8")
    for line in ("  device ", "  data ", "  images   per part: 64 train", "  batches ", "  epochs ", "  output ",
                 "  estimate about "):
        assert line in text
    assert text.count("step 1 (shared): test ") == 1
    for name in ("finetune (lr 1e-2)", "framework"):
        assert all(f"{name} step {k}: test " in text for k in (2, 3))
    assert "At Data3 the framework is " in text and "training FLOPs" in text
    scratch = [p for p in out.rglob("epochs.csv") if ",scratch," in p.read_text()]
    assert [p.parent.parent.name for p in scratch] == ["step1"]  # step 1 trained once, then shared


def test_demo_sentence_says_who_is_ahead(tmp_path):
    from filtersurgery.cli.run import demo_sentence

    def res(ft, fw):
        return {"finetune (lr 1e-2)": [{"step": 4, "test_acc": ft}], "framework": [{"step": 4, "test_acc": fw}]}

    flops = {"finetune (lr 1e-2)": 1.0, "framework": 5.0}
    assert "framework is behind fine-tuning by 2.00 points" in demo_sentence(res(80.0, 78.0), flops, tmp_path)
    assert "framework is ahead of fine-tuning by 1.50 points" in demo_sentence(res(80.0, 81.5), flops, tmp_path)
    assert "level with" in demo_sentence(res(80.0, 80.0), flops, tmp_path)
    assert "5.0x its training FLOPs" in demo_sentence(res(80.0, 80.0), flops, tmp_path)


def test_demo_sentence_says_whether_the_framework_harmed_the_models_it_received(tmp_path):
    from filtersurgery.cli.run import demo_sentence

    def fw(worse):
        sst = {"phase": "sst", "val_in": 64.0, "val_min": 60.5, "val_end": 66.0, "zero_frac": 0.3}
        return [{"step": 1, "test_acc": 70.0},
                {"step": 2, "test_acc": 72.0, "val_in": 64.0, "val_acc": 60.0 if worse else 70.0, "worse": worse,
                 "phase_vals": [sst]}]

    res = {"finetune (lr 1e-2)": [{"step": 2, "test_acc": 73.0}]}
    flops = {"finetune (lr 1e-2)": 1.0, "framework": 5.0}
    text = demo_sentence({**res, "framework": fw(False)}, flops, tmp_path, "the embedded subset")
    assert "No step of the framework left the model worse than it received it" in text
    assert "SST's lowest epoch was at most 3.5 points below" in text and "test on the embedded subset)" in text
    assert "left the model worse than it received it at step(s) 2" in demo_sentence(
        {**res, "framework": fw(True)}, flops, tmp_path)


@pytest.mark.parametrize("method,extra", [("plain", ()), ("framework", ("--steps", "2"))])
def test_killed_run_refuses_a_rerun_with_other_settings(tmp_path, capsys, monkeypatch, method, extra):
    """Killed before its first metrics.json (a single-run method, or step 1): a re-run with another --lr is
    refused with one line instead of resuming the old schedule; the same command resumes, and the settings
    file is gone once the seed finishes."""
    out = tmp_path / "o"
    real = trainer.Run.log_epoch

    def log_then_interrupt(self, row):
        real(self, row)
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Run, "log_epoch", log_then_interrupt)
    argv = run_args(out, "--method", method, *extra)
    assert cli(argv, capsys)[0] == 130
    assert not (out / "seed0" / "metrics.json").exists()
    monkeypatch.setattr(trainer.Run, "log_epoch", real)
    rc, _, err = cli(argv + ["--lr", "0.5"], capsys)
    assert rc == 2 and "holds a run with lr=None (now 0.5)" in err, err
    rc, stdout, _ = cli(argv, capsys)
    assert rc == 0 and "resuming at step 1" in stdout
    assert not (out / "seed0" / ".work").exists()
