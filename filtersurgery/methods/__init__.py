"""Layer 4, methods: training methods built on the engine (kernel reactivation and its
baselines, class-incremental sharing, incremental growth). The multi-step framework and its
baselines are planned in :mod:`filtersurgery.engine.trainer` (``plan_step``).

Importing this package imports every method module; each registers its methods with
:func:`filtersurgery.engine.registry.register` (names, options dataclass, run function), in
this order (the order of ``filtersurgery run --help``).
"""
from . import reactivation, sharing, growth  # noqa: F401  (registration happens at import)

__all__ = ["reactivation", "sharing", "growth"]
