"""Checkpoints: the manager that saves and restores a run (manager), the folder on disk (files), the counters
saved with it (state)."""
