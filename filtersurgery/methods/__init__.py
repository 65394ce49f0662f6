"""Layer 6, methods: training methods built on the engine. ``multistep`` (the multi-step framework and its
baselines: ``MultiStepConfig``, the phase objects ``SST``, ``AOD``, ..., ``plan_step``, ``multi_step``),
``reactivation`` (kernel reactivation and its baselines), ``sharing`` (class-incremental partial sharing and
its sweep), ``growth`` (incremental growth).

Importing this package imports every method module; each registers its methods at import
(:func:`filtersurgery.engine.registry.register` for the single-run methods, in this order, the order of
``filtersurgery run --help``; :func:`~filtersurgery.engine.registry.register_plan` for the multi-step ones).
"""
from . import reactivation, sharing, growth  # noqa: F401  (registration happens at import)
from . import multistep  # noqa: F401  (the multi-step methods' plans)

__all__ = ["reactivation", "sharing", "growth", "multistep"]
