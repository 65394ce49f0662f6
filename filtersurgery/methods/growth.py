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

Outputs in ``out_dir``: ``metrics.json`` (one entry: final test/val accuracy, cumulative
training FLOPs, and per stage its epochs, accuracies, inference and cumulative training
FLOPs), ``epochs.csv``, ``stageK.safetensors`` (the grown network after stage K),
``step1.safetensors`` (the final model). ``.work/growth_state.pt`` is written after every
epoch: re-running the same command resumes from the last finished epoch.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from filtersurgery.data import augment

from filtersurgery.engine import checkpoint
from filtersurgery.engine.loop import sgd_batches
from filtersurgery.engine.registry import MethodSpec, option, register
from filtersurgery.data.datasets import BatchLoader, ImageData
from filtersurgery.ops.growth import (GrownNet, LinearHead, frozen_stages, grow, partition, should_grow,
                     train_flops_per_image, window_angles)
from filtersurgery.engine.trainer import Run, TrainConfig, forward_flops, write_metrics
from filtersurgery.tracing.probe import example_input

__all__ = ["GrowthConfig", "run_method", "run_growth", "plan"]

STATE_FILE = "growth_state.pt"
INITS = ("lookahead", "random")


@dataclass
class GrowthConfig:
    """Options of the growth schedule (docs/method.md §7). The paper gives no values; these are ours.

    The field metadata names each option's ``filtersurgery run`` flag
    (:func:`~filtersurgery.engine.registry.option`); ``regular`` has none."""

    # ws: epochs per window of the termination rule
    window: int = option(3, flag="--growth-window", aliases=("--window",),
                         help="growth: epochs per window of the termination rule (default %(default)s)")
    # stop when alpha_i <= gamma * alpha_(i-1)
    gamma: float = option(0.5, flag="--growth-gamma",
                          help="growth: add the next sub-network when alpha_i <= gamma * alpha_(i-1) (default %(default)s)")
    # epochs of S_k + head with S_1..S_(k-1) frozen
    lookahead_epochs: int = option(2, flag="--growth-lookahead-epochs", aliases=("--lookahead-epochs",),
                                   help="growth: epochs of look-ahead (new sub-network + head, earlier ones frozen) "
                                        "(default %(default)s)")
    init: str = option("lookahead", flag="--growth-init", aliases=("--init",), choices=INITS,
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


register(MethodSpec("growth", GrowthConfig, run_method,
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


def run_growth(cfg: TrainConfig, gcfg: GrowthConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None) -> Dict:
    """Train one seed with incremental growth (or, ``gcfg.regular``, the full network); returns metrics.

    Resumes from ``out_dir/.work/growth_state.pt`` (per epoch); a finished run (metrics.json
    and step1.safetensors present) is returned as it is. A folder holding a run with other
    growth options raises a one-line ValueError.
    """
    gcfg.validate()
    run = Run(replace(cfg, split="multi", steps=1), seed, Path(out_dir), data)  # one part: all training data
    out, dev = run.out, run.device
    out.mkdir(parents=True, exist_ok=True)
    run.work.mkdir(exist_ok=True)
    config = {**asdict(cfg), "seed": seed, "growth": asdict(gcfg)}
    metrics_path, final_path, state_path = out / "metrics.json", out / "step1.safetensors", run.work / STATE_FILE
    if metrics_path.exists():
        old = checkpoint.read_json(metrics_path)
        checkpoint.refuse_other_settings(out, old.get("config", {}).get("growth") or {}, config["growth"],
                                         what="growth options ")
        if final_path.exists():
            return old

    model = run.new_model()
    part = partition(model, example_inputs=example_input(model, (run.data.in_chans, run.data.size, run.data.size)))
    phases = plan(part.K, gcfg)
    x_tr, y_tr = run.part_xy([0], "train")
    shape = (run.data.in_chans, run.data.size, run.data.size)
    lr = _lr(cfg)

    # ---- resume
    st = checkpoint.load_training_state(state_path) if state_path.exists() else None
    if st is not None:
        checkpoint.refuse_other_settings(run.work, st["extra"].get("growth") or {}, config["growth"],
                                         what="growth options ")
    ex = st["extra"] if st is not None else {}
    phase_i, curve = int(ex.get("phase", 0)), list(ex.get("curve", []))
    history: List[Dict] = list(ex.get("history", []))
    stages: List[Dict] = list(ex.get("stages", []))
    cum_flops, seconds, head_k = int(ex.get("train_flops", 0)), float(ex.get("seconds", 0.0)), int(ex.get("head_k", 0))
    pending_rng = None
    if st is not None:
        model.load_state_dict({k[2:]: v for k, v in st["model"].items() if k.startswith("m.")})
        pending_rng = ex["rng"]

    net: Optional[GrownNet] = None
    for pi in range(phase_i, len(phases)):
        k, kind = phases[pi]
        if net is None or net.k != k:  # a new stage (or a resumed run): S_1..S_k + head
            resumed_head = st is not None and head_k == k
            if pending_rng is not None and not resumed_head:
                checkpoint.set_rng_state(pending_rng)  # the fresh head draws what it drew before the kill
                pending_rng = None
            net = grow(part, k)  # a fresh LinearHead for k < K, drawn from the global RNG
            if resumed_head and isinstance(net.head, LinearHead):
                net.head.load_state_dict({n[2:]: v for n, v in st["model"].items() if n.startswith("h.")})
        # else: the same stage after its look-ahead: keep the look-ahead's head
        if pending_rng is not None:
            checkpoint.set_rng_state(pending_rng)
            pending_rng = None
        head_k = k
        frozen = k - 1 if kind == "lookahead" else 0
        with (frozen_stages(net, frozen) if frozen else contextlib.nullcontext()):
            params = [p for p in net.parameters() if p.requires_grad]
            opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            gen = torch.Generator(device=dev).manual_seed(seed * 7919 + pi * 31 + 17)
            if st is not None and int(ex.get("phase", -1)) == pi and curve:
                opt.load_state_dict(st["optimizer"])
                gen.set_state(ex["gen"])
            scaler = torch.amp.GradScaler(dev.type, enabled=run.amp is torch.float16)
            per_img = train_flops_per_image(net, shape)
            loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, device=dev, seed=seed * 1000 + pi,
                                 drop_last=len(y_tr) > cfg.batch_size)
            n_batches = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
            max_epochs = gcfg.lookahead_epochs if kind == "lookahead" else cfg.epochs
            watch = kind == "train" and not gcfg.regular
            net.train()
            while len(curve) < max_epochs and not (watch and should_grow(curve, gcfg.window, gcfg.gamma)):
                t0 = time.time()
                epoch = len(curve)
                loss_sum, n_img = _train_epoch(run, net, opt, scaler, loader, epoch, n_batches, gen)
                val = run.acc(net, [0])
                curve.append(val / 100.0)
                cum_flops += per_img * n_img
                dt = time.time() - t0
                seconds += dt
                angle = window_angles(curve, gcfg.window)[-1] if len(curve) % gcfg.window == 0 else None
                checkpoint.save_training_state(
                    state_path, _pack(model, net), opt.state_dict(),
                    {"growth": config["growth"], "phase": pi, "curve": curve, "history": history, "stages": stages,
                     "train_flops": cum_flops, "seconds": seconds, "head_k": head_k,
                     "rng": checkpoint.rng_state(), "gen": gen.get_state()})
                run.log_epoch({"stage": k, "phase": kind, "epoch": epoch + 1, "lr": lr,
                               "train_loss": round(loss_sum / max(1, n_img), 5), "val_acc": round(val, 3),
                               "angle": "" if angle is None else round(angle, 4), "train_flops": cum_flops,
                               "seconds": round(dt, 3)})
            stopped = "rule" if (watch and should_grow(curve, gcfg.window, gcfg.gamma)) else "cap"
        history.append({"k": k, "phase": kind, "epochs": len(curve), "stopped": stopped,
                        "val_acc": round(100.0 * curve[-1], 4) if curve else None,
                        "angles": [round(a, 4) for a in window_angles(curve, gcfg.window)], "train_flops_cum": cum_flops})
        if kind == "train":  # end of stage k
            t0 = time.time()
            stages.append({"k": k, "epochs": len(curve),
                           "lookahead_epochs": sum(h["epochs"] for h in history if h["k"] == k and h["phase"] == "lookahead"),
                           "stopped": stopped, "val_acc": round(100.0 * curve[-1], 4) if curve else None,
                           "test_acc": round(run.acc(net), 4), "inference_flops": forward_flops(net, run.data, dev),
                           "params": sum(p.numel() for p in net.parameters()), "train_flops_cum": cum_flops,
                           "width": part.widths[k - 1]})
            checkpoint.save_state_dict(net.state_dict(), out / f"stage{k}.safetensors")
            seconds += time.time() - t0
        curve = []
        st = None
        checkpoint.save_training_state(
            state_path, _pack(model, net), None,
            {"growth": config["growth"], "phase": pi + 1, "curve": [], "history": history, "stages": stages,
             "train_flops": cum_flops, "seconds": seconds, "head_k": head_k, "rng": checkpoint.rng_state()})

    # ---- the final network is S_1..S_K + the model's own head, i.e. the model itself
    last = stages[-1]
    entry = {"step": 1, "test_acc": last["test_acc"], "val_acc": last["val_acc"], "seconds": round(seconds, 2),
             "train_flops": cum_flops, "inference_flops": last["inference_flops"],
             "epochs": sum(h["epochs"] for h in history), "stages": stages, "phases": history,
             "K": part.K, "partition": [list(n) for n in part.names], "init": "regular" if gcfg.regular else gcfg.init}
    checkpoint.save_state_dict(model.state_dict(), final_path)
    metrics = write_metrics(out, run.data, config, [entry])
    state_path.unlink(missing_ok=True)
    checkpoint.remove_empty_dir(run.work)
    return metrics


def _train_epoch(run: Run, net: GrownNet, opt, scaler, loader: BatchLoader, epoch: int, n_batches: int,
                 gen: torch.Generator) -> Tuple[float, int]:
    """One epoch of CE on randomly cropped + flipped batches through the engine's batch loop
    (:func:`~filtersurgery.engine.loop.sgd_batches`); returns (summed loss, images seen)."""
    cfg, data, dev = run.cfg, run.data, run.device
    cl = torch.channels_last if cfg.channels_last else torch.contiguous_format

    def loss_fn(xb, yb):
        x = augment.normalize(augment.random_crop_flip(xb, generator=gen), data.mean, data.std).contiguous(memory_format=cl)
        with torch.autocast(dev.type, dtype=run.amp, enabled=run.amp is not None):
            return F.cross_entropy(net(x).float(), yb)

    loader.set_epoch(epoch)
    total, n = sgd_batches(itertools.islice(loader, n_batches), loss_fn, opt, scaler=scaler, per_sample=True)
    total = float(total)
    if not math.isfinite(total):
        raise RuntimeError(f"non-finite loss at epoch {epoch + 1}; the last good state is kept in {run.work / STATE_FILE}")
    return total, n
