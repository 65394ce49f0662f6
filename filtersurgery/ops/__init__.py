"""Layer 3, operations: functions of ``(model, scaling_map, ...)`` that change a model's weights.

``ranking`` (rank filters by their factor), ``sparsity`` (SST/BST sparsifier), ``reinit``
(Dri rescale), ``reactivation``, ``weight_evolution``, ``filter_grafting``, ``sharing``
(partial-sharing surgery), ``growth`` (stage partition and growth surgery), ``warmstart``
(shrink & perturb, DASH). An operation never trains: training loops live in ``engine``.
"""
