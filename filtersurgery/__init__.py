"""filtersurgery: model surgery for arbitrary CNNs (timm, torchvision, your own).

Trace which normalization weight (gamma) scales every conv filter, then operate on that
map: selective sparsity training, diverse re-initialization, kernel reactivation,
partial network sharing. ``filtersurgery.train`` composes them into the multi-step
framework. Docs: docs/getting_started.md, docs/concepts.md, docs/api.md (every name below).

Tracing
    trace(model, example_inputs=None) -> ScalingMap        conv filter -> BN/GN/LN gamma(s)
    ScalingMap, ConvEntry, NormRef, FactorView, unwrap, default_input_size
    verify(sm) -> VerifyResult                             numerical check of a map
    unfreeze_norms(model), freeze_norms(model)             frozen batch norms <-> trainable ones
    check_trainable(sm, op)                                refuse frozen factors where gradients are needed
    build_model(spec, num_classes, in_chans), list_cnns(source)
Sparsity, ranking, re-initialization (docs/method.md §1, §2)
    sparsify(model, target_r=0.3, epochs=E) -> Sparsifier  SST / BST: set_epoch, step, useless
    SparsityConfig, rank_filters -> FilterRanking, useless_mask, remaining_mean
    rescale(model, target_r=0.3, I=0.1) -> RescaleReport   Dri, eq. 4
Kernel reactivation and its baselines (docs/method.md §5, §9)
    reactivate_kernels(model) -> ReactivationReport, KernelReactivation, ReactivationCallback
    evolve_weights -> EvolutionReport, WeightEvolutionCallback
    graft -> GraftReport, graft_coefficient, layer_entropy, GraftingCallback
Incremental growth (docs/method.md §7)
    partition(model) -> Partition, grow(part, k) -> GrownNet, LinearHead, frozen_stages,
    should_grow, stop_epoch, window_angle, window_angles, train_flops_per_image
Partial network sharing (docs/method.md §6)
    share(model, share=0.8, num_classes) -> branch; BranchedNet(base, classes).add_branch(...)
    plan_share, share_plan, SharePlan, is_pinned, branch_state_dict, load_branch,
    max_prob_combine, training_cost -> TrainingCost
Warm-starting on new data (Ash & Adams 2020; Shin et al. 2024)
    shrink_perturb(model, shrink=0.4, noise=0.1) -> ShrinkPerturbReport
    dash(model, loader, lam=0.3) -> DashReport             cos(w, -grad) shrinking
Distillation (docs/method.md §3, §4)
    blocks(model), capture_blocks(model), attention_map(x), losses (AT, KL, JS, AOD, MSL, DML, LwM)
Data and training (docs/method.md §8)
    load_dataset(name) -> ImageData, split_parts
    TrainConfig, train.multi_step(cfg, out_dir, seed), train.single_step(...)
"""
from filtersurgery.tracing.scaling_map import ConvEntry, FactorView, NormRef, ScalingMap, check_trainable, unwrap

__version__ = "0.1.0"

from . import _compat

_compat.install()  # the old flat module paths keep importing (filtersurgery/_compat.py)


def __getattr__(name):  # filtersurgery.<old flat module>, e.g. filtersurgery.sparsity
    return _compat.old_attribute(name)

# --- every training method registers itself at import (methods/, engine/registry.py) ---
from filtersurgery import methods as _methods  # each method module registers its methods at import

del _methods  # (still importable as filtersurgery.methods)

# --- tracing/ and models/ ---
from filtersurgery.models.factory import build_model, list_cnns
from filtersurgery.tracing.tracer import default_input_size, trace
from filtersurgery.tracing.norms import freeze_norms, unfreeze_norms
from filtersurgery.tracing.verify import VerifyResult, verify

# --- ops/: ranking, sparsity, reinit, reactivation ---
from filtersurgery.ops.checks import check_finite
from filtersurgery.ops.ranking import FilterRanking, rank_filters, remaining_mean, useless_mask
from filtersurgery.ops.reactivation import KernelReactivation, ReactivationReport, reactivate_kernels
from filtersurgery.ops.reinit import RescaleReport, rescale
from filtersurgery.ops.sparsity import Sparsifier, SparsityConfig, lam_for_budget
from filtersurgery.engine.sparse import sparsify  # the operation, plus the SST loop when given a loader

# --- kernel reactivation and its baselines: ops/ and the per-epoch callbacks of engine/callbacks.py (docs/method.md §5, §9) ---
from filtersurgery.ops.filter_grafting import GraftReport, graft, graft_coefficient, layer_entropy
from filtersurgery.engine.callbacks import GraftingCallback, ReactivationCallback, WeightEvolutionCallback
from filtersurgery.ops.weight_evolution import EvolutionReport, evolve_weights

# --- incremental growth with look-ahead (ops/growth.py, docs/method.md §7) ---
from filtersurgery.ops.growth import (GrownNet, LinearHead, Partition, frozen_stages, grow, partition, should_grow, stop_epoch,
                     train_flops_per_image, window_angle, window_angles)

# --- partial network sharing (ops/sharing.py, docs/method.md §6) ---
from filtersurgery.ops.sharing import (BranchedNet, SharePlan, TrainingCost, branch_state_dict, is_pinned, load_branch,
                      max_prob_combine, plan_share, share, share_plan, training_cost)

# --- warm-start operations (ops/warmstart.py) ---
from filtersurgery.ops.warmstart import DashReport, ShrinkPerturbReport, dash, shrink_perturb

# --- distillation (distill/) ---
from filtersurgery.distill import losses
from filtersurgery.distill.blockfeats import blocks, capture_blocks
from filtersurgery.distill.losses import attention_map

# --- data (data/) ---
from filtersurgery.data.datasets import ImageData, load_dataset, split_parts

# --- the trainer (the multi-step framework in methods/multistep.py on engine/trainer.py, public as filtersurgery.train) ---
from filtersurgery.methods import multistep as train
from filtersurgery.engine.trainer import TrainConfig

__all__ = [
    "__version__",
    # tracing
    "trace", "ScalingMap", "ConvEntry", "NormRef", "FactorView", "unwrap", "default_input_size",
    "verify", "VerifyResult", "build_model", "list_cnns", "unfreeze_norms", "freeze_norms", "check_trainable",
    # sparsity, ranking, re-initialization
    "sparsify", "Sparsifier", "SparsityConfig", "lam_for_budget", "rank_filters", "FilterRanking", "useless_mask",
    "remaining_mean", "rescale", "RescaleReport", "check_finite",
    # kernel reactivation and baselines
    "reactivate_kernels", "ReactivationReport", "KernelReactivation", "ReactivationCallback",
    "evolve_weights", "EvolutionReport", "WeightEvolutionCallback",
    "graft", "GraftReport", "graft_coefficient", "layer_entropy", "GraftingCallback",
    # incremental growth
    "partition", "Partition", "grow", "GrownNet", "LinearHead", "frozen_stages", "should_grow", "stop_epoch",
    "window_angle", "window_angles", "train_flops_per_image",
    # partial network sharing
    "share", "plan_share", "share_plan", "SharePlan", "BranchedNet", "is_pinned", "branch_state_dict",
    "load_branch", "max_prob_combine", "training_cost", "TrainingCost",
    # warm-start operations
    "shrink_perturb", "ShrinkPerturbReport", "dash", "DashReport",
    # distillation
    "blocks", "capture_blocks", "attention_map", "losses",
    # data and training
    "load_dataset", "ImageData", "split_parts", "TrainConfig", "train",
]
