"""Every bad input of docs/bad_inputs.md gives its one-line error.

Python API calls raise a one-line ``ValueError`` / ``FileNotFoundError`` /
``PermissionError`` that names the argument; CLI calls (``filtersurgery.cli.main``)
print exactly one line to stderr and return exit code 2, before any training starts.
"""
import errno
import json
import os
import re
from dataclasses import asdict

import pytest
import torch
from torch import nn

from conftest import run_cli, tiny_run_args

import filtersurgery as fs
from filtersurgery import train
from filtersurgery.engine.run import resolve_device
from filtersurgery.engine import checkpoint
from filtersurgery.distill import losses
from filtersurgery.models.cifar_resnet import cifar_resnet
from filtersurgery.cli.main import build_parser
from filtersurgery.data import BatchLoader, ImageData, check_classes, load_dataset, split_parts
from filtersurgery.models.factory import build_model
from filtersurgery.cli.run import config_from_args

torch.set_num_threads(1)


def tiny():
    torch.manual_seed(0)
    return cifar_resnet(8, num_classes=4, in_chans=3)


def no_convs():
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 2))


def no_norms():
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def image_data(train_y, n_test=2, num_classes=10):
    x = torch.zeros(len(train_y), 1, 4, 4, dtype=torch.uint8)
    return ImageData(x, torch.as_tensor(train_y), x[:n_test], torch.zeros(n_test, dtype=torch.int64), num_classes,
                     1, 4, [0.5], [0.25], "toy")


def one_class_folder(t):
    """``t/one/{train,val}/only/0.png``: an image folder with a single class."""
    from PIL import Image

    root = t / "one"
    for split in ("train", "val"):
        (root / split / "only").mkdir(parents=True, exist_ok=True)
        Image.new("L", (4, 4)).save(root / split / "only" / "0.png")
    return root


def nan_gamma():
    m = tiny()
    with torch.no_grad():
        m.layer1[0].bn1.weight[5] = float("nan")
    return m


def step_before_backward():
    sp = fs.sparsify(tiny(), 0.3)
    sp.step()


def simulated_erofs(path):
    """``atomic_write_json`` into a read-only file system (EROFS), as root or not."""
    real = os.makedirs

    def ro(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system", a[0])

    os.makedirs = ro
    try:
        checkpoint.atomic_write_json({}, os.path.join(path, "ro", "metrics.json"))
    finally:
        os.makedirs = real


X8 = torch.zeros(4, 1, 2, 2, dtype=torch.uint8)
CUDA = torch.cuda.is_available()

# (id, call(tmp), exception, regex searched in the message)
API = [
    # wrong input shapes
    ("trace: 1-channel input to a 3-channel model", lambda t: fs.trace(tiny(), torch.randn(1, 1, 32, 32)), ValueError,
     r"^example_inputs: expected shape \(N, 3, H, W\)"),
    ("trace: 2-D input", lambda t: fs.trace(tiny(), torch.randn(3, 32)), ValueError, r"^example_inputs: expected shape"),
    ("blocks: model fails on the probe input", lambda t: fs.distill.blocks(no_convs()), ValueError,
     r"^example_inputs: the probe forward pass of Sequential failed"),
    ("attention_map: 2-D tensor", lambda t: losses.attention_map(torch.randn(3, 4)), ValueError,
     r"^x: expected a feature map of shape \(N, C, H, W\)"),
    ("kl_div: logits of different shapes", lambda t: losses.kl_div(torch.randn(2, 10), torch.randn(2, 5)), ValueError,
     r"^p_student_logits: shape \(2, 5\) does not match"),
    ("at_loss: spatial sizes differ, resize=False",
     lambda t: losses.at_loss([torch.randn(2, 4, 8, 8)], [torch.randn(2, 4, 4, 4)], resize=False), ValueError, r"resize=False"),
    ("BatchLoader: float images", lambda t: BatchLoader(X8.float(), torch.arange(4), 2, True), ValueError,
     r"^x_uint8 must be uint8 \[N, C, H, W\]"),
    ("BatchLoader: one label too many", lambda t: BatchLoader(X8, torch.arange(5), 2, True), ValueError,
     r"^y must be 1-D with one label per image"),
    # empty
    ("BatchLoader: no samples", lambda t: BatchLoader(X8[:0], torch.arange(0), 2, True), ValueError, r"^x_uint8 is empty"),
    ("sparsify: loader yields no batches", lambda t: fs.sparsify(tiny(), 0.3, epochs=1, loader=[]), ValueError,
     r"^loader: yielded no batches in epoch 0"),
    ("ImageData: empty training set", lambda t: image_data(torch.zeros(0, dtype=torch.int64), n_test=0), ValueError, r"^train_x: the training set is empty"),
    # labels
    ("ImageData: label 12 with num_classes=10", lambda t: image_data([0, 3, 12]), ValueError,
     r"^train_y: labels must be in \[0, 10\) \(num_classes=10\), got min 0, max 12"),
    ("ImageData: float labels", lambda t: image_data([0.0, 1.0]), ValueError, r"^train_y: must be a 1-D integer label tensor"),
    ("split_parts: negative label", lambda t: split_parts(torch.tensor([0, 1, -1, 2]), 2, 0), ValueError,
     r"^y must hold labels >= 0, got min -1"),
    # out-of-range hyper-parameters
    ("sparsify: target_r=1.5", lambda t: fs.sparsify(tiny(), target_r=1.5), ValueError,
     r"^target_r: must be in the open interval \(0, 1\), got 1.5"),
    ("sparsify: target_r=0", lambda t: fs.sparsify(tiny(), target_r=0), ValueError, r"^target_r: must be in the open interval"),
    ("sparsify: target_r='a'", lambda t: fs.sparsify(tiny(), target_r="a"), ValueError, r"^target_r: must be a number"),
    ("sparsify: lam=-1", lambda t: fs.sparsify(tiny(), lam=-1), ValueError, r"^lam: must be a finite number >= 0"),
    ("sparsify: epochs=0", lambda t: fs.sparsify(tiny(), epochs=0), ValueError, r"^epochs: must be None or an integer >= 1"),
    ("sparsify: loader without epochs", lambda t: fs.sparsify(tiny(), loader=[(1, 2)]), ValueError, r"^epochs: required"),
    ("Sparsifier.set_epoch(-1)", lambda t: fs.sparsify(tiny()).set_epoch(-1), ValueError, r"^epoch: must be an integer >= 0"),
    ("rescale: I=-0.1", lambda t: fs.rescale(tiny(), I=-0.1), ValueError, r"^I: must be >= 0"),
    ("rescale: I=0.4 with target_r=0.3", lambda t: fs.rescale(tiny(), 0.3, I=0.4), ValueError,
     r"^I: eq\. \(4\) needs target_r \+ I < 1 - I, i\.e\. 0 <= I < 0\.35"),
    ("rescale: target_r=1", lambda t: fs.rescale(tiny(), target_r=1.0), ValueError, r"^target_r: must be in the open interval"),
    ("reactivate_kernels: alpha=1.5", lambda t: fs.reactivation.reactivate_kernels(tiny(), alpha=1.5), ValueError, r"^alpha: must be in \[0, 1\]"),
    ("reactivate_kernels: beta=-0.1", lambda t: fs.reactivation.reactivate_kernels(tiny(), beta=-0.1), ValueError, r"^beta: must be in \[0, 1\]"),
    ("reactivate_kernels: gamma=nan", lambda t: fs.reactivation.reactivate_kernels(tiny(), gamma=float("nan")), ValueError,
     r"^gamma: must be in \[0, 1\]"),
    ("reactivate_kernels: lr_ratio=2", lambda t: fs.reactivation.reactivate_kernels(tiny(), lr_ratio=2), ValueError,
     r"^lr_ratio: must be lr_t / lr_0 in \[0, 1\]"),
    ("KernelReactivation: period=0", lambda t: fs.reactivation.KernelReactivation(tiny(), period=0), ValueError,
     r"^period: must be an integer >= 1"),
    ("share: share=1.5", lambda t: fs.sharing.share(tiny(), 1.5), ValueError, r"^share: must be a number in \[0, 1\]"),
    ("share: num_classes=0", lambda t: fs.sharing.share(tiny(), 0.5, num_classes=0), ValueError, r"^num_classes: must be an integer >= 1"),
    ("kl_div: T=0", lambda t: losses.kl_div(torch.randn(2, 3), torch.randn(2, 3), T=0), ValueError,
     r"^T: temperature must be a finite number > 0"),
    ("aod_losses: alpha=-1", lambda t: losses.aod_losses(*(torch.randn(2, 3) for _ in range(4)), torch.tensor([0, 1]), alpha=-1),
     ValueError, r"^alpha: must be a finite number >= 0"),
    ("split_parts: parts=0", lambda t: split_parts(torch.arange(10) % 2, 0, 0), ValueError, r"^parts must be an int in \[1, 10\]"),
    ("split_parts: subset larger than a part", lambda t: split_parts(torch.arange(10) % 2, 2, 0, subset=100), ValueError,
     r"^subset must be an int in \[1, 5\] \(training images per part\), got 100"),
    # models
    ("rank_filters: model with no convs", lambda t: fs.rank_filters(no_convs()), ValueError,
     r"^model: Sequential has no nn\.Conv2d layer"),
    ("sparsify: model with no norms", lambda t: fs.sparsify(no_norms()), ValueError,
     r"^model: has no scaling factors \(no conv output channel is normalized"),
    ("rank_filters: not a model", lambda t: fs.rank_filters("resnet18"), ValueError,
     r"^model: expected an nn\.Module or a ScalingMap, got str"),
    ("rescale: NaN scaling factor", lambda t: fs.rescale(nan_gamma()), ValueError,
     r"^model: 1 scaling factor is NaN/Inf \(first: layer1\.0\.bn1\.weight\[5\]\)"),
    ("sparsify: NaN scaling factor", lambda t: fs.sparsify(nan_gamma()), ValueError,
     r"^model: 1 scaling factor is NaN/Inf \(first: layer1\.0\.bn1\.weight\[5\]\)"),
    ("Sparsifier.step before backward", lambda t: step_before_backward(), ValueError,
     r"^step: scaling factor stem\.1\.weight has no gradient; call step\(\) after loss\.backward\(\)"),
    # names
    ("build_model: unknown timm model", lambda t: build_model("timm:resnet_nope"), ValueError,
     r"^spec: unknown timm model 'resnet_nope'"),
    ("build_model: unknown source", lambda t: build_model("keras:resnet50"), ValueError,
     r"^spec: source must be one of timm, torchvision, cifar"),
    ("build_model: cifar depth not 6n+2", lambda t: build_model("cifar:resnet7"), ValueError, r"^depth: must be 6n \+ 2"),
    ("build_model: num_classes=0", lambda t: build_model("cifar:resnet20", num_classes=0), ValueError,
     r"^num_classes: expected an integer >= 1"),
    ("load_dataset: unknown name", lambda t: load_dataset("mnist3"), ValueError,
     r"^name: unknown dataset 'mnist3'; allowed: fashion-mnist, cifar100, imagefolder:PATH, demo"),
    ("load_dataset: imagefolder without a path", lambda t: load_dataset("imagefolder:"), ValueError,
     r"^name: dataset 'imagefolder:PATH' needs a PATH"),
    ("load_dataset: root does not exist", lambda t: load_dataset("fashion-mnist", root=str(t / "nowhere")), FileNotFoundError,
     r"^root: data folder .*nowhere does not exist"),
    ("TrainConfig: unknown method", lambda t: train.TrainConfig(method="nope").validate(), ValueError,
     r"^method: must be one of framework, finetune"),
    ("TrainConfig: amp='fp8'", lambda t: train.TrainConfig(amp="fp8").validate(), ValueError,
     r"^amp: must be one of auto, bf16, fp16, none"),
    ("resolve_device: cuda without CUDA", lambda t: resolve_device("cuda"), ValueError,
     r"^device: 'cuda' requested but CUDA is not available"),
    # files
    ("load_state_dict: missing file", lambda t: checkpoint.load_state_dict(t / "missing.safetensors"), FileNotFoundError,
     r"^checkpoint not found: .*missing\.safetensors"),
    ("load_state_dict: corrupt file", lambda t: checkpoint.load_state_dict(t / "garbage.bin"), ValueError,
     r"^corrupt or unreadable checkpoint .*garbage\.bin: "),
    ("load_training_state: garbage bytes", lambda t: checkpoint.load_training_state(t / "garbage.bin"), ValueError,
     r"^corrupt or unreadable training state .*garbage\.bin: "),
    ("load_training_state: truncated file", lambda t: checkpoint.load_training_state(t / "truncated.pt"), ValueError,
     r"^corrupt or unreadable training state .*truncated\.pt: "),
    ("load_training_state: a safetensors file", lambda t: checkpoint.load_training_state(t / "weights.safetensors"), ValueError,
     r"weights\.safetensors is not a filtersurgery training state"),
    ("read_json: corrupt metrics.json", lambda t: checkpoint.read_json(t / "corrupt.json"), ValueError,
     r"^corrupt JSON file .*corrupt\.json: "),
    ("atomic_write_json: read-only file system", lambda t: simulated_erofs(str(t)), PermissionError,
     r"^cannot create output directory .*ro: read-only file system"),
    ("atomic_write_json: a file in the way", lambda t: checkpoint.atomic_write_json({}, t / "garbage.bin" / "m.json"), ValueError,
     r"^cannot create output directory .*garbage\.bin: a file is in the way"),
]
API += [
    ("MultiStepConfig: lam=-1", lambda t: train.MultiStepConfig(lam=-1).validate(), ValueError, r"^lam: "),
    ("TrainConfig: max_batches=0", lambda t: train.TrainConfig(max_batches=0).validate(), ValueError, r"^max_batches: "),
    ("resolve_device: unknown device 'tpu'", lambda t: resolve_device("tpu"), ValueError, r"^device: "),
    ("evolve_weights: NaN scaling factor", lambda t: fs.reactivation.evolve_weights(nan_gamma()), ValueError,
     r"^model: 1 scaling factor is NaN/Inf \(first: layer1\.0\.bn1\.weight\[5\]\)"),
    ("graft: NaN scaling factor in model_b", lambda t: fs.reactivation.graft(tiny(), nan_gamma()), ValueError,
     r"^model_b: 1 scaling factor is NaN/Inf \(first: layer1\.0\.bn1\.weight\[5\]\)"),
]
API += [
    ("sparsify: frozen batch norms", lambda t: fs.sparsify(fs.freeze_norms(tiny())), ValueError,
     r"^model: 336 of 336 scaling factors are frozen \(9 FrozenBatchNorm2d norms, first: stem\.1\) and sparsify needs "
     r"their gradients; call filtersurgery\.unfreeze_norms\(model\) first"),
    ("unfreeze_norms: not a model", lambda t: fs.unfreeze_norms("resnet18"), ValueError,
     r"^model: expected an nn\.Module, got str"),
    ("freeze_norms: not a model", lambda t: fs.freeze_norms(None), ValueError, r"^model: expected an nn\.Module, got NoneType"),
]
API += [  # the first hour of a new user
    ("load_dataset: image folder with one class", lambda t: load_dataset(f"imagefolder:{one_class_folder(t)}"),
     ValueError, r"^data: image folder .*train has 1 class folder\(s\) \(only\); a classifier needs at least 2 classes"),
    ("load_dataset: image folder that does not exist", lambda t: load_dataset(f"imagefolder:{t}/nowhere"),
     FileNotFoundError, r"^data: image folder .*nowhere does not exist"),
    ("load_dataset: image_size for fashion-mnist", lambda t: load_dataset("demo", image_size=32), ValueError,
     r"^image_size: only image folders are resized"),
    ("check_classes: training labels of one class", lambda t: check_classes(image_data([1, 1, 1])), ValueError,
     r"^data: toy has 1 class\(es\) with training images"),
    ("TrainConfig: image_size=0", lambda t: train.TrainConfig(image_size=0).validate(), ValueError,
     r"^image_size: must be an integer >= 1"),
    ("build_model: misspelt timm model", lambda t: build_model("timm:efficentnet_b0"), ValueError,
     r"^spec: unknown timm model 'efficentnet_b0'; did you mean timm:efficientnet_b0"),
    ("build_model: a timm name as torchvision", lambda t: build_model("torchvision:resnet10t"), ValueError,
     r"^spec: unknown torchvision classification model 'resnet10t'; 'resnet10t' is a timm model: use timm:resnet10t"),
]
if CUDA:  # pragma: no cover - the CPU CI has no CUDA
    API = [c for c in API if not c[0].startswith("resolve_device")]



@pytest.fixture(scope="module")
def files(tmp_path_factory):
    t = tmp_path_factory.mktemp("bad")
    (t / "garbage.bin").write_bytes(b"\x00garbage" * 8)
    (t / "corrupt.json").write_text('{"steps": [')
    torch.save({"a": torch.ones(3)}, t / "truncated.pt")
    raw = (t / "truncated.pt").read_bytes()
    (t / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    checkpoint.save_state_dict({"a": torch.ones(3)}, t / "weights.safetensors")
    return t


@pytest.mark.parametrize("case", API, ids=[c[0] for c in API])
def test_api_bad_input(case, files):
    _, call, exc, pattern = case
    with pytest.raises(exc, match=pattern) as e:
        call(files)
    assert "\n" not in str(e.value)


# ------------------------------------------------------------------------ CLI
run_args = tiny_run_args


def cli(argv, capsys):
    """``(exit code, stderr lines)`` of ``filtersurgery ARGV``."""
    rc, _, err = run_cli(argv, capsys)
    return rc, err.strip().splitlines()


def write_metrics_for(argv, seed=0, **over):
    """A metrics.json in ``--out/seedS`` whose config matches ``argv`` (a run that can be resumed)."""
    args = build_parser().parse_args([str(a) for a in argv])
    cfg = config_from_args(args)
    config = {**asdict(cfg), "seed": seed, **over}
    d = os.path.join(args.out, f"seed{seed}")
    os.makedirs(d, exist_ok=True)
    metrics = {"preprocess": {}, "steps": [{"step": 1, "test_acc": 0.0, "val_acc": 0.0, "seconds": 0.0}], "config": config}
    with open(os.path.join(d, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    return d


def _corrupt_metrics(t):
    os.makedirs(t / "seed0")
    (t / "seed0" / "metrics.json").write_text("{bad json")
    return run_args(t)


def _other_settings(t):
    write_metrics_for(run_args(t), epochs=5)
    return run_args(t)


def _corrupt_step_checkpoint(t):
    d = write_metrics_for(run_args(t))
    with open(os.path.join(d, "step1.safetensors"), "wb") as f:
        f.write(b"\x00not a checkpoint" * 4)
    return run_args(t)


def _corrupt_state(t):
    os.makedirs(t / "seed0" / ".work")
    (t / "seed0" / ".work" / "state.pt").write_bytes(b"PK\x03\x04 truncated zip")
    return run_args(t)


def _read_only_out(t):
    if os.geteuid() == 0:  # root ignores permissions: /proc refuses new entries to everyone
        return run_args("/proc/filtersurgery-read-only/out")
    ro = t / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return run_args(ro / "out")


CLI = [
    # (id, argv(tmp), regex searched in the single stderr line)
    ("run --steps 1", lambda t: run_args(t, "--steps", "1"), r"steps: must be >= 2"),
    ("run --epochs 0", lambda t: run_args(t, "--epochs", "0"), r"epochs: must be >= 1, got 0"),
    ("run --batch-size 0", lambda t: run_args(t, "--batch-size", "0"), r"batch_size: must be >= 1, got 0"),
    ("run --subset 0", lambda t: run_args(t, "--subset", "0"), r"subset: must be >= 1 images per part, got 0"),
    ("run --target-r 1.5", lambda t: run_args(t, "--target-r", "1.5"), r"target_r: must be in \(0, 1\), got 1.5"),
    ("run --split single --steps 3", lambda t: run_args(t, "--split", "single", "--steps", "3"),
     r"steps: --split single means exactly 2 steps"),
    ("run --method nope", lambda t: run_args(t, "--method", "nope"), r"method: must be one of .*got 'nope'"),
    ("run --model timm:resnet_nope", lambda t: run_args(t, "--model", "timm:resnet_nope"), r"spec: unknown timm model 'resnet_nope'"),
    ("run --data nope", lambda t: run_args(t, "--data", "nope"), r"name: unknown dataset 'nope'"),
    ("run --data-root DIR that does not exist", lambda t: run_args(t, "--data", "fashion-mnist", "--data-root", t / "nowhere"),
     r"root: data folder .*nowhere does not exist"),
    ("run --data imagefolder:MISSING", lambda t: run_args(t, "--data", f"imagefolder:{t}/nowhere"),
     r"data: image folder .*nowhere does not exist \(--data imagefolder:PATH\)"),
    ("run --device tpu", lambda t: run_args(t, "--device", "tpu"), r"tpu"),
    ("run: corrupt metrics.json in --out", _corrupt_metrics, r"out: .*metrics\.json is corrupt .*move it away or use another --out"),
    ("run: --out holds a run with other settings", _other_settings, r"out: .* holds a run with epochs=5 \(now 1\)"),
    ("run: corrupt stepK.safetensors in --out", _corrupt_step_checkpoint, r"corrupt or unreadable checkpoint .*step1\.safetensors"),
    ("run: corrupt .work/state.pt in --out", _corrupt_state, r"corrupt or unreadable training state .*state\.pt"),
    ("run: read-only --out", _read_only_out, r"out: cannot create directory .*(filtersurgery-read-only|ro)/out/seed0: "
                                              r"(permission denied|no such file or directory|read-only file system)"),
    ("inspect --input-size 3 0 32", lambda t: ["inspect", "cifar:resnet20", "--input-size", "3", "0", "32"],
     r"input_size \(--input-size\): expected three positive integers C H W, got \[3, 0, 32\]"),
    ("inspect --input-size 5 32 32", lambda t: ["inspect", "cifar:resnet20", "--input-size", "5", "32", "32"],
     r"input_size \(--input-size\): expected shape \(N, 3, H, W\)"),
    ("inspect timm:resnet_nope", lambda t: ["inspect", "timm:resnet_nope"], r"spec: unknown timm model"),
]
if not CUDA:
    CLI.append(("run --device cuda (no CUDA)", lambda t: run_args(t, "--device", "cuda"),
                r"device: 'cuda' requested but CUDA is not available \(use --device cpu\)"))



CLI += [
    ("run --data imagefolder:ONE-CLASS", lambda t: run_args(t, "--data", f"imagefolder:{one_class_folder(t)}"),
     r"data: image folder .*train has 1 class folder\(s\) \(only\); a classifier needs at least 2 classes"),
    ("run --image-size 32 with --data demo", lambda t: run_args(t, "--data", "demo", "--image-size", "32"),
     r"image_size: only image folders are resized"),
    ("run --image-size 0", lambda t: run_args(t, "--image-size", "0"), r"image_size: must be an integer >= 1"),
    ("run --model efficentnet_b0", lambda t: run_args(t, "--model", "efficentnet_b0"),
     r"spec: unknown timm model 'efficentnet_b0'; did you mean timm:efficientnet_b0"),
    ("run: metrics.json in --out holds a JSON list",
     lambda t: (os.makedirs(t / "seed0"), (t / "seed0" / "metrics.json").write_text("[1, 2]"), run_args(t))[-1],
     r"out: "),
    ("run: --out below a regular file",
     lambda t: ((t / "file").write_text("x"), run_args(t / "file" / "out"))[-1],
     r"error: out: cannot create directory .*file/out/seed0: a file is in the way"),
]


@pytest.mark.parametrize("case", CLI, ids=[c[0] for c in CLI])
def test_cli_bad_input(case, tmp_path, capsys):
    _, argv, pattern = case
    rc, lines = cli(argv(tmp_path), capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("filtersurgery ") and ": error: " in lines[0]
    assert re.search(pattern, lines[0]), lines[0]
    assert not list(tmp_path.rglob("epochs.csv"))  # it failed before the first epoch


@pytest.mark.parametrize("flag,value", [("--amp", "fp8"), ("--epochs", "abc")])
def test_cli_argparse_errors_exit_2(flag, value, tmp_path, capsys):
    """Type/choice errors are argparse's: usage line + one error line naming the flag, exit 2."""
    rc, lines = cli(run_args(tmp_path, flag, value), capsys)
    assert rc == 2 and lines[0].startswith("usage:") and f"argument {flag}:" in lines[-1]
