"""``filtersurgery run --method growth``: incremental training with look-ahead (docs/method.md §7).

One seed of the incremental-training paper's schedule on one data set (the whole
training set, 10% held out for validation, docs/method.md §8)::

    k = 1       train S1 + head, watch val accuracy; stop when the window rule fires
                (alpha_i <= gamma * alpha_(i-1), every --growth-window epochs) or after --epochs
    k = 2..K    --growth-init lookahead: train S_k + a fresh head for --growth-lookahead-epochs
                with S_1..S_(k-1) frozen, then train everything with the rule as above
                --growth-init random:    train everything at once (S_k as built, fresh head)

The head after ``S_k`` (k < K) is global average pooling + linear; with all K
sub-networks the model's own classifier block is used, so the final network is the
model itself (``step1.safetensors`` loads with ``build_model``). SGD with the trainer's
momentum and weight decay at a *constant* learning rate (``--lr``, default the trainer's
scratch lr 0.1): the paper trains without decay, and the termination rule watches a
curve that a decaying rate would flatten by itself.

:func:`run_growth` also runs the regular-training baseline (``regular=True``): the full
network from scratch with the same loop for ``--epochs`` epochs (benchmarks/growth.py).

:func:`epoch_curve` reads a run's validation accuracy against cumulative training FLOPs and seconds;
:func:`first_reach` and :func:`value_at` read such a curve at an accuracy target or a budget
(benchmarks/growth.py: the cost of reaching the full network's accuracy, accuracy at equal FLOPs).

Outputs in ``out_dir``: ``metrics.json`` (one entry: final test/val accuracy, cumulative
training FLOPs, and per stage its epochs, accuracies, inference and cumulative training
FLOPs), ``epochs.csv``, ``stageK.safetensors`` (the grown network after stage K),
``step1.safetensors`` (the final model). ``.work/growth_state.pt`` is written after every
epoch (or every ``state_every`` seconds, as the trainer's phases: the engine's epoch driver,
``engine/epochs.py``): re-running the same command resumes from the last saved epoch.
"""
from __future__ import annotations

import contextlib
import csv
import itertools
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch


from filtersurgery.engine import checkpoint
from filtersurgery.engine.epochs import check_finite_loss, run_epochs, save_training_state
from filtersurgery.engine.loop import sgd_batches
from filtersurgery.engine.registry import MethodSpec, option, register
from filtersurgery.data import BatchLoader, ImageData
from filtersurgery.ops.growth import (GrownNet, LinearHead, frozen_stages, grow, partition, should_grow,
                     train_flops_per_image, window_angles)
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.metrics import write_metrics
from filtersurgery.engine.run import Run, forward_flops, make_scaler, make_sgd
from filtersurgery.tracing.probe import example_input

__all__ = ["GrowthConfig", "run_method", "run_growth", "plan", "epoch_curve", "first_reach", "value_at"]

STATE_FILE = "growth_state.pt"
INITS = ("lookahead", "random")


@dataclass
class GrowthConfig:
    """Options of the growth schedule (docs/method.md §7). The paper gives no values; these are ours.

    The field metadata names each option's ``filtersurgery run`` flag
    (:func:`~filtersurgery.engine.registry.option`); ``regular`` has none."""

    # ws: epochs per window of the termination rule
    window: int = option(3, flag="--growth-window",
                         help="growth: epochs per window of the termination rule (default %(default)s)")
    # stop when alpha_i <= gamma * alpha_(i-1)
    gamma: float = option(0.5, flag="--growth-gamma",
                          help="growth: add the next sub-network when alpha_i <= gamma * alpha_(i-1) (default %(default)s)")
    # epochs of S_k + head with S_1..S_(k-1) frozen
    lookahead_epochs: int = option(2, flag="--growth-lookahead-epochs",
                                   help="growth: epochs of look-ahead (new sub-network + head, earlier ones frozen) "
                                        "(default %(default)s)")
    init: str = option("lookahead", flag="--growth-init", choices=INITS,
                       help="growth: initialization of each new sub-network (default %(default)s)")
    regular: bool = False  # baseline: the full network from scratch, --epochs epochs, no rule

    def validate(self) -> None:
        """One-line ValueError naming the bad field and its allowed range."""
        if not isinstance(self.window, int) or self.window < 2:
            raise ValueError(f"window: must be an int >= 2 (a line needs two points), got {self.window!r}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma: must be in [0, 1], got {self.gamma}")
        if not isinstance(self.lookahead_epochs, int) or self.lookahead_epochs < 0:
            raise ValueError(f"lookahead_epochs: must be an int >= 0, got {self.lookahead_epochs!r}")
        if self.init not in INITS:
            raise ValueError(f"init: must be one of {', '.join(INITS)}, got {self.init!r}")


def run_method(cfg: TrainConfig, options: Optional[GrowthConfig], out_dir: Path, seed: int, data: ImageData) -> Dict:
    """Entry point of ``filtersurgery run --method growth`` for one seed (writes metrics.json)."""
    return run_growth(cfg, options if options is not None else GrowthConfig(), out_dir, seed=seed, data=data)


register(MethodSpec("growth", GrowthConfig, run_method, schedule="constant",
                    help="incremental growth with look-ahead: one training run (docs/growth.md)"))


# --------------------------------------------------------------------------- schedule
def plan(K: int, gcfg: GrowthConfig) -> List[Tuple[int, str]]:
    """The phases ``(k, "lookahead" | "train")`` of a run on a model with ``K`` sub-networks."""
    if gcfg.regular:
        return [(K, "train")]
    phases: List[Tuple[int, str]] = []
    for k in range(1, K + 1):
        if k > 1 and gcfg.init == "lookahead" and gcfg.lookahead_epochs > 0:
            phases.append((k, "lookahead"))
        phases.append((k, "train"))
    return phases


def _lr(cfg: TrainConfig) -> float:
    return cfg.lr if cfg.lr is not None else cfg.scratch_lr


def _pack(model: torch.nn.Module, net: GrownNet) -> Dict[str, torch.Tensor]:
    sd = {f"m.{k}": v for k, v in model.state_dict().items()}
    if isinstance(net.head, LinearHead):
        sd.update({f"h.{k}": v for k, v in net.head.state_dict().items()})
    return sd


@dataclass
class _Growth:
    """One seed's growth run: what it trains and what it has done so far (the resumable state)."""

    run: Run
    gcfg: GrowthConfig
    config: Dict
    model: torch.nn.Module
    part: Any
    phase: int = 0  # index of the phase being trained (``plan``)
    curve: List[float] = field(default_factory=list)  # validation accuracy (0-1) of the phase's epochs
    history: List[Dict] = field(default_factory=list)
    stages: List[Dict] = field(default_factory=list)
    train_flops: int = 0
    seconds: float = 0.0
    head_k: int = 0
    st: Optional[Dict] = None  # the loaded state while it is being resumed
    pending_rng: Optional[Dict] = None

    @property
    def state_path(self) -> Path:
        return self.run.work / STATE_FILE

    def save(self, net: GrownNet, opt=None, gen: Optional[torch.Generator] = None, phase: Optional[int] = None) -> None:
        """Write the resumable state (after an epoch: with the optimizer and augmentation generator)."""
        extra = {"growth": self.config["growth"], "phase": self.phase if phase is None else phase,
                 "curve": self.curve, "history": self.history, "stages": self.stages, "train_flops": self.train_flops,
                 "seconds": self.seconds, "head_k": self.head_k}
        save_training_state(self.state_path, _pack(self.model, net), opt.state_dict() if opt else None, extra, gen=gen)


def run_growth(cfg: TrainConfig, gcfg: GrowthConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None) -> Dict:
    """Train one seed with incremental growth (or, ``gcfg.regular``, the full network); returns metrics.

    Resumes from ``out_dir/.work/growth_state.pt`` (per epoch); a finished run (metrics.json
    and step1.safetensors present) is returned as it is. A folder holding a run with other
    growth options raises a one-line ValueError.
    """
    gcfg.validate()
    run = Run(replace(cfg, split="multi", steps=1), seed, Path(out_dir), data)  # one part: all training data
    run.out.mkdir(parents=True, exist_ok=True)
    run.work.mkdir(exist_ok=True)
    config = {**cfg.record(), "seed": seed, "growth": asdict(gcfg)}
    done = _finished(run.out, config)
    if done is not None:
        return done
    model = run.new_model()
    part = partition(model, example_inputs=example_input(model, (run.data.in_chans, run.data.size, run.data.size)))
    g = _resume(_Growth(run, gcfg, config, model, part))
    phases = plan(part.K, gcfg)
    net: Optional[GrownNet] = None
    for pi in range(g.phase, len(phases)):
        k, kind = phases[pi]
        g.phase = pi
        net = _stage_net(g, net, k)
        stopped = _train_phase(g, net, k, kind)
        _end_phase(g, net, k, kind, stopped)
    return _final_metrics(g)


def _finished(out: Path, config: Dict) -> Optional[Dict]:
    """The metrics of a finished run in ``out`` (None when there is none); refuses other growth options."""
    if not (out / "metrics.json").exists():
        return None
    old = checkpoint.read_json(out / "metrics.json")
    checkpoint.refuse_other_settings(out, old.get("config", {}).get("growth") or {}, config["growth"],
                                     what="growth options ")
    return old if (out / "step1.safetensors").exists() else None


def _resume(g: _Growth) -> _Growth:
    """Load the resumable state into ``g`` (the model's weights; the global RNG is set when the next
    stage's head is drawn, so a fresh head draws what it drew before the kill)."""
    if not g.state_path.exists():
        return g
    st = checkpoint.load_training_state(g.state_path)
    checkpoint.refuse_other_settings(g.run.work, st["extra"].get("growth") or {}, g.config["growth"],
                                     what="growth options ")
    ex = st["extra"]
    g.phase, g.curve = int(ex.get("phase", 0)), list(ex.get("curve", []))
    g.history, g.stages = list(ex.get("history", [])), list(ex.get("stages", []))
    g.train_flops, g.seconds, g.head_k = int(ex.get("train_flops", 0)), float(ex.get("seconds", 0.0)), int(ex.get("head_k", 0))
    g.model.load_state_dict({k[2:]: v for k, v in st["model"].items() if k.startswith("m.")})
    g.st, g.pending_rng = st, ex["rng"]
    return g


def _stage_net(g: _Growth, net: Optional[GrownNet], k: int) -> GrownNet:
    """S_1..S_k + head for stage ``k``: a new one at a new stage (or in a resumed run), else the same
    (the stage after its look-ahead keeps the look-ahead's head)."""
    if net is None or net.k != k:
        resumed_head = g.st is not None and g.head_k == k
        if g.pending_rng is not None and not resumed_head:
            checkpoint.set_rng_state(g.pending_rng)  # the fresh head draws what it drew before the kill
            g.pending_rng = None
        net = grow(g.part, k)  # a fresh LinearHead for k < K, drawn from the global RNG
        if resumed_head and isinstance(net.head, LinearHead):
            net.head.load_state_dict({n[2:]: v for n, v in g.st["model"].items() if n.startswith("h.")})
    if g.pending_rng is not None:
        checkpoint.set_rng_state(g.pending_rng)
        g.pending_rng = None
    g.head_k = k
    return net


def _train_phase(g: _Growth, net: GrownNet, k: int, kind: str) -> str:
    """Train one look-ahead or training phase until its cap or the termination rule; returns
    ``"rule"`` or ``"cap"``."""
    run, gcfg, cfg, dev, pi = g.run, g.gcfg, g.run.cfg, g.run.device, g.phase
    frozen = k - 1 if kind == "lookahead" else 0
    with (frozen_stages(net, frozen) if frozen else contextlib.nullcontext()):
        opt = make_sgd([p for p in net.parameters() if p.requires_grad], _lr(cfg), cfg)
        gen = torch.Generator(device=dev).manual_seed(run.seed * 7919 + pi * 31 + 17)
        if g.st is not None and int(g.st["extra"].get("phase", -1)) == pi and g.curve:
            opt.load_state_dict(g.st["optimizer"])
            gen.set_state(g.st["extra"]["gen"])
        scaler = make_scaler(run)
        per_img = train_flops_per_image(net, (run.data.in_chans, run.data.size, run.data.size))
        x_tr, y_tr = run.part_xy([0], "train")
        loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, device=dev, seed=run.seed * 1000 + pi,
                             drop_last=len(y_tr) > cfg.batch_size)
        n_batches = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
        max_epochs = gcfg.lookahead_epochs if kind == "lookahead" else cfg.epochs
        watch = kind == "train" and not gcfg.regular

        def rule() -> bool:  # the termination rule on the validation curve so far
            return watch and should_grow(g.curve, gcfg.window, gcfg.gamma)

        net.train()
        training = (opt, scaler, loader, n_batches, gen)
        run_epochs(len(g.curve), lambda e: e >= max_epochs or rule(),
                   lambda e: _epoch(g, net, k, kind, training, per_img), lambda e: g.save(net, opt, gen),
                   g.run.log_epoch, cfg.state_every)
        return "rule" if rule() else "cap"


def _epoch(g: _Growth, net: GrownNet, k: int, kind: str, training, per_img: int) -> Dict:
    """One epoch: train, validate, count FLOPs; returns its ``epochs.csv`` row (the epoch driver saves
    the state, then logs the row)."""
    opt, scaler, loader, n_batches, gen = training
    t0 = time.time()
    epoch = len(g.curve)
    loss_sum, n_img = _train_epoch(g.run, net, opt, scaler, loader, epoch, n_batches, gen, where=f"stage {k} {kind}")
    val = g.run.acc(net, [0])
    g.curve.append(val / 100.0)
    g.train_flops += per_img * n_img
    dt = time.time() - t0
    g.seconds += dt
    angle = window_angles(g.curve, g.gcfg.window)[-1] if len(g.curve) % g.gcfg.window == 0 else None
    return {"stage": k, "phase": kind, "epoch": epoch + 1, "lr": _lr(g.run.cfg),
            "train_loss": round(loss_sum / max(1, n_img), 5), "val_acc": round(val, 3),
            "angle": "" if angle is None else round(angle, 4), "train_flops": g.train_flops,
            "seconds": round(dt, 3)}


def _end_phase(g: _Growth, net: GrownNet, k: int, kind: str, stopped: str) -> None:
    """Record the phase; at the end of stage ``k`` evaluate it and save ``stageK.safetensors``; save
    the state at the start of the next phase."""
    curve = g.curve
    g.history.append({"k": k, "phase": kind, "epochs": len(curve), "stopped": stopped,
                      "val_acc": round(100.0 * curve[-1], 4) if curve else None,
                      "angles": [round(a, 4) for a in window_angles(curve, g.gcfg.window)],
                      "train_flops_cum": g.train_flops})
    if kind == "train":  # end of stage k
        t0 = time.time()
        g.stages.append({"k": k, "epochs": len(curve),
                         "lookahead_epochs": sum(h["epochs"] for h in g.history if h["k"] == k and h["phase"] == "lookahead"),
                         "stopped": stopped, "val_acc": round(100.0 * curve[-1], 4) if curve else None,
                         "test_acc": round(g.run.acc(net), 4), "inference_flops": forward_flops(net, g.run.data, g.run.device),
                         "params": sum(p.numel() for p in net.parameters()), "train_flops_cum": g.train_flops,
                         "width": g.part.widths[k - 1]})
        checkpoint.save_state_dict(net.state_dict(), g.run.out / f"stage{k}.safetensors")
        g.seconds += time.time() - t0
    g.curve, g.st = [], None
    g.save(net, phase=g.phase + 1)


def _final_metrics(g: _Growth) -> Dict:
    """The final network is S_1..S_K + the model's own head, i.e. the model itself: save it, write
    metrics.json, remove the resumable state."""
    last, gcfg = g.stages[-1], g.gcfg
    entry = {"step": 1, "test_acc": last["test_acc"], "val_acc": last["val_acc"], "seconds": round(g.seconds, 2),
             "train_flops": g.train_flops, "inference_flops": last["inference_flops"],
             "epochs": sum(h["epochs"] for h in g.history), "stages": g.stages, "phases": g.history,
             "K": g.part.K, "partition": [list(n) for n in g.part.names], "init": "regular" if gcfg.regular else gcfg.init}
    checkpoint.save_state_dict(g.model.state_dict(), g.run.out / "step1.safetensors")
    metrics = write_metrics(g.run.out, g.run.data, g.config, [entry])
    g.state_path.unlink(missing_ok=True)
    checkpoint.remove_empty_dir(g.run.work)
    return metrics


def _train_epoch(run: Run, net: GrownNet, opt, scaler, loader: BatchLoader, epoch: int, n_batches: int,
                 gen: torch.Generator, where: str = "") -> Tuple[float, int]:
    """One epoch of CE on randomly cropped + flipped batches through the engine's batch loop
    (:func:`~filtersurgery.engine.loop.sgd_batches`); returns (summed loss, images seen)."""
    loader.set_epoch(epoch)
    ctx = run.context(1, "growth", [0])
    total, n = sgd_batches(itertools.islice(loader, n_batches), lambda xb, yb: ctx.cross_entropy(net, xb, yb, gen),
                           opt, scaler=scaler, per_sample=True)
    check_finite_loss(total, f"{where} epoch {epoch + 1}".strip(), run.work / STATE_FILE)  # once per epoch
    return float(total), n


# --------------------------------------------------------------------------- reading the curves
def epoch_curve(out_dir) -> Dict[str, List]:
    """A run's ``epochs.csv`` as lists, one item per epoch in training order (look-ahead epochs included:
    the network then is a working classifier too): ``stage``, ``phase``, ``val_acc`` (%), ``flops``
    (cumulative training FLOPs) and ``seconds`` (cumulative measured seconds of the epochs: training +
    validation; stage-end test passes and saves not included). A re-logged epoch counts once (its last row)."""
    path = Path(out_dir) / "epochs.csv"
    if not path.exists():
        raise ValueError(f"out_dir: no epochs.csv in {out_dir}")
    rows: Dict[Tuple[int, str, int], Dict[str, str]] = {}
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows[(int(r["stage"]), r["phase"], int(r["epoch"]))] = r  # keys in first-logged order
    out: Dict[str, List] = {"stage": [], "phase": [], "val_acc": [], "flops": [], "seconds": []}
    total = 0.0
    for (k, phase, _), r in rows.items():
        total += float(r["seconds"])
        out["stage"].append(k)
        out["phase"].append(phase)
        out["val_acc"].append(float(r["val_acc"]))
        out["flops"].append(int(r["train_flops"]))
        out["seconds"].append(round(total, 3))
    return out


def _check_curve(xs: Sequence[float], ys: Sequence[float]) -> None:
    if len(xs) != len(ys):
        raise ValueError(f"ys: must have one value per x, got {len(ys)} for {len(xs)}")
    if any(b < a for a, b in zip(xs, xs[1:])):
        raise ValueError("xs: must be non-decreasing (cumulative FLOPs or seconds)")


def first_reach(xs: Sequence[float], ys: Sequence[float], target: float) -> Optional[float]:
    """The first ``x`` at which ``y >= target`` (``xs`` cumulative, non-decreasing), else None."""
    _check_curve(xs, ys)
    return next((x for x, y in zip(xs, ys) if y >= target), None)


def value_at(xs: Sequence[float], ys: Sequence[float], budget: float) -> Optional[float]:
    """``y`` of the last point with ``x <= budget`` (what a run had reached within the budget; a run that
    ended earlier keeps its last value), else None (its first point already costs more)."""
    _check_curve(xs, ys)
    got = None
    for x, y in zip(xs, ys):
        if x > budget:
            break
        got = y
    return got
