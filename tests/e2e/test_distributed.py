"""Distributed training (2 CPU processes, gloo) and resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from filtersurgery import train

from filtersurgery.engine import checkpoint
from filtersurgery.data import load_demo

pytestmark = pytest.mark.slow  # end-to-end: torchrun-style processes, SIGKILL and resume

TINY = dict(model="cifar:resnet20", data="demo", steps=2, epochs=1, subset=64, batch_size=16, max_batches=2,
            device="cpu", progress=False)


def _worker(rank: int, world: int, init_file: str, out: str, res: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        from filtersurgery.methods.multistep import driver

        outputs = []
        real = driver.run_phase

        def spy(*a, **k):  # record every phase's output model on this rank
            m, handoff = real(*a, **k)
            outputs.append({k_: v.detach().clone() for k_, v in m.state_dict().items()})
            return m, handoff

        driver.run_phase = spy
        data = load_demo(subset_test=200)
        train.multi_step(train.TrainConfig(method="framework", **TINY), out, seed=0, data=data)
        torch.save(outputs, os.path.join(res, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_end_with_identical_weights(tmp_path):
    out, res = tmp_path / "run", tmp_path / "res"
    res.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "pg"), str(out), str(res)), nprocs=2, join=True)
    r0, r1 = torch.load(res / "rank0.pt"), torch.load(res / "rank1.pt")
    assert len(r0) == len(r1) == 3  # scratch, sst (SST subgradient on both ranks), aod
    for a, b in zip(r0, r1):
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    # rank 0 wrote the artefacts once; the SST phase changed the gammas
    m = json.loads((out / "metrics.json").read_text())
    assert [s["step"] for s in m["steps"]] == [1, 2]
    assert (out / "step2.safetensors").exists()
    saved = checkpoint.load_state_dict(out / "step2.safetensors")
    for k, v in saved.items():
        torch.testing.assert_close(v, r0[-1][k], rtol=0, atol=0)


def _cli(out: Path) -> list:
    return [sys.executable, "-m", "filtersurgery", "run", "--model", "cifar:resnet20", "--data", "demo",
            "--steps", "2", "--method", "framework", "--epochs", "3", "--subset", "64", "--batch-size", "16",
            "--max-batches", "2", "--device", "cpu", "--no-progress", "--out", str(out)]


def test_sigkill_mid_step_then_rerun_matches_uninterrupted(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    ref, run = tmp_path / "ref", tmp_path / "run"
    subprocess.run(_cli(ref), check=True, env=env, capture_output=True)

    proc = subprocess.Popen(_cli(run), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    csv = run / "seed0" / "epochs.csv"
    deadline = time.time() + 300
    killed = False
    while time.time() < deadline and proc.poll() is None:
        rows = csv.read_text().splitlines()[1:] if csv.exists() else []
        if any(r.startswith("2,") for r in rows):  # one epoch of step 2 done: kill mid-step
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.05)
    proc.wait()
    if not killed:
        pytest.skip("the run finished before it could be killed")
    assert proc.returncode == -signal.SIGKILL
    m = json.loads((run / "seed0" / "metrics.json").read_text())
    assert [s["step"] for s in m["steps"]] == [1]  # step 1 is kept, step 2 not yet written
    assert not list((run / "seed0").glob("*.tmp*"))  # atomic writes leave no half files behind

    subprocess.run(_cli(run), check=True, env=env, capture_output=True)
    a = checkpoint.load_state_dict(ref / "seed0" / "step2.safetensors")
    b = checkpoint.load_state_dict(run / "seed0" / "step2.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    rows = [tuple(r.split(",")[:3]) for r in (run / "seed0" / "epochs.csv").read_text().splitlines()[1:]]
    assert len(rows) == len(set(rows))  # no epoch logged twice
