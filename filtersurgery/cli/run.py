"""``filtersurgery run`` and ``filtersurgery demo``: the trainer from the command line.

``run`` writes, per seed, ``OUT/seedS/stepK.safetensors``, ``OUT/seedS/metrics.json``,
``OUT/seedS/epochs.csv``, and over all seeds ``OUT/summary.json`` and
``OUT/accuracy.png``. Re-running the same command resumes (docs/trainer.md).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Dict, List, Optional

from filtersurgery.cli.options import add_options, options_from_args
from filtersurgery.engine import registry
from filtersurgery.engine.checkpoint import LOCK_FILE, run_lock
from filtersurgery.engine.config import TrainConfig, resume_keys
from filtersurgery.engine.registry import SINGLE_RUN_METHODS
from filtersurgery.methods.multistep import MultiStepConfig

MODEL_DATA_FIELDS = ("model", "data", "data_root", "download", "image_size")


def add_model_data_arguments(p: argparse.ArgumentParser) -> None:
    """``--model --data --data-root --download --image-size`` (``run`` and ``sweep-sharing``), from TrainConfig."""
    add_options(p, TrainConfig, only=MODEL_DATA_FIELDS)


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``filtersurgery run`` (docs/trainer.md): TrainConfig's (built from its fields' ``option``
    metadata), ``--seeds``/``--out``, the multi-step methods' (MultiStepConfig's) and one group per
    registered single-run method family."""
    add_model_data_arguments(p)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds to run (default 0)")
    p.add_argument("--out", default=None, help="output folder (default runs/METHOD)")
    add_options(p, TrainConfig, exclude=MODEL_DATA_FIELDS)
    p.set_defaults(steps=None)  # None: 4 parts with --split multi, 2 with --split single (config_from_args)
    add_options(p, MultiStepConfig, title="multi-step options",
                description="the framework and its baselines (docs/method.md §1-4, §9)")
    for spec in registry.specs():  # one group per registered method family, built from its options dataclass
        add_options(p, spec.options, title=f"{spec.title} options", description=spec.help or None)


def method_options(cfg: TrainConfig, args: argparse.Namespace):
    """The options dataclass of ``cfg.method`` built from parsed ``args``: its registered options for a
    single-run method, :class:`MultiStepConfig` for a multi-step one."""
    if cfg.method not in SINGLE_RUN_METHODS:
        return options_from_args(MultiStepConfig, args)
    return options_from_args(registry.get(cfg.method).options, args)


def options_class(cfg: TrainConfig) -> type:
    """The options dataclass of ``cfg.method`` (whose ``resume=True`` fields a resume must match too)."""
    return registry.get(cfg.method).options if cfg.method in SINGLE_RUN_METHODS else MultiStepConfig


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The :class:`TrainConfig` of parsed ``run`` arguments (``--steps`` unset: 2 with ``--split single``, else 4)."""
    steps = args.steps if args.steps is not None else (2 if args.split == "single" else 4)
    return options_from_args(TrainConfig, args, steps=steps)


RUN_SETTINGS = Path(".work") / "run.json"  # a seed folder's settings while its run is unfinished


def _earlier_config(path: Path, nested: bool) -> Optional[Dict]:
    """The settings recorded in ``path`` (``metrics.json``'s ``config`` when ``nested``); None when missing."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"out: {path} is corrupt ({e}); move it away or use another --out") from None
    if not isinstance(old, dict):
        raise ValueError(f"out: {path} is not a JSON object; move it away or use another --out")
    return old.get("config", {}) if nested else old


def _has_earlier_work(seed_dir: Path) -> bool:
    """True when ``seed_dir`` holds anything an earlier run trained or wrote besides its settings file."""
    skip = {seed_dir / RUN_SETTINGS, seed_dir / LOCK_FILE}
    return seed_dir.is_dir() and any(p.is_file() and p not in skip for p in seed_dir.rglob("*"))


def _settings(cfg: TrainConfig, options) -> Dict:
    """The run's settings as a run folder records them: TrainConfig's and the method's options, one flat dict."""
    return {**cfg.record(), **(asdict(options) if options is not None else {})}


def check_out_dir(out: Path, cfg: TrainConfig, seed: int, options=None) -> None:
    """Refuse to resume into a folder that holds a run with other settings (nothing is overwritten).

    Compares the :func:`resume_keys` with the finished steps' ``metrics.json`` and, while a run
    is unfinished (killed before its first ``metrics.json``, e.g. in step 1 or a single-run
    method), with the settings :func:`claim_out_dir` wrote when it started."""
    seed_dir = out / f"seed{seed}"
    from filtersurgery.engine.checkpoint import refuse_other_settings

    olds = [_earlier_config(seed_dir / "metrics.json", nested=True)]
    if _has_earlier_work(seed_dir):
        olds.append(_earlier_config(seed_dir / RUN_SETTINGS, nested=False))
    for old in olds:
        if old is not None:
            refuse_other_settings(out, old, _settings(cfg, options),
                                  keys=[k for k in resume_keys(options_class(cfg)) if k in old])


def claim_out_dir(out: Path, cfg: TrainConfig, seed: int, options=None) -> None:
    """Record the run's :func:`resume_keys` settings in ``OUT/seedS/.work/run.json`` (removed when the seed
    finishes), so a re-run with other settings is refused even before the first ``metrics.json``."""
    from filtersurgery.engine.checkpoint import atomic_write_json, make_dir

    path = out / f"seed{seed}" / RUN_SETTINGS
    make_dir(path.parent.parent)  # a folder that cannot be created: one line naming it
    make_dir(path.parent)
    settings = _settings(cfg, options)
    atomic_write_json({k: settings[k] for k in resume_keys(options_class(cfg)) if k in settings}, path)


def summarize(out: Path, seeds: List[int], method: str) -> Dict:
    """Mean and std of test accuracy per step over seeds -> OUT/summary.json (+ accuracy.png)."""
    per_step: Dict[int, List[float]] = {}
    secs: Dict[int, List[float]] = {}
    flops: Dict[int, List[float]] = {}
    for s in seeds:
        m = json.loads((out / f"seed{s}" / "metrics.json").read_text())
        for e in m["steps"]:
            per_step.setdefault(e["step"], []).append(e["test_acc"])
            secs.setdefault(e["step"], []).append(e["seconds"])
            flops.setdefault(e["step"], []).append(e.get("train_flops", 0))
    rows = []
    for k in sorted(per_step):
        v = per_step[k]
        rows.append({"step": k, "test_acc_mean": statistics.fmean(v), "test_acc_std": statistics.stdev(v) if len(v) > 1 else 0.0,
                     "n": len(v), "seconds_mean": statistics.fmean(secs[k]), "train_flops": statistics.fmean(flops[k])})
    summary = {"method": method, "seeds": seeds, "steps": rows}
    from filtersurgery.engine.checkpoint import atomic_write_json

    atomic_write_json(summary, out / "summary.json")
    from filtersurgery.report.figures import accuracy_per_step

    accuracy_per_step({method: rows}, out / "accuracy.png")
    return summary


def _init_distributed(cfg: TrainConfig) -> None:
    """Under ``torchrun`` (WORLD_SIZE > 1): join the process group (NCCL on CUDA, else gloo)."""
    import os

    import torch
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    cuda = torch.cuda.is_available() and cfg.device != "cpu"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend="nccl" if cuda else "gloo")


def lr_text(cfg: TrainConfig, options=None) -> str:
    """The learning rates ``cfg.method`` trains with, in words (for the start banner); ``options``: the
    multi-step methods' :class:`MultiStepConfig` (default: its defaults)."""
    if cfg.method in registry.training_lr_methods():  # --lr is the lr of the one training run
        return f"{cfg.lr if cfg.lr is not None else cfg.scratch_lr:g} ({registry.get(cfg.method).schedule}; --lr)"
    if cfg.method == "joint":
        return f"{cfg.scratch_lr:g} (from scratch every step)"
    if cfg.method in SINGLE_RUN_METHODS:  # a base network, then new data at the new-data lr (sharing)
        return f"new data {cfg.new_lr:g} (--lr), base network {cfg.scratch_lr:g}"
    opts = options if isinstance(options, MultiStepConfig) else MultiStepConfig()
    sst = f", SST {opts.sst_lr:g}" if cfg.method in ("framework", "bst") else ""
    return f"new data {opts.step_lr(cfg):g} (--lr), step 1 {cfg.scratch_lr:g}{sst}"


def _start(cfg: TrainConfig, args: argparse.Namespace, options, data, out: Path) -> Dict:
    """Print the banner and the duration estimate; return each seed's :class:`~filtersurgery.cli.console.Resume`."""
    from filtersurgery.cli import console
    from filtersurgery.engine.run import amp_dtype, resolve_device

    dev = resolve_device(cfg.device)
    amp = amp_dtype(cfg, dev)
    plan = console.plan_run(cfg, data, args.seeds[0], options)
    resumes = {s: console.find_resume(out / f"seed{s}", cfg) for s in args.seeds}
    lines = console.banner(cfg, data, args, out, dev, amp, plan)
    lines.insert(2, f"  lr       {lr_text(cfg, options)}")
    print("\n".join(lines), flush=True)
    if all(r.complete for r in resumes.values()):
        print("  estimate nothing left to train", flush=True)
    else:
        sec = console.timed_batch(cfg, data, dev, amp)
        print(console.estimate_line(plan, sec, cfg, data, dev, [r for r in resumes.values() if not r.complete]),
              flush=True)
    for s, r in resumes.items():
        line = console.resume_line(s, out / f"seed{s}", r, plan)
        if line:
            print(line, flush=True)
    return resumes


def _close_progress_bars() -> None:
    """Clear tqdm bars left open by an interrupted loop, so the next line starts clean."""
    try:
        from tqdm import tqdm

        for bar in list(getattr(tqdm, "_instances", [])):
            bar.close()
    except ImportError:  # no tqdm, no bars
        pass


def cmd_run(args: argparse.Namespace) -> int:
    """``filtersurgery run``: every seed of one method, then ``summary.json`` and ``accuracy.png``.

    Prints a banner (device, data, images per part, batches per epoch, epochs, method,
    output folder) and a duration estimate first, then per seed where a re-run resumes;
    Ctrl-C prints one line saying where the state is (exit code 130).
    """
    from filtersurgery.data import check_classes, load_dataset
    from filtersurgery.engine.distributed import is_main_process
    from filtersurgery.models.factory import build_model

    cfg = config_from_args(args)
    cfg.validate()
    options = method_options(cfg, args)
    if isinstance(options, MultiStepConfig):
        options.validate()  # before any work: a refused run writes nothing
    _init_distributed(cfg)
    build_model(cfg.model, num_classes=10, in_chans=1)  # unknown model -> one-line error before any work
    out = Path(args.out or f"runs/{cfg.method}")
    for s in args.seeds:
        check_out_dir(out, cfg, s, options)
    data = check_classes(load_dataset(cfg.data, root=cfg.data_root, download=cfg.download, image_size=cfg.image_size))
    with contextlib.ExitStack() as locks:
        for s in args.seeds if is_main_process() else []:  # after every check: a refused run writes nothing
            locks.enter_context(run_lock(out / f"seed{s}"))  # a second run into the same folder: refused
            claim_out_dir(out, cfg, s, options)
        return _run_seeds(cfg, args, options, data, out)


def _run_seeds(cfg: TrainConfig, args: argparse.Namespace, options, data, out: Path) -> int:
    """Train every seed of ``cmd_run`` (banner first), print each step, then the summary."""
    from filtersurgery.cli.console import interrupted_line
    from filtersurgery.engine.distributed import barrier, is_main_process
    from filtersurgery.methods.multistep import multi_step

    seed = None
    try:
        resumes = _start(cfg, args, options, data, out) if is_main_process() else {}
        for s in args.seeds:
            seed = s
            if cfg.method in SINGLE_RUN_METHODS:
                m = registry.get(cfg.method).run(cfg, options, out / f"seed{s}", s, data)
            else:
                m = multi_step(cfg, out / f"seed{s}", seed=s, data=data, options=options)
            _remove_empty_work(out / f"seed{s}")
            r = resumes.get(s)
            for e in m["steps"] if is_main_process() else []:
                earlier = r is not None and (r.complete or e["step"] in r.done_steps)
                when = f"{e['seconds']:.0f}s, earlier run" if earlier else f"{e['seconds']:.0f}s"
                print(f"seed {s} step {e['step']}: {step_text(e)}  ({when})")
    except KeyboardInterrupt:
        _close_progress_bars()
        if is_main_process():
            print(f"filtersurgery run: {interrupted_line(out, seed)}", file=sys.stderr, flush=True)
        return 130
    barrier()
    if not is_main_process():
        return 0
    summary = summarize(out, args.seeds, cfg.method)
    for r in summary["steps"]:
        print(f"step {r['step']}: {r['test_acc_mean']:.2f} ± {r['test_acc_std']:.2f} (n={r['n']})")
    print(f"wrote {out}/summary.json, {out}/accuracy.png and per-seed checkpoints/metrics")
    return 0


def step_text(e: Dict) -> str:
    """``test T%  val V%`` of a step's ``metrics.json`` entry, with the validation accuracy of the model the
    step received (``val IN% -> V%``) and a note when the step left the model worse."""
    if e.get("val_in") is None:
        return f"test {e['test_acc']:.2f}%  val {e['val_acc']:.2f}%"
    worse = "  WORSE than the model it received" if e.get("worse") else ""
    return f"test {e['test_acc']:.2f}%  val {e['val_in']:.2f}% -> {e['val_acc']:.2f}%{worse}"


def _remove_empty_work(seed_dir: Path) -> None:
    """Remove the ``.work/`` folder of a finished seed when nothing is left in it."""
    from filtersurgery.engine.checkpoint import remove_empty_dir
    from filtersurgery.engine.distributed import is_main_process

    if is_main_process():
        (seed_dir / RUN_SETTINGS).unlink(missing_ok=True)
        remove_empty_dir(seed_dir / ".work")


# the demo's TrainConfig flags: its own defaults (the CPU testbed at a 5-minute size) and the help of those
# it reads its own way
_DEMO_DEFAULTS = dict(model="cifar:resnet8", steps=4, epochs=5, subset=3000)
_DEMO_HELP = {"steps": "number of steps/data parts (default %(default)s)",
              "epochs": "epochs per phase; step 1 gets twice as many (default %(default)s)",
              "subset": "training images per data part (default %(default)s; the embedded subset has 1350)",
              "data_root": "folder holding the Fashion-MNIST files (default: the usual places, else the embedded subset)"}
DEMO_METHODS = {"finetune (lr 1e-2)": dict(method="finetune", lr=1e-2), "framework": dict(method="framework")}


def _demo_config(args: argparse.Namespace, data) -> TrainConfig:
    """The demo's base config: the CPU testbed's model and protocol at a 5-minute size."""
    n_part = len(data.train_y) // args.steps
    subset = min(args.subset, int(n_part * 0.9))  # the embedded subset holds 1350 training images per part
    return TrainConfig(model=args.model, data="fashion-mnist", steps=args.steps, epochs=args.epochs,
                       step1_epochs=2 * args.epochs, subset=subset, device=args.device, batch_size=64,
                       progress=args.progress)


def harm_sentence(steps: List[Dict]) -> str:
    """What the framework did to the models it received (``metrics.json`` entries of steps >= 2): whether any
    step left its model worse, and how far SST's lowest epoch fell below the model SST received."""
    later = [e for e in steps if e.get("val_in") is not None]
    if not later:
        return ""
    worse = [e["step"] for e in later if e.get("worse")]
    drops = [p["val_in"] - p["val_min"] for e in later for p in e.get("phase_vals", [])
             if p["phase"] == "sst" and p.get("val_min") is not None]
    sst = f"; SST's lowest epoch was at most {max(drops):.1f} points below the model it received" if drops else ""
    if worse:
        return f"The framework left the model worse than it received it at step(s) {', '.join(map(str, worse))}{sst}."
    return f"No step of the framework left the model worse than it received it (validation){sst}."


def demo_sentence(results: Dict[str, List[Dict]], flops: Dict[str, float], out: Path, data_text: str = "") -> str:
    """Plain sentences on what the demo's table shows (whoever is ahead, on which data, whether the framework
    harmed the models it received), and where the full results are."""
    ft, fw = results["finetune (lr 1e-2)"][-1], results["framework"][-1]
    diff = fw["test_acc"] - ft["test_acc"]
    ratio = flops["framework"] / max(flops["finetune (lr 1e-2)"], 1.0)
    verdict = ("ahead of" if diff > 0 else "behind" if diff < 0 else "level with")
    on = f" on {data_text}" if data_text else ""
    harm = harm_sentence(results["framework"])
    return (f"At Data{fw['step']} the framework is {verdict} fine-tuning by {abs(diff):.2f} points "
            f"({fw['test_acc']:.2f}% vs {ft['test_acc']:.2f}% test{on}) at {ratio:.1f}x its training FLOPs. "
            f"{harm + ' ' if harm else ''}One seed of a 5-minute run decides little: docs/results.md has the 3-seed "
            f"comparisons with more baselines, and the ablation that shows where the framework gains or loses. "
            f"Files: {out}/")


def demo_data_text(data) -> str:
    """Which Fashion-MNIST the demo ran on, in words (the embedded subset is what a pip install has)."""
    n = f"{len(data.train_y)} training / {len(data.test_y)} test images"
    if data.name.endswith("-demo"):
        return (f"the embedded Fashion-MNIST subset ({n}; the full dataset: see README, Set up)")
    return f"Fashion-MNIST from {data.source} ({n})"


def cmd_demo(args: argparse.Namespace) -> int:
    """Framework vs fine-tuning on Fashion-MNIST in about 5 minutes on 2 CPU cores.

    The CPU testbed's model (``cifar:resnet8``) and protocol at a smaller size: step 1 is
    trained once and shared, then each method trains steps 2..4; every step's accuracies
    are printed as soon as it finishes, and a last sentence says what the table shows.
    Uses the full Fashion-MNIST when installed, else the embedded subset.
    """
    from filtersurgery.cli.console import banner, estimate_line, plan_run, timed_batch
    from filtersurgery.data import load_dataset
    from filtersurgery.report.figures import accuracy_per_step
    from filtersurgery.engine.run import amp_dtype, resolve_device
    from filtersurgery.methods.multistep import multi_step

    data = load_dataset("fashion-mnist", root=args.data_root, allow_demo=True)
    out = Path(args.out)
    base = _demo_config(args, data)
    base.validate()
    device = resolve_device(base.device)
    plan = [p for m, ov in DEMO_METHODS.items() for p in plan_run(replace(base, **ov), data)
            if p.step > 1 or m == "framework"]
    shown = argparse.Namespace(seeds=[0])
    fw_plan = plan_run(replace(base, method="framework"), data)
    lines = banner(replace(base, method="framework"), data, shown, out, device, amp_dtype(base, device), fw_plan)
    lines[0] = f"filtersurgery demo: fine-tuning (lr 1e-2) vs the framework, model {base.model}, seed 0"
    lines.insert(-1, f"  step 1   trained once ({base.step1_epochs} epochs) and shared by both methods")
    print("\n".join(lines))
    print(estimate_line(plan, timed_batch(base, data, device, amp_dtype(base, device)), base, data, device), flush=True)
    step1 = out / "step1" / "seed0"
    results: Dict[str, List[Dict]] = {}
    flops: Dict[str, float] = {}
    try:
        s1 = multi_step(replace(base, method="finetune"), step1, seed=0, data=data, until_step=1,
                        on_step=lambda e: print(f"step 1 (shared): test {e['test_acc']:.2f}%  val {e['val_acc']:.2f}%  "
                                                f"({e['seconds']:.0f}s)", flush=True))
        for name, ov in DEMO_METHODS.items():
            def show(e, name=name):
                if e["step"] == 1:  # the shared step 1, printed above
                    return
                print(f"{name:>18s} step {e['step']}: {step_text(e)}  ({e['seconds']:.0f}s)", flush=True)
            m = multi_step(replace(base, **ov), out / _slug(name) / "seed0", seed=0, data=data,
                           step1_from=str(step1 / "step1.safetensors"), on_step=show)
            results[name] = [s1["steps"][0]] + [e for e in m["steps"] if e["step"] > 1]
            flops[name] = float(sum(e.get("train_flops", 0) for e in m["steps"] if e["step"] > 1))
    except KeyboardInterrupt:
        _close_progress_bars()
        print(f"filtersurgery demo: interrupted; run the same command again to resume ({out})", file=sys.stderr)
        return 130
    print(f"\n{'step':>4}  " + "  ".join(f"{n:>18s}" for n in results))
    for k in range(len(results["framework"])):
        print(f"{k + 1:>4}  " + "  ".join(f"{results[n][k]['test_acc']:>17.2f}%" for n in results))
    accuracy_per_step({n: [{"step": e["step"], "test_acc_mean": e["test_acc"], "test_acc_std": 0.0} for e in r]
                       for n, r in results.items()}, out / "accuracy.png")
    print("\n" + demo_sentence(results, flops, out, demo_data_text(data)))
    return 0


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def add_parsers(sub) -> None:
    """Register ``run`` and ``demo`` with the CLI."""
    p = sub.add_parser("run", help="train with the multi-step framework or a baseline")
    add_run_arguments(p)
    p.set_defaults(func=cmd_run)
    d = sub.add_parser("demo", help="fine-tuning vs the framework on Fashion-MNIST in about 5 minutes on a CPU")
    d.add_argument("--out", default="runs/demo", help="output folder (default %(default)s)")
    add_options(d, TrainConfig, only=("model", "steps", "epochs", "subset", "data_root", "device", "progress"),
                help=_DEMO_HELP)
    d.set_defaults(**_DEMO_DEFAULTS)
    d.set_defaults(func=cmd_demo)
