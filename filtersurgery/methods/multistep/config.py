"""``MultiStepConfig``: the settings of the multi-step framework and its baselines (docs/method.md §1-4, §9).

``TrainConfig`` holds what every run needs; this dataclass holds what only the multi-step
methods read (SST, Dri, AOD, MSL, the warm-start baselines), as each single-run method has its
own options dataclass. Its fields' ``option`` metadata builds the ``filtersurgery run`` flags.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional, Tuple, Union

from filtersurgery.data import augment
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.registry import option
from filtersurgery.methods.multistep.phases import SST_KEEPS
from filtersurgery.ops.ranking import DEFAULT_RANKING, RANKINGS, check_ranking
from filtersurgery.ops.sparsity import UPDATES, SparsityConfig

__all__ = ["MultiStepConfig", "PAPER_RECIPE", "RECIPES", "lam_value", "fit_acc_value"]

RECIPES = ("library", "paper")
# the multistep paper's recipe (MultiStepConfig(recipe="paper"), --recipe paper): where the library's defaults
# depart from it (docs/method.md, "Where this library departs from the papers"); the paper's AOD lr, 1e-3, is
# MultiStepConfig.step_lr's
PAPER_RECIPE = {"ranking": "global", "lam": 1e-4, "sst_update": "subgradient", "refresh_bn": False, "sst_project": False,
                "sst_keep": "last", "msl_step2": False, "msl_ce": False, "sst_fit_acc": None,
                "e_cut_fraction": 1.0 / 3.0, "at_min_size": 1}
DASH_GRANULARITIES = ("kernel", "filter")


def lam_value(text: str) -> Union[float, str]:
    """``--lam``: ``auto`` or a number (one-line ValueError otherwise; :meth:`MultiStepConfig.validate` checks >= 0)."""
    if text == "auto":
        return "auto"
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be 'auto' or a number >= 0, got {text!r}") from None


def fit_acc_value(text: str) -> Optional[float]:
    """``--sst-fit-acc``: ``none`` or a number (one-line ValueError otherwise; :meth:`MultiStepConfig.validate`
    checks the range)."""
    if text.lower() == "none":
        return None
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"must be 'none' or a number in (0, 100], got {text!r}") from None


@dataclass
class MultiStepConfig:
    """Options of the multi-step framework and its baselines. Defaults: docs/method.md §1-4 and "Do no harm"."""

    # "paper": the settings left at their library default take the multistep paper's (PAPER_RECIPE)
    recipe: str = option("library", flag="--recipe", choices=RECIPES, resume=True,
                         help="library: the defaults (docs/method.md); paper: the multistep paper's exact recipe "
                              "for every setting left at its default (global ranking, subgradient L1 of 1e-4 with "
                              "the SP_r ramp, SST ending on its last epoch, stale BN statistics, AT on "
                              "every block, AOD at lr 1e-3, SST at --sst-lr whatever the model's training accuracy) "
                              "(default %(default)s)")
    sst_lr: float = option(  # SST's peak lr (cosine; x FIT_LR_SCALE under sst_fit_acc); the proximal push ignores it
        0.1, flag="--sst-lr", resume=True,
        help="peak learning rate of SST's cosine schedule (default %(default)s, the paper's; a model that already "
             "fits SST's training images gets a tenth of it, --sst-fit-acc)")
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
    lam_safety: Optional[float] = option(  # the "auto" rule's margin for step 2's SST and SST with CE (docs/method.md §1)
        None, flag="--lam-safety", resume=True,
        help="margin of --lam auto for step 2's SST and for SST with cross-entropy (default 1.5 proximal: the largest "
             "final target reaches 0 after two thirds of SST; 3 subgradient)")
    lam_safety_msl: Optional[float] = option(  # ... and for SST under MSL (the teacher's KL pulls back harder)
        None, flag="--lam-safety-msl", resume=True,
        help="margin of --lam auto for SST under the multi-step loss, steps >= 3 (default 2 proximal: after half of SST; 6 subgradient)")
    refresh_bn: bool = option(  # re-estimate BN running statistics after every SST epoch (ops/normstats.py)
        True, flag="--no-refresh-bn", dest="refresh_bn", resume=True,
        help="ablation: keep the BatchNorm running statistics SST's moving factors leave behind (stale), instead "
             "of re-estimating them from the phase's training images after every SST epoch")
    refresh_bn_batches: int = 50  # at most this many training batches for the re-estimate
    sst_project: bool = option(  # SST's last epoch ends with its Target_r smallest factors set to exactly 0
        True, flag="--no-sst-project", dest="sst_project", resume=True,
        help="ablation: end SST with the zeros its L1 reached, instead of setting the target_r smallest scaling "
             "factors to exactly 0 at the end of its last epoch (before that epoch's BN re-estimate and validation)")
    sst_fit_acc: Optional[float] = option(  # SST on a model that already fits its training images (docs/method.md)
        99.0, flag="--sst-fit-acc", type=fit_acc_value, resume=True,
        help="when the incoming model's accuracy on SST's training images is at least this (%%), SST runs at a "
             "tenth of --sst-lr with its zeros due by a third of the phase; 'none': never (default %(default)s)")
    sst_keep: str = option(  # SST hands on its best feasible epoch (validation) or its last (docs/method.md)
        "best", flag="--sst-keep", choices=SST_KEEPS, resume=True,
        help="which SST epoch the step goes on from: best = the best validation accuracy among the epochs that end "
             "with target_r of the factors at 0; last = the last epoch (the paper) (default %(default)s)")
    e_cut_fraction: float = option(
        1.0 / 3.0, flag="--e-cut-fraction", resume=True,
        help="E_cut / E_max of SST's SP_r ramp, in [0, 1] (default 1/3, the paper; 0: no ramp, only the "
             "final targets are pushed)")
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
    msl: bool = option(True, flag="--no-msl", dest="msl", resume=True,  # False: every SST phase with CE
                       help="ablation: every SST phase with CE, no distillation")
    msl_step2: bool = option(  # step 2's SST (on Data1) under MSL too, the step-1 model its teacher (docs/method.md)
        True, flag="--no-msl-step2", dest="msl_step2", resume=True,
        help="step 2's SST with cross-entropy on Data1 (the paper) instead of under the multi-step loss with the "
             "step-1 model as its teacher")
    msl_ce: bool = option(  # MSL adds CE on the SST data's labels to KL + AT (beyond the paper; docs/method.md)
        True, flag="--no-msl-ce", dest="msl_ce", resume=True,
        help="SST under the multi-step loss without cross-entropy on the labels (the paper: KL + AT only)")
    teacher_update: bool = option(True, flag="--no-teacher-update", dest="teacher_update", resume=True,
                                  help="ablation: fixed MSL teacher")
    students: int = option(2, flag="--students", choices=(1, 2), resume=True,  # 1: AOD with one student (CE + alpha * L_CR)
                           help="ablation: AOD students (default 2)")
    sst: bool = True  # False: no SST phase; Dri re-draws the smallest factors of the incoming model
    dri: bool = True  # False: the AOD students start as exact copies (no re-drawn factors)
    # LwM
    lwm_beta: float = 1.0
    lwm_gamma: float = 1.0

    def __post_init__(self) -> None:
        if self.recipe == "paper":  # the paper's value for every setting still at the library's default
            defaults = {f.name: f.default for f in fields(self)}
            for name, value in PAPER_RECIPE.items():
                if getattr(self, name) == defaults[name]:
                    setattr(self, name, value)

    def step_lr(self, cfg: TrainConfig) -> float:
        """The new-data learning rate of the multi-step methods at steps >= 2: ``cfg.lr``, default 1e-2 (the
        paper's 1e-3 with ``recipe="paper"``). At 1e-3 a trained model barely moves in a short step; 1e-2
        was chosen on the CPU testbed's validation split (docs/method.md, "Where this library departs")."""
        if cfg.lr is not None:
            return cfg.lr
        return 1e-3 if self.recipe == "paper" else 1e-2

    def sst_safety(self, msl: bool) -> float:
        """The margin of ``lam="auto"`` for SST with CE (``msl=False``) or under MSL: ``lam_safety`` /
        ``lam_safety_msl`` when set, else the update's default (proximal 1.5 and 2; subgradient 3 and 6): the
        teacher's KL pulls the targets back harder than CE (docs/method.md, "Do no harm")."""
        v = self.lam_safety_msl if msl else self.lam_safety
        if v is not None:
            return float(v)
        if self.sst_update == "proximal":
            return 2.0 if msl else 1.5
        return 6.0 if msl else 3.0

    def validate(self) -> "MultiStepConfig":
        """One-line ValueError naming the bad field and its allowed range; returns ``self``."""
        for check in (self._check_recipe, self._check_sst_dri, self._check_students, self._check_lam,
                      self._check_warmstart, self._check_sst_options):
            check()
        return self

    def _check_recipe(self) -> None:
        if self.recipe not in RECIPES:
            raise ValueError(f"recipe: must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
        if not (isinstance(self.sst_lr, (int, float)) and self.sst_lr > 0):
            raise ValueError(f"sst_lr: must be > 0, got {self.sst_lr}")

    def _check_sst_dri(self) -> None:
        """``target_r`` of SST and the re-drawn fractions ``dri_I`` of Dri (docs/method.md §1, §2)."""
        if not 0.0 < self.target_r < 1.0:
            raise ValueError(f"target_r: must be in (0, 1), got {self.target_r}")
        for I in self.dri_I:
            if not (0.0 <= I and self.target_r + I < 1.0 - I):
                raise ValueError(f"dri_I: each I needs target_r + I < 1 - I (target_r={self.target_r}), got {I}")

    def _check_students(self) -> None:
        """``students`` of AOD, and ``dri=False`` only with one student."""
        if self.students not in (1, 2):
            raise ValueError(f"students: must be 1 or 2, got {self.students}")
        if not self.dri and self.students == 2:
            raise ValueError("students: dri=False makes the two AOD students identical copies that see the same "
                             "views and never diverge; use students=1 with dri=False")

    def _check_lam(self) -> None:
        """The L1 strength ``lam`` (``auto`` or a finite number >= 0)."""
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
        """``lam_safety*``, ``sst_update``, ``sst_fit_acc``, ``refresh_bn_batches``, ``e_cut_fraction``,
        ``aod_flip``, ``ranking``, ``at_min_size``."""
        for name in ("lam_safety", "lam_safety_msl"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: must be None or a finite number > 0, got {v}")
        if self.sst_update not in UPDATES:
            raise ValueError(f"sst_update: must be one of {', '.join(UPDATES)}, got {self.sst_update!r}")
        if self.sst_keep not in SST_KEEPS:
            raise ValueError(f"sst_keep: must be one of {', '.join(SST_KEEPS)}, got {self.sst_keep!r}")
        if self.sst_fit_acc is not None and not (isinstance(self.sst_fit_acc, (int, float))
                                                 and 0 < self.sst_fit_acc <= 100):
            raise ValueError(f"sst_fit_acc: must be None or in (0, 100], got {self.sst_fit_acc!r}")
        if not (isinstance(self.refresh_bn_batches, int) and self.refresh_bn_batches >= 1):
            raise ValueError(f"refresh_bn_batches: must be an integer >= 1, got {self.refresh_bn_batches!r}")
        SparsityConfig(e_cut_fraction=self.e_cut_fraction).validate()  # SST's own check, before step 1 trains
        if self.aod_flip not in augment.AOD_FLIPS:
            raise ValueError(f"aod_flip: must be one of {', '.join(augment.AOD_FLIPS)}, got {self.aod_flip!r}")
        check_ranking(self.ranking)
        if not (isinstance(self.at_min_size, int) and self.at_min_size >= 1):
            raise ValueError(f"at_min_size: must be an int >= 1, got {self.at_min_size!r}")
