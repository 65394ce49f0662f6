"""Layer 2, distillation: block features of any CNN (``blockfeats``: ``blocks``, ``capture_blocks``) and the
losses (``losses``: attention transfer, KD, JS, AOD, MSL, DML, LwM); public as ``filtersurgery.distill``."""
from filtersurgery.distill import losses
from filtersurgery.distill.blockfeats import blocks, capture_blocks
from filtersurgery.distill.losses import attention_map

__all__ = ["blocks", "capture_blocks", "attention_map", "losses"]
