"""Artifact layout, atomic writes and run metadata."""
