"""Measuring what pruning cost: perplexity, agreement with the dense model, speed and memory."""
