"""The one accelerator check: full-size numbers from a single ~9-minute call on one GPU.

Run by ``benchmarks/device/check.sh`` from the repository root (it installs the carried
wheels first). Items, in priority order; every result is written to ``--out`` as soon as
it exists, and nothing new starts past ``--deadline`` seconds from the start:

  1. multi-step comparison in the paper's regime (``--item1 paper``, the default): timm
     resnet18 ``in_chans=1`` (over-parameterised for the data), Fashion-MNIST 1:1:1:1 with
     1125 training + 125 validation images per part (the paper's ~112 images per class),
     step 1 150 epochs, 60 epochs per phase, batch 64, seeds 0-2: framework (the library's
     defaults), finetune(1e-2), shrink-perturb, dash. ``--item1 full``: the full-size parts
     (13.5k training images each), 30 epochs per phase, batch 256 (the earlier check). ~420 s
  2. the same four methods for the CPU testbed's model (cifar:resnet8) at full size, after
     item 1.                                                          whatever is left
  extras (after item 1, while slots are free, stopped at deadline - reserve): finetune(1e-3)
     and joint (both measured at full size before: see the results folder), and
     fine-tuning 1e-2 given the framework's training FLOPs.           whatever is left

Budgets, measured on one H100 (benchmarks/device/results/2026-11-26-h100*): step 1 (30
epochs of 13.5k images) ~35-40 s per process; one resnet18 fine-tuning step ~45 s with 12-15
processes sharing the GPU; one framework step (SST + two-student AOD, 5x the FLOPs) ~220 s
with 15 processes, ~124 s with 6, 77-89 s with 3. These small models are launch-bound, so
the processes time-share the GPU, and every extra process slows the framework's runs. Hence
strict priority: no job of item 2 or of the extras starts while any job of item 1 is waiting
or running. Item 1 alone is estimated at ~420 s (its three framework runs finish last, alone
on the GPU); the two runs that measured these budgets had item 2 or extras running beside it
and were cut before the framework's Data4.
  3. ``sp.step()`` overhead (resnet18/50, mobilenetv2_100, efficientnet_b0; batch 256,
     64x64, bf16, interleaved rounds, medians, beside torch-pruning's regularizer). ~40 s
  4. trainer cost ratios (two-student AOD / one student; trainer epoch / plain loop). ~30 s

Items 1 and 2 run as parallel processes on the one GPU (``--jobs``; small models leave it
idle), each (seed, method) its own ``benchmarks/multistep.py`` process; step 1 is trained
once per seed and model and shared. Item 2 and the extras start only after item 1 is done. At
``deadline - reserve`` the jobs of item 2 and the extras are stopped (their finished
steps are kept) so that items 3 and 4 get an idle GPU; item 1's jobs may run until the
deadline, in which case items 3 and 4 are skipped (strict priority). Every training job
writes ``metrics.json`` after each step, so a cut job still reports its finished steps.

Output (at most 8 files): ``results.json`` (every number, GPU name and versions),
``results.md`` (the tables), ``item1_accuracy.png``, ``item2_accuracy.png``,
``check.log`` and ``runs.tar.gz`` (each job's metrics.json, epochs.csv and log).

``--dry``: the same pipeline at toy sizes on the CPU (a smoke test, run by the test suite).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[2]
METHODS = ["framework", "finetune(1e-2)", "shrink-perturb", "dash"]
EXTRAS = ["finetune(1e-3)", "joint", "finetune(1e-2) equal FLOPs"]
# item 1 in the paper's regime: ~112 training images per class and part, phases long enough to converge
PAPER_REGIME = ["--subset", "1125", "--step1-epochs", "150", "--epochs", "60", "--batch-size", "64"]


@dataclass
class Job:
    """One process: a (model, seed) step 1 or a (model, seed, method) multi-step run."""

    name: str
    item: str  # "1", "2" or "extra"
    cmd: List[str]
    after: Optional[str] = None  # a job that must have finished successfully first
    proc: Optional[subprocess.Popen] = None
    t0: float = 0.0
    t1: float = 0.0
    rc: Optional[int] = None
    note: str = ""
    log: Optional[Path] = None
    meta: Dict = field(default_factory=dict)


class Check:
    def __init__(self, args):
        self.args = args
        self.start = time.time()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.logf = open(self.out / "check.log", "a")
        self.results: Dict = {"dry": args.dry, "deadline_s": args.deadline, "items": {}}

    # ------------------------------------------------------------------ utils
    def now(self) -> float:
        return time.time() - self.start

    def log(self, msg: str) -> None:
        line = f"[{self.now():6.1f}s] {msg}"
        print(line, flush=True)
        self.logf.write(line + "\n")
        self.logf.flush()

    def save(self) -> None:
        """Rewrite results.json and results.md (called after every finished piece)."""
        self.results["elapsed_s"] = round(self.now(), 1)
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=1, default=str))
        tmp.replace(self.out / "results.json")
        (self.out / "results.md").write_text(self.markdown())

    # ------------------------------------------------------------ environment
    def environment(self) -> None:
        code = ("import json, sys, platform, torch, torchvision, timm\n"
                "import importlib.metadata as md\n"
                "try:\n import torch_pruning; tpv = md.version('torch-pruning')\n"
                "except Exception as e:\n tpv = 'MISSING: %s' % e\n"
                "cuda = torch.cuda.is_available()\n"
                "print(json.dumps({'python': platform.python_version(), 'torch': torch.__version__,"
                " 'torchvision': torchvision.__version__, 'timm': timm.__version__, 'torch_pruning': tpv,"
                " 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name(0) if cuda else None,"
                " 'gpu_count': torch.cuda.device_count()}))")
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        try:
            env = json.loads(r.stdout.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            env = {"error": (r.stdout + r.stderr)[-2000:]}
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            env["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.SubprocessError) as e:
            env["nvidia_smi"] = f"n/a ({type(e).__name__})"
        env["cpus"] = os.cpu_count()
        env["host"] = platform.node()
        self.results["environment"] = env
        self.log(f"environment: {json.dumps(env)}")
        self.save()

    # --------------------------------------------------------------- training
    def training_jobs(self) -> List[Job]:
        a = self.args
        py = [sys.executable, str(ROOT / "benchmarks" / "multistep.py")]
        if a.dry:  # toy sizes on the CPU, embedded data: 64 images per part, 1 epoch, 200 test images
            common = ["--data", "demo", "--epochs", "1", "--subset", "64", "--batch-size", "32", "--device", "cpu",
                      "--test-subset", "200", "--channels-last", "--state-every", "1e9"]
        else:
            common = ["--epochs", str(a.epochs), "--batch-size", "256", "--device", "cuda", "--channels-last",
                      "--state-every", "1e9"]
        if a.data_root and not a.dry:
            common += ["--data-root", a.data_root]
        common += ["--no-report"]
        models = {k: m for k, m in (("1", "timm:resnet18"), ("2", a.testbed_model)) if k in a.items}
        own = {"1": PAPER_REGIME if a.item1 == "paper" and not a.dry else []}  # later flags win in argparse
        jobs: List[Job] = []
        for item, model in models.items():
            out = self.work / f"item{item}"
            for s in a.seeds:
                jobs.append(Job(f"item{item}/step1/seed{s}", item,
                                py + ["--model", model, "--out", str(out), "--seeds", str(s), "--step1-only"] + common
                                + own.get(item, [])))
        queue = [(item, m) for item in models for m in a.methods] + [(item, m) for m in a.extras for item in models]
        for item, m in queue:
            out = self.work / f"item{item}"
            for s in a.seeds:
                jobs.append(Job(f"item{item}/{m}/seed{s}", item if m in a.methods else "extra",
                                py + ["--model", models[item], "--out", str(out), "--seeds", str(s), "--methods", m] + common
                                + own.get(item, []),
                                after=f"item{item}/step1/seed{s}", meta={"model": models[item], "method": m, "seed": s,
                                                                          "dir": str(out / _slug(m) / f"seed{s}")}))
        return jobs

    def launch(self, job: Job) -> None:
        job.log = self.work / "logs" / (_slug(job.name) + ".log")
        job.log.parent.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        job.proc = subprocess.Popen(job.cmd, stdout=open(job.log, "w"), stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                    start_new_session=True)
        job.t0 = time.time()
        self.log(f"start {job.name}")

    def stop(self, job: Job, why: str) -> None:
        if job.proc is not None and job.proc.poll() is None:
            try:
                os.killpg(job.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            job.proc.wait()
            job.rc, job.t1, job.note = job.proc.returncode, time.time(), why
            self.log(f"stopped {job.name} ({why}) after {job.t1 - job.t0:.0f}s")

    def train(self) -> None:
        a = self.args
        jobs = self.training_jobs()
        by = {j.name: j for j in jobs}
        pending = list(jobs)
        running: List[Job] = []
        reserve_at = a.deadline - a.reserve
        last_snapshot = 0.0
        cut = False
        while pending or running:
            for j in list(running):
                if j.proc.poll() is not None:
                    j.rc, j.t1 = j.proc.returncode, time.time()
                    running.remove(j)
                    tail = " | ".join(j.log.read_text(errors="replace").strip().splitlines()[-2:]) if j.rc else ""
                    self.log(f"done {j.name}: exit {j.rc} in {j.t1 - j.t0:.0f}s {tail}")
            t = self.now()
            if t >= reserve_at and not cut:
                cut = True
                for j in [j for j in running if j.item != "1"]:
                    self.stop(j, "cut at deadline - reserve")
                running = [j for j in running if j.item == "1"]
                self.log(f"no new training jobs: {len([p for p in pending])} not started")
                for j in pending:
                    j.note = "not started (deadline)"
                pending = []
            if t >= a.deadline:
                for j in running:
                    self.stop(j, "cut at deadline")
                running = []
                break
            for j in list(pending):
                if len(running) >= a.jobs:
                    break
                if j.item != "1" and any(q.item == "1" for q in pending + running):
                    continue  # strict priority: nothing slows item 1's framework runs while they last
                dep = by.get(j.after) if j.after else None
                if dep is not None and dep.rc is None:
                    continue  # step 1 of this seed not finished yet
                pending.remove(j)
                if dep is not None and dep.rc != 0:
                    j.note = f"skipped: {dep.name} failed"
                    continue
                self.launch(j)
                running.append(j)
            if t - last_snapshot >= 30 or not (pending or running):
                last_snapshot = t
                self.collect(jobs)
            time.sleep(0.5)
        self.collect(jobs)

    def collect(self, jobs: List[Job]) -> None:
        """Read every job's metrics.json into the results (items 1, 2 and extras)."""
        per_item: Dict[str, Dict] = {}
        for j in jobs:
            if "method" not in j.meta:
                continue
            mp = Path(j.meta["dir"]) / "metrics.json"
            steps = json.loads(mp.read_text())["steps"] if mp.exists() else []
            key = "item" + j.name[4]
            runs = per_item.setdefault(key, {"model": j.meta["model"], "runs": []})["runs"]
            runs.append({"method": j.meta["method"], "seed": j.meta["seed"], "steps": steps,
                         "status": _status(j), "wall_s": round((j.t1 or time.time()) - j.t0, 1) if j.t0 else None})
        for key, d in per_item.items():
            d["table"] = _table(d["runs"])
            self.results["items"][key] = d
        self.save()

    # ----------------------------------------------------------- items 3 and 4
    def run_script(self, key: str, cmd: List[str], json_path: Path, expect_s: float) -> None:
        left = self.args.deadline - self.now()
        if left < min(expect_s, 20):
            self.results["items"][key] = {"status": f"not run: {left:.0f}s left before the deadline"}
            self.log(f"{key}: not run ({left:.0f}s left)")
            self.save()
            return
        self.log(f"start {key}: {' '.join(cmd[1:])}")
        t0 = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        try:
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=left + self.args.grace)
            out, rc = r.stdout + r.stderr, r.returncode
        except subprocess.TimeoutExpired as e:
            out, rc = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or ""), "timeout"
        self.logf.write(out + "\n")
        res: Dict = {"status": "ok" if rc == 0 else f"exit {rc}", "seconds": round(time.time() - t0, 1),
                     "stdout_tail": out[-3000:]}
        if json_path.exists():
            res["data"] = json.loads(json_path.read_text())
        self.results["items"][key] = res
        self.log(f"done {key}: {res['status']} in {res['seconds']}s")
        self.save()

    def overhead_and_cost(self) -> None:
        a, py = self.args, sys.executable
        if a.dry:
            ov = ["--device", "cpu", "--models", "resnet18", "--batch-size", "2", "--size", "32", "--rounds", "5",
                  "--iters", "1", "--warmup", "1"]
            tc = ["--device", "cpu", "--batch-size", "16", "--batches", "2", "--rounds", "1"]
        else:
            ov = ["--device", "cuda", "--rounds", "5", "--iters", "15", "--warmup", "5"]
            tc = ["--device", "cuda", "--batch-size", "256", "--batches", "50", "--rounds", "5", "--channels-last",
                  "--state-every", "1e9"]  # as item 1 runs: no per-epoch state on a 9-minute GPU slot
        if a.data_root and not a.dry:
            tc += ["--data-root", a.data_root]
        if "3" in a.items:
            self.run_script("item3_sparsify_overhead",
                            [py, str(ROOT / "benchmarks" / "sparsify_overhead.py")] + ov + ["--out", str(self.work / "item3.json")],
                            self.work / "item3.json", 40)
        if "4" in a.items:
            self.run_script("item4_trainer_cost",
                            [py, str(ROOT / "benchmarks" / "trainer_cost.py")] + tc + ["--json", str(self.work / "item4.json")],
                            self.work / "item4.json", 30)

    # ------------------------------------------------------------------ output
    def markdown(self) -> str:
        env = self.results.get("environment", {})
        lines = [f"# Accelerator check{' (DRY RUN: toy sizes on CPU, not a result)' if self.args.dry else ''}", "",
                 f"GPU: {env.get('gpu')} ({env.get('nvidia_smi')}); python {env.get('python')}, torch {env.get('torch')}, "
                 f"torchvision {env.get('torchvision')}, timm {env.get('timm')}, torch-pruning {env.get('torch_pruning')}; "
                 f"elapsed {self.results.get('elapsed_s')} s of a {self.args.deadline:.0f} s deadline.", ""]
        for key in ("item1", "item2"):
            d = self.results["items"].get(key)
            if not d:
                continue
            lines += [f"## {key}: {d['model']}, Fashion-MNIST 1:1:1:1, test accuracy (%), mean ± std (n seeds)", "",
                      d["table"], ""]
            lines += ["| method | seed | status | wall s | step seconds | step TFLOPs |", "|---|---|---|---|---|---|"]
            for r in d["runs"]:
                secs = " / ".join(f"{e['seconds']:.0f}" for e in r["steps"])
                tfl = " / ".join(f"{e.get('train_flops', 0) / 1e12:.1f}" for e in r["steps"])
                lines.append(f"| {r['method']} | {r['seed']} | {r['status']} | {r['wall_s']} | {secs} | {tfl} |")
            lines.append("")
        for key in ("item3_sparsify_overhead", "item4_trainer_cost"):
            d = self.results["items"].get(key)
            if d:
                lines += [f"## {key}: {d['status']}", "", "```", d.get("stdout_tail", "")[-2500:], "```", ""]
        return "\n".join(lines)

    def finish(self, jobs_dirs: List[Path]) -> None:
        from filtersurgery.report.figures import accuracy_per_step

        for key in ("item1", "item2"):
            d = self.results["items"].get(key)
            if d and d.get("series"):
                try:
                    accuracy_per_step(d["series"], self.out / f"{key}_accuracy.png")
                except Exception as e:  # noqa: BLE001 - a plot must never lose the numbers
                    self.log(f"plot {key} failed: {type(e).__name__}: {e}")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tar:
            for d in jobs_dirs:
                for f in sorted(d.rglob("*")):
                    if f.is_file() and (f.name in ("metrics.json", "epochs.csv") or f.suffix == ".log" or f.name.endswith(".json")):
                        tar.add(f, arcname=str(f.relative_to(self.work)))
        (self.out / "runs.tar.gz").write_bytes(buf.getvalue())
        self.save()
        self.log(f"wrote {sorted(p.name for p in self.out.iterdir())}")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def _status(j: Job) -> str:
    if j.note:
        return j.note
    if j.rc is None:
        return "running" if j.proc is not None else "waiting"
    return "ok" if j.rc == 0 else f"exit {j.rc}"


def _table(runs: List[Dict]) -> str:
    """``| method | step 1 | ... |`` with mean ± std (n) of the finished steps of every seed."""
    by: Dict[str, Dict[int, List[float]]] = {}
    for r in runs:
        for e in r["steps"]:
            by.setdefault(r["method"], {}).setdefault(e["step"], []).append(e["test_acc"])
    steps = sorted({s for d in by.values() for s in d})
    lines = ["| method | " + " | ".join(f"Data{s}" for s in steps) + " |", "|" + "---|" * (len(steps) + 1)]
    for m, d in by.items():
        cells = []
        for s in steps:
            v = d.get(s, [])
            cells.append(f"{statistics.fmean(v):.2f} ± {statistics.stdev(v) if len(v) > 1 else 0.0:.2f} ({len(v)})" if v else "")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _series(runs: List[Dict]) -> Dict[str, List[Dict]]:
    by: Dict[str, Dict[int, List[float]]] = {}
    for r in runs:
        for e in r["steps"]:
            by.setdefault(r["method"], {}).setdefault(e["step"], []).append(e["test_acc"])
    return {m: [{"step": s, "test_acc_mean": statistics.fmean(v), "test_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0}
                for s, v in sorted(d.items())] for m, d in by.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry", action="store_true", help="toy sizes on the CPU (smoke test of the whole pipeline)")
    p.add_argument("--out", default=os.environ.get("OUT") or "runs/device_check", help="result folder (default $OUT)")
    p.add_argument("--work", default=None, help="scratch folder for the runs (default /tmp/fs_device_check)")
    p.add_argument("--data-root", default=None, help="folder holding the Fashion-MNIST .gz files")
    p.add_argument("--deadline", type=float, default=None, help="seconds from the start after which nothing new starts "
                                                                "(default 510, dry 600)")
    p.add_argument("--reserve", type=float, default=70.0, help="seconds kept for items 3 and 4 (default %(default)s)")
    p.add_argument("--grace", type=float, default=25.0, help="seconds a running item 3/4 may overrun the deadline")
    p.add_argument("--jobs", type=int, default=None, help="parallel training processes (default 12, dry 2)")
    p.add_argument("--epochs", type=int, default=30, help="epochs per phase (default %(default)s)")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 2 (dry: 0)")
    p.add_argument("--testbed-model", default="cifar:resnet8", help="item 2's model (default %(default)s)")
    p.add_argument("--item1", choices=("paper", "full"), default="paper",
                   help="item 1's regime: paper (1125 images per part, 60 epochs per phase) or full (13.5k, "
                        "--epochs) (default %(default)s)")
    p.add_argument("--items", default="1234", help="which items to run (default all: 1234)")
    p.add_argument("--methods", nargs="+", default=list(METHODS),
                   help="items 1 and 2's methods, run first (default %(default)s)")
    p.add_argument("--extras", nargs="*", default=None,
                   help=f"extra variants run while slots are free (default {EXTRAS}; dry: none)")
    a = p.parse_args(argv)
    # dry: a generous deadline, so a loaded CI machine never cuts the smoke test short (it takes ~1 min)
    a.deadline = a.deadline if a.deadline is not None else (600.0 if a.dry else 510.0)
    a.jobs = a.jobs or (2 if a.dry else 12)
    a.extras = a.extras if a.extras is not None else ([] if a.dry else list(EXTRAS))
    a.seeds = a.seeds if a.seeds is not None else ([0] if a.dry else [0, 1, 2])
    a.work = a.work or ("/tmp/fs_device_check_dry" if a.dry else "/tmp/fs_device_check")
    if a.dry:
        a.reserve = min(a.reserve, 40.0)
    c = Check(a)
    c.log(f"check start: {vars(a)}")
    c.environment()
    if "1" in a.items or "2" in a.items:
        c.train()
        for d in c.results["items"].values():
            if "runs" in d:
                d["series"] = _series(d["runs"])
    if "3" in a.items or "4" in a.items:
        c.overhead_and_cost()
    c.finish([Path(a.work)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
