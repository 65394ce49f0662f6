"""Old flat module paths (``filtersurgery.sparsity``, ``filtersurgery.method_growth``, ...) kept importing.

The library's modules live in layer folders (``tracing/``, ``ops/``, ``distill/``, ``models/``,
``data/``, ``engine/``, ``methods/``, ``cli/``, ``report/``; docs/architecture.md). An import
finder maps each old path to its new module: importing it warns once with a
``FutureWarning`` naming the new path, and the old name then *is* the new module (one
object under two names, so attributes, private names and monkeypatching behave the same).
``filtersurgery.train`` and ``filtersurgery.losses`` stay public names without a warning. The other old paths go in
a future release.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

OLD_PATHS = {  # old module (under filtersurgery.) -> new module (under filtersurgery.)
    "scaling_map": "tracing.scaling_map",
    "tracer": "tracing.tracer",
    "norms": "tracing.norms",
    "ranking": "ops.ranking",
    "sparsity": "engine.sparse",  # the operation plus its loader loop (sparsify(loader=...), train_sparse)
    "reinit": "ops.reinit",
    "reactivation": "ops.reactivation",
    "weight_evolution": "ops.weight_evolution",
    "filter_grafting": "ops.filter_grafting",
    "sharing": "ops.sharing",
    "growth": "ops.growth",
    "warmstart": "ops.warmstart",
    "losses": "distill.losses",
    "blockfeats": "distill.blockfeats",
    "augment": "data.augment",
    "cifar_resnet": "models.cifar_resnet",
    "checkpoint": "engine.checkpoint",
    "train": "methods.multistep",
    "console": "cli.console",
    "runner": "cli.run",
    "zoo": "cli.zoo",
    "plots": "report.plots",
    "method_growth": "methods.growth",
    "method_reactivation": "methods.reactivation",
    "method_sharing": "methods.sharing",
}
PUBLIC = {"train", "losses"}  # old paths that are public names in filtersurgery.__all__ (no warning)


class OldPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves ``filtersurgery.<old>`` to ``filtersurgery.<new>`` (:data:`OLD_PATHS`)."""

    def find_spec(self, fullname, path=None, target=None):
        pkg, _, leaf = fullname.rpartition(".")
        if pkg != "filtersurgery" or leaf not in OLD_PATHS:
            return None
        spec = importlib.util.spec_from_loader(fullname, self)
        spec.loader_state = {}  # per import: the new module's own spec (thread-safe, unlike the finder)
        return spec

    def create_module(self, spec):
        new = _warned_new_name(spec.name)
        module = importlib.import_module(new)
        spec.loader_state["spec"] = module.__spec__  # the import machinery overwrites it with the old path's spec
        return module

    def exec_module(self, module):
        """Nothing to run (the module is the new one, already imported); restore its own spec."""
        state = getattr(module.__spec__, "loader_state", None)
        if isinstance(state, dict) and "spec" in state:
            module.__spec__ = state["spec"]

    def get_code(self, fullname):
        """``python -m filtersurgery.<old>`` runs the new module's code (runpy asks for it)."""
        new = _warned_new_name(fullname)
        return importlib.util.find_spec(new).loader.get_code(new)


def _warned_new_name(old: str) -> str:
    """The new module path of ``old``; a FutureWarning unless the old name is public."""
    leaf = old.rpartition(".")[2]
    new = f"filtersurgery.{OLD_PATHS[leaf]}"
    if leaf not in PUBLIC:
        warnings.warn(f"{old} moved to {new}; the old path goes in a future release", FutureWarning, stacklevel=3)
    return new


def old_attribute(name: str):
    """``filtersurgery.<old>`` as an attribute (``import filtersurgery; filtersurgery.sparsity``): the
    module of the old path, imported (with its FutureWarning); AttributeError for other names."""
    if name in OLD_PATHS:
        with warnings.catch_warnings(record=True) as caught:  # re-issued below, pointing at the caller
            warnings.simplefilter("always")
            module = importlib.import_module(f"filtersurgery.{name}")
        for w in caught:
            warnings.warn(w.message, w.category, stacklevel=3)  # 1: here, 2: filtersurgery.__getattr__, 3: the caller
        return module
    raise AttributeError(f"module 'filtersurgery' has no attribute {name!r}")


def install() -> None:
    """Put the finder in front of ``sys.meta_path`` (once)."""
    if not any(isinstance(f, OldPathFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, OldPathFinder())
