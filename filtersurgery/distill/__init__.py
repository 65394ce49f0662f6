"""Layer 2, distillation: block features of any CNN (``blockfeats``) and the losses (``losses``:
attention transfer, KD, JS, AOD, MSL, DML, LwM)."""
