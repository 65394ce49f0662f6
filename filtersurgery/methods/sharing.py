"""Partial network sharing as a training method and its baseline (docs/method.md §6); the sweep over sharing
fractions is ``methods/sharing_sweep.py``.

CLI methods (``filtersurgery run --method M``), class-incremental over ``--class-sets``
(sizes in label order, e.g. ``4,3,3``: classes 0-3, then 4-6, then 7-9):

================== ==============================================================================
``sharing``         the base network is trained from scratch on the first set (lr 0.1 cosine); for
                    each later set a branch is made with :func:`~filtersurgery.ops.sharing.share`
                    (``--share`` of the conv parameters frozen and shared, a fresh head for the
                    new classes, the rest cloned from the base) and trained on that set's data
                    only at ``--lr`` (default 1e-3). The updated network is a
                    :class:`~filtersurgery.ops.branched.BranchedNet` (max softmax probability).
                    ``--share 0`` is the paper's "without partial network sharing" baseline.
``class-finetune``  one network with a head over all classes, trained on the first set, then
                    fine-tuned whole on each new set's data (CE at ``--lr``): it forgets.
================== ==============================================================================

Each set's data is its classes' share of the training set (``--subset N``: N training
images per set), 10% of it held out for validation (docs/method.md §8); the test accuracy is read on
the official test set. ``metrics.json`` has one entry whose ``test_acc``/``val_acc`` are the
all-class accuracies (prediction over all classes of the sets); ``per_set`` lists, per
class set, the accuracy within the set (``test_acc``: the branch on its own classes, the
paper's per-set rows) and under the all-class prediction (``test_acc_all``: what the
class-incremental network gets right on that set's images).

:func:`~filtersurgery.methods.sharing_sweep.sweep_sharing` (the ``filtersurgery sweep-sharing`` command) runs
``sharing`` for each of ``--shares`` (the base is trained once and reused), writes
``sweep.csv``/``sweep.json``/``sweep.png`` (the accuracy-vs-sharing curve, paper §3.4)
and marks the chosen configuration: the largest
share whose all-class *validation* accuracy is within ``--max-drop`` points of no sharing.
Per configuration it also reports training MACs per iteration, trainable and stored
parameters, measured time per iteration and peak memory
(:func:`~filtersurgery.report.cost.training_cost`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.data import augment

from filtersurgery.engine import checkpoint
from filtersurgery.engine.registry import MethodSpec, option, register
from filtersurgery.data import ImageData, load_dataset
from filtersurgery.models.user import is_user_model, model_id
from filtersurgery.ops.branched import BranchedNet
from filtersurgery.ops.sharing import branch_state_dict, load_branch, share, share_plan
from filtersurgery.report.cost import training_cost
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.metrics import write_metrics
from filtersurgery.engine.phase import FineTune, Phase, Scratch
from filtersurgery.engine.run import Run
from filtersurgery.engine.trainer import run_phase
from filtersurgery.tracing.probe import eval_mode, example_input

METHODS = ("sharing", "class-finetune")
DEFAULT_SHARE = 0.8
DEFAULT_SHARES = (0.0, 0.5, 0.66, 0.8, 0.9, 0.99)
PROGRESS_FILE = "progress.json"


# --------------------------------------------------------------------------- options
@dataclass
class SharingConfig:
    """Options of ``sharing`` / ``class-finetune``; the field metadata names each one's ``filtersurgery run``
    flag (:func:`~filtersurgery.engine.registry.option`). ``class_sets``: sizes in label order
    (:func:`class_sets_from`; None: 40%/30%/30% of the classes); ``share``: ``sharing`` only."""

    class_sets: Optional[str] = option(None, flag="--class-sets", metavar="N,N,...",
                                       help="sharing/class-finetune: sizes of the class sets in label order, e.g. "
                                            "4,3,3 (default: 40%%/30%%/30%% of the classes)")
    share: float = option(DEFAULT_SHARE, flag="--share",
                          help="sharing: fraction of conv parameters (forward order) frozen and shared with the base "
                               "(default %(default)s; 0 = no sharing)")


def set_phase(cfg: TrainConfig, k: int) -> Phase:
    """The phase of class set ``k``: the base network from scratch (k = 1, lr ``scratch_lr``), else
    ``sharing``'s branch or ``class-finetune``'s fine-tuning at the new-data lr (``cfg.new_lr``)."""
    if k == 1:
        return Scratch("base", [0], cfg.scratch_lr, cfg.epochs)
    return FineTune("branch" if cfg.method == "sharing" else "finetune", [0], cfg.new_lr, cfg.epochs)


def plan_phases(cfg: TrainConfig, options: Optional[SharingConfig], data: ImageData) -> List[Tuple[int, Phase, torch.Tensor]]:
    """One phase per class set, each on the training images of its classes (:attr:`MethodSpec.plan`)."""
    sets = class_sets_from(options.class_sets if options is not None else None, data.num_classes)
    return [(k, set_phase(cfg, k), data.train_y[torch.isin(data.train_y, torch.as_tensor(cls))])
            for k, cls in enumerate(sets, start=1)]


def class_sets_from(spec: Optional[str], num_classes: int) -> List[List[int]]:
    """``"4,3,3"`` -> ``[[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]`` (consecutive label order).

    ``None``: three sets of 40%/30%/30% of the classes (the paper's CIFAR-10 split 4/3/3).
    """
    if spec is None:
        if num_classes < 3:
            raise ValueError(f"class_sets: the default split needs >= 3 classes, the data has {num_classes}")
        a = max(1, round(0.4 * num_classes))
        b = max(1, round(0.3 * num_classes))
        sizes = [a, b, num_classes - a - b]
    else:
        try:
            sizes = [int(s) for s in str(spec).replace(" ", "").split(",") if s != ""]
        except ValueError:
            raise ValueError(f"class_sets: must be comma-separated set sizes like 4,3,3, got {spec!r}") from None
    if len(sizes) < 2 or min(sizes) < 1 or sum(sizes) > num_classes:
        raise ValueError(f"class_sets: need >= 2 sizes >= 1 summing to at most {num_classes} classes, got {spec!r}")
    out, start = [], 0
    for s in sizes:
        out.append(list(range(start, start + s)))
        start += s
    return out


def class_subset(data: ImageData, classes: Sequence[int], remap: bool) -> ImageData:
    """The images of ``classes`` only; labels remapped to ``0..len(classes)-1`` when ``remap``.

    Normalization statistics stay the whole dataset's (one normalization for every branch).
    """
    cls = torch.as_tensor(list(classes), dtype=torch.int64)
    lut = torch.full((data.num_classes,), -1, dtype=torch.int64)
    lut[cls] = torch.arange(len(cls))

    def pick(x, y):
        idx = torch.nonzero(torch.isin(y, cls)).flatten()
        yy = y[idx]
        return x[idx], (lut[yy] if remap else yy)

    tx, ty = pick(data.train_x, data.train_y)
    vx, vy = pick(data.test_x, data.test_y)
    names = [data.classes[c] for c in classes] if (remap and data.classes) else data.classes
    return replace(data, train_x=tx, train_y=ty, test_x=vx, test_y=vy,
                   num_classes=len(cls) if remap else data.num_classes, classes=names,
                   name=f"{data.name}[{','.join(map(str, classes))}]", extra=dict(data.extra))


def _set_runs(cfg: TrainConfig, seed: int, out: Path, data: ImageData, sets, remap: bool) -> List[Run]:
    """One :class:`Run` per class set (one data part each: 90% train / 10% val; ``subset`` per set)."""
    sub_cfg = replace(cfg, split="multi", steps=1)
    runs = [Run(sub_cfg, seed, out, class_subset(data, s, remap)) for s in sets]
    runs[0].work.mkdir(parents=True, exist_ok=True)
    return runs


def _progress(out: Path, args: Dict) -> Dict:
    """Read ``progress.json``; refuse a folder holding a run with other sharing settings."""
    path = out / PROGRESS_FILE
    if not path.exists():
        return {"args": args, "steps": {}}
    prog = checkpoint.read_json(path)
    checkpoint.refuse_other_settings(out, prog.get("args", {}), args, keys=list(args))
    return prog


def _finish_step(run: Run, step: int, prog: Dict, out: Path, **info) -> None:
    prog["steps"][str(step)] = info
    checkpoint.atomic_write_json(prog, out / PROGRESS_FILE)
    run.drop_step_work(step)


# --------------------------------------------------------------------------- evaluation
@torch.no_grad()
def _outputs(model: nn.Module, x, data: ImageData, device, amp, batch_size: int = 512) -> torch.Tensor:
    """Model outputs (float, CPU) for uint8 images ``x``; the model's modes are restored."""
    outs = []
    with eval_mode(model):
        for i in range(0, len(x), batch_size):
            xb = augment.normalize(x[i:i + batch_size].to(device), data.mean, data.std)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                outs.append(model(xb).float().cpu())
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def _set_accuracy(out: torch.Tensor, y: torch.Tensor, cols: Sequence[int]) -> float:
    """Accuracy (%) of ``argmax`` over columns ``cols`` against global labels ``y``."""
    if len(y) == 0:
        return 0.0
    c = torch.as_tensor(list(cols))
    pred = c[out[:, c].argmax(1)]
    return 100.0 * (pred == y).float().mean().item()


def evaluate_sets(model: nn.Module, runs: List[Run], sets, remapped: bool, data: ImageData) -> Dict:
    """Per-set and all-class accuracy of the class-incremental network ``model``.

    ``model`` outputs one column per class id (a :class:`BranchedNet` or an all-class
    network). Within-set accuracy: argmax over the set's columns; all-class: over the
    columns of every set. Validation: each set's held-out training images.
    """
    all_ids = [c for s in sets for c in s]
    dev, amp = runs[0].device, runs[0].amp
    per_set, totals = [], {"test": [0.0, 0], "val": [0.0, 0]}
    for run, s in zip(runs, sets):
        lut = torch.as_tensor(s)
        row = {"classes": list(s)}
        for split, (x, y) in (("test", (run.data.test_x, run.data.test_y)), ("val", run.part_xy([0], "val"))):
            y = lut[y] if remapped else y
            out = _outputs(model, x, data, dev, amp)
            row[f"{split}_acc"] = round(_set_accuracy(out, y, s), 4)
            acc_all = _set_accuracy(out, y, all_ids)
            row[f"{split}_acc_all"] = round(acc_all, 4)
            totals[split][0] += acc_all * len(y)
            totals[split][1] += len(y)
        per_set.append(row)
    return {"per_set": per_set, "test_acc": round(totals["test"][0] / max(1, totals["test"][1]), 4),
            "val_acc": round(totals["val"][0] / max(1, totals["val"][1]), 4)}


def _example_batch(data: ImageData, n: int, device) -> torch.Tensor:
    return example_input(None, (data.in_chans, data.size, data.size), batch=n, device=device)


# --------------------------------------------------------------------------- methods
def run_method(cfg: TrainConfig, options: Optional[SharingConfig], out_dir: Path, seed: int, data: ImageData) -> Dict:
    """``filtersurgery run --method sharing|class-finetune`` for one seed (module docstring)."""
    _needs_a_name(cfg)
    opts = options if options is not None else SharingConfig()
    sets = class_sets_from(opts.class_sets, data.num_classes)
    if cfg.method == "sharing":
        return run_sharing(cfg, sets, opts.share, out_dir, seed, data)
    if cfg.method == "class-finetune":
        return run_class_finetune(cfg, sets, out_dir, seed, data)
    raise ValueError(f"method: {cfg.method!r} is not implemented here (one of {', '.join(METHODS)})")


def _needs_a_name(cfg: TrainConfig) -> None:
    """One-line ValueError for a user model: these methods build one head per class set from a model name."""
    if is_user_model(cfg.model):
        raise ValueError(f"model: {cfg.method} builds one network per class set (its own number of classes) from a "
                         f"model name; got a user model ({model_id(cfg.model)}): pass timm:NAME, torchvision:NAME or "
                         f"cifar:resnetDEPTH")


def run_sharing(cfg: TrainConfig, class_sets: List[List[int]], share_frac: float, out_dir, seed: int = 0,
                data: Optional[ImageData] = None, base_from: Optional[Path] = None, cost: bool = True) -> Dict:
    """Base on set 1, one branch per later set with ``share_frac`` shared; writes ``out_dir/metrics.json``.

    ``base_from``: a ``step1.safetensors`` of the same model, seed and class sets to reuse
    (the sweep trains the base once). Re-running with the same ``out_dir`` resumes.
    ``cost``: measure :func:`~filtersurgery.report.cost.training_cost` of the branch.
    Checkpoints: ``step1.safetensors`` the base (full ``state_dict``), ``stepK.safetensors``
    (K >= 2) the branch's own tensors (:func:`~filtersurgery.ops.sharing.branch_state_dict`;
    rebuild with :func:`~filtersurgery.ops.sharing.load_branch`).
    """
    share_frac = float(share_frac)
    if not 0.0 <= share_frac <= 1.0:
        raise ValueError(f"share: must be in [0, 1], got {share_frac}")
    cfg = replace(cfg, method="sharing")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_dataset(cfg.data, root=cfg.data_root, download=cfg.download)
    prog = _progress(out, {"method": "sharing", "class_sets": class_sets, "share": share_frac, "model": cfg.model})
    done = checkpoint.read_json(out / "metrics.json") if (out / "metrics.json").exists() else None
    if done is not None and done.get("config", {}).get("share") == share_frac and len(prog["steps"]) == len(class_sets):
        return done
    runs = _set_runs(cfg, seed, out, data, class_sets, remap=True)
    ex = _example_batch(data, 1, runs[0].device)
    base = _sharing_base(runs[0], prog, out, base_from)
    branches = [_sharing_branch(runs[k - 1], k, base, share_frac, len(class_sets[k - 1]), prog, out, seed, ex)
                for k in range(2, len(class_sets) + 1)]
    metrics = _sharing_metrics(cfg, data, runs, class_sets, share_frac, base, branches, prog, seed, cost)
    checkpoint.remove_empty_dir(runs[0].work)
    return metrics


def _sharing_base(run: Run, prog: Dict, out: Path, base_from: Optional[Path]) -> nn.Module:
    """Step 1 of ``sharing``: the base network on the first class set (resumed, reused from ``base_from``, or trained)."""
    cfg, dev = run.cfg, run.device
    base = run.new_model()
    ck = out / "step1.safetensors"
    if ck.exists():
        base.load_state_dict(checkpoint.load_state_dict(ck, device=str(dev)))
    elif base_from is not None and Path(base_from).exists():
        base.load_state_dict(checkpoint.load_state_dict(base_from, device=str(dev)))
        checkpoint.save_state_dict(base.state_dict(), ck)
        _finish_step(run, 1, prog, out, seconds=0.0, base_from=str(base_from))
    else:
        t0 = time.time()
        base, _ = run_phase(run, 1, set_phase(cfg, 1), base)
        checkpoint.save_state_dict(base.state_dict(), ck)
        _finish_step(run, 1, prog, out, seconds=round(time.time() - t0, 2))
    return base


def _sharing_branch(run: Run, k: int, base: nn.Module, share_frac: float, n_classes: int, prog: Dict, out: Path,
                    seed: int, ex: torch.Tensor) -> nn.Module:
    """Step ``k >= 2`` of ``sharing``: the branch of class set ``k``, trained on its own data only (or resumed)."""
    ck = out / f"step{k}.safetensors"
    if ck.exists():
        return load_branch(base, checkpoint.load_state_dict(ck, device=str(run.device)), share_frac,
                           num_classes=n_classes, example_inputs=ex)
    torch.manual_seed(seed * 1000 + k)  # the new head's initialization
    br = share(base, share_frac, num_classes=n_classes, example_inputs=ex)
    t0 = time.time()
    br, _ = run_phase(run, k, set_phase(run.cfg, k), br)
    checkpoint.save_state_dict(branch_state_dict(br), ck)
    _finish_step(run, k, prog, out, seconds=round(time.time() - t0, 2))
    return br


def _sharing_metrics(cfg: TrainConfig, data: ImageData, runs: List[Run], class_sets: List[List[int]], share_frac: float,
                     base: nn.Module, branches: List[nn.Module], prog: Dict, seed: int, cost: bool) -> Dict:
    """Evaluate the branched network of a ``sharing`` run and write its ``metrics.json``."""
    dev = runs[0].device
    net = BranchedNet(base, class_sets[0])
    for br, s in zip(branches, class_sets[1:]):
        net.add_branch(br, s)
    ev = evaluate_sets(net, runs, class_sets, remapped=True, data=data)
    plan = share_plan(branches[-1])
    models = [base] + branches
    for row, m, (k, p) in zip(ev["per_set"], models, sorted(prog["steps"].items(), key=lambda kv: int(kv[0]))):
        row["trainable_params"] = sum(q.numel() for q in m.parameters() if q.requires_grad)
        row["seconds"] = p.get("seconds", 0.0)
    extra = {"class_sets": class_sets, "per_set": ev["per_set"], "share": plan.to_dict(),
             "stored_params": sum(p.numel() for p in net.parameters()),
             "params_per_network": sum(p.numel() for p in base.parameters())}
    flops = None
    if cost:
        extra["cost"] = _cost_summary(cfg, data, dev, base, branches[-1], len(class_sets[-1]))
        n_imgs = [len(r.part_xy([0], "train")[1]) for r in runs]
        per_img = [extra["cost"]["base_train_macs_per_iter"]] + [extra["cost"]["train_macs_per_iter"]] * len(branches)
        flops = int(sum(2 * m / cfg.batch_size * n * cfg.epochs for m, n in zip(per_img, n_imgs)))
    entry = {"step": 1, "test_acc": ev["test_acc"], "val_acc": ev["val_acc"],
             "seconds": round(sum(p.get("seconds", 0.0) for p in prog["steps"].values()), 2),
             "share": share_frac, "shared_fraction": round(plan.shared_fraction, 4)}
    if flops is not None:
        entry["train_flops"] = flops
    config = {**cfg.record(), "seed": seed, "class_sets": class_sets, "share": share_frac}
    return write_metrics(runs[0].out, data, config, [entry], **extra)


def _cost_summary(cfg: TrainConfig, data: ImageData, dev, base: nn.Module, branch: nn.Module, n_out: int) -> Dict:
    """Training cost per iteration of ``branch`` and of the base trained whole (reference)."""
    x = _example_batch(data, cfg.batch_size, dev)
    c = training_cost(branch, x, num_classes=n_out)
    full = training_cost(base, x, measure=False)
    return {"batch_size": c.batch_size, "train_macs_per_iter": c.train_macs, "forward_macs_per_iter": c.forward_macs,
            "backward_macs_per_iter": c.backward_macs, "trainable_params": c.trainable_params,
            "sec_per_iter": c.sec_per_iter, "peak_mem_mb": c.peak_mem_mb, "peak_mem_source": c.peak_mem_source,
            "base_train_macs_per_iter": full.train_macs, "device": str(dev)}


def run_class_finetune(cfg: TrainConfig, class_sets: List[List[int]], out_dir, seed: int = 0,
                       data: Optional[ImageData] = None, cost: bool = True) -> Dict:
    """One all-class network: scratch on set 1, then fine-tuned whole on each new set (forgets)."""
    cfg = replace(cfg, method="class-finetune")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = data if data is not None else load_dataset(cfg.data, root=cfg.data_root, download=cfg.download)
    prog = _progress(out, {"method": "class-finetune", "class_sets": class_sets, "model": cfg.model})
    done = checkpoint.read_json(out / "metrics.json") if (out / "metrics.json").exists() else None
    if done is not None and len(prog["steps"]) == len(class_sets):
        return done
    runs = _set_runs(cfg, seed, out, data, class_sets, remap=False)
    dev = runs[0].device
    model = runs[0].new_model()
    for k in range(1, len(class_sets) + 1):
        ck = out / f"step{k}.safetensors"
        if ck.exists():
            model.load_state_dict(checkpoint.load_state_dict(ck, device=str(dev)))
            continue
        t0 = time.time()
        model, _ = run_phase(runs[k - 1], k, set_phase(cfg, k), model)
        checkpoint.save_state_dict(model.state_dict(), ck)
        _finish_step(runs[k - 1], k, prog, out, seconds=round(time.time() - t0, 2))
    ev = evaluate_sets(model, runs, class_sets, remapped=False, data=data)
    for row, (k, p) in zip(ev["per_set"], sorted(prog["steps"].items(), key=lambda kv: int(kv[0]))):
        row["trainable_params"] = sum(q.numel() for q in model.parameters())
        row["seconds"] = p.get("seconds", 0.0)
    n_params = sum(p.numel() for p in model.parameters())
    extra = {"class_sets": class_sets, "per_set": ev["per_set"], "stored_params": n_params,
             "params_per_network": n_params}
    entry = {"step": 1, "test_acc": ev["test_acc"], "val_acc": ev["val_acc"],
             "seconds": round(sum(p.get("seconds", 0.0) for p in prog["steps"].values()), 2)}
    if cost:
        x = _example_batch(data, cfg.batch_size, dev)
        c = training_cost(model, x)
        extra["cost"] = {"batch_size": c.batch_size, "train_macs_per_iter": c.train_macs,
                         "forward_macs_per_iter": c.forward_macs, "backward_macs_per_iter": c.backward_macs,
                         "trainable_params": c.trainable_params, "sec_per_iter": c.sec_per_iter,
                         "peak_mem_mb": c.peak_mem_mb, "peak_mem_source": c.peak_mem_source, "device": str(dev)}
        n_imgs = [len(r.part_xy([0], "train")[1]) for r in runs]
        entry["train_flops"] = int(sum(2 * c.train_macs / cfg.batch_size * n * cfg.epochs for n in n_imgs))
    config = {**cfg.record(), "seed": seed, "class_sets": class_sets}
    metrics = write_metrics(out, data, config, [entry], **extra)
    checkpoint.remove_empty_dir(runs[0].work)
    return metrics


register(MethodSpec(METHODS, SharingConfig, run_method, plan=plan_phases,
                    help="class-incremental partial network sharing and its class fine-tuning baseline (docs/sharing.md)",
                    lr_is_training_lr=False))
