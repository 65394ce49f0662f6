"""Faults a user meets, each reproduced: a full disk, two runs into one folder, a non-finite loss in a
step's first epoch, an empty class folder, a kill during a step's test evaluation. Each must say what
happened in one line, and a re-run after the fault must resume."""
import errno
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, tiny_run_args
from filtersurgery import train
from filtersurgery.data import datasets
from filtersurgery.engine import checkpoint, trainer


# --------------------------------------------------------------------------- a full disk
def test_a_writer_that_runs_out_of_space_says_so_and_names_the_file(tmp_path, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    path = tmp_path / "step1.safetensors"
    with pytest.raises(checkpoint.DiskFullError) as e:
        checkpoint.save_state_dict({"w": torch.ones(3)}, path)
    msg = str(e.value)
    assert msg.startswith(f"writing {path} failed: the disk is full") and "run the same command again to resume" in msg
    assert "\n" not in msg and e.value.errno == errno.ENOSPC
    assert not path.exists() and list(tmp_path.iterdir()) == []  # no temp file left


def test_an_error_that_is_not_a_full_disk_passes_through(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(*a, **k):
        raise RuntimeError("something else")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(RuntimeError, match="^something else$"):
        checkpoint.save_state_dict({"w": torch.ones(3)}, tmp_path / "x.safetensors")


def _mount_tmpfs(where: Path, size: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_full_disk_during_a_run_is_one_line_and_the_rerun_resumes(tmp_path, capsys):
    """A real small tmpfs as --out: torch.save's own message there is '[enforce fail at
    inline_container.cc] unexpected pos ...'; the run must say that the disk is full instead."""
    out = tmp_path / "small"
    if not _mount_tmpfs(out, "1500k"):
        pytest.skip("cannot mount a tmpfs here (needs root and mount)")
    try:
        rc, _, err = run_cli(tiny_run_args(out, "--method", "finetune", "--steps", "2"), capsys)
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert lines[0].startswith(f"filtersurgery run: error: writing {out}/seed0/") and "the disk is full" in lines[0]
        assert "run the same command again to resume" in lines[0]
        subprocess.run(["mount", "-o", "remount,size=64m", str(out)], check=True)  # free space
        rc, stdout, _ = run_cli(tiny_run_args(out, "--method", "finetune", "--steps", "2"), capsys)
        assert rc == 0 and (out / "seed0" / "step2.safetensors").exists(), stdout
    finally:
        subprocess.run(["umount", str(out)], capture_output=True)


# --------------------------------------------------------------------------- two runs, one folder
_HOLD = """
import sys, time
from filtersurgery.engine.checkpoint import run_lock
with run_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_second_run_into_a_busy_folder_is_refused_and_a_killed_holder_leaves_no_lock(tmp_path, capsys):
    out = tmp_path / "runs"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(out / "seed0")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        rc, _, err = run_cli(tiny_run_args(out, "--method", "finetune", "--steps", "2"), capsys)
        assert rc == 2 and err.strip() == (f"filtersurgery run: error: out: {out / 'seed0'} is in use by another run "
                                           f"(process {holder.pid}); wait for it to end, or use another --out")
        assert not (out / "seed0" / "epochs.csv").exists()  # the refused run trained nothing
        # the Python API refuses too
        cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=2, method="finetune", epochs=1, subset=8,
                                batch_size=4, max_batches=1, device="cpu", progress=False)
        with pytest.raises(checkpoint.RunFolderBusy, match=f"process {holder.pid}"):
            train.multi_step(cfg, out / "seed0", seed=0)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    rc, stdout, err = run_cli(tiny_run_args(out, "--method", "finetune", "--steps", "2"), capsys)
    assert rc == 0, err  # the OS released the SIGKILLed holder's lock
    rows = (out / "seed0" / "epochs.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:3] for r in rows] == [["1", "scratch", "1"], ["2", "finetune", "1"]]


def test_the_lock_is_reentrant_within_one_process(tmp_path):
    with checkpoint.run_lock(tmp_path / "a"):
        with checkpoint.run_lock(tmp_path / "a"):
            pass
        assert (tmp_path / "a" / checkpoint.LOCK_FILE).read_text().strip() == str(os.getpid())


# --------------------------------------------------------------------------- a non-finite loss
def test_a_nan_loss_in_the_first_epoch_of_a_step_names_the_file_that_holds_the_last_good_state(tmp_path, monkeypatch):
    cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=2, method="finetune", epochs=1, subset=8,
                            batch_size=4, max_batches=1, device="cpu", progress=False)
    train.multi_step(cfg, tmp_path, seed=0, until_step=1)
    assert not (tmp_path / ".work" / checkpoint.STATE_FILE).exists()
    real = trainer._batch_loss
    monkeypatch.setattr(trainer, "_batch_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(RuntimeError) as e:
        train.multi_step(cfg, tmp_path, seed=0)
    assert str(e.value) == (f"non-finite loss at step 2 phase finetune epoch 1; the last saved state (an earlier "
                            f"epoch) is kept in {tmp_path / 'step1.safetensors'}")


def test_a_nan_loss_in_the_second_phase_names_the_first_phases_output(tmp_path, monkeypatch):
    cfg = train.TrainConfig(model="cifar:resnet20", data="demo", steps=2, method="framework", epochs=1, subset=8,
                            batch_size=4, max_batches=1, device="cpu", progress=False)
    train.multi_step(cfg, tmp_path, seed=0, until_step=1)
    real = trainer._batch_loss
    monkeypatch.setattr(trainer, "_batch_loss", lambda run, phase, *a: real(run, phase, *a) * (
        float("nan") if phase.name == "aod" else 1.0))
    with pytest.raises(RuntimeError, match=f"is kept in {tmp_path / '.work' / 'step2_sst.safetensors'}$"):
        train.multi_step(cfg, tmp_path, seed=0)


# --------------------------------------------------------------------------- an empty class folder
def test_an_empty_class_folder_is_refused_naming_it(tmp_path, capsys):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in ("cat", "dog"):
            d = tmp_path / "imgs" / split / c
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(d / f"{i}.png")
    (tmp_path / "imgs" / "train" / "emu").mkdir()  # a class folder without images
    with pytest.raises(ValueError) as e:
        datasets.load_dataset(f"imagefolder:{tmp_path / 'imgs'}")
    assert str(e.value).startswith(f"data: class folder {tmp_path / 'imgs' / 'train' / 'emu'} holds no image")
    rc, _, err = run_cli(tiny_run_args(tmp_path / "out", "--data", f"imagefolder:{tmp_path / 'imgs'}"), capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "emu holds no image" in err


# --------------------------------------------------------------------------- a kill during the test evaluation
def test_rerun_after_a_kill_during_a_steps_test_evaluation_says_where_it_resumes(tmp_path, capsys, monkeypatch):
    out = tmp_path / "runs"
    args = tiny_run_args(out, "--method", "finetune", "--steps", "2", epochs="2")
    real = trainer.Run.acc

    def killed_at_step2_test(self, model, parts=None):
        if parts is None and (self.out / "step1.safetensors").exists():
            raise KeyboardInterrupt  # both epochs of step 2 are done; its test evaluation is running
        return real(self, model, parts)

    monkeypatch.setattr(trainer.Run, "acc", killed_at_step2_test)
    assert run_cli(args, capsys)[0] == 130
    monkeypatch.setattr(trainer.Run, "acc", real)
    rc, stdout, _ = run_cli(args, capsys)
    assert rc == 0
    assert ("seed 0: resuming at step 2: its training is done, only its evaluation and checkpoint are left "
            "(steps 1 done earlier)") in stdout
    rows = (out / "seed0" / "epochs.csv").read_text().splitlines()[1:]
    assert [r.split(",")[:3] for r in rows] == [["1", "scratch", "1"], ["1", "scratch", "2"],
                                                ["2", "finetune", "1"], ["2", "finetune", "2"]]


# --------------------------------------------------------------------------- resume inside a step
@pytest.mark.parametrize("step, phase", [(2, "aod"), (3, "sst")])
def test_a_run_killed_inside_a_phase_resumes_to_the_same_weights(tmp_path, monkeypatch, step, phase):
    """Killed in AOD's second epoch (SST finished: its handoff comes back from its file) or in SST-under-MSL's
    second epoch (its teacher, teacher accuracy and sparsifier come back from the state file): the resumed
    run ends with the same step weights as an uninterrupted one."""
    cfg = train.TrainConfig(model="cifar:resnet8", data="demo", steps=3, method="framework", epochs=2, subset=16,
                            batch_size=8, max_batches=1, device="cpu", progress=False)
    ref = train.multi_step(cfg, tmp_path / "ref", seed=0)
    real, calls = trainer._batch_loss, []

    def interrupt(ctx, ph, *a):
        if ctx.step == step and ph.name == phase:
            calls.append(1)
            if len(calls) == 2:  # the second epoch's batch: the first epoch's state is saved
                raise KeyboardInterrupt
        return real(ctx, ph, *a)

    monkeypatch.setattr(trainer, "_batch_loss", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train.multi_step(cfg, tmp_path / "run", seed=0)
    assert train.resume_point(tmp_path / "run") == {"step": step, "phase": phase, "epoch": 1}
    monkeypatch.setattr(trainer, "_batch_loss", real)
    got = train.multi_step(cfg, tmp_path / "run", seed=0)
    for k in (2, 3):
        a = checkpoint.load_state_dict(tmp_path / "ref" / f"step{k}.safetensors")
        b = checkpoint.load_state_dict(tmp_path / "run" / f"step{k}.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a), k
    strip = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["steps"]]  # noqa: E731
    assert strip(got) == strip(ref)


def test_a_work_folder_of_the_older_layout_is_refused_in_one_line(tmp_path):
    cfg = train.TrainConfig(model="cifar:resnet8", data="demo", steps=2, method="framework", epochs=1, subset=8,
                            batch_size=4, max_batches=1, device="cpu", progress=False)
    train.multi_step(cfg, tmp_path, seed=0, until_step=1)
    (tmp_path / ".work").mkdir(exist_ok=True)
    checkpoint.save_state_dict({"scales": torch.ones(3)}, tmp_path / ".work" / "step2_sst_scales.safetensors")
    with pytest.raises(ValueError, match=r"step2_sst_scales.safetensors in .work/ was written by an older "
                                         r"filtersurgery, .*delete .*\.work to train step 2 again$"):
        train.multi_step(cfg, tmp_path, seed=0)
    checkpoint.save_training_state(tmp_path / ".work" / checkpoint.STATE_FILE, {}, None,
                                   {"step": 2, "phase": "sst", "epoch": 0})  # an old state: no phase_state
    (tmp_path / ".work" / "step2_sst_scales.safetensors").unlink()
    with pytest.raises(ValueError, match=r"was written by an older filtersurgery and cannot be resumed"):
        train.multi_step(cfg, tmp_path, seed=0)
