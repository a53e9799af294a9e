"""Depth pruning: criteria that rank decoder layers, removal, and projection compensation."""
