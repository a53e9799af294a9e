"""Unstructured and N:M sparsity: shared masks, the method base, and one short file per method."""
