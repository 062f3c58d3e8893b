"""Merge methods: pure tensor functions, one file each.

Delta-space methods take the dense per-module deltas of the source adapters (`list[Tensor]`,
each out x in) and return the merged delta. `weighted` works on the LoRA factors instead. No
function here reads files, touches a model, or knows about the registry.
"""
