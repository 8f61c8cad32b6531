"""The distillation trainer, its CLI, checkpoints, export and tracking."""
