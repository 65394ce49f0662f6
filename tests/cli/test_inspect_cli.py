"""``filtersurgery inspect`` / ``zoo`` command lines (checked by name)."""
import json

import pytest
import torch

from filtersurgery.cli.main import main
from filtersurgery.models.factory import build_model, list_cnns


def run(capsys, *argv):
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_inspect_json_schema(capsys):
    rc, out, _ = run(capsys, "inspect", "torchvision:resnet18", "--json")
    assert rc == 0
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1  # exactly one JSON object
    obj = json.loads(lines[0])
    assert set(obj) == {"model", "source", "input_size", "trace_seconds", "coverage", "totals", "convs"}
    assert len(obj["input_size"]) == 3 and obj["input_size"][0] == 3  # the size the trace ran with
    assert obj["totals"] == {"convs": 20, "mapped": 20, "unscaled": 0, "scaling_factors": 4800}
    assert obj["model"] == "resnet18" and obj["source"] == "torchvision"
    assert isinstance(obj["trace_seconds"], float) and obj["coverage"] == 1.0
    model, _ = build_model("torchvision:resnet18")
    names = dict(model.named_modules())
    assert [c["name"] for c in obj["convs"]] == [n for n, m in names.items() if isinstance(m, torch.nn.Conv2d)]
    for c in obj["convs"]:
        assert set(c) == {"name", "out_channels", "groups", "scaled_by", "reason"}
        assert isinstance(c["out_channels"], int) and isinstance(c["groups"], int)
        assert c["reason"] is None and c["scaled_by"]
        for r in c["scaled_by"]:
            assert set(r) == {"norm", "offset"} and r["norm"] in names and isinstance(r["offset"], int)
    first = obj["convs"][0]
    assert first["name"] == "conv1" and first["scaled_by"] == [{"norm": "bn1", "offset": 0}]


def test_inspect_table_and_unscaled_reasons(capsys):
    rc, out, _ = run(capsys, "inspect", "torchvision:squeezenet1_1", "--input-size", "3", "64", "64")
    assert rc == 0
    assert "features.0" in out and "no norm in the model" in out
    assert "26 convs, 0 mapped, 26 unscaled" in out
    assert "coverage n/a (nothing mappable" in out and "coverage 100" not in out
    rc, out, _ = run(capsys, "inspect", "torchvision:squeezenet1_1", "--json")
    obj = json.loads(out)
    assert obj["coverage"] is None and '"coverage": null' in out  # n/a: nothing is mappable
    assert all(c["scaled_by"] == [] and c["reason"] == "no norm in the model" for c in obj["convs"])


def test_inspect_bad_inputs_one_line_errors(capsys):
    rc, _, err = run(capsys, "inspect", "timm:no_such_model_xyz")
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "list_models" in err
    rc, _, err = run(capsys, "inspect", "resnet18", "--input-size", "1", "32", "32")
    assert rc == 2 and "expected shape (N, 3, H, W)" in err and len(err.strip().splitlines()) == 1


def test_zoo_verify_json(capsys):
    rc, out, _ = run(
        capsys, "zoo", "--source", "torchvision", "--filter", "shufflenet_v2_x0_5,squeezenet1_1",
        "--verify", "--input-size", "3", "64", "64", "--json",
    )
    assert rc == 0
    obj = json.loads(out)
    assert [r["model"] for r in obj["models"]] == ["shufflenet_v2_x0_5", "squeezenet1_1"]
    shuf = obj["models"][0]
    assert shuf["coverage"] == 1.0 and shuf["error"] is None
    assert shuf["verify"]["filters"] >= 56 and shuf["verify"]["mismappings"] == []
    assert obj["totals"]["mismappings"] == 0 and obj["totals"]["errors"] == 0 and obj["totals"]["traced"] == 2
    squeeze = obj["models"][1]
    assert squeeze["coverage"] is None and squeeze["mapped"] == 0 and squeeze["error"] is None
    assert obj["totals"]["coverage_na"] == 1 and obj["totals"]["mean_coverage"] == 1.0  # n/a left out of the mean
    assert obj["totals"]["below_target"] == []


def test_zoo_human_lines(capsys):
    rc, out, _ = run(capsys, "zoo", "--source", "torchvision", "--filter", "squeezenet*")
    assert rc == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("torchvision:squeezenet1_0") and "coverage     n/a" in lines[0]
    assert lines[-1].startswith("total: 2 models, 2 traced, 0 errors")
    assert lines[-1].endswith("(2 with coverage n/a: nothing mappable)") and "coverage mean" not in lines[-1]


def test_list_cnns_skips_transformers():
    tv = list_cnns("torchvision")
    assert "resnet18" in tv and "googlenet" in tv and not any(n.startswith(("vit_", "swin_", "maxvit")) for n in tv)
    timm_cnns = list_cnns("timm", "resnet*")
    assert "resnet18" in timm_cnns and "resnetv2_50" in timm_cnns
    assert not any(n.startswith(("vit_", "deit", "swin")) for n in list_cnns("timm"))
    with pytest.raises(ValueError, match="source"):
        list_cnns("keras")


def test_build_model_specs():
    m, src = build_model("torchvision:resnet18", num_classes=7, in_chans=1)
    assert src == "torchvision" and m.conv1.in_channels == 1 and m.fc.out_features == 7
    m, src = build_model("resnet18", num_classes=5, in_chans=2)
    assert src == "timm" and m.conv1.in_channels == 2
    with pytest.raises(ValueError, match="torchvision.models.list_models"):
        build_model("torchvision:resnet19")
    with pytest.raises(ValueError, match="source must be one of"):
        build_model("keras:resnet18")
