"""Layer 4, methods: training methods built on the engine (kernel reactivation and its
baselines, class-incremental sharing, incremental growth). The multi-step framework and its
baselines are planned in :mod:`filtersurgery.engine.trainer` (``plan_step``)."""
