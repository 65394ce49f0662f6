"""Layer 6, methods: training methods built on the engine (kernel reactivation and its
baselines, class-incremental sharing, incremental growth). The multi-step framework and its
baselines are :mod:`filtersurgery.methods.multistep` (``plan_step``, its phase kinds).

Importing this package imports every method module; each registers its methods with
:func:`filtersurgery.engine.registry.register` (names, options dataclass, run function), in
this order (the order of ``filtersurgery run --help``), and ``multistep`` registers its phase
kinds and warm starts (:func:`filtersurgery.engine.phases.register_phase_kind`).
"""
from . import reactivation, sharing, growth  # noqa: F401  (registration happens at import)
from . import multistep  # noqa: F401  (the multi-step framework's phase kinds)

__all__ = ["reactivation", "sharing", "growth", "multistep"]
