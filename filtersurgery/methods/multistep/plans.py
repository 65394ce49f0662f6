"""The plans of the multi-step methods: which phase objects a step trains (docs/method.md §1-4, §9).

Step 1 trains Data1 from scratch for every method (``Scratch``); a later step's phases come from
the method's registered plan, ``plan(cfg, options, step) -> [Phase, ...]``
(:func:`filtersurgery.engine.registry.register_plan`)::

    framework   SST on Data1 (step 2) / SST under MSL on Data_k (steps >= 3), then Dri + AOD on Data_k
    finetune    CE on Data_k at the new-data lr            bst    the framework with network slimming
    dml, lwm    two mutual students / CE + KD + Grad-CAM   joint  from scratch on Data1..Data_k
    shrink-perturb, dash                                    a warm start, then fine-tuning
"""
from __future__ import annotations

from typing import List

from filtersurgery.engine import registry
from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.phase import FineTune, Phase, Scratch
from filtersurgery.methods.multistep.config import MultiStepConfig
from filtersurgery.methods.multistep.phases import AOD, DML, SST, SSTMSL, Dash, LwM, ShrinkPerturb

__all__ = ["plan_step"]


def plan_step(cfg: TrainConfig, opts: MultiStepConfig, step: int) -> List[Phase]:
    """The phase objects of step ``step`` (1-based) for ``cfg.method``: step 1 trains Data1 from scratch;
    later steps are the method's registered plan."""
    if step == 1:
        return [Scratch("scratch", [0], cfg.scratch_lr, cfg.step1_epochs or cfg.epochs)]
    return registry.plan_for(cfg.method)(cfg, opts, step)


def _sst(cfg: TrainConfig, opts: MultiStepConfig, step: int, selective: bool) -> SST:
    """Step 2: SST with CE on Data1 (under MSL with ``opts.msl_step2``); later steps: SST under MSL on Data_k
    (``opts.msl``), else with CE."""
    msl = opts.msl and (step > 2 or opts.msl_step2)
    # the "auto" margin of MSL applies from step 3; step 2's SST keeps the CE margin under MSL too (docs/method.md)
    kw = dict(target_r=opts.target_r, ranking=opts.ranking, lam=opts.lam, update=opts.sst_update,
              safety=opts.sst_safety(msl and step > 2), momentum=cfg.momentum, e_cut_fraction=opts.e_cut_fraction,
              selective=selective, refresh_bn=opts.refresh_bn, refresh_bn_batches=opts.refresh_bn_batches,
              project=opts.sst_project, keep=opts.sst_keep, fit_acc=opts.sst_fit_acc)
    parts = [0] if step == 2 else [step - 1]
    if msl:
        return SSTMSL("sst", parts, opts.sst_lr, cfg.epochs, at_weight=opts.at_weight, at_min_size=opts.at_min_size,
                      kd_temperature=opts.kd_temperature, teacher_update=opts.teacher_update, msl_ce=opts.msl_ce, **kw)
    return SST("sst", parts, opts.sst_lr, cfg.epochs, **kw)


def _framework_plan(cfg: TrainConfig, opts: MultiStepConfig, step: int, selective: bool = True) -> List[Phase]:
    """SST (on Data1 at step 2; with MSL on Data_k later), then Dri + AOD on Data_k (docs/method.md §1-4).
    ``selective=False`` is the BST baseline; ``opts.sst=False`` leaves AOD alone."""
    aod = AOD("aod", [step - 1], opts.step_lr(cfg), cfg.epochs, students=opts.students, dri=opts.dri,
              target_r=opts.target_r, dri_I=opts.dri_I, ranking=opts.ranking, alpha=opts.alpha, flip=opts.aod_flip,
              kd_temperature=opts.kd_temperature)
    return [_sst(cfg, opts, step, selective), aod] if opts.sst else [aod]


def _bst_plan(cfg: TrainConfig, opts: MultiStepConfig, step: int) -> List[Phase]:
    """Network slimming (SP_r = 1 throughout) instead of SST, then Dri + AOD."""
    return _framework_plan(cfg, opts, step, selective=False)


def _finetune_plan(cfg, opts, step):
    """CE on Data_k at the new-data lr."""
    return [FineTune("finetune", [step - 1], opts.step_lr(cfg), cfg.epochs)]


def _dml_plan(cfg, opts, step):
    """Two mutual students on Data_k (DML)."""
    return [DML("dml", [step - 1], opts.step_lr(cfg), cfg.epochs)]


def _lwm_plan(cfg, opts, step):
    """CE + KD + Grad-CAM attention distillation from the previous model (LwM) on Data_k."""
    return [LwM("lwm", [step - 1], opts.step_lr(cfg), cfg.epochs, beta=opts.lwm_beta, gamma=opts.lwm_gamma,
                kd_temperature=opts.kd_temperature)]


def _joint_plan(cfg, opts, step):
    """Joint training: from scratch on all data seen so far (Data1..Data_k)."""
    return [Scratch("joint", list(range(step)), cfg.scratch_lr, cfg.epochs)]


def _shrink_perturb_plan(cfg, opts, step):
    """Shrink & Perturb the incoming model, then fine-tune on Data_k."""
    return [FineTune("shrink-perturb", [step - 1], opts.step_lr(cfg), cfg.epochs,
                     warm_start=ShrinkPerturb(opts.sp_shrink, opts.sp_noise))]


def _dash_plan(cfg, opts, step):
    """DASH on the incoming model, then fine-tune on Data_k."""
    return [FineTune("dash", [step - 1], opts.step_lr(cfg), cfg.epochs,
                     warm_start=Dash(opts.dash_lam, opts.dash_alpha, opts.dash_granularity))]


# registration order is the order of METHODS (help texts, tables)
for _name, _plan in (("framework", _framework_plan), ("finetune", _finetune_plan), ("bst", _bst_plan),
                     ("dml", _dml_plan), ("lwm", _lwm_plan), ("joint", _joint_plan),
                     ("shrink-perturb", _shrink_perturb_plan), ("dash", _dash_plan)):
    registry.register_plan(_name, _plan)
