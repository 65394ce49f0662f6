"""``filtersurgery.growth``: incremental growth with look-ahead (docs/growth.md).

The surgery and the termination rule (``partition``, ``grow``, ``GrownNet``, ``should_grow``, ...) and the
trainer's method (``GrowthConfig``, ``run_growth``). Only imports.
"""
from filtersurgery.methods.growth import GrowthConfig, run_growth
from filtersurgery.ops.growth import (GrownNet, LinearHead, Partition, frozen_stages, grow, partition, should_grow,
                                     stop_epoch, train_flops_per_image, window_angle, window_angles)

__all__ = ["partition", "Partition", "grow", "GrownNet", "LinearHead", "frozen_stages", "should_grow", "stop_epoch",
           "window_angle", "window_angles", "train_flops_per_image", "GrowthConfig", "run_growth"]
