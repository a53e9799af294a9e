"""Structured width pruning: dependency groups, importance scores, selection, methods."""
