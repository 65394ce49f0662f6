"""``filtersurgery.reactivation``: kernel reactivation and its baselines (docs/reactivation.md).

The operations (``reactivate_kernels``, ``evolve_weights``, ``graft``), the per-epoch callbacks for your
own loop (``ReactivationCallback``, ``WeightEvolutionCallback``, ``GraftingCallback``) and the trainer's
methods' options (``ReactivationMethodConfig``, ``run_method``) and the per-epoch diagnostic
``invalid_fractions``. Only imports.
"""
from filtersurgery.engine.callbacks import GraftingCallback, ReactivationCallback, WeightEvolutionCallback
from filtersurgery.methods.reactivation import (METHODS, ReactivationMethodConfig, invalid_fractions, peak_memory,
                                               run_method)
from filtersurgery.ops.filter_grafting import GraftReport, graft, graft_coefficient, layer_entropy
from filtersurgery.ops.reactivation import KernelReactivation, ReactivationReport, reactivate_kernels
from filtersurgery.ops.weight_evolution import EvolutionReport, evolve_weights

__all__ = ["reactivate_kernels", "ReactivationReport", "KernelReactivation", "evolve_weights", "EvolutionReport",
           "graft", "GraftReport", "graft_coefficient", "layer_entropy", "ReactivationCallback",
           "WeightEvolutionCallback", "GraftingCallback", "ReactivationMethodConfig", "run_method", "peak_memory",
           "METHODS", "invalid_fractions"]
