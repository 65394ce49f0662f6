"""Layer 1, tracing: which normalization factor scales every conv filter.

``scaling_map`` (the map's data types), ``tracer`` (builds it from an FX/torch-pruning graph),
``norms`` (frozen-norm handling), ``verify`` (the numerical check of a map), ``probe`` (what
everything that runs a model once to learn about it uses: an example input, the modules' call
order, train/eval modes kept). Imports nothing above this layer.
"""
