"""LoRA Merge Service: HTTP API, durable job queue, resident-model worker, SQLite mirror.

The service adds no merge or evaluation logic of its own; it calls `merging_core`.
"""
