"""The training engine: ``TrainConfig``, one seed's ``Run`` and the one training loop, ``run_phase``.

A *phase* (``engine/phases.py``) trains one or two models for ``phase.epochs`` epochs; what
it trains and with which loss comes from its kind (a ``PhaseKind``), the loop around it is
``run_phase`` here: SGD with momentum and weight decay, a cosine schedule per phase, AMP,
DistributedDataParallel under torchrun, a resumable state after every epoch (``.work/state.pt``)
and the phase's output model when it finishes, so a killed run re-run with the same
arguments continues from its last finished epoch.

The multi-step framework (steps of phases, its phase kinds and baselines, ``multi_step``)
is ``filtersurgery/methods/multistep.py``, public as ``filtersurgery.train``.
"""
from __future__ import annotations

import csv
import itertools
import json
import math
import os
import time
import zlib
import copy
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from filtersurgery.data import augment
from filtersurgery.data.datasets import BatchLoader, ImageData, load_dataset, split_parts
from filtersurgery.engine import checkpoint
from filtersurgery.engine.epochs import check_finite_loss, restore_rng, run_epochs, save_training_state
from filtersurgery.engine.loop import sgd_batches
from filtersurgery.engine.phases import (PHASE_KINDS, WARM_STARTS, Phase, PhaseKind, PhaseState, WarmStart,
                                         phase_flops, phase_kind, register_phase_kind, register_warm_start,
                                         warm_start_op)
from filtersurgery.engine.registry import MULTI_STEP_METHODS, SINGLE_RUN_METHODS  # read-only views, filled by methods/ at import
from filtersurgery.engine.registry import option, plan_for, resume_fields
from filtersurgery.models.user import ModelSpec, Logits, check_model_spec, fresh_copy, logits_of, make_model, model_id
# TrainConfig.validate checks option values with the operations' own checks (ranking names, SST's e_cut_fraction)
from filtersurgery.ops.ranking import DEFAULT_RANKING, RANKINGS, check_ranking
from filtersurgery.ops.sparsity import UPDATES, SparsityConfig
from filtersurgery.tracing.probe import eval_mode, example_input

# the multi-step methods: a live view of the plans registered by methods/multistep.py (in this order:
# framework, finetune, bst, dml, lwm, joint, shrink-perturb, dash)
METHODS = MULTI_STEP_METHODS
# single-run methods (one entry in metrics.json) are not named here: each module in methods/ registers
# its own at import (engine/registry.py); SINGLE_RUN_METHODS is the read-only view ``name -> module``
STATE_FILE = "state.pt"


MODEL_HELP = ("timm:NAME, torchvision:NAME, cifar:resnetDEPTH (CIFAR-style ResNet, DEPTH = 6n+2, e.g. "
              "cifar:resnet20) or a bare timm NAME; random weights")
DATA_HELP = "fashion-mnist | cifar100 | imagefolder:PATH (PATH/train/CLASS/*, PATH/val/CLASS/*) | demo"
AMP_MODES = ("auto", "bf16", "fp16", "none")
RECIPES = ("library", "paper")
# the multistep paper's recipe (TrainConfig(recipe="paper"), --recipe paper): where the library's defaults depart
# from it (docs/method.md, "Where this library departs from the papers")
PAPER_RECIPE = {"ranking": "global", "lam": 1e-4, "sst_update": "subgradient", "refresh_bn": False,
                "e_cut_fraction": 1.0 / 3.0, "at_min_size": 1, "lr": 1e-3}
DASH_GRANULARITIES = ("kernel", "filter")


def lam_value(text: str) -> Union[float, str]:
    """``--lam``: ``auto`` or a number (one-line ValueError otherwise; :meth:`TrainConfig.validate` checks >= 0)."""
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be 'auto' or a number >= 0, got {text!r}") from None


def _method_help() -> str:
    """``--method``: every registered method, read when the parser is built."""
    return f"one of {', '.join(METHODS + tuple(SINGLE_RUN_METHODS))} (default %(default)s)"


def _lr_help() -> str:
    """``--lr``: what the learning rate means for each kind of method."""
    from filtersurgery.engine.registry import training_lr_methods

    d = TrainConfig.scratch_lr
    return (f"learning rate on new data: finetune, AOD, DML, LwM, shrink-perturb, dash (default 1e-2), "
            f"sharing branches, class-finetune (default 1e-3); step 1, joint and base networks train at {d}; for "
            f"{', '.join(training_lr_methods())}: the training lr (default {d})")


@dataclass
class TrainConfig:
    """Everything a run needs. Defaults are docs/method.md §1-4 and paper IV-B's.

    A field's :func:`~filtersurgery.engine.registry.option` metadata names its
    ``filtersurgery run`` flag and help (the command line is built from it); ``resume=True``
    marks the settings that must match for a re-run to resume into an existing run folder.
    """

    # a name, or (Python API) an nn.Module or a zero-argument function returning one (models/user.py)
    model: ModelSpec = option("timm:resnet18", flag="--model", help=f"{MODEL_HELP} (default %(default)s)", type=str,
                              resume=True)
    data: str = option("fashion-mnist", flag="--data", help=f"{DATA_HELP} (default %(default)s)", resume=True)
    data_root: Optional[str] = option(None, flag="--data-root",
                                      help="folder holding the dataset files (docs/data.md: search order)")
    download: bool = option(False, flag="--download",
                            help="let torchvision download the dataset where the network allows")
    split: str = option("multi", flag="--split", choices=("single", "multi"), resume=True,  # "single": 1:1
                        help="multi: --steps equal parts; single: 1:1, 2 steps (default %(default)s)")
    steps: int = option(4, flag="--steps", resume=True,
                        help="number of steps/data parts (default 4 multi, 2 single)")
    method: str = option("framework", flag="--method", help=_method_help, resume=True)
    # "paper": the settings left at their library default take the multistep paper's (PAPER_RECIPE)
    recipe: str = option("library", flag="--recipe", choices=RECIPES, resume=True,
                         help="library: the defaults (docs/method.md); paper: the multistep paper's exact recipe "
                              "for every setting left at its default (global ranking, subgradient L1 of 1e-4 with "
                              "the SP_r ramp, stale BN statistics, AT on every block, AOD at lr 1e-3) "
                              "(default %(default)s)")
    epochs: int = option(30, flag="--epochs", help="epochs per phase (default %(default)s)",  # SST and AOD each
                         resume=True)
    step1_epochs: Optional[int] = option(None, flag="--step1-epochs", resume=True,  # None: ``epochs``
                                         help="epochs of step 1 (Data1 from scratch; default --epochs)")
    batch_size: int = option(256, flag="--batch-size", resume=True,
                             help="images per batch (per process under torchrun) (default %(default)s)")
    lr: Optional[float] = option(None, flag="--lr", help=_lr_help, resume=True)  # new-data lr (step_lr, new_lr)
    scratch_lr: float = 0.1  # step 1 and joint
    sst_lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    subset: Optional[int] = option(None, flag="--subset", resume=True,  # training images per part
                                   help="N training images per data part (quick runs)")
    image_size: Optional[int] = option(  # image folders only (default: the images' own size, else 224)
        None, flag="--image-size", metavar="PIXELS", resume=True,
        help="imagefolder only: decode images to PIXELS x PIXELS (default: the images' own size when "
             "they all share one, else 224)")
    val_fraction: float = 0.1
    # warm-start baselines (filtersurgery.ops.warmstart): Shrink & Perturb, DASH; chosen on the testbed's
    # validation (docs/warmstart.md; the operations' own defaults are the papers' 0.4 / 0.1 and 0.3)
    sp_shrink: float = option(0.8, flag="--sp-shrink", resume=True,
                              help="shrink-perturb: weights are scaled by this (default %(default)s)")
    sp_noise: float = option(0.01, flag="--sp-noise", resume=True,
                             help="shrink-perturb: scale of the noise drawn like a fresh initialisation "
                                  "(default %(default)s)")
    dash_lam: float = option(0.5, flag="--dash-lam", resume=True,
                             help="dash: lower bound of the per-kernel shrink factor max(lam, cos(w, -grad)) "
                                  "(default %(default)s)")
    dash_alpha: Optional[float] = option(
        None, flag="--dash-alpha", resume=True,
        help="dash: running-average weight of batch gradients (default: the mean gradient over the part)")
    dash_granularity: str = option(
        "kernel", flag="--dash-granularity", choices=DASH_GRANULARITIES, resume=True,
        help="dash: one shrink factor per kernel (the authors' code) or per filter (default %(default)s)")
    # SST / Dri / AOD / MSL
    target_r: float = option(0.3, flag="--target-r", help="Target_r of SST (default %(default)s)", resume=True)
    ranking: str = option(  # how factors of different norms compare (the operations' default too)
        DEFAULT_RANKING, flag="--ranking", choices=RANKINGS, resume=True,
        help="how scaling factors of different norms are compared: global |gamma| (the paper) or "
             "|gamma| over its own norm's mean (default %(default)s)")
    lam: Union[float, str] = option(  # L1 strength, or "auto": sparsity.lam_for_budget over the SST schedule
        "auto", flag="--lam", type=lam_value, resume=True,
        help="L1 strength of SST in ranking units, or 'auto': large enough to reach target_r zeros "
             "in the SST schedule (default %(default)s)")
    sst_update: str = option(  # how SST's L1 acts (ops.sparsity.UPDATES); docs/method.md, "Do no harm"
        "proximal", flag="--sst-update", choices=UPDATES, resume=True,
        help="how SST's L1 acts on its targets: proximal (each step shrinks a target's |gamma| by lam, stopping at 0) "
             "or subgradient (the paper: lam * sign(gamma) added to the gradient) (default %(default)s)")
    lam_safety: Optional[float] = option(  # the "auto" rule's margin for SST with CE (docs/method.md §1)
        None, flag="--lam-safety", resume=True,
        help="margin of --lam auto for SST with cross-entropy (default 1.5 proximal: the largest final target "
             "reaches 0 after two thirds of SST; 3 subgradient)")
    lam_safety_msl: Optional[float] = option(  # ... and for SST under MSL (the teacher's KL pulls back harder)
        None, flag="--lam-safety-msl", resume=True,
        help="margin of --lam auto for SST under the multi-step loss, steps >= 3 (default 1.5 proximal, 6 subgradient)")
    refresh_bn: bool = option(  # re-estimate BN running statistics after every SST epoch (ops/normstats.py)
        True, flag="--no-refresh-bn", dest="refresh_bn", resume=True,
        help="ablation: keep the BatchNorm running statistics SST's moving factors leave behind (stale), instead "
             "of re-estimating them from the phase's training images after every SST epoch")
    refresh_bn_batches: int = 50  # at most this many training batches for the re-estimate
    e_cut_fraction: float = option(
        1.0 / 3.0, flag="--e-cut-fraction", resume=True,
        help="E_cut / E_max of SST's SP_r ramp, in [0, 1] (default 1/3, the paper; 0: no ramp, only the "
             "final targets are pushed: much better on timm ResNets, see README)")
    dri_I: Tuple[float, float] = (0.1, 0.2)
    alpha: float = 0.5
    aod_flip: str = option(  # AOD's B_F view: "always" mirrored (paper) | "random" (p = 1/2 per image)
        "always", flag="--aod-flip", choices=augment.AOD_FLIPS, resume=True,
        help="AOD's mirrored view B_F: every image mirrored (the paper) or each with probability 1/2 "
             "(default %(default)s)")
    kd_temperature: float = 1.0
    at_weight: float = option(1e3, flag="--at-weight", help="weight of the AT term of MSL (default %(default)s)",
                              resume=True)
    at_min_size: int = option(  # AT only on blocks whose map is at least this many pixels on each side
        4, flag="--at-min-size", resume=True,
        help="attention transfer only on blocks whose map is at least this many pixels a side (default %(default)s)")
    # ablation switches (framework only)
    msl: bool = option(True, flag="--no-msl", dest="msl", resume=True,  # False: steps >= 3 run SST with CE
                       help="ablation: steps>=3 run SST with CE, no distillation")
    msl_ce: bool = False  # True: MSL adds CE on the current data's labels to KL + AT (beyond the paper)
    teacher_update: bool = option(True, flag="--no-teacher-update", dest="teacher_update", resume=True,
                                  help="ablation: fixed MSL teacher")
    students: int = option(2, flag="--students", choices=(1, 2), resume=True,  # 1: AOD with one student (CE + alpha * L_CR)
                           help="ablation: AOD students (default 2)")
    sst: bool = True  # False: no SST phase; Dri re-draws the smallest factors of the incoming model
    dri: bool = True  # False: the AOD students start as exact copies (no re-drawn factors)
    # LwM
    lwm_beta: float = 1.0
    lwm_gamma: float = 1.0
    # runtime
    device: str = option("auto", flag="--device", help="cpu, cuda, cuda:N or auto (default %(default)s)")
    amp: str = option("auto", flag="--amp", choices=AMP_MODES,  # "auto": bf16 on CUDA, none on CPU
                      help="mixed precision: auto = bf16 on CUDA, none on CPU; fp16 uses a GradScaler "
                           "(default %(default)s)")
    channels_last: bool = option(False, flag="--channels-last", help="train in the channels_last memory format")
    workers_seed: int = 0
    progress: bool = option(True, flag="--no-progress", dest="progress", help="no tqdm bars")
    max_batches: Optional[int] = option(None, flag="--max-batches", resume=True,  # cap batches per epoch
                                        help="cap batches per epoch (smoke tests)")
    # write the resumable state at most every this many seconds (0: after every epoch); the
    # epochs.csv rows of unsaved epochs are held back with it, so a kill never duplicates a row
    state_every: float = 0.0

    def __post_init__(self) -> None:
        if self.recipe == "paper":  # the paper's value for every setting still at the library's default
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in PAPER_RECIPE.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)

    def validate(self) -> None:
        """One-line ValueError naming the bad field and its allowed range (the first bad field, in field order)."""
        for check in (self._check_method, self._check_counts, self._check_sst_dri, self._check_data,
                      self._check_students, self._check_amp_lam, self._check_warmstart, self._check_sst_options,
                      self._check_runtime, self._check_lrs):
            check()

    def record(self) -> Dict[str, Any]:
        """The settings as a JSON-ready dict (``metrics.json``'s ``config``): a user model is recorded as
        ``user:CLASS:FINGERPRINT`` (:func:`~filtersurgery.models.user.model_id`)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "model"}
        return {"model": model_id(self.model), **copy.deepcopy(out)}

    def _check_method(self) -> None:
        """``model``, ``method`` (multi-step or registered single-run), ``split`` and ``steps``."""
        check_model_spec(self.model)
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
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
        if self.amp not in AMP_MODES:
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
        if self.dash_granularity not in DASH_GRANULARITIES:
            raise ValueError(f"dash_granularity: must be kernel or filter, got {self.dash_granularity!r}")

    def _check_sst_options(self) -> None:
        """``lam_safety*``, ``e_cut_fraction`` (SST's own check), ``aod_flip``, ``ranking``, ``at_min_size``."""
        for name in ("lam_safety", "lam_safety_msl"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be None or a finite number > 0, got {v}")
        if self.sst_update not in UPDATES:
            raise ValueError(f"sst_update: must be one of {', '.join(UPDATES)}, got {self.sst_update!r}")
        if not (isinstance(self.refresh_bn_batches, int) and self.refresh_bn_batches >= 1):
            raise ValueError(f"refresh_bn_batches: must be an integer >= 1, got {self.refresh_bn_batches!r}")
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

    def sst_safety(self, msl: bool) -> float:
        """The margin of ``lam="auto"`` for SST with CE (``msl=False``) or under MSL: ``lam_safety`` /
        ``lam_safety_msl`` when set, else the update's default (proximal 1.5 and 1.5; subgradient 3 and 6)."""
        v = self.lam_safety_msl if msl else self.lam_safety
        if v is not None:
            return float(v)
        return 1.5 if self.sst_update == "proximal" else (6.0 if msl else 3.0)

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


def resume_keys() -> List[str]:
    """The :class:`TrainConfig` settings that must match for a re-run to resume into an existing run folder
    (the fields declared with ``option(..., resume=True)``; ``model`` compares names or user-model ids)."""
    return resume_fields(TrainConfig)


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


# --------------------------------------------------------------------------- one seed's run
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

    def drop_step_work(self, step: int) -> None:
        """Remove what step ``step`` left in ``.work/`` once its result is written: its phases' output
        models (``stepK_PHASE.safetensors``) and the resumable state (rank 0 only)."""
        if not is_main_process():
            return
        for f in self.work.glob(f"step{step}_*.safetensors"):
            f.unlink()
        (self.work / STATE_FILE).unlink(missing_ok=True)

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


def make_sgd(params, lr: float, cfg: TrainConfig) -> torch.optim.SGD:
    """The engine's optimizer: SGD at ``lr`` with the config's momentum and weight decay."""
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_scaler(run: Run) -> torch.amp.GradScaler:
    """The run's AMP gradient scaler (enabled only under fp16)."""
    return torch.amp.GradScaler(run.device.type, enabled=run.amp is torch.float16)


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


# --------------------------------------------------------------------------- the loop
@dataclass
class _PhaseLoop:
    """The moving parts of one phase's training: what trains, the loader, SGD, schedule, AMP scaler."""

    state: PhaseState
    loader: BatchLoader
    opt: torch.optim.Optimizer
    sched: Any
    scaler: torch.amp.GradScaler
    gen: torch.Generator  # the augmentation generator
    batches: int  # per epoch (``cfg.max_batches`` applied)
    state_path: Path  # the resumable state file


def run_phase(run: Run, step: int, phase: Phase, model: nn.Module) -> nn.Module:
    """Train ``phase`` starting from ``model``; returns the phase's output model.

    Writes ``.work/state.pt`` after every epoch (resume) and ``.work/stepK_PHASE.safetensors``
    when done. What trains and the loss come from the phase's kind (``engine/phases.py``).
    """
    kind = phase_kind(phase.kind)
    done_path = run.work / f"step{step}_{phase.name}.safetensors"
    if done_path.exists():  # finished in an earlier (killed) run
        model.load_state_dict(checkpoint.load_state_dict(done_path, device=str(run.device)))
        return model
    loop = _set_up(run, step, phase, kind, model)
    start_epoch = _resume(step, phase, loop)
    _train_epochs(run, step, phase, kind, loop, start_epoch)
    return _finish(run, step, phase, kind, loop.state, done_path)


def _set_up(run: Run, step: int, phase: Phase, kind: PhaseKind, model: nn.Module) -> _PhaseLoop:
    """The warm start, the loader, the kind's models and set-up, SGD and the cosine schedule.

    The order fixes the random streams: the kind's models (new models re-seed the global
    RNG) before the phase's seed, the kind's set-up (teacher copies, probes) after it.
    """
    cfg, dev = run.cfg, run.device
    x_tr, y_tr = run.part_xy(phase.parts, "train")
    state_path = run.work / STATE_FILE
    if phase.warm_start is not None and not _resumes(state_path, step, phase):
        warm_start_op(phase.warm_start).apply(run, step, phase, model, x_tr, y_tr)
    world = dist_info()[1]  # under torchrun each rank takes its share of every epoch (BatchLoader)
    loader = BatchLoader(x_tr, y_tr, cfg.batch_size, shuffle=True, device=dev,
                         seed=phase_seed(run.seed, step, phase.name, "order:"), drop_last=len(y_tr) > cfg.batch_size * world)
    state = PhaseState(kind.students(run, step, phase, model))
    # seeded after the kind's models (new_model re-seeds the global RNG for its initialisation)
    gen = _seed_everything(phase_seed(run.seed, step, phase.name), dev)
    batches = len(loader) if cfg.max_batches is None else min(len(loader), cfg.max_batches)
    kind.set_up(run, step, phase, state, batches)
    params = [p for s in state.students for p in s.parameters() if p.requires_grad]
    opt = make_sgd(params, phase.lr, cfg)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=phase.epochs * max(1, batches))
    scaler = make_scaler(run)
    return _PhaseLoop(state, loader, opt, sched, scaler, gen, batches, state_path)


def _resume(step: int, phase: Phase, loop: _PhaseLoop) -> int:
    """Load a saved epoch of this step's ``phase`` into ``loop``; returns the epochs already done (0: none)."""
    if not loop.state_path.exists():
        return 0
    st = checkpoint.load_training_state(loop.state_path)
    extra = st["extra"]
    if extra.get("step") != step or extra.get("phase") != phase.name:
        return 0
    sd, state = st["model"], loop.state
    for i, s in enumerate(state.students):
        s.load_state_dict({k[len(f"s{i}.") :]: v for k, v in sd.items() if k.startswith(f"s{i}.")})
    if state.teacher is not None:
        state.teacher.load_state_dict({k[2:]: v for k, v in sd.items() if k.startswith("t.")})
    loop.opt.load_state_dict(st["optimizer"])
    loop.sched.load_state_dict(extra["sched"])
    if state.sparsifier is not None:
        state.sparsifier.load_state_dict(extra["sparsifier"])
    state.teacher_val = extra.get("teacher_val", state.teacher_val)
    restore_rng(extra, loop.gen)
    return int(extra["epoch"])


def _train_epochs(run: Run, step: int, phase: Phase, kind: PhaseKind, loop: _PhaseLoop, start_epoch: int) -> None:
    """Epochs ``start_epoch..phase.epochs-1`` through the engine's epoch driver
    (:func:`~filtersurgery.engine.epochs.run_epochs`): train, validate, fill the row; the state is
    saved after every epoch (or every ``cfg.state_every`` seconds and after the last), then the rows are logged."""
    for s in loop.state.students:
        s.train()
    nets = _ddp_wrap(loop.state.students, run.device)  # what the batch loss calls (the students without torchrun)
    desc = f"{run.cfg.method} seed{run.seed} step{step} {phase.name}"

    def one_epoch(epoch: int) -> Dict:
        t0 = time.time()
        total, nb = _train_epoch(run, step, phase, loop, nets, epoch, desc)
        kind.after_batches(run, phase, loop.state, epoch)
        _sync_buffers(loop.state.students)  # torchrun: BN running statistics averaged over ranks
        row = {"step": step, "phase": phase.name, "epoch": epoch + 1, "lr": loop.opt.param_groups[0]["lr"],
               "train_loss": float(total) / max(1, nb), "seconds": round(time.time() - t0, 3)}
        _epoch_end(run, phase, kind, loop.state, epoch, row)
        extra = {k: v for k, v in row.items() if k not in _CSV_FIELDS}
        return {**{k: row.get(k, "") for k in _CSV_FIELDS}, "extra": json.dumps(extra) if extra else ""}

    run_epochs(start_epoch, lambda e: e >= phase.epochs, one_epoch, lambda e: _save_state(step, phase, loop, e),
               run.log_epoch, run.cfg.state_every)


def _train_epoch(run: Run, step: int, phase: Phase, loop: _PhaseLoop, nets: List[nn.Module], epoch: int,
                 desc: str) -> Tuple[Union[torch.Tensor, float], int]:
    """One epoch's batches through :func:`~filtersurgery.engine.loop.sgd_batches` (loss, backward, the
    sparsifier's subgradient, SGD and schedule steps). Returns the summed loss and the number of batches."""
    loop.loader.set_epoch(epoch)
    sp = loop.state.sparsifier
    if sp is not None:
        sp.set_epoch(epoch, phase.epochs)
    it = _progress(loop.loader, desc=f"{desc} ep{epoch + 1}/{phase.epochs}", total=loop.batches, enable=run.cfg.progress)
    total, nb = sgd_batches(itertools.islice(it, loop.batches),
                            lambda xb, yb: _batch_loss(run, phase, loop.state, nets, xb, yb, loop.gen),
                            loop.opt, scaler=loop.scaler, sparsifier=sp, sched=loop.sched)
    check_finite_loss(total, f"step {step} phase {phase.name} epoch {epoch + 1}",  # once per epoch
                      _last_good_state(run, step, phase, loop.state_path))
    return total, nb


def _last_good_state(run: Run, step: int, phase: Phase, state_path: Path) -> Path:
    """The file that holds the last good state before this phase's current epoch: the resumable state once
    an epoch of this phase is saved, else the output of the step's previous phase, else the previous step's
    checkpoint (else the state file, which step 1's first epoch has not written yet)."""
    if _resumes(state_path, step, phase):
        return state_path
    names = [p.name for p in plan_for(run.cfg.method)(run.cfg, step)] if step > 1 and run.cfg.method in METHODS else []
    if phase.name in names and names.index(phase.name) > 0:
        prev = run.work / f"step{step}_{names[names.index(phase.name) - 1]}.safetensors"
        if prev.exists():
            return prev
    prev_step = run.out / f"step{step - 1}.safetensors"
    return prev_step if step > 1 and prev_step.exists() else state_path


def _epoch_end(run: Run, phase: Phase, kind: PhaseKind, state: PhaseState, epoch: int, row: Dict) -> None:
    """Fill the epoch's log ``row``: the phase's ``epoch_end`` callback, the students' validation
    accuracy (``val_acc0``, ``val_acc1``), then the kind's ``epoch_end``."""
    if phase.epoch_end is not None:
        row.update(phase.epoch_end(state.students, epoch, row["lr"]) or {})
    vals = [run.acc(s, phase.parts) for s in state.students]
    for i, v in enumerate(vals):
        row[f"val_acc{i}"] = round(v, 3)
    kind.epoch_end(run, phase, state, epoch, vals, row)


def _save_state(step: int, phase: Phase, loop: _PhaseLoop, epoch: int) -> None:
    """Write the resumable state after ``epoch``: models (``s0.``, ``s1.``, ``t.``), optimizer,
    schedule, sparsifier, ``teacher_val``, RNG states (rank 0 writes)."""
    state = loop.state
    sd = {f"s{i}.{k}": v for i, s in enumerate(state.students) for k, v in s.state_dict().items()}
    if state.teacher is not None:
        sd.update({f"t.{k}": v for k, v in state.teacher.state_dict().items()})
    if is_main_process():
        sp = state.sparsifier
        save_training_state(
            loop.state_path, sd, loop.opt.state_dict(),
            {"step": step, "phase": phase.name, "epoch": epoch + 1, "sched": loop.sched.state_dict(),
             "sparsifier": sp.state_dict() if sp is not None else None, "teacher_val": state.teacher_val},
            gen=loop.gen,
        )


def _finish(run: Run, step: int, phase: Phase, kind: PhaseKind, state: PhaseState, done_path: Path) -> nn.Module:
    """The phase's output: its one model, or the better student on the current data's validation
    split (docs/method.md §3); the kind's ``finish`` and the output model are written by rank 0."""
    for p in state.frozen:
        p.requires_grad_(True)
    students = state.students
    if len(students) == 1:
        out = students[0]
    else:
        vals = [run.acc(s, phase.parts) for s in students]
        out = students[max(range(len(students)), key=lambda i: vals[i])]
    if is_main_process():
        kind.finish(run, step, phase, state)  # e.g. SST's norm scales (written before the phase counts as done)
        checkpoint.save_state_dict(out.state_dict(), done_path)
    barrier()
    return out


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


def _batch_loss(run: Run, phase: Phase, state: PhaseState, nets: List[nn.Module], xb: torch.Tensor,
                yb: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The loss of one batch of ``phase``: its kind's ``batch_loss``."""
    return phase_kind(phase.kind).batch_loss(run, state, nets, xb, yb, gen)


# --------------------------------------------------------------------------- metrics, resume point
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


__all__ = [
    "METHODS", "SINGLE_RUN_METHODS", "STATE_FILE", "TrainConfig", "Run", "run_phase", "phase_seed",
    "dist_info", "is_main_process", "barrier", "resolve_device", "amp_dtype", "classifier_params", "evaluate",
    "forward_flops", "preprocess_info", "write_metrics", "resume_point", "make_sgd", "make_scaler", "resume_keys",
    # phases and their kinds (engine/phases.py)
    "Phase", "PhaseKind", "PhaseState", "WarmStart", "PHASE_KINDS", "WARM_STARTS", "phase_flops", "phase_kind",
    "warm_start_op", "register_phase_kind", "register_warm_start",
]
