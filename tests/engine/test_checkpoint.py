"""Checkpoint I/O: atomic writes, safetensors round trips, resume state, clear errors."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from filtersurgery.engine import checkpoint as ck


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))


def leftovers(d):
    return [n for n in os.listdir(d) if ".tmp-" in n]


def test_state_dict_round_trip_strict(tmp_path):
    m = small_model()
    p = tmp_path / "runs" / "x" / "step1.safetensors"  # parents are created
    ck.save_state_dict(m.state_dict(), str(p), metadata={"model": "seq"})
    m2 = small_model()
    for t in m2.parameters():
        t.data.zero_()
    m2.load_state_dict(ck.load_state_dict(str(p)), strict=True)
    for a, b in zip(m.state_dict().values(), m2.state_dict().values()):
        assert torch.equal(a, b)
    assert ck.read_metadata(str(p)) == {"model": "seq"}
    assert leftovers(p.parent) == []


def test_shared_and_noncontiguous_tensors(tmp_path):
    w = torch.randn(4, 6)
    sd = {"a": w, "tied": w, "view": w[:, 1:3], "t": w.t(), "empty": torch.empty(0), "empty2": torch.empty(0, 3)}
    p = str(tmp_path / "s.safetensors")
    ck.save_state_dict(sd, p)
    back = ck.load_state_dict(p)
    for k, v in sd.items():
        assert torch.equal(back[k], v) and back[k].is_contiguous()
    assert back["a"].data_ptr() != back["tied"].data_ptr()
    with pytest.raises(ValueError, match="not a tensor"):
        ck.save_state_dict({"a": 3}, p)


def test_failed_write_leaves_old_file(tmp_path, monkeypatch):
    p = tmp_path / "step1.safetensors"
    ck.save_state_dict({"w": torch.ones(3)}, str(p))
    before = p.read_bytes()
    import safetensors.torch as st

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial garbage")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(st, "save_file", broken)
    with pytest.raises(OSError, match="simulated"):
        ck.save_state_dict({"w": torch.zeros(3)}, str(p))
    assert p.read_bytes() == before and leftovers(tmp_path) == []
    # same for JSON: unserializable objects are rejected before anything is written
    j = tmp_path / "metrics.json"
    ck.atomic_write_json({"steps": [1]}, str(j))
    with pytest.raises(ValueError, match="metrics.json"):
        ck.atomic_write_json({"bad": object()}, str(j))
    assert ck.read_json(str(j)) == {"steps": [1]} and leftovers(tmp_path) == []


def test_interrupt_inside_atomic_path(tmp_path):
    p = tmp_path / "plot.png"
    with pytest.raises(KeyboardInterrupt):
        with ck.atomic_path(str(p)) as tmp:
            assert tmp.endswith(".png") and os.path.dirname(tmp) == str(tmp_path)
            open(tmp, "wb").write(b"half")
            raise KeyboardInterrupt
    assert not p.exists() and leftovers(tmp_path) == []
    # what a SIGKILL between write and rename leaves behind is recognised and cleaned
    (tmp_path / ".step2.tmp-0123abcd.safetensors").write_bytes(b"x")
    (tmp_path / "keep.tmp-0123abcd.txt").write_bytes(b"x")
    assert [os.path.basename(r) for r in ck.clean_temp_files(str(tmp_path))] == [".step2.tmp-0123abcd.safetensors"]
    assert os.listdir(tmp_path) == ["keep.tmp-0123abcd.txt"]


def test_missing_and_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        ck.load_state_dict(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "bad.safetensors"
    ck.save_state_dict({"w": torch.ones(100)}, str(bad))
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    with pytest.raises(ValueError, match="corrupt or unreadable checkpoint .*bad.safetensors") as e:
        ck.load_state_dict(str(bad))
    assert "\n" not in str(e.value)
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(ValueError, match="junk.safetensors"):
        ck.load_state_dict(str(tmp_path / "junk.safetensors"))
    (tmp_path / "m.json").write_text("{\"a\": ")
    with pytest.raises(ValueError, match="corrupt JSON file .*m.json"):
        ck.read_json(str(tmp_path / "m.json"))
    with pytest.raises(FileNotFoundError, match="x.json"):
        ck.read_json(str(tmp_path / "x.json"))
    (tmp_path / "state.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="state.pt"):
        ck.load_training_state(str(tmp_path / "state.pt"))
    with pytest.raises(FileNotFoundError, match="none.pt"):
        ck.load_training_state(str(tmp_path / "none.pt"))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match=str(ro)):
            ck.save_state_dict({"w": torch.ones(1)}, str(ro / "a.safetensors"))
        with pytest.raises(PermissionError, match=str(ro)):
            ck.atomic_write_json({}, str(ro / "sub" / "m.json"))
    finally:
        ro.chmod(0o755)


def test_read_only_dir_simulated(tmp_path, monkeypatch):
    """Same check when running as root: make the temp-file creation fail like a read-only folder."""
    real_open = open

    def deny(path, mode="r", *a, **k):
        if "x" in mode:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(PermissionError, match=f"cannot write to directory {tmp_path}"):
        ck.atomic_write_json({"a": 1}, str(tmp_path / "m.json"))
    monkeypatch.setattr("builtins.open", real_open)
    assert os.listdir(tmp_path) == []


def test_training_state_round_trip(tmp_path):
    m = small_model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, 10)
    m(torch.randn(2, 1, 8, 8)).sum().backward()
    opt.step()
    sched.step()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    extra = {"epoch": 3, "step": 2, "scheduler": sched.state_dict(), "rng": ck.rng_state(), "best": 0.5}
    p = str(tmp_path / "state.pt")
    ck.save_training_state(p, m.state_dict(), opt.state_dict(), extra)
    expect = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)

    st = ck.load_training_state(p)
    m2 = small_model()
    m2.load_state_dict(st["model"], strict=True)
    opt2 = torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    opt2.load_state_dict(st["optimizer"])
    assert torch.equal(opt2.state_dict()["state"][0]["momentum_buffer"], opt.state_dict()["state"][0]["momentum_buffer"])
    assert st["extra"]["epoch"] == 3 and st["extra"]["scheduler"]["last_epoch"] == 1
    ck.set_rng_state(st["extra"]["rng"])
    assert (random.random(), np.random.rand()) == expect[:2] and torch.equal(torch.rand(1), expect[2])
    with pytest.raises(ValueError, match=r"extra'\]\['f'\] is a function"):
        ck.save_training_state(p, m.state_dict(), None, {"f": lambda: 0})
    assert ck.load_training_state(p)["extra"]["epoch"] == 3  # the failed save changed nothing
    torch.save({"model": {}}, str(tmp_path / "foreign.pt"))
    with pytest.raises(ValueError, match="not a filtersurgery training state"):
        ck.load_training_state(str(tmp_path / "foreign.pt"))
