"""filtersurgery: model surgery for arbitrary CNNs.

Public API
----------
Tracing
    trace(model, example_inputs=None) -> ScalingMap      every conv -> its BN/GN/LN scaling factor
Operations (SPEC §1, §2, §5)
    sparsify(model, target_r=0.3, ...) -> Sparsifier      selective sparsity training (SST) / BST
    rank_filters(model)                                   filters ordered by |gamma|
    rescale(model, target_r=0.3, I=0.1)                   diverse re-initialization (Dri), eq. 4
    reactivate_kernels(model, ...)                        kernel reactivation
Distillation (SPEC §3, §4)
    blocks(model), capture_blocks(model), attention_map(x), losses.*
Training
    train.single_step(...), train.multi_step(...)         the multi-step framework and baselines
"""
from .scaling_map import ConvEntry, FactorView, NormRef, ScalingMap, unwrap

__version__ = "0.1.0"

# --- tracer (tracer.py) ---
from .models import build_model, list_cnns
from .tracer import default_input_size, trace
from .zoo import VerifyResult, verify

# --- operations (sparsity.py, ranking.py, reinit.py, reactivation.py) ---
from .ranking import FilterRanking, rank_filters, remaining_mean, useless_mask
from .reactivation import KernelReactivation, ReactivationReport, reactivate_kernels
from .reinit import RescaleReport, rescale
from .sparsity import Sparsifier, SparsityConfig, sparsify

# --- kernel reactivation as a training method and its baselines (SPEC §5, §9) ---
from .filter_grafting import GraftReport, graft, graft_coefficient, layer_entropy
from .method_reactivation import GraftingCallback, ReactivationCallback, WeightEvolutionCallback
from .weight_evolution import EvolutionReport, evolve_weights

# --- partial network sharing (sharing.py, SPEC §6) ---
from .sharing import (BranchedNet, SharePlan, TrainingCost, branch_state_dict, is_pinned, load_branch,
                      max_prob_combine, plan_share, share, share_plan, training_cost)

# --- distillation (blockfeats.py, losses.py) ---
from . import losses
from .blockfeats import blocks, capture_blocks
from .losses import attention_map

# --- data, checkpoints (data.py, augment.py, checkpoint.py) ---
from .data import ImageData, load_dataset, split_parts

# --- trainer (train.py) ---
from . import train
from .train import TrainConfig
