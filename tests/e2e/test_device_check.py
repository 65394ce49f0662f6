"""The prepared accelerator check must not rot: its --dry pipeline runs here on the CPU."""
import json
import os
import subprocess
import sys

import pytest
from conftest import ROOT



@pytest.mark.slow  # end-to-end
def test_device_check_dry(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHON=sys.executable, OUT=str(out))
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "device" / "check.sh"), "--dry", "--work", str(tmp_path / "work")],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8  # what comes back from the accelerator machine
    assert {"results.json", "results.md", "check.log", "runs.tar.gz", "item1_accuracy.png"} <= set(files)
    res = json.loads((out / "results.json").read_text())
    assert res["dry"] is True and "torch" in res["environment"]
    for item in ("item1", "item2"):
        runs = res["items"][item]["runs"]
        assert {r["method"] for r in runs} == {"framework", "finetune(1e-2)", "shrink-perturb", "dash"}
        for r in runs:
            assert r["status"] == "ok" and [e["step"] for e in r["steps"]] == [1, 2, 3, 4]
            assert all(0.0 <= e["test_acc"] <= 100.0 for e in r["steps"])
    for item in ("item3_sparsify_overhead", "item4_trainer_cost"):
        assert res["items"][item]["status"] == "ok", res["items"][item]
        assert res["items"][item]["data"]
    assert "DRY RUN" in (out / "results.md").read_text()
