"""One seed's run: its data and parts, device and AMP, model factory, evaluation, output folder and log.

``Run`` is what the engine's loop and the methods work with; a phase only sees the
:class:`~filtersurgery.engine.phase.PhaseContext` that :meth:`Run.context` builds for it.
"""
from __future__ import annotations

import csv
import os
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from filtersurgery.data import augment
from filtersurgery.data import ImageData, load_dataset, split_parts
from filtersurgery.engine import checkpoint
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.distributed import dist_info, is_main_process
from filtersurgery.engine.phase import PhaseContext
from filtersurgery.models.user import Logits, fresh_copy, logits_of, make_model, model_id
from filtersurgery.tracing.probe import eval_mode, example_input

__all__ = ["Run", "evaluate", "forward_flops", "classifier_params", "resolve_device", "amp_dtype", "make_sgd",
           "make_scaler", "phase_seed"]


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under torchrun ``cuda`` means ``cuda:LOCAL_RANK``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available (use --device cpu)")
    if dev.type == "cuda" and dev.index is None and dist_info()[1] > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return dev


def amp_dtype(cfg: TrainConfig, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of ``cfg.amp`` on ``device`` (``auto``: bf16 on CUDA, none on CPU)."""
    mode = cfg.amp if cfg.amp != "auto" else ("bf16" if device.type == "cuda" else "none")
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[mode]


def classifier_params(model: nn.Module) -> List[nn.Parameter]:
    """Parameters of the classifier (timm ``get_classifier`` or the last ``nn.Linear``)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module) or not list(head.parameters()):
        linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
        head = linears[-1] if linears else None
    return list(head.parameters()) if head is not None else []


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, data: ImageData, device, batch_size=1024,
             amp: Optional[torch.dtype] = None) -> float:
    """Top-1 accuracy (%) of ``model`` on uint8 images ``x``; every submodule's train/eval mode is restored."""
    correct = 0
    with eval_mode(model):
        for i in range(0, len(y), batch_size):
            xb = augment.normalize(x[i : i + batch_size].to(device, non_blocking=True), data.mean, data.std)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                pred = model(xb).argmax(1)
            correct += (pred.cpu() == y[i : i + batch_size]).sum().item()
    return 100.0 * correct / max(1, len(y))


def forward_flops(model: nn.Module, data: ImageData, device) -> int:
    """FLOPs of one forward pass of one image (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = example_input(model, (data.in_chans, data.size, data.size), device=device)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def make_sgd(params, lr: float, cfg: TrainConfig) -> torch.optim.SGD:
    """The engine's optimizer: SGD at ``lr`` with the config's momentum and weight decay."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scaler(run: "Run") -> torch.amp.GradScaler:
    """The run's AMP gradient scaler (enabled only under fp16)."""
    return torch.amp.GradScaler(run.device.type, enabled=run.amp is torch.float16)


def phase_seed(seed: int, step: int, name: str, salt: str = "") -> int:
    """A seed for one phase of one step: the run's seed, the step and a hash (CRC-32) of the
    phase's name, so phases of one step (``sst``, ``aod``) get different streams."""
    return (seed * 1_000_003 + step * 7919 + zlib.crc32(f"{salt}{name}".encode())) % (2**63)


class Run:
    """State of one seed of one method: data, parts, device, model factory, output folder, logging."""

    def __init__(self, cfg: TrainConfig, seed: int, out_dir: Path, data: Optional[ImageData] = None):
        cfg.validate()
        self.cfg, self.seed, self.out = cfg, seed, Path(out_dir)
        self.device = resolve_device(cfg.device)
        self.amp = amp_dtype(cfg, self.device)
        self.data = data if data is not None else load_dataset(cfg.data, root=cfg.data_root, download=cfg.download,
                                                               image_size=cfg.image_size)
        parts = cfg.steps if cfg.split == "multi" else 2
        self.parts = split_parts(self.data.train_y, parts, seed=seed, val_fraction=cfg.val_fraction, subset=cfg.subset)
        self.work = self.out / ".work"
        self._wrap, self.model_id = self._check_model()

    # -- models
    def _check_model(self) -> Tuple[bool, str]:
        """Build ``cfg.model`` once and run it on one image of the data (before anything is written): its
        output must be (or hold) one logit per class. Returns whether its output needs :class:`Logits`
        and what the run folder records of the model."""
        torch.manual_seed(self.seed)
        model = make_model(self.cfg.model, self.data.num_classes, self.data.in_chans)
        x = self.part_xy([0], "train")[0][:2].float() / 255.0
        try:
            with eval_mode(model), torch.no_grad():
                out = model(x)
        except Exception as e:  # noqa: BLE001 - a user model's forward can raise anything; say which input
            raise ValueError(f"model: fails on the data's {'x'.join(map(str, x.shape[1:]))} images: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        logits = logits_of(out)
        if logits.ndim != 2 or logits.shape[1] != self.data.num_classes:
            raise ValueError(f"model: outputs shape {tuple(logits.shape)} on a batch of 2, the data has "
                             f"{self.data.num_classes} classes (expected (2, {self.data.num_classes}))")
        return not isinstance(out, torch.Tensor), model_id(self.cfg.model, model)

    def new_model(self, seed_offset: int = 0, fresh: bool = False) -> nn.Module:
        """A ``cfg.model`` on the run's device, torch's RNG seeded by the run's seed: a freshly initialized
        one for a name or a factory; for an ``nn.Module`` a copy of it (``fresh``: re-initialized)."""
        torch.manual_seed(self.seed + 1_000_003 * seed_offset)
        build = fresh_copy if fresh else make_model
        model = build(self.cfg.model, self.data.num_classes, self.data.in_chans)
        model = (Logits(model) if self._wrap else model).to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    # -- data and accuracy
    def part_xy(self, parts: Sequence[int], which: str) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of the ``train`` or ``val`` split of the data parts ``parts``."""
        idx = torch.cat([self.parts[p][0 if which == "train" else 1] for p in parts])
        return self.data.train_x[idx], self.data.train_y[idx]

    def acc(self, model, parts: Optional[Sequence[int]] = None) -> float:
        """Validation accuracy on ``parts``, or test accuracy when ``parts`` is None."""
        if parts is None:
            x, y = self.data.test_x, self.data.test_y
        else:
            x, y = self.part_xy(parts, "val")
        return evaluate(model, x, y, self.data, self.device, amp=None)  # fp32: it decides (student, teacher)

    def train_acc(self, model, parts: Sequence[int]) -> float:
        """Accuracy on the (un-augmented) training images of ``parts``: how far a phase fitted its data."""
        x, y = self.part_xy(parts, "train")
        return evaluate(model, x, y, self.data, self.device, amp=None)

    def example(self, parts: Sequence[int], n: int = 2) -> torch.Tensor:
        """``n`` normalized validation images of ``parts`` on the device (for probing block sizes)."""
        x = self.part_xy(parts, "val")[0][:n].to(self.device)
        cl = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return augment.normalize(x, self.data.mean, self.data.std, memory_format=cl)

    def context(self, step: int, name: str, parts: Sequence[int]) -> PhaseContext:
        """What phase ``name`` of ``step``, which trains on ``parts``, may use of this run."""
        return PhaseContext(step=step, name=name, seed=self.seed, device=self.device, amp=self.amp,
                            channels_last=self.cfg.channels_last, batch_size=self.cfg.batch_size,
                            mean=self.data.mean, std=self.data.std,
                            train_images=lambda: self.part_xy(parts, "train"),
                            accuracy=lambda model: self.acc(model, parts),
                            train_accuracy=lambda model: self.train_acc(model, parts),
                            example=lambda n=2: self.example(parts, n), new_model=self.new_model)

    # -- files
    def drop_step_work(self, step: int) -> None:
        """Remove what step ``step`` left in ``.work/`` once its result is written: its phases' output
        models (``stepK_PHASE.safetensors``) and the resumable state (rank 0 only)."""
        if not is_main_process():
            return
        for f in self.work.glob(f"step{step}_*.safetensors"):
            f.unlink()
        (self.work / checkpoint.STATE_FILE).unlink(missing_ok=True)

    def log_epoch(self, row: Dict) -> None:
        """Append ``row`` to ``out/epochs.csv`` (rank 0 only; the header of an existing file is kept)."""
        if not is_main_process():
            return
        path = self.out / "epochs.csv"
        new = not path.exists()
        fields = list(row)
        if not new:  # keep the existing header (a file from an older version stays well-formed)
            with open(path, newline="") as f:
                fields = next(csv.reader(f), fields)
        with checkpoint.reporting_full_disk(path), open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
