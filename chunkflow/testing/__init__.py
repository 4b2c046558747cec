"""Helpers for chunkflow's own tests (multi-process runs on CPU with gloo)."""
