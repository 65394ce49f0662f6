"""``filtersurgery.warmstart``: warm-start operations before training on new data (docs/warmstart.md):
Shrink & Perturb and DASH. Only imports."""
from filtersurgery.ops.dash import DashReport, dash
from filtersurgery.ops.shrink_perturb import ShrinkPerturbReport, shrink_perturb
from filtersurgery.ops.warmstart import DEFAULTS

__all__ = ["shrink_perturb", "ShrinkPerturbReport", "dash", "DashReport", "DEFAULTS"]
