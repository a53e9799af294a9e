"""Expert pruning of mixture-of-experts models: score each routed expert on calibration data (REAP,
frequency, EAN) and remove the lowest per layer, leaving a model plain ``transformers`` loads.
The request is :mod:`secateurs.moe.config` (light), the verb :func:`secateurs.moe.prune.prune_experts`."""
