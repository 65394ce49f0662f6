"""Layer 3, engine: the training configuration, the one training loop (phases), distributed
helpers and resumable checkpoints (``trainer``, ``checkpoint``)."""
