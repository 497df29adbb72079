"""Orchestration: data, training of targets, checkpoints, the command line, the Python API.

Names are imported on first use (PEP 562), so that the command line answers ``--help`` and
argument errors without importing torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "audit_model": "api",
    "Checkpoint": "checkpoint",
    "CheckpointError": "checkpoint",
    "apply_weights": "checkpoint",
    "load_checkpoint": "checkpoint",
    "load_weights": "checkpoint",
    "save_checkpoint": "checkpoint",
    "DataError": "dataset",
    "DataOptions": "dataset",
    "Dataset": "dataset",
    "dataset_names": "data",
    "load_dataset": "data",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'audit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
