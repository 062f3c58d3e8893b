"""Merge methods: pure tensor functions.

Delta-space methods take the dense per-module deltas of the source adapters (`list[Tensor]`,
each out x in) and return the merged delta. `weighted` works on the LoRA factors instead. Most
methods have a file each; the sparsify-then-combine family (DARE, magnitude prune, breadcrumbs,
DELLA) has none: it is the one pipeline of `gta.py` with a sparsifier of `sparsify.py`, and the
engine registers each combination. No function here reads files, touches a model, or knows
about the registry.
"""
