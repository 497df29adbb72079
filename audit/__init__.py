"""Orchestration: data, training of targets, checkpoints, the command line."""

from .api import audit_model
from .checkpoint import (
    Checkpoint,
    CheckpointError,
    apply_weights,
    load_checkpoint,
    load_weights,
    save_checkpoint,
)
from .data import DataError, DataOptions, Dataset, dataset_names, load_dataset

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "DataError",
    "DataOptions",
    "Dataset",
    "apply_weights",
    "audit_model",
    "dataset_names",
    "load_checkpoint",
    "load_dataset",
    "load_weights",
    "save_checkpoint",
]
