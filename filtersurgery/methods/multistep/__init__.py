"""The multi-step framework (docs/method.md §1-4) and its baselines (§9): its options, phases, plans and
the per-seed driver. Read top to bottom, a step of the framework is::

    step 1            train Data1 from scratch (CE, lr 0.1)                       -> M1
    step 2            SST on Data1 (CE + selective L1)                            -> S
                      Dri(S, I=0.1), Dri(S, I=0.2)  -> two students
                      AOD on Data2 (eqs. 5-8), keep the better student on val     -> M2
    step k >= 3       SST on Data_k with MSL (eq. 9: KL + AT to the teacher M_{k-1},
                      classifier frozen, teacher <- student when val improves)      -> S
                      Dri x2 + AOD on Data_k                                       -> M_k

``config.py`` (``MultiStepConfig``), ``phases.py`` (the phase objects ``SST``, ``SSTMSL``, ``AOD``,
``DML``, ``LwM`` and the warm starts), ``plans.py`` (which phases a step of each method trains;
importing it registers the methods), ``driver.py`` (``multi_step``, ``single_step``).
"""
from filtersurgery.methods.multistep.config import PAPER_RECIPE, MultiStepConfig
from filtersurgery.methods.multistep.driver import harm_margin, multi_step, single_step
from filtersurgery.methods.multistep.phases import AOD, DML, SST, SSTMSL, Dash, LwM, ShrinkPerturb
from filtersurgery.methods.multistep.plans import plan_step

__all__ = ["MultiStepConfig", "PAPER_RECIPE", "multi_step", "single_step", "plan_step", "harm_margin", "SST", "SSTMSL",
           "AOD", "DML", "LwM", "ShrinkPerturb", "Dash"]
