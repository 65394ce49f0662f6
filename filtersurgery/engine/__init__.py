"""Layer 5, engine: the training configuration, the one training loop, phases and their kinds,
distributed helpers and resumable checkpoints (``trainer``, ``phases``, ``checkpoint``)."""
