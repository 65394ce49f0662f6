"""The multi-step framework's phases (docs/method.md §1-4) and its baselines' (§9), one class each.

``SST`` (selective sparsity training; ``selective=False`` is BST), ``SSTMSL`` (SST under the
multi-step loss), ``AOD`` (Dri'd students + adaptive online distillation), ``DML``, ``LwM``,
and the warm starts ``ShrinkPerturb`` and ``Dash`` that run before a fine-tuning phase.
Each phase object holds its options (given to its constructor by the plan,
``methods/multistep/plans.py``) and its per-phase state; SST hands its norm scales to the
step's next phase (:meth:`SST.finish` -> :meth:`AOD.receive`).
"""
from __future__ import annotations

import copy
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from filtersurgery.data import augment
from filtersurgery.data import BatchLoader
from filtersurgery.distill import losses
from filtersurgery.distill.blockfeats import capture_blocks, spatial_blocks
from filtersurgery.engine.phase import FineTune, Phase, WarmStart
from filtersurgery.engine.run import classifier_params, phase_seed
from filtersurgery.ops.dash import dash
from filtersurgery.ops.normstats import refresh_bn_stats
from filtersurgery.ops.ranking import as_scaling_map
from filtersurgery.ops.reinit import rescale
from filtersurgery.ops.shrink_perturb import shrink_perturb
from filtersurgery.ops.sparsity import Sparsifier, SparsityConfig, lam_for_budget

__all__ = ["SST", "SSTMSL", "AOD", "DML", "LwM", "ShrinkPerturb", "Dash", "SST_KEEPS"]

SST_KEEPS = ("best", "last")  # which SST epoch goes on (SST(keep=), MultiStepConfig.sst_keep)
# SST on a model that already fits the phase's training images (SST(fit_acc=), MultiStepConfig.sst_fit_acc):
# the peak lr times FIT_LR_SCALE and lam="auto"'s margin at least FIT_SAFETY (docs/method.md, "Do no harm")
FIT_LR_SCALE, FIT_SAFETY = 0.1, 3.0


def _frozen_copy(model: nn.Module) -> nn.Module:
    """A teacher: a copy of ``model`` in eval mode without gradients."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class SST(FineTune):
    """SST on the incoming model: CE + selective L1 on the scaling factors (docs/method.md §1); BST (network
    slimming) with ``selective=False``. Logs ``sp_r`` and ``zero_frac``; hands Dri the norm scales it ranked
    with. ``lam="auto"`` sizes the L1 to the phase's schedule (``safety``, ``momentum``: ``lam_for_budget``);
    ``refresh_bn`` re-estimates the BN statistics after every epoch; ``project`` sets the ``Target_r`` smallest
    factors to exactly 0 at the end of the last epoch, before its BN re-estimate and validation, and logs how
    many were not yet at 0 and the largest of them (``projected``, ``projected_max``; docs/method.md, "Do no harm").
    ``keep="best"`` hands on the epoch with the best validation accuracy among those that end with ``Target_r`` of
    the factors at 0 (every final target at or below ``zero_tol``, then set to exactly 0), ``"last"`` the last
    epoch; the last row logs which (``kept_epoch``, ``kept_val``). ``fit_acc``: when the incoming model's
    accuracy on the phase's un-augmented training images is at least ``fit_acc`` (%), the model already fits
    them and SST runs at ``lr * FIT_LR_SCALE`` with ``lam="auto"``'s margin at least ``FIT_SAFETY`` (its zeros
    due by a third of the phase); the last row logs the accuracy and the peak lr (``train_acc_in``,
    ``peak_lr``)."""

    kind = "sst"
    columns = ("sp_r", "zero_frac")

    def __init__(self, name: str, parts: Sequence[int], lr: float, epochs: int, *, target_r: float = 0.3,
                 ranking: str = "per-norm", lam="auto", update: str = "proximal", safety: float = 1.5,
                 momentum: float = 0.9, e_cut_fraction: float = 1.0 / 3.0, selective: bool = True,
                 refresh_bn: bool = True, refresh_bn_batches: int = 50, project: bool = True, keep: str = "best",
                 fit_acc: Optional[float] = None):
        super().__init__(name, parts, lr, epochs)
        if keep not in SST_KEEPS:
            raise ValueError(f"keep: must be one of {', '.join(SST_KEEPS)}, got {keep!r}")
        if fit_acc is not None and not (isinstance(fit_acc, (int, float)) and 0 < fit_acc <= 100):
            raise ValueError(f"fit_acc: must be None or in (0, 100], got {fit_acc!r}")
        self.base_lr, self.fit_acc, self.train_acc_in = lr, fit_acc, None
        self.project, self.projected, self.keep = project, None, keep
        self.best = None  # keep="best": the best epoch so far that ended at Target_r zeros
        self.target_r, self.ranking, self.lam, self.update, self.safety = target_r, ranking, lam, update, safety
        self.momentum, self.e_cut_fraction, self.selective = momentum, e_cut_fraction, selective
        self.refresh_bn, self.refresh_bn_batches = refresh_bn, refresh_bn_batches

    def set_up(self, ctx, students, batches):
        model = students[0]
        safety = self._fit_lr_and_safety(ctx, model)
        lam = self.lam if self.lam != "auto" else lam_for_budget(
            model, self.target_r, self.lr, self.epochs * max(1, batches), self.momentum, safety, self.ranking,
            update=self.update)
        # proximal "auto": the largest final target is due at 0 after 1 / safety of the phase; a late target catches up
        catch_up = 1.0 / safety if self.update == "proximal" and self.lam == "auto" else None
        self.grad_hook = Sparsifier(as_scaling_map(model), SparsityConfig(
            target_r=self.target_r, epochs=self.epochs, lam=lam, selective=self.selective,
            e_cut_fraction=self.e_cut_fraction, ranking=self.ranking, update=self.update, catch_up=catch_up))

    def _fit_lr_and_safety(self, ctx, model) -> float:
        """Set the phase's peak lr and return ``lam="auto"``'s margin: ``lr * FIT_LR_SCALE`` and at least
        ``FIT_SAFETY`` when the incoming model already fits the training images (``fit_acc``), else as given.
        A model that fits them has nothing left to learn from them at a large lr, which only shakes it (the
        paper's regime: one epoch at 0.1 without any L1 cost 14 points); at the small lr it cannot make up
        for zeros that arrive late, so they are due early."""
        self.lr, safety = self.base_lr, self.safety
        if self.fit_acc is None or ctx is None or ctx.train_accuracy is None:
            return safety
        self.train_acc_in = float(ctx.train_accuracy(model))
        if self.train_acc_in >= self.fit_acc:
            self.lr, safety = self.base_lr * FIT_LR_SCALE, max(safety, FIT_SAFETY)
        return safety

    @property
    def sparsifier(self) -> Sparsifier:
        """The phase's :class:`~filtersurgery.ops.sparsity.Sparsifier` (after :meth:`set_up`)."""
        return self.grad_hook

    def epoch_start(self, ctx, epoch):
        self.sparsifier.set_epoch(epoch, self.epochs)

    def after_batches(self, ctx, students, epoch):
        """At the last epoch's end set the final targets to exactly 0 (``project``; SST only, not BST). Then
        re-estimate the BN running statistics from the phase's training images (``refresh_bn``): the
        factors moved at every step, so the averages of the last batches describe another network."""
        self.projected, sp = None, self.sparsifier
        if self.project and self.selective and epoch == self.epochs - 1:
            self.projected = sp.project()
        elif self.project and self.selective and self.keep == "best" and sp.final_targets_converged():
            sp.project()  # only factors already at or below zero_tol: the epoch is a candidate for SST's output
        if self.refresh_bn:
            x = ctx.train_images()[0][: self.refresh_bn_batches * ctx.batch_size]
            bs = ctx.batch_size
            batches = (ctx.normalized(x[i: i + bs].to(ctx.device)) for i in range(0, len(x), bs))
            with ctx.autocast():
                refresh_bn_stats(students[0], batches)

    def epoch_end(self, ctx, students, epoch, vals, row):
        sp = self.sparsifier
        row["sp_r"] = round(float(sp.sp_r), 4)
        zero_frac = sp.zero_fraction()
        row["zero_frac"] = round(zero_frac, 4)  # SST's goal: >= target_r
        if self.projected is not None:  # the epochs.csv row's extra: what the end's projection moved
            row["projected"] = self.projected["projected"]
            row["projected_max"] = round(self.projected["projected_max"], 6)
        self._keep_candidate(students[0], epoch, vals[0], zero_frac >= sp.target_r - 0.5 / sp.n)
        if epoch == self.epochs - 1 and self.keep == "best" and self.best is not None:
            row["kept_epoch"], row["kept_val"] = self.best["epoch"] + 1, round(self.best["val"], 3)
        if epoch == self.epochs - 1 and self.train_acc_in is not None:  # what decided the lr (fit_acc)
            row["train_acc_in"], row["peak_lr"] = round(self.train_acc_in, 4), float(f"{self.lr:.6g}")

    def _keep_candidate(self, model, epoch, val, feasible):
        """``keep="best"``: remember ``model`` (on the CPU) when this epoch ends at ``Target_r`` zeros (``feasible``)
        and its validation accuracy is at least the best such epoch's so far (a tie goes to the later epoch)."""
        if self.keep != "best" or not feasible or (self.best is not None and val < self.best["val"]):
            return
        state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        self.best = {"epoch": epoch, "val": float(val), "state": state}

    def finish(self, ctx, students):
        """Hand on the kept epoch (``keep="best"``) and, for Dri, the norm scales of SST's start."""
        if self.keep == "best" and self.best is not None and self.best["epoch"] != self.epochs - 1:
            students[0].load_state_dict(self.best["state"])
        return {"scales": self.sparsifier.scales}

    def state_dict(self):
        return {"sparsifier": self.sparsifier.state_dict(), "best": self.best}

    def load_state_dict(self, state):
        self.sparsifier.load_state_dict(state["sparsifier"])
        self.best = state.get("best")


class SSTMSL(SST):
    """SST under MSL (docs/method.md §4, eq. 9): KL + AT to the incoming model as teacher, the classifier
    frozen; the teacher becomes the student whenever the student's validation accuracy is higher
    (``teacher_update``). ``msl_ce`` adds CE on the labels."""

    kind = "sst_msl"
    columns = ("teacher_updated",)

    def __init__(self, name: str, parts: Sequence[int], lr: float, epochs: int, *, at_weight: float = 1e3,
                 at_min_size: int = 4, kd_temperature: float = 1.0, teacher_update: bool = True,
                 msl_ce: bool = False, **sst):
        super().__init__(name, parts, lr, epochs, **sst)
        self.at_weight, self.at_min_size, self.kd_temperature = at_weight, at_min_size, kd_temperature
        self.teacher_update, self.msl_ce = teacher_update, msl_ce
        self.teacher: Optional[nn.Module] = None
        self.teacher_val: Optional[float] = None
        self.blocks: List[str] = []

    def flops_per_image(self, fwd):
        return 3 * fwd + fwd  # + teacher forward

    def set_up(self, ctx, students, batches):
        model = students[0]  # the incoming model itself
        self.teacher = _frozen_copy(model)
        self.frozen = classifier_params(model)
        for p in self.frozen:
            p.requires_grad_(False)
        super().set_up(ctx, students, batches)
        # distillation on the blocks whose maps carry spatial information (a 1x1 map has none)
        self.blocks = spatial_blocks(model, ctx.example(2), self.at_min_size, arg="at_min_size")
        self.teacher_val = ctx.accuracy(self.teacher)

    def batch_loss(self, ctx, nets, xb, yb, gen):
        names, teacher = self.blocks, self.teacher
        x = ctx.augmented(xb, gen)
        with ctx.autocast():
            with torch.no_grad(), capture_blocks(teacher, names) as tf:
                t_logits = teacher(x)
                t_feats = [tf[n].float() for n in names]
            with capture_blocks(nets[0], names) as sf:
                s_logits = nets[0](x)
                s_feats = [sf[n].float() for n in names]
            loss = losses.msl_loss(t_logits.float(), s_logits.float(), t_feats, s_feats,
                                   at_weight=self.at_weight, T=self.kd_temperature)
            return loss + F.cross_entropy(s_logits.float(), yb) if self.msl_ce else loss

    def epoch_end(self, ctx, students, epoch, vals, row):
        super().epoch_end(ctx, students, epoch, vals, row)
        if self.teacher_update and vals[0] > self.teacher_val:
            self.teacher.load_state_dict(students[0].state_dict())  # docs/method.md §4 teacher update
            self.teacher_val = vals[0]
            row["teacher_updated"] = 1

    def state_dict(self):
        return {**super().state_dict(), "teacher": self.teacher.state_dict(), "teacher_val": self.teacher_val}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.teacher.load_state_dict(state["teacher"])
        self.teacher_val = state["teacher_val"]


class AOD(Phase):
    """AOD (docs/method.md §2-3): ``students`` copies of the incoming model, each with its smallest factors
    re-drawn by Dri (``dri_I``; in the units SST ranked with, :meth:`receive`), trained on two views
    (mirrored and cropped) with CE + consistency + the students' mutual distillation (eqs. 5-8)."""

    kind = "aod"

    def __init__(self, name: str, parts: Sequence[int], lr: float, epochs: int, *, students: int = 2,
                 dri: bool = True, target_r: float = 0.3, dri_I: Sequence[float] = (0.1, 0.2),
                 ranking: str = "per-norm", alpha: float = 0.5, flip: str = "always", kd_temperature: float = 1.0):
        super().__init__(name, parts, lr, epochs)
        self.n_students, self.dri, self.target_r, self.dri_I = students, dri, target_r, tuple(dri_I)
        self.ranking, self.alpha, self.flip, self.kd_temperature = ranking, alpha, flip, kd_temperature
        self.scales: Optional[torch.Tensor] = None  # SST's norm scales (None without an SST phase)

    def models(self):
        return self.n_students

    def flops_per_image(self, fwd):
        return self.n_students * 2 * 3 * fwd  # two views per student

    def receive(self, handoff):
        self.scales = handoff.get("scales")

    def students(self, ctx, model):
        out = []
        for i in range(self.n_students):
            s = copy.deepcopy(model)
            if self.dri:
                g = torch.Generator(device="cpu").manual_seed(phase_seed(ctx.seed, ctx.step, f"dri{i}"))
                rescale(s, target_r=self.target_r, I=self.dri_I[i], generator=g, ranking=self.ranking,
                        scales=self.scales)
            out.append(s)
        return out

    def batch_loss(self, ctx, nets, xb, yb, gen):
        xf, xc = augment.two_views(xb, generator=gen, flip=self.flip)
        xf, xc = ctx.normalized(xf), ctx.normalized(xc)
        with ctx.autocast():
            if len(nets) == 2:
                out = [(s(xf), s(xc)) for s in nets]
                l1, l2, _ = losses.aod_losses(out[0][0], out[0][1], out[1][0], out[1][1], yb,
                                              alpha=self.alpha, T=self.kd_temperature)
                return l1 + l2
            lf, lc = nets[0](xf), nets[0](xc)
            return F.cross_entropy(lf.float(), yb) + self.alpha * losses.consistency_loss(lf, lc)


class DML(Phase):
    """Deep mutual learning (docs/method.md §9): two copies of the incoming model, each with CE + KL to the
    peer's prediction, each on its own augmentation draw."""

    kind = "dml"

    def models(self):
        return 2

    def flops_per_image(self, fwd):
        return 2 * 3 * fwd

    def students(self, ctx, model):
        return [copy.deepcopy(model), copy.deepcopy(model)]

    def batch_loss(self, ctx, nets, xb, yb, gen):
        x = ctx.augmented(xb, gen)
        with ctx.autocast():
            # each student sees its own augmentation draw: two copies of one model on one batch never
            # diverge (KL and its gradient exactly 0); the KL then compares the two students'
            # predictions on two augmentations of the same images (docs/method.md §9)
            x2 = ctx.augmented(xb, gen)
            a, b = nets[0](x), nets[1](x2)
            return losses.dml_loss(a, b, yb) + losses.dml_loss(b, a, yb)


class LwM(FineTune):
    """Learning without Memorizing (docs/method.md §9): CE + KD + Grad-CAM attention distillation from the
    incoming model (frozen teacher) on the last block with a map larger than 1x1."""

    kind = "lwm"

    def __init__(self, name: str, parts: Sequence[int], lr: float, epochs: int, *, beta: float = 1.0,
                 gamma: float = 1.0, kd_temperature: float = 1.0):
        super().__init__(name, parts, lr, epochs)
        self.beta, self.gamma, self.kd_temperature = beta, gamma, kd_temperature
        self.teacher: Optional[nn.Module] = None
        self.last_block: List[str] = []

    def flops_per_image(self, fwd):
        # + teacher forward (Grad-CAM only back-propagates from the logits to the last block)
        return 3 * fwd + fwd

    def set_up(self, ctx, students, batches):
        model = students[0]  # the incoming model itself
        self.teacher = _frozen_copy(model)
        self.last_block = spatial_blocks(model, ctx.example(2), 2, arg="lwm block (map larger than 1x1)")[-1:]

    def batch_loss(self, ctx, nets, xb, yb, gen):
        last_block, teacher = self.last_block, self.teacher
        x = ctx.augmented(xb, gen)
        with ctx.autocast():
            # the teacher is frozen: its Grad-CAM needs a graph, so the input carries the grad
            with capture_blocks(teacher, last_block) as tf:
                t_logits = teacher(x.detach().requires_grad_(True))
                t_feat = tf[last_block[0]]
            with capture_blocks(nets[0], last_block) as sf:
                s_logits = nets[0](x)
                s_feat = sf[last_block[0]]
            return losses.lwm_loss(s_logits.float(), t_logits.float(), yb, s_feat, t_feat,
                                   beta=self.beta, gamma=self.gamma, T=self.kd_temperature)

    def state_dict(self):
        return {"teacher": self.teacher.state_dict()}

    def load_state_dict(self, state):
        self.teacher.load_state_dict(state["teacher"])


# --------------------------------------------------------------------------- warm starts
class ShrinkPerturb(WarmStart):
    """Shrink & Perturb (``ops.shrink_perturb.shrink_perturb``): the weights scaled by ``shrink`` plus ``noise``
    times a freshly initialised, seeded model of the same architecture."""

    name = "shrink-perturb"

    def __init__(self, shrink: float = 0.8, noise: float = 0.01):
        self.shrink, self.noise = shrink, noise

    def apply(self, ctx, model, x, y):
        g = torch.Generator().manual_seed(phase_seed(ctx.seed, ctx.step, ctx.name, "noise:"))
        shrink_perturb(model, shrink=self.shrink, noise=self.noise, generator=g,
                       init=ctx.new_model(seed_offset=1000 + ctx.step, fresh=True))


class Dash(WarmStart):
    """DASH (``ops.dash.dash``): one gradient pass over the phase's training images, normalized but not
    augmented; each kernel (or filter) shrunk by ``max(lam, cos(w, -grad))``."""

    name = "dash"

    def __init__(self, lam: float = 0.5, alpha: Optional[float] = None, granularity: str = "kernel"):
        self.lam, self.alpha, self.granularity = lam, alpha, granularity

    def apply(self, ctx, model, x, y):
        loader = BatchLoader(x, y, ctx.batch_size, shuffle=False, device=ctx.device)
        norm = lambda x: augment.normalize(x, ctx.mean, ctx.std, memory_format=ctx.memory_format)  # noqa: E731
        dash(model, loader, lam=self.lam, alpha=self.alpha, granularity=self.granularity, transform=norm,
             amp=ctx.amp)

    def flops(self, fwd, n_images):
        return 3 * fwd * n_images  # one gradient pass over the part
