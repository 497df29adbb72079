"""The typed result of every data source (:class:`Dataset`), its options and errors, and
:func:`make_dataset`, which validates arrays and hashes their content."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["DataError", "DataOptions", "Dataset", "make_dataset"]


class DataError(ValueError):
    """A dataset could not be loaded or failed validation; the message says how to fix it."""


@dataclass(frozen=True, kw_only=True)
class DataOptions:
    """Options of the loaders that need them (ignored by the others)."""

    data_root: str | None = None
    download: bool = False
    label_column: str | None = None
    synthetic_samples: int = 1000
    synthetic_features: int = 20
    synthetic_classes: int = 2
    synthetic_seed: int = 0

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items()}


@dataclass(frozen=True)
class Dataset:
    """A population (and optional test split) with its shape, class count and content hash."""

    id: str
    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    kind: str  # "image" or "tabular"
    x_test: torch.Tensor | None = None
    y_test: torch.Tensor | None = None
    sha256: str = field(default="")

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def population(self) -> int:
        return int(self.x.shape[0])


def _content_hash(*arrays: np.ndarray | None) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _labels(y: Any, what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise DataError(f"{what}: labels must be one-dimensional, got shape {y.shape}")
    if y.dtype.kind == "f":
        if not np.all(np.isfinite(y)) or not np.all(y == np.round(y)):
            raise DataError(f"{what}: labels must be integers, got non-integer values")
    elif y.dtype.kind not in "iu":
        raise DataError(f"{what}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


def make_dataset(
    id: str,
    x: np.ndarray,
    y: np.ndarray,
    *,
    kind: str,
    x_test: np.ndarray | None = None,
    y_test: np.ndarray | None = None,
    num_classes: int | None = None,
) -> Dataset:
    """Validate arrays and wrap them as a :class:`Dataset` (float32 inputs, int64 labels)."""
    import torch

    x = np.asarray(x, dtype=np.float32)
    y = _labels(y, id)
    if len(x) == 0:
        raise DataError(f"{id}: the dataset is empty")
    if len(x) != len(y):
        raise DataError(f"{id}: {len(x)} inputs but {len(y)} labels")
    if not np.all(np.isfinite(x)):
        bad = int(np.argwhere(~np.isfinite(x.reshape(len(x), -1)))[0, 0])
        raise DataError(f"{id}: inputs contain NaN or infinite values (first at example {bad})")
    if x_test is not None:
        x_test = np.asarray(x_test, dtype=np.float32)
        y_test = _labels(y_test, f"{id} (test)")
        if len(x_test) != len(y_test):
            raise DataError(f"{id}: {len(x_test)} test inputs but {len(y_test)} test labels")
        if x_test.shape[1:] != x.shape[1:]:
            raise DataError(f"{id}: test inputs have shape {x_test.shape[1:]}, population {x.shape[1:]}")
        if not np.all(np.isfinite(x_test)):
            raise DataError(f"{id}: test inputs contain NaN or infinite values")
    k = num_classes if num_classes is not None else int(y.max()) + 1
    for labels, split in ((y, "labels"), (y_test, "test labels")):
        if labels is not None and len(labels) and (labels.min() < 0 or labels.max() >= k):
            raise DataError(
                f"{id}: {split} out of range: found {labels.min()}..{labels.max()}, expected 0..{k - 1}"
            )
    if len(np.unique(y)) < 2:
        raise DataError(f"{id}: the population has a single class; membership tests need two or more")
    return Dataset(
        id=id,
        x=torch.from_numpy(x),
        y=torch.from_numpy(y),
        num_classes=k,
        kind=kind,
        x_test=None if x_test is None else torch.from_numpy(x_test),
        y_test=None if y_test is None else torch.from_numpy(y_test),
        sha256=_content_hash(x, y, x_test, y_test),
    )
