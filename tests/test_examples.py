"""The examples run (``--smoke``), the public API is documented, every CLI flag is in docs/.

The examples run in ONE child Python process (``_DRIVER`` below) that executes each script
as ``__main__`` with its own ``sys.argv``, catching ``SystemExit``: importing torch, timm
and torchvision costs several CPU-seconds per process, which one process per example
would pay six times. Each example's exit code and output are then checked by its own test.
"""
from __future__ import annotations

import inspect
import json
import os
import pickle
import pydoc
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, subcommands

EXAMPLES = ROOT / "examples"
DOCS = ROOT / "docs"

_DRIVER = r"""
import contextlib, io, json, os, runpy, sys, time, traceback
jobs = json.loads(sys.argv[1])
results = {}
for job in jobs:
    saved = None
    if job.get("skip_cifar_md5"):  # the fake CIFAR-100 files cannot match torchvision's MD5 sums
        import torchvision.datasets.cifar as tv_cifar
        saved = tv_cifar.check_integrity
        tv_cifar.check_integrity = lambda fpath, md5=None: os.path.isfile(fpath)
    sys.argv = [job["path"]] + job["args"]
    buf, rc, t0 = io.StringIO(), 0, time.time()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            runpy.run_path(job["path"], run_name="__main__")
        except SystemExit as e:
            rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(file=buf)
            rc = -1
    if saved is not None:
        tv_cifar.check_integrity = saved
    results[job["name"]] = {"rc": rc, "out": buf.getvalue(), "seconds": round(time.time() - t0, 2)}
print("RESULTS=" + json.dumps(results))
"""


def _fake_cifar100(root: Path, train_per_class: int = 3, test_per_class: int = 2) -> None:
    """A tiny CIFAR-100 in torchvision's pickle layout: ``root/cifar-100-python/{train,test,meta}``."""
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, per in (("train", train_per_class), ("test", test_per_class)):
        labels = [c for c in range(100) for _ in range(per)]
        data = rng.integers(0, 256, size=(len(labels), 3 * 32 * 32), dtype=np.uint8)
        with open(d / split, "wb") as f:
            pickle.dump({"data": data, "fine_labels": labels, "coarse_labels": [c // 5 for c in labels],
                         "filenames": [f"{split}_{i}.png" for i in range(len(labels))]}, f)
    with open(d / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"class{i}" for i in range(100)],
                     "coarse_label_names": [f"super{i}" for i in range(20)]}, f)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Run every example with ``--smoke`` in one child process; ``{name: {rc, out, seconds}}``."""
    work = tmp_path_factory.mktemp("examples")
    empty = work / "no_data"
    empty.mkdir()
    fake = work / "fake_cifar"
    _fake_cifar100(fake)
    ex = lambda name: str(EXAMPLES / f"{name}.py")  # noqa: E731
    jobs = [
        {"name": "sparsify_timm_backbone", "path": ex("sparsify_timm_backbone"), "args": ["--smoke"]},
        {"name": "multistep_fashion_mnist", "path": ex("multistep_fashion_mnist"), "args": ["--smoke"]},
        {"name": "kernel_reactivation", "path": ex("kernel_reactivation"), "args": ["--smoke"]},
        {"name": "partial_sharing", "path": ex("partial_sharing"), "args": ["--smoke"]},
        {"name": "cifar100_missing", "path": ex("multistep_cifar100"), "args": ["--smoke", "--data-root", str(empty)]},
        {"name": "cifar100_fake", "path": ex("multistep_cifar100"), "args": ["--smoke", "--data-root", str(fake)],
         "skip_cifar_md5": True},
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               FILTERSURGERY_DATA=str(empty), OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(jobs)], cwd=work, env=env,
                          capture_output=True, text=True, timeout=600)
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULTS=")]
    assert proc.returncode == 0 and line, f"driver failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = json.loads(line[-1][len("RESULTS="):])
    res["_work"] = str(work)
    return res


def _ok(runs, name):
    r = runs[name]
    assert r["rc"] == 0, f"{name} exited with {r['rc']}:\n{r['out'][-3000:]}"
    return r["out"]


def test_every_example_is_run():
    ran = {"sparsify_timm_backbone", "multistep_fashion_mnist", "kernel_reactivation", "partial_sharing",
           "multistep_cifar100"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == ran


def test_sparsify_timm_backbone(runs):
    out = _ok(runs, "sparsify_timm_backbone")
    m = re.search(r"useless factors: (\d+) of (\d+)", out)
    assert m, out
    k, n = int(m.group(1)), int(m.group(2))
    assert n > 0 and k == int(0.3 * n + 0.5)  # Target_r = 0.3 of all factors
    m = re.search(r"Dri \(I=0\.1\): (\d+) gammas re-drawn", out)
    assert m and int(m.group(1)) == k
    assert (Path(runs["_work"]) / "runs/examples/sparsify/gamma_hist.png").stat().st_size > 0


def _table_rows(out):
    return {ln.split("|")[1].strip(): ln for ln in out.splitlines() if ln.startswith("| ") and "±" in ln}


def test_multistep_fashion_mnist(runs):
    out = _ok(runs, "multistep_fashion_mnist")
    rows = _table_rows(out)
    assert set(rows) == {"finetune", "framework"} and all(r.count("±") == 3 for r in rows.values())
    base = Path(runs["_work"]) / "runs/examples/multistep_fashion_mnist_smoke"
    ft = json.loads((base / "finetune/seed0/metrics.json").read_text())
    fw = json.loads((base / "framework/seed0/metrics.json").read_text())
    assert [s["step"] for s in fw["steps"]] == [1, 2, 3]
    assert fw["steps"][0]["phases"] == [] and fw["steps"][0]["test_acc"] == ft["steps"][0]["test_acc"]  # step 1 reused
    assert fw["steps"][2]["phases"] == ["sst", "aod"] and ft["steps"][2]["phases"] == ["finetune"]
    assert (base / "accuracy.png").stat().st_size > 0


def test_kernel_reactivation(runs):
    out = _ok(runs, "kernel_reactivation")
    kernels = [int(k) for k in re.findall(r"reactivated (\d+) kernels", out)]
    assert kernels and kernels[0] > 0  # smoke: period 1 of 2 epochs -> one reactivation
    assert re.search(r"test accuracy: plain [\d.]+%  reactivation [\d.]+%", out)


def test_partial_sharing(runs):
    out = _ok(runs, "partial_sharing")
    assert re.search(r"all-class test accuracy .* over 10 classes\): [\d.]+%", out)
    assert len(re.findall(r"within-set accuracy", out)) == 3
    ratio = float(re.search(r"\(([\d.]+)x\)", out).group(1))
    assert 0 < ratio < 1  # frozen layers need no weight gradients


def test_cifar100_without_data_says_how_to_get_it(runs):
    r = runs["cifar100_missing"]
    lines = [ln for ln in r["out"].splitlines() if ln.strip()]
    assert r["rc"] == 1 and len(lines) == 1, r["out"]
    assert "cifar-100-python" in lines[0] and "--download" in lines[0] and "--data-root" in lines[0]


def test_cifar100_with_data_runs(runs):
    out = _ok(runs, "cifar100_fake")
    assert "data: cifar100 (300 train / 200 test)" in out
    rows = _table_rows(out)
    assert set(rows) == {"finetune", "framework"} and all(r.count("±") == 3 for r in rows.values())


# --------------------------------------------------------------------------- API docs


def public_names():
    """The names of ``filtersurgery.__all__``."""
    import filtersurgery

    return list(filtersurgery.__all__)


NAMESPACES = ("train", "reactivation", "sharing", "growth", "warmstart", "distill", "data")


def namespace_names():
    """``(namespace, name, object)`` of every name a public namespace exports (its ``__all__``)."""
    import filtersurgery

    return [(ns, n, getattr(getattr(filtersurgery, ns), n)) for ns in NAMESPACES for n in getattr(filtersurgery, ns).__all__]


def _has_own_docstring(obj) -> bool:
    doc = obj.__doc__ if not isinstance(obj, (str, int, float)) else "constant"
    if not doc or not doc.strip():
        return False
    # a dataclass without a docstring gets its signature, "Name(field: type, ...)", as __doc__
    return not (inspect.isclass(obj) and doc.startswith(f"{obj.__name__}("))


def _documented(obj) -> bool:
    """A class or function has its own docstring; constants, modules and registry views need none."""
    if inspect.isclass(obj) or inspect.isfunction(obj) or inspect.isbuiltin(obj):
        return _has_own_docstring(obj)
    return True


def test_public_api_has_docstrings_and_is_in_api_md():
    import filtersurgery

    names = public_names()
    assert 12 <= len(names) <= 25
    api = (DOCS / "api.md").read_text()
    missing_doc = [n for n in names if not _documented(getattr(filtersurgery, n))]
    assert not missing_doc, f"public names without a docstring: {missing_doc}"
    missing_api = [n for n in names if not re.search(r"`(?:[\w.]+\.)?%s[`(\[]" % re.escape(n), api)]
    assert not missing_api, f"public names not in docs/api.md: {missing_api}"


def test_every_namespace_name_has_a_docstring_and_is_in_api_md():
    api = (DOCS / "api.md").read_text()
    rows = namespace_names()
    assert len(rows) > 80
    missing_doc = [f"{ns}.{n}" for ns, n, obj in rows if not _documented(obj)]
    assert not missing_doc, f"namespace names without a docstring: {missing_doc}"
    missing_api = [f"{ns}.{n}" for ns, n, _ in rows if not re.search(r"`%s\.%s[`(\[ ]" % (ns, re.escape(n)), api)]
    assert not missing_api, f"namespace names not in docs/api.md: {missing_api}"


def test_module_functions_in_api_md_have_docstrings():
    """``losses.*`` and ``train.*`` are documented in docs/api.md; what it names must have a docstring."""
    from filtersurgery import train
    from filtersurgery.distill import losses

    api = (DOCS / "api.md").read_text()
    for mod in (losses, train):
        short = mod.__name__.rsplit(".", 1)[-1]
        for name in re.findall(r"`%s\.(\w+)" % short, api):
            obj = getattr(mod, name, None)
            assert obj is not None, f"docs/api.md names {short}.{name}, which does not exist"
            if callable(obj):
                assert _has_own_docstring(obj), f"{short}.{name} has no docstring"
    for name in losses.__all__:
        assert re.search(r"`losses\.%s[`(]" % name, api), f"losses.{name} not in docs/api.md"


def test_help_lists_public_api():
    """``help(filtersurgery)`` shows every public name (pydoc lists classes/functions of ``__all__``)."""
    import filtersurgery

    text = pydoc.render_doc(filtersurgery, renderer=pydoc.plaintext)
    missing = [n for n in public_names() if not n.startswith("__") and not re.search(r"\b%s\b" % re.escape(n), text)]
    assert not missing, f"help(filtersurgery) does not list: {missing} (define __all__ in filtersurgery/__init__.py)"


# --------------------------------------------------------------------------- CLI docs


_subcommands = subcommands


def test_every_cli_subcommand_and_flag_is_documented():
    docs = "\n".join(p.read_text() for p in sorted(DOCS.glob("*.md")))
    missing = []
    for cmd, p in _subcommands().items():
        if not re.search(r"filtersurgery %s\b" % re.escape(cmd), docs):
            missing.append(f"filtersurgery {cmd}")
        for action in p._actions:
            for flag in action.option_strings:
                if flag.startswith("--") and flag != "--help" and not re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(flag), docs):
                    missing.append(f"{cmd} {flag}")
    assert not missing, f"not documented anywhere in docs/: {missing}"

