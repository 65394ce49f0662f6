"""``filtersurgery.sharing``: class-incremental partial network sharing (docs/sharing.md).

The surgery (``share``, ``plan_share``, ``BranchedNet``, ``load_branch``, ...), its cost measurement
(``training_cost``) and the trainer's methods (``SharingConfig``, ``run_sharing``, ``run_class_finetune``,
``sweep_sharing``). Only imports.
"""
from filtersurgery.methods.sharing import SharingConfig, run_class_finetune, run_sharing
from filtersurgery.methods.sharing_sweep import sweep_sharing
from filtersurgery.ops.branched import BranchedNet
from filtersurgery.ops.sharing import (SharePlan, branch_state_dict, is_pinned, load_branch, max_prob_combine, plan_share,
                                      share, share_plan)
from filtersurgery.report.cost import TrainingCost, training_cost

__all__ = ["share", "plan_share", "share_plan", "SharePlan", "BranchedNet", "is_pinned", "branch_state_dict",
           "load_branch", "max_prob_combine", "training_cost", "TrainingCost", "SharingConfig", "run_sharing",
           "run_class_finetune", "sweep_sharing"]
