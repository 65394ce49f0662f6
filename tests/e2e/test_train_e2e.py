"""End-to-end: every method through 3 steps on real Fashion-MNIST (CPU-sized), artefacts,
resume after an interruption, and an independent re-evaluation of a saved checkpoint."""
import json

import pytest
import timm
import torch


from filtersurgery.engine import checkpoint, trainer
from filtersurgery.data.augment import normalize
from filtersurgery.cli.main import main as cli_main
from filtersurgery.data import load_dataset
from filtersurgery.train import METHODS, TrainConfig, multi_step

pytestmark = pytest.mark.slow  # end-to-end: every method trained on real data

TINY = dict(model="timm:resnet18", steps=3, epochs=1, subset=64, batch_size=32, max_batches=2, device="cpu",
            progress=False)


@pytest.fixture(scope="module")
def data():
    try:
        return load_dataset("fashion-mnist", subset_test=300)
    except FileNotFoundError:
        pytest.skip("Fashion-MNIST not installed (apt-get install dataset-fashion-mnist)")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("runs")
    out = {}
    for m in METHODS:
        cfg = TrainConfig(method=m, **TINY)
        out[m] = (root / m, multi_step(cfg, root / m, seed=0, data=data))
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_method_writes_artefacts(runs, method):
    d, metrics = runs[method]
    assert [s["step"] for s in metrics["steps"]] == [1, 2, 3]
    for s in metrics["steps"]:
        assert 0.0 <= s["test_acc"] <= 100.0 and 0.0 <= s["val_acc"] <= 100.0 and s["seconds"] >= 0
    on_disk = json.loads((d / "metrics.json").read_text())
    assert set(on_disk["preprocess"]) >= {"mean", "std", "size"}
    assert on_disk["preprocess"]["size"] == 28
    for k in (1, 2, 3):
        assert (d / f"step{k}.safetensors").exists()
    rows = (d / "epochs.csv").read_text().splitlines()
    assert rows[0].startswith("step,phase,epoch")
    assert not any((d / ".work").glob("*.safetensors"))  # phase outputs cleaned once a step is done


def test_framework_runs_its_phases(runs):
    _, m = runs["framework"]
    assert m["steps"][1]["phases"] == ["sst", "aod"]
    assert m["steps"][2]["phases"] == ["sst", "aod"]
    d, _ = runs["framework"]
    csv = (d / "epochs.csv").read_text()
    assert "sst" in csv and "aod" in csv


def test_checkpoint_reproduces_metrics(runs, data):
    """Load stepK.safetensors strictly into a fresh timm model and re-evaluate independently."""
    d, metrics = runs["framework"]
    pre = metrics["preprocess"]
    model = timm.create_model("resnet18", num_classes=10, in_chans=1)
    sd = checkpoint.load_state_dict(d / "step3.safetensors")
    model.load_state_dict(sd, strict=True)
    model.eval()
    with torch.no_grad():
        pred = model(normalize(data.test_x, pre["mean"], pre["std"])).argmax(1)
    acc = 100.0 * (pred == data.test_y).float().mean().item()
    assert acc == pytest.approx(metrics["steps"][2]["test_acc"], abs=1e-3)


def test_resume_after_interruption(tmp_path, data, monkeypatch):
    cfg = TrainConfig(method="framework", **dict(TINY, epochs=2))
    multi_step(cfg, tmp_path / "ref", seed=1, data=data)

    calls = {"n": 0}
    real = trainer._batch_loss

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 11:  # inside step 2 (step 1: 2 epochs x 2 batches; then SST...)
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(trainer, "_batch_loss", dying)
    with pytest.raises(KeyboardInterrupt):
        multi_step(cfg, tmp_path / "run", seed=1, data=data)
    done = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [s["step"] for s in done["steps"]] == [1]  # step 1 kept, nothing later written
    assert (tmp_path / "run" / ".work" / checkpoint.STATE_FILE).exists()
    step1_before = (tmp_path / "run" / "step1.safetensors").read_bytes()

    monkeypatch.setattr(trainer, "_batch_loss", real)
    res = multi_step(cfg, tmp_path / "run", seed=1, data=data)
    assert [s["step"] for s in res["steps"]] == [1, 2, 3]
    assert (tmp_path / "run" / "step1.safetensors").read_bytes() == step1_before
    # epochs finished before the kill are not trained again
    rows = [r.split(",")[:3] for r in (tmp_path / "run" / "epochs.csv").read_text().splitlines()[1:]]
    assert len(rows) == len(set(map(tuple, rows)))
    # deterministic on CPU: the resumed run ends where the uninterrupted one does
    for k in (1, 2, 3):
        a = checkpoint.load_state_dict(tmp_path / "ref" / f"step{k}.safetensors")
        b = checkpoint.load_state_dict(tmp_path / "run" / f"step{k}.safetensors")
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"step{k} {name}")


def _cli_args(out, **over):
    opts = {"--model": "timm:resnet18", "--data": "demo", "--steps": "2", "--method": "finetune",
            "--epochs": "1", "--seeds": "0", "--subset": "32", "--batch-size": "16", "--max-batches": "1",
            "--device": "cpu", "--out": str(out)}
    opts.update({"--" + k.replace("_", "-"): v for k, v in over.items()})
    return ["run", "--no-progress"] + [x for kv in opts.items() for x in kv]


def test_cli_run_and_bad_inputs(tmp_path, capsys):
    out = tmp_path / "cli"
    assert cli_main(_cli_args(out)) == 0
    assert (out / "seed0" / "step2.safetensors").exists() and (out / "summary.json").exists()
    assert (out / "accuracy.png").exists()
    before = (out / "seed0" / "step2.safetensors").read_bytes()

    bad = [
        (dict(steps="1"), "steps"),
        (dict(epochs="0"), "epochs"),
        (dict(method="magic"), "method"),
        (dict(model="timm:not_a_model_xyz"), "not_a_model_xyz"),
        (dict(data="mnist-of-dreams"), "mnist-of-dreams"),
        (dict(lr="0.5"), "another --out"),  # a different run into the same --out
    ]
    for over, needle in bad:
        assert cli_main(_cli_args(out, **over)) == 2, over
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (over, err)
    assert (out / "seed0" / "step2.safetensors").read_bytes() == before  # nothing lost


def test_missing_data_files_say_how_to_get_them(tmp_path, capsys):
    args = ["run", "--data", "cifar100", "--data-root", str(tmp_path / "nothing"), "--epochs", "1",
            "--device", "cpu", "--out", str(tmp_path / "o")]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "download" in err.lower()
