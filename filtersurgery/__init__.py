"""filtersurgery: model surgery for arbitrary CNNs (timm, torchvision, your own).

Trace which normalization weight (gamma) scales every conv filter, then operate on that
map: selective sparsity training, diverse re-initialization, kernel reactivation,
partial network sharing; train with the multi-step framework. Docs: docs/getting_started.md,
docs/concepts.md, docs/api.md (every public name).

At the top, what a user types every day::

    trace(model) -> ScalingMap          conv filter -> BN/GN/LN gamma(s); verify(sm) checks it numerically
    build_model(spec), list_cnns(src)   timm / torchvision / cifar:resnetN models
    sparsify(model, target_r=0.3)       SST / BST: a Sparsifier to step in your loop
    rank_filters(model), rescale(model) ranking, Dri (eq. 4)
    freeze_norms(model), unfreeze_norms(model)
    TrainConfig, MultiStepConfig, multi_step(cfg, out_dir, seed)   the multi-step framework and its baselines

Everything else lives in a namespace: ``filtersurgery.train`` (the trainer: phases, plans, runs),
``.reactivation``, ``.sharing``, ``.growth``, ``.warmstart`` (the other methods and their operations),
``.distill`` (blocks, attention maps, losses), ``.data`` (datasets, splits, loaders), ``.ops``
(every operation by module), ``.tracing`` (the map's types, the tracer, frozen norms).
"""
__version__ = "0.1.0"

# every training method registers itself at import (methods/, engine/registry.py)
from filtersurgery import methods as _methods  # noqa: F401

from filtersurgery.engine.config import TrainConfig
from filtersurgery.engine.sparse import sparsify  # the operation, plus the SST loop when given a loader
from filtersurgery.methods.multistep import MultiStepConfig, multi_step
from filtersurgery.models.factory import build_model, list_cnns
from filtersurgery.ops.ranking import rank_filters
from filtersurgery.ops.reinit import rescale
from filtersurgery.tracing.norms import freeze_norms, unfreeze_norms
from filtersurgery.tracing.scaling_map import ScalingMap
from filtersurgery.tracing.tracer import trace
from filtersurgery.tracing.verify import verify

from filtersurgery import data, distill, growth, reactivation, sharing, train, warmstart  # noqa: E402  the namespaces

del _methods

__all__ = [
    "__version__", "trace", "ScalingMap", "verify", "build_model", "list_cnns", "sparsify", "rank_filters", "rescale",
    "freeze_norms", "unfreeze_norms", "TrainConfig", "MultiStepConfig", "multi_step",
    # namespaces
    "train", "reactivation", "sharing", "growth", "warmstart", "distill", "data",
]
