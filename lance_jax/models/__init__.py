"""Flax modules: the dual-stream backbone and the Lance glue around it."""
