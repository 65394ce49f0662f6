"""Layer 5, engine: what every training run needs. ``config`` (``TrainConfig``), ``run`` (one seed's ``Run``:
data, device, models, evaluation), ``phase`` (the ``Phase`` object and its context, the plain kinds),
``trainer`` (``run_phase``, the one loop), ``epochs`` (the epoch driver), ``loop`` (the one batch loop),
``distributed``, ``metrics`` (``metrics.json``, the resume point), ``checkpoint`` (crash-safe files, the run
lock), ``registry`` (the methods, their options), ``callbacks`` (per-epoch surgery), ``sparse`` (the public
``sparsify``). The public names are in ``filtersurgery.train``."""
