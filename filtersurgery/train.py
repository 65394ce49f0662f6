"""``filtersurgery.train``: the trainer's namespace (docs/trainer.md).

The run's settings (``TrainConfig``), the multi-step framework and its baselines (``MultiStepConfig``,
``multi_step``, ``single_step``, ``plan_step``, their phase objects), the engine they run on (``Run``,
``run_phase``, the ``Phase`` base, its plain kinds and ``WarmStart``), what a run folder tells
(``resume_point``, ``write_metrics``) and the registries a new method uses (``register_plan``,
``register``, ``MethodSpec``, ``option``). Only imports: the code lives in ``engine/`` and ``methods/``.
"""
from filtersurgery.engine.config import METHODS, TrainConfig, resume_keys
from filtersurgery.engine.metrics import preprocess_info, resume_point, write_metrics
from filtersurgery.engine.phase import FineTune, Phase, PhaseContext, Scratch, Scratch2, WarmStart
from filtersurgery.engine.registry import SINGLE_RUN_METHODS, MethodSpec, option, register, register_plan
from filtersurgery.engine.run import Run, evaluate, forward_flops, phase_seed
from filtersurgery.engine.trainer import run_phase
from filtersurgery.methods.multistep import (AOD, DML, PAPER_RECIPE, SST, SSTMSL, Dash, LwM, MultiStepConfig,
                                             ShrinkPerturb, harm_margin, multi_step, plan_step, single_step)

__all__ = [
    "TrainConfig", "MultiStepConfig", "PAPER_RECIPE", "multi_step", "single_step", "plan_step", "harm_margin",
    "METHODS", "SINGLE_RUN_METHODS", "resume_keys",
    "SST", "SSTMSL", "AOD", "DML", "LwM", "ShrinkPerturb", "Dash",
    "Run", "run_phase", "Phase", "PhaseContext", "Scratch", "Scratch2", "FineTune", "WarmStart", "phase_seed",
    "evaluate", "forward_flops", "resume_point", "write_metrics", "preprocess_info",
    "register_plan", "register", "MethodSpec", "option",
]
