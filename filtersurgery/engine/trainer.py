"""The multi-step trainer: docs/method.md §1-4 composed into steps, plus the §9 baselines.

Read top to bottom, a step of the framework is::

    step 1            train Data1 from scratch (CE, lr 0.1)                       -> M1
    step 2            SST on Data1 (CE + selective L1)                            -> S
                      Dri(S, I=0.1), Dri(S, I=0.2)  -> two students
                      AOD on Data2 (eqs. 5-8), keep the better student on val     -> M2
    step k >= 3       SST on Data_k with MSL (eq. 9: KL + AT to the teacher M_{k-1},
                      classifier frozen, teacher <- student when val improves)      -> S
                      Dri x2 + AOD on Data_k                                       -> M_k

Every step is a list of *phases* (``scratch``, ``sst``, ``aod``, ``finetune``, ...). A
phase trains one or two models for ``cfg.epochs`` epochs and writes a resumable state
after every epoch; a finished phase writes its output model, so a killed run re-run with
the same arguments continues from its last finished epoch.

The baselines swap the phases of steps >= 2: ``finetune`` (CE at ``lr``), ``bst``
(network slimming instead of SST), ``dml`` (two students, CE + KL to the peer), ``lwm``
(CE + KD + Grad-CAM attention distillation from the previous model), ``joint`` (from
scratch on all data seen so far). ``single_step`` is ``multi_step`` with two parts.
"""
from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import zlib
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.data import augment

from filtersurgery.engine import checkpoint
from filtersurgery.engine.registry import SINGLE_RUN_METHODS  # read-only view, filled by methods/ at import

from filtersurgery.distill import losses

from filtersurgery.ops import warmstart
from filtersurgery.distill.blockfeats import capture_blocks, spatial_blocks
from filtersurgery.data.datasets import BatchLoader, ImageData, load_dataset, split_parts
from filtersurgery.models.factory import build_model
from filtersurgery.ops.reinit import rescale
from filtersurgery.ops.ranking import check_ranking
from filtersurgery.ops.sparsity import SparsityConfig, lam_for_budget, sparsify
from filtersurgery.tracing.probe import eval_mode, example_input

METHODS = ("framework", "finetune", "bst", "dml", "lwm", "joint", "shrink-perturb", "dash")
# single-run methods (one entry in metrics.json) are not named here: each module in methods/ registers
# its own at import (engine/registry.py); SINGLE_RUN_METHODS is the read-only view ``name -> module``
STATE_FILE = "state.pt"


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are docs/method.md §1-4 and paper IV-B's."""

    model: str = "timm:resnet18"
    data: str = "fashion-mnist"
    data_root: Optional[str] = None
    download: bool = False
    split: str = "multi"  # "multi": `steps` equal parts; "single": 1:1
    steps: int = 4
    method: str = "framework"
    epochs: int = 30  # per phase (SST and AOD each get it)
    step1_epochs: Optional[int] = None  # step 1 (Data1 from scratch); None: ``epochs``
    batch_size: int = 256
    lr: Optional[float] = None  # new-data lr: multi-step methods 1e-2 (step_lr), sharing branches 1e-3 (new_lr)
    scratch_lr: float = 0.1  # step 1 and joint
    sst_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    subset: Optional[int] = None  # training images per part
    image_size: Optional[int] = None  # image folders only (default: the images' own size, else 224)
    val_fraction: float = 0.1
    # warm-start baselines (filtersurgery.ops.warmstart): Shrink & Perturb, DASH; chosen on the testbed's
    # validation (docs/warmstart.md; the operations' own defaults are the papers' 0.4 / 0.1 and 0.3)
    sp_shrink: float = 0.8
    sp_noise: float = 0.01
    dash_lam: float = 0.5
    dash_alpha: Optional[float] = None
    dash_granularity: str = "kernel"
    # SST / Dri / AOD / MSL
    target_r: float = 0.3
    ranking: str = "per-norm"  # how factors of different norms compare: "global" (paper) | "per-norm"
    lam: Union[float, str] = "auto"  # L1 strength, or "auto": sparsity.lam_for_budget over the SST schedule
    lam_safety: float = 3.0  # the "auto" rule's margin for SST with CE (chosen on the testbed: docs/method.md)
    lam_safety_msl: float = 6.0  # ... and for SST under MSL (the teacher's KL pulls back harder)
    e_cut_fraction: float = 1.0 / 3.0
    dri_I: Tuple[float, float] = (0.1, 0.2)
    alpha: float = 0.5
    aod_flip: str = "always"  # AOD's B_F view: "always" mirrored (paper) | "random" (p = 1/2 per image)
    kd_temperature: float = 1.0
    at_weight: float = 1e3
    at_min_size: int = 4  # AT only on blocks whose map is at least this many pixels on each side
    # ablation switches (framework only)
    msl: bool = True  # False: steps >= 3 run SST with CE on current data
    msl_ce: bool = False  # True: MSL adds CE on the current data's labels to KL + AT (beyond the paper)
    teacher_update: bool = True
    students: int = 2  # 1: AOD with one student (CE + alpha * L_CR)
    sst: bool = True  # False: no SST phase; Dri re-draws the smallest factors of the incoming model
    dri: bool = True  # False: the AOD students start as exact copies (no re-drawn factors)
    # LwM
    lwm_beta: float = 1.0
    lwm_gamma: float = 1.0
    # runtime
    device: str = "auto"
    amp: str = "auto"  # "bf16", "fp16", "none", "auto" (bf16 on CUDA, none on CPU)
    channels_last: bool = False
    workers_seed: int = 0
    progress: bool = True
    max_batches: Optional[int] = None  # cap batches per epoch (smoke tests)
    # write the resumable state at most every this many seconds (0: after every epoch); the
    # epochs.csv rows of unsaved epochs are held back with it, so a kill never duplicates a row
    state_every: float = 0.0

    def validate(self) -> None:
        """One-line ValueError naming the bad field and its allowed range (the first bad field, in field order)."""
        for check in (self._check_method, self._check_counts, self._check_sst_dri, self._check_data,
                      self._check_students, self._check_amp_lam, self._check_warmstart, self._check_sst_options,
                      self._check_runtime, self._check_lrs):
            check()

    def _check_method(self) -> None:
        """``method`` (multi-step or registered single-run), ``split`` and ``steps``."""
        if self.method not in METHODS and self.method not in SINGLE_RUN_METHODS:
            allowed = ", ".join(METHODS + tuple(SINGLE_RUN_METHODS))
            raise ValueError(f"method: must be one of {allowed}, got {self.method!r}")
        if self.split not in ("single", "multi"):
            raise ValueError(f"split: must be 'single' or 'multi', got {self.split!r}")
        if self.method not in SINGLE_RUN_METHODS and self.steps < 2:  # single-run: one data set, no steps
            raise ValueError(f"steps: must be >= 2 (step 1 trains Data1, later steps add data), got {self.steps}")
        if self.split == "single" and self.steps != 2:
            raise ValueError(f"steps: --split single means exactly 2 steps (1:1), got {self.steps}")

    def _check_counts(self) -> None:
        """``epochs``, ``step1_epochs``, ``batch_size``."""
        if self.epochs <= 0:
            raise ValueError(f"epochs: must be >= 1, got {self.epochs}")
        if self.step1_epochs is not None and self.step1_epochs <= 0:
            raise ValueError(f"step1_epochs: must be None or >= 1, got {self.step1_epochs}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    def _check_sst_dri(self) -> None:
        """``target_r`` of SST and the re-drawn fractions ``dri_I`` of Dri (docs/method.md §1, §2)."""
        if not 0.0 < self.target_r < 1.0:
            raise ValueError(f"target_r: must be in (0, 1), got {self.target_r}")
        for I in self.dri_I:
            if not (0.0 <= I and self.target_r + I < 1.0 - I):
                raise ValueError(f"dri_I: each I needs target_r + I < 1 - I (target_r={self.target_r}), got {I}")

    def _check_data(self) -> None:
        """``val_fraction``, ``image_size``, ``subset``."""
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction: must be in (0, 1), got {self.val_fraction}")
        if self.image_size is not None and (not isinstance(self.image_size, int) or self.image_size < 1):
            raise ValueError(f"image_size: must be an integer >= 1 (pixels), got {self.image_size!r}")
        if self.subset is not None and self.subset <= 0:
            raise ValueError(f"subset: must be >= 1 images per part, got {self.subset}")

    def _check_students(self) -> None:
        """``students`` of AOD, and ``dri=False`` only with one student."""
        if self.students not in (1, 2):
            raise ValueError(f"students: must be 1 or 2, got {self.students}")
        if not self.dri and self.students == 2:
            raise ValueError("students: dri=False makes the two AOD students identical copies that see the same "
                             "views and never diverge; use students=1 with dri=False")

    def _check_amp_lam(self) -> None:
        """``amp`` and the L1 strength ``lam`` (``auto`` or a finite number >= 0)."""
        if self.amp not in ("auto", "bf16", "fp16", "none"):
            raise ValueError(f"amp: must be one of auto, bf16, fp16, none, got {self.amp!r}")
        if self.lam != "auto" and not (isinstance(self.lam, (int, float)) and math.isfinite(self.lam) and self.lam >= 0):
            raise ValueError(f"lam: must be 'auto' or a finite number >= 0, got {self.lam!r}")

    def _check_warmstart(self) -> None:
        """The Shrink & Perturb and DASH options (``sp_*``, ``dash_*``)."""
        for name, v, ok, allowed in (("sp_shrink", self.sp_shrink, 0 < self.sp_shrink <= 1, "in (0, 1]"),
                                     ("sp_noise", self.sp_noise, self.sp_noise >= 0, ">= 0"),
                                     ("dash_lam", self.dash_lam, 0 <= self.dash_lam <= 1, "in [0, 1]")):
            if not (math.isfinite(v) and ok):
                raise ValueError(f"{name}: must be {allowed}, got {v}")
        if self.dash_alpha is not None and not 0 < self.dash_alpha <= 1:
            raise ValueError(f"dash_alpha: must be None or in (0, 1], got {self.dash_alpha}")
        if self.dash_granularity not in ("kernel", "filter"):
            raise ValueError(f"dash_granularity: must be kernel or filter, got {self.dash_granularity!r}")

    def _check_sst_options(self) -> None:
        """``lam_safety*``, ``e_cut_fraction`` (SST's own check), ``aod_flip``, ``ranking``, ``at_min_size``."""
        for name in ("lam_safety", "lam_safety_msl"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be a finite number > 0, got {v}")
        SparsityConfig(e_cut_fraction=self.e_cut_fraction).validate()  # SST's own check, before step 1 trains
        if self.aod_flip not in augment.AOD_FLIPS:
            raise ValueError(f"aod_flip: must be one of {', '.join(augment.AOD_FLIPS)}, got {self.aod_flip!r}")
        check_ranking(self.ranking)  # the one copy of the check, in ops/ranking.py (ops is below the engine)
        if not (isinstance(self.at_min_size, int) and self.at_min_size >= 1):
            raise ValueError(f"at_min_size: must be an int >= 1, got {self.at_min_size!r}")

    def _check_runtime(self) -> None:
        """``state_every``, ``max_batches``, ``device``."""
        if not (math.isfinite(self.state_every) and self.state_every >= 0):
            raise ValueError(f"state_every: must be a finite number of seconds >= 0, got {self.state_every}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"max_batches: must be None or >= 1, got {self.max_batches}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ValueError(f"device: must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None

    def _check_lrs(self) -> None:
        """``lr``, ``scratch_lr``, ``sst_lr``: None (where allowed) or > 0."""
        for name in ("lr", "scratch_lr", "sst_lr"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ValueError(f"{name}: must be > 0, got {v}")

    @property
    def new_lr(self) -> float:
        """The learning rate of sharing branches and class fine-tuning (``lr``, default 1e-3)."""
        return 1e-3 if self.lr is None else self.lr

    @property
    def step_lr(self) -> float:
        """The new-data learning rate of the multi-step methods at steps >= 2 (``lr``, default 1e-2).

        The paper's 1e-3 barely moves a trained model in a short step; 1e-2 was chosen on the
        CPU testbed's validation split (docs/method.md, "Where this library departs")."""
        return 1e-2 if self.lr is None else self.lr


# --------------------------------------------------------------------------- utils
def dist_info() -> Tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main_process() -> bool:
    """True on rank 0 (or without distributed training): the only rank that writes files."""
    return dist_info()[0] == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    import torch.distributed as dist

    if dist_info()[1] > 1:
        dist.barrier()


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
    """Top-1 accuracy (%) of ``model`` on uint8 images ``x``; restores the train/eval mode."""
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for i in range(0, len(y), batch_size):
            xb = augment.normalize(x[i : i + batch_size].to(device, non_blocking=True), data.mean, data.std)
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                pred = model(xb).argmax(1)
            correct += (pred.cpu() == y[i : i + batch_size]).sum().item()
    finally:
        model.train(was_training)
    return 100.0 * correct / max(1, len(y))


def forward_flops(model: nn.Module, data: ImageData, device) -> int:
    """FLOPs of one forward pass of one image (``torch.utils.flop_counter``)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = example_input(model, (data.in_chans, data.size, data.size), device=device)
    with eval_mode(model), torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


# --------------------------------------------------------------------------- phases
@dataclass
class Phase:
    """One training phase of a step: which models train, on which data, with what loss."""

    name: str
    kind: str  # scratch | finetune | sst | sst_msl | aod | dml | lwm
    parts: List[int]  # data parts (0-based) whose train/val split is used
    lr: float
    epochs: int
    selective: bool = True
    # called after every epoch's batches, before the resumable state is saved:
    # ``epoch_end(models, epoch, lr) -> dict | None`` (the dict's items go to the log row).
    # Single-run methods use it for per-epoch surgery (kernel reactivation, weight
    # evolution, filter grafting).
    epoch_end: Optional[Callable[[List[nn.Module], int, float], Optional[Dict]]] = None
    # a warm-start operation applied to the incoming model before the phase's first epoch
    # ("shrink-perturb" or "dash", filtersurgery.ops.warmstart)
    warm_start: Optional[str] = None


def plan_step(cfg: TrainConfig, step: int) -> List[Phase]:
    """The phases of step ``step`` (1-based) for ``cfg.method`` (module docstring)."""
    E, k = cfg.epochs, step - 1
    if step == 1:
        return [Phase("scratch", "scratch", [0], cfg.scratch_lr, cfg.step1_epochs or E)]
    m = cfg.method
    if m == "joint":
        return [Phase("joint", "scratch", list(range(step)), cfg.scratch_lr, E)]
    if m == "finetune":
        return [Phase("finetune", "finetune", [k], cfg.step_lr, E)]
    if m == "dml":
        return [Phase("dml", "dml", [k], cfg.step_lr, E)]
    if m == "lwm":
        return [Phase("lwm", "lwm", [k], cfg.step_lr, E)]
    if m in warmstart.WARMSTART_METHODS:  # the op on the incoming model, then fine-tuning on Data_k
        return [Phase(m, "finetune", [k], cfg.step_lr, E, warm_start=m)]
    selective = m != "bst"
    aod = Phase("aod", "aod", [k], cfg.step_lr, E)
    if not cfg.sst:
        return [aod]
    if step == 2:
        sst = Phase("sst", "sst", [0], cfg.sst_lr, E, selective)
    elif cfg.msl:
        sst = Phase("sst", "sst_msl", [k], cfg.sst_lr, E, selective)
    else:
        sst = Phase("sst", "sst", [k], cfg.sst_lr, E, selective)
    return [sst, aod]


def phase_flops(phase: Phase, fwd: int, n_images: int, students: int) -> int:
    """Training FLOPs of a phase: 3x forward per trained model-image, 1x per frozen-teacher image."""
    per_img = {
        "scratch": 3 * fwd,
        "scratch2": 2 * 3 * fwd,
        "finetune": 3 * fwd,
        "sst": 3 * fwd,
        "sst_msl": 3 * fwd + fwd,  # + teacher forward
        "aod": students * 2 * 3 * fwd,  # two views per student
        "dml": 2 * 3 * fwd,
        "lwm": 3 * fwd + fwd,  # + teacher forward (Grad-CAM only back-propagates from the logits to the last block)
    }[phase.kind]
    once = 3 * fwd * n_images if phase.warm_start == "dash" else 0  # DASH: one gradient pass over the part
    return per_img * n_images * phase.epochs + once


class Run:
    """State of one seed of one method: data, parts, output folder, logging."""

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

    # -- models
    def new_model(self, seed_offset: int = 0) -> nn.Module:
        """A freshly initialized ``cfg.model`` on the run's device (seeded by the run's seed)."""
        torch.manual_seed(self.seed + 1_000_003 * seed_offset)
        model, _ = build_model(self.cfg.model, num_classes=self.data.num_classes, in_chans=self.data.in_chans)
        model = model.to(self.device)
        if self.cfg.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

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

    def example(self, parts: Sequence[int], n: int = 2) -> torch.Tensor:
        """``n`` normalized validation images of ``parts`` on the device (for probing block sizes)."""
        x = self.part_xy(parts, "val")[0][:n].to(self.device)
        cl = torch.channels_last if self.cfg.channels_last else torch.contiguous_format
        return augment.normalize(x, self.data.mean, self.data.std, memory_format=cl)

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
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)


def _sgd(params, lr, cfg: TrainConfig):
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def phase_seed(seed: int, step: int, name: str, salt: str = "") -> int:
    """A seed for one phase of one step: the run's seed, the step and a hash (CRC-32) of the
    phase's name, so phases of one step (``sst``, ``aod``) get different streams."""
    return (seed * 1_000_003 + step * 7919 + zlib.crc32(f"{salt}{name}".encode())) % (2**63)


def _seed_everything(seed: int, device: torch.device) -> torch.Generator:
    """Seed torch's global RNGs and return the augmentation generator (on ``device``: no host sync)."""
    torch.manual_seed(seed)
    return torch.Generator(device=device).manual_seed(seed)


def _resumes(state_path: Path, step: int, phase: Phase) -> bool:
    """True when ``state_path`` holds a saved epoch of this step's ``phase``."""
    if not state_path.exists():
        return False
    extra = checkpoint.peek_training_state(state_path)
    return extra.get("step") == step and extra.get("phase") == phase.name


def _warm_start(run: Run, step: int, phase: Phase, model: nn.Module, x_tr: torch.Tensor, y_tr: torch.Tensor) -> None:
    """Apply ``phase.warm_start`` to the incoming model (once, before the first epoch).

    Shrink & Perturb draws its noise from a freshly initialised, seeded model of the same
    spec; DASH takes one gradient pass over the current part's training images, normalized
    but not augmented.
    """
    cfg, dev = run.cfg, run.device
    if phase.warm_start == "shrink-perturb":
        g = torch.Generator().manual_seed(phase_seed(run.seed, step, phase.name, "noise:"))
        warmstart.prepare_step("shrink-perturb", model, cfg=cfg, generator=g, init=run.new_model(seed_offset=1000 + step))
        return
    cl = torch.channels_last if cfg.channels_last else torch.contiguous_format
    loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=False, device=dev)
    norm = lambda x: augment.normalize(x, run.data.mean, run.data.std, memory_format=cl)  # noqa: E731
    warmstart.prepare_step("dash", model, loader, cfg=cfg, transform=norm, amp=run.amp)


def run_phase(run: Run, step: int, phase: Phase, model: nn.Module) -> nn.Module:
    """Train ``phase`` starting from ``model``; returns the phase's output model.

    Writes ``.work/state.pt`` after every epoch (resume) and ``.work/stepK_PHASE.safetensors``
    when done.
    """
    cfg, dev = run.cfg, run.device
    done_path = run.work / f"step{step}_{phase.name}.safetensors"
    if done_path.exists():  # finished in an earlier (killed) run
        model.load_state_dict(checkpoint.load_state_dict(done_path, device=str(dev)))
        return model

    x_tr, y_tr = run.part_xy(phase.parts, "train")
    state_path = run.work / STATE_FILE
    if phase.warm_start is not None and not _resumes(state_path, step, phase):
        _warm_start(run, step, phase, model, x_tr, y_tr)
    world = dist_info()[1]  # under torchrun each rank takes its share of every epoch (BatchLoader)
    loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, device=dev,
                         seed=phase_seed(run.seed, step, phase.name, "order:"), drop_last=len(y_tr) > cfg.batch_size * world)
    # ---- set up the trained model(s) and what the loss needs
    teacher = None
    students: List[nn.Module]
    sp = None
    frozen: List[nn.Parameter] = []
    if phase.kind == "scratch":
        students = [run.new_model()]
    elif phase.kind == "scratch2":  # two independently initialized networks (filter grafting)
        students = [run.new_model(), run.new_model(seed_offset=1)]
    elif phase.kind in ("finetune", "sst", "sst_msl"):
        students = [model]
    elif phase.kind == "aod":
        students = []
        scales = _sst_scales(run, step)  # Dri ranks and maps back in the units SST used
        for i in range(cfg.students):
            s = copy.deepcopy(model)
            if cfg.dri:
                g = torch.Generator(device="cpu").manual_seed(phase_seed(run.seed, step, f"dri{i}"))
                rescale(s, target_r=cfg.target_r, I=cfg.dri_I[i], generator=g, ranking=cfg.ranking, scales=scales)
            students.append(s)
    elif phase.kind == "dml":
        students = [copy.deepcopy(model), copy.deepcopy(model)]
    elif phase.kind == "lwm":
        students = [model]
    else:  # pragma: no cover - plan_step only emits the kinds above
        raise ValueError(f"phase kind {phase.kind!r}")

    # seeded after the set-up (new_model re-seeds the global RNG for its initialisation)
    gen = _seed_everything(phase_seed(run.seed, step, phase.name), dev)
    if phase.kind in ("sst_msl", "lwm"):
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    if phase.kind == "sst_msl":
        frozen = classifier_params(students[0])
        for p in frozen:
            p.requires_grad_(False)
    steps_per_epoch = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    if phase.kind in ("sst", "sst_msl"):
        lam = cfg.lam if cfg.lam != "auto" else lam_for_budget(
            students[0], cfg.target_r, phase.lr, phase.epochs * max(1, steps_per_epoch), cfg.momentum,
            cfg.lam_safety_msl if phase.kind == "sst_msl" else cfg.lam_safety, cfg.ranking)
        sp = sparsify(students[0], target_r=cfg.target_r, epochs=phase.epochs, lam=lam, selective=phase.selective,
                      e_cut_fraction=cfg.e_cut_fraction, ranking=cfg.ranking)
    # distillation on the blocks whose maps carry spatial information (a 1x1 map has none)
    block_names = (spatial_blocks(students[0], run.example(phase.parts), cfg.at_min_size, arg="at_min_size")
                   if phase.kind == "sst_msl" else None)
    last_block = (spatial_blocks(students[0], run.example(phase.parts), 2, arg="lwm block (map larger than 1x1)")[-1:]
                  if phase.kind == "lwm" else None)

    params = [p for s in students for p in s.parameters() if p.requires_grad]
    opt = _sgd(params, phase.lr, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs * max(1, steps_per_epoch))
    scaler = torch.amp.GradScaler(dev.type, enabled=run.amp is torch.float16)
    teacher_val = run.acc(teacher, phase.parts) if (teacher is not None and phase.kind == "sst_msl") else None

    # ---- resume inside the phase
    start_epoch = 0
    if state_path.exists():
        st = checkpoint.load_training_state(state_path)
        if st["extra"].get("step") == step and st["extra"].get("phase") == phase.name:
            sd = st["model"]
            for i, s in enumerate(students):
                s.load_state_dict({k[len(f"s{i}.") :]: v for k, v in sd.items() if k.startswith(f"s{i}.")})
            if teacher is not None:
                teacher.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("t.")})
            opt.load_state_dict(st["optimizer"])
            sched.load_state_dict(st["extra"]["sched"])
            if sp is not None:
                sp.load_state_dict(st["extra"]["sparsifier"])
            teacher_val = st["extra"].get("teacher_val", teacher_val)
            start_epoch = int(st["extra"]["epoch"])
            checkpoint.set_rng_state(st["extra"]["rng"])
            gen.set_state(st["extra"]["gen"])

    for s in students:
        s.train()
    nets = _ddp_wrap(students, dev)  # what the batch loss calls (the students themselves without torchrun)
    desc = f"{cfg.method} seed{run.seed} step{step} {phase.name}"
    pending: List[Dict] = []  # epochs.csv rows not yet covered by a saved state
    saved_at = time.time()
    for epoch in range(start_epoch, phase.epochs):
        t0 = time.time()
        loader.set_epoch(epoch)
        if sp is not None:
            sp.set_epoch(epoch, phase.epochs)
        total, nb = 0.0, 0
        it = _progress(loader, desc=f"{desc} ep{epoch + 1}/{phase.epochs}", total=steps_per_epoch, enable=cfg.progress)
        for bi, (xb, yb) in enumerate(it):
            if bi >= steps_per_epoch:
                break
            loss = _batch_loss(run, phase, nets, teacher, xb, yb, gen, block_names, last_block)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.unscale_(opt)  # the L1 subgradient is added to unscaled gradients
            if sp is not None:
                sp.step()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.detach()
            nb += 1
        if not math.isfinite(float(total)):  # checked once per epoch: no host sync per batch
            raise RuntimeError(
                f"non-finite loss at step {step} phase {phase.name} epoch {epoch + 1}; "
                f"the last saved state (an earlier epoch) is kept in {state_path}"
            )
        _sync_buffers(students)  # torchrun: BN running statistics averaged over ranks
        row = {"step": step, "phase": phase.name, "epoch": epoch + 1, "lr": opt.param_groups[0]["lr"],
               "train_loss": float(total) / max(1, nb), "seconds": round(time.time() - t0, 3)}
        if phase.epoch_end is not None:
            row.update(phase.epoch_end(students, epoch, opt.param_groups[0]["lr"]) or {})
        vals = [run.acc(s, phase.parts) for s in students]
        for i, v in enumerate(vals):
            row[f"val_acc{i}"] = round(v, 3)
        if sp is not None:
            row["sp_r"] = round(float(sp.sp_r), 4)
            row["zero_frac"] = round(sp.zero_fraction(), 4)  # SST's goal: >= target_r
        if teacher is not None and phase.kind == "sst_msl" and cfg.teacher_update and vals[0] > teacher_val:
            teacher.load_state_dict(students[0].state_dict())  # docs/method.md §4 teacher update
            teacher_val = vals[0]
            row["teacher_updated"] = 1
        extra = {k: v for k, v in row.items() if k not in _CSV_FIELDS}
        pending.append({**{k: row.get(k, "") for k in _CSV_FIELDS}, "extra": json.dumps(extra) if extra else ""})
        last = epoch + 1 == phase.epochs
        if cfg.state_every <= 0 or last or time.time() - saved_at >= cfg.state_every:
            sd = {f"s{i}.{k}": v for i, s in enumerate(students) for k, v in s.state_dict().items()}
            if teacher is not None:
                sd.update({f"t.{k}": v for k, v in teacher.state_dict().items()})
            if is_main_process():
                checkpoint.save_training_state(
                    state_path, sd, opt.state_dict(),
                    {"step": step, "phase": phase.name, "epoch": epoch + 1, "sched": sched.state_dict(),
                     "sparsifier": sp.state_dict() if sp is not None else None, "teacher_val": teacher_val,
                     "rng": checkpoint.rng_state(), "gen": gen.get_state()},
                )
            for r in pending:  # after the state: a kill never duplicates a row
                run.log_epoch(r)
            pending, saved_at = [], time.time()

    # ---- phase output
    for p in frozen:
        p.requires_grad_(True)
    if len(students) == 1:
        out = students[0]
    else:  # docs/method.md §3: the better student on the current data's validation split
        vals = [run.acc(s, phase.parts) for s in students]
        out = students[max(range(len(students)), key=lambda i: vals[i])]
    if is_main_process():
        if sp is not None:  # the norm scales of SST's start, for Dri (written before the phase counts as done)
            checkpoint.save_state_dict({"scales": sp.scales.detach().cpu()}, _scales_path(run, step))
        checkpoint.save_state_dict(out.state_dict(), done_path)
    barrier()
    return out


def _scales_path(run: Run, step: int) -> Path:
    return run.work / f"step{step}_sst_scales.safetensors"


def _sst_scales(run: Run, step: int) -> Optional[torch.Tensor]:
    """The per-factor norm scales that this step's SST ranked with (None without an SST phase)."""
    path = _scales_path(run, step)
    return checkpoint.load_state_dict(path)["scales"] if path.exists() else None


@torch.no_grad()
def _sync_buffers(models: List[nn.Module]) -> None:
    """Average floating-point buffers (BN running mean/var) over ranks; integer buffers
    (``num_batches_tracked``) come from rank 0. Afterwards every rank holds the same model.
    No-op without a process group."""
    import torch.distributed as dist

    world = dist_info()[1]
    if world == 1:
        return
    for m in models:
        for b in m.buffers():
            if b.is_floating_point():
                dist.all_reduce(b, op=dist.ReduceOp.SUM)
                b.div_(world)
            else:
                dist.broadcast(b, src=0)


def _ddp_wrap(students: List[nn.Module], device: torch.device) -> List[nn.Module]:
    """Wrap each trained model in DistributedDataParallel under torchrun (gradients are
    averaged over ranks during backward, so the SST subgradient added afterwards is the
    same on every rank); without a process group the models are returned as they are."""
    if dist_info()[1] == 1:
        return list(students)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return [DDP(s, device_ids=ids) for s in students]


_CSV_FIELDS = ["step", "phase", "epoch", "lr", "train_loss", "val_acc0", "val_acc1", "sp_r", "zero_frac",
               "teacher_updated", "seconds"]


def _progress(it, desc: str, total: int, enable: bool):
    if not enable:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, desc=desc, total=total, leave=False, dynamic_ncols=True)


def _batch_loss(run: Run, phase: Phase, students, teacher, xb, yb, gen, block_names, last_block) -> torch.Tensor:
    """The loss of one batch for ``phase.kind`` (docs/method.md §1-4, §9)."""
    cfg, data, dev = run.cfg, run.data, run.device
    ac = dict(device_type=dev.type, dtype=run.amp, enabled=run.amp is not None)
    norm = lambda x: augment.normalize(x, data.mean, data.std)  # noqa: E731
    cl = torch.channels_last if cfg.channels_last else torch.contiguous_format
    if phase.kind == "aod":
        xf, xc = augment.two_views(xb, generator=gen, flip=cfg.aod_flip)
        xf, xc = norm(xf).contiguous(memory_format=cl), norm(xc).contiguous(memory_format=cl)
        with torch.autocast(**ac):
            if len(students) == 2:
                out = [(s(xf), s(xc)) for s in students]
                l1, l2, _ = losses.aod_losses(out[0][0], out[0][1], out[1][0], out[1][1], yb,
                                              alpha=cfg.alpha, T=cfg.kd_temperature)
                return l1 + l2
            lf, lc = students[0](xf), students[0](xc)
            return F.cross_entropy(lf.float(), yb) + cfg.alpha * losses.consistency_loss(lf, lc)
    x = norm(augment.random_crop_flip(xb, generator=gen)).contiguous(memory_format=cl)
    with torch.autocast(**ac):
        if phase.kind in ("scratch", "finetune", "sst"):
            return F.cross_entropy(students[0](x).float(), yb)
        if phase.kind == "scratch2":
            return sum(F.cross_entropy(s(x).float(), yb) for s in students)
        if phase.kind == "dml":  # each student sees its own augmentation draw: two copies of one model on
            # one batch never diverge (KL and its gradient exactly 0); the KL then compares the two
            # students' predictions on two augmentations of the same images (docs/method.md §9)
            x2 = norm(augment.random_crop_flip(xb, generator=gen)).contiguous(memory_format=cl)
            a, b = students[0](x), students[1](x2)
            return losses.dml_loss(a, b, yb) + losses.dml_loss(b, a, yb)
        if phase.kind == "sst_msl":
            with torch.no_grad(), capture_blocks(teacher, block_names) as tf:
                t_logits = teacher(x)
                t_feats = [tf[n].float() for n in block_names]
            with capture_blocks(students[0], block_names) as sf:
                s_logits = students[0](x)
                s_feats = [sf[n].float() for n in block_names]
            loss = losses.msl_loss(t_logits.float(), s_logits.float(), t_feats, s_feats,
                                   at_weight=cfg.at_weight, T=cfg.kd_temperature)
            return loss + F.cross_entropy(s_logits.float(), yb) if cfg.msl_ce else loss
        if phase.kind == "lwm":
            # the teacher is frozen: its Grad-CAM needs a graph, so the input carries the grad
            with capture_blocks(teacher, last_block) as tf:
                t_logits = teacher(x.detach().requires_grad_(True))
                t_feat = tf[last_block[0]]
            with capture_blocks(students[0], last_block) as sf:
                s_logits = students[0](x)
                s_feat = sf[last_block[0]]
            return losses.lwm_loss(s_logits.float(), t_logits.float(), yb, s_feat, t_feat,
                                   beta=cfg.lwm_beta, gamma=cfg.lwm_gamma, T=cfg.kd_temperature)
    raise ValueError(f"phase kind {phase.kind!r}")  # pragma: no cover


# --------------------------------------------------------------------------- steps
def preprocess_info(data: ImageData) -> Dict:
    """What a re-evaluation needs: normalization mean/std, image size, channels, classes."""
    return {"mean": list(map(float, data.mean)), "std": list(map(float, data.std)), "size": int(data.size),
            "in_chans": int(data.in_chans), "num_classes": int(data.num_classes)}


def write_metrics(out_dir, data: ImageData, config: Dict, steps: List[Dict], **extra) -> Dict:
    """Write ``out_dir/metrics.json`` atomically in the trainer's schema and return it.

    ``{"preprocess": {...}, "steps": [{"step", "test_acc", "val_acc", "seconds", ...}], "config": {...}}``;
    single-run methods (``reactivation``, ``sharing``, ``growth``, ...) write one entry with
    ``step: 1``. ``extra`` items are added at the top level (e.g. per-class-set accuracy).
    """
    for e in steps:
        missing = {"step", "test_acc", "val_acc", "seconds"} - set(e)
        if missing:
            raise ValueError(f"steps: each entry needs step, test_acc, val_acc, seconds; missing {sorted(missing)}")
    metrics = {"preprocess": preprocess_info(data), "steps": list(steps), "config": dict(config), **extra}
    if is_main_process():
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        checkpoint.atomic_write_json(metrics, out / "metrics.json")
    return metrics


def multi_step(cfg: TrainConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None,
               step1_from: Optional[str] = None, until_step: Optional[int] = None,
               on_step: Optional[Callable[[Dict], None]] = None) -> Dict:
    """Run ``cfg.steps`` steps of ``cfg.method`` for one seed; returns the metrics dict.

    Writes ``out_dir/stepK.safetensors``, ``out_dir/metrics.json``, ``out_dir/epochs.csv``.
    Re-running with the same ``out_dir`` resumes. ``step1_from``: a ``step1.safetensors``
    to reuse (the step-1 model is the same for every method of a seed); ``until_step``:
    stop after that step (the rest can be run later into the same ``out_dir``); ``on_step``:
    called with each newly trained step's ``metrics.json`` entry as soon as it is written.
    """
    run = Run(cfg, seed, Path(out_dir), data)
    out = run.out
    checkpoint.make_dir(out, "out")
    run.work.mkdir(exist_ok=True)
    if not os.access(out, os.W_OK):
        raise PermissionError(f"out: directory {out} is not writable")
    metrics_path = out / "metrics.json"
    metrics = checkpoint.read_json(metrics_path) if metrics_path.exists() else {}
    metrics.setdefault("preprocess", preprocess_info(run.data))
    metrics.setdefault("steps", [])
    metrics["config"] = {**asdict(cfg), "seed": seed}
    done = {s["step"] for s in metrics["steps"]}
    fwd = None

    model = run.new_model()
    for step in range(1, (until_step or cfg.steps) + 1):
        ckpt = out / f"step{step}.safetensors"
        if step in done and ckpt.exists():
            model.load_state_dict(checkpoint.load_state_dict(ckpt, device=str(run.device)))
            continue
        t0 = time.time()
        phases = plan_step(cfg, step)
        if step == 1 and step1_from is not None and Path(step1_from).exists():
            model.load_state_dict(checkpoint.load_state_dict(step1_from, device=str(run.device)))
            phases_run = []
        else:
            phases_run = phases
            for phase in phases:
                model = run_phase(run, step, phase, model)
        fwd = fwd or forward_flops(model, run.data, run.device)
        flops = sum(phase_flops(p, fwd, len(run.part_xy(p.parts, "train")[1]), cfg.students if p.kind == "aod" else 1)
                    for p in phases_run)
        cur = list(range(step)) if cfg.method == "joint" else [step - 1]
        entry = {"step": step, "test_acc": round(run.acc(model), 4), "val_acc": round(run.acc(model, cur), 4),
                 "seconds": round(time.time() - t0, 2), "train_flops": flops,
                 "phases": [p.name for p in phases_run]}
        metrics["steps"] = [s for s in metrics["steps"] if s["step"] != step] + [entry]
        if is_main_process():  # under torchrun only rank 0 writes (every rank holds the same model)
            checkpoint.save_state_dict(model.state_dict(), ckpt)
            checkpoint.atomic_write_json(metrics, metrics_path)
            for f in run.work.glob(f"step{step}_*.safetensors"):
                f.unlink()
            (run.work / STATE_FILE).unlink(missing_ok=True)
        barrier()
        if on_step is not None and is_main_process():
            on_step(entry)
    if is_main_process():
        checkpoint.remove_empty_dir(run.work)
    return metrics


def resume_point(out_dir) -> Optional[Dict]:
    """Where a re-run into ``out_dir`` continues inside a phase: ``{"step", "phase", "epoch"}``
    (``epoch``: epochs of that phase already finished) from ``out_dir/.work/state.pt``, or
    None when there is no such state. Reads only the state's small ``extra`` part."""
    path = Path(out_dir) / ".work" / STATE_FILE
    if not path.is_file():
        return None
    extra = checkpoint.peek_training_state(path)
    if not {"step", "phase", "epoch"} <= set(extra):
        return None
    return {"step": int(extra["step"]), "phase": str(extra["phase"]), "epoch": int(extra["epoch"])}


def single_step(cfg: TrainConfig, out_dir, seed: int = 0, data: Optional[ImageData] = None, **kw) -> Dict:
    """The single-step (1:1) experiment: ``multi_step`` with ``split='single'``, 2 steps."""
    return multi_step(replace(cfg, split="single", steps=2), out_dir, seed=seed, data=data, **kw)
