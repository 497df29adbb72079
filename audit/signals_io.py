"""Signals computed elsewhere: a target's logits and reference models' logits and membership,
read (and checked) at the boundary, in mia-audit's layout or the LiRA reference code's.

mia-audit's references folder::

    keep.npy            bool [M, N]
    logits/<i>.npy      float [N, Q, C], i = 0 .. M-1

The LiRA reference code's (Carlini et al. 2022, ``mi_lira_2021``)::

    experiment-<i>_<M>/keep.npy         bool [N]
    experiment-<i>_<M>/logits/<E>.npy   float [N, 1, Q, C]; the last file in name order is used

A target's logits are ``float [N, Q, C]`` (or ``[N, 1, Q, C]``) in a ``.npy`` file
(``mia-audit export`` writes them as ``target/logits/0000000000.npy``, beside ``target/keep.npy``). Every
array is loaded with ``allow_pickle=False``; shapes, dtypes, finiteness and N are checked,
and an error names the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from .files import write_npy

__all__ = ["SignalError", "export_lira", "load_reference_signals", "load_target_logits"]


class SignalError(ValueError):
    """A signals file is missing or malformed; the message names it."""


def _load(path: Path) -> np.ndarray:
    if not path.is_file():
        raise SignalError(f"{path}: no such file")
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as err:  # object arrays need pickle: refused
        raise SignalError(f"{path}: not a plain numeric .npy array ({err})") from None
    except OSError as err:
        raise SignalError(f"{path}: not a .npy file ({err})") from None


def _logits(path: Path, population: int, num_classes: int, lira: bool = False) -> np.ndarray:
    a = _load(path)
    if a.dtype.kind != "f":
        raise SignalError(f"{path}: logits must be floating point, got dtype {a.dtype}")
    if a.ndim == 4 and a.shape[1] == 1:
        a = a[:, 0]
    elif lira or a.ndim != 3:
        want = "[N, 1, Q, C]" if lira else "[N, Q, C] (or [N, 1, Q, C])"
        raise SignalError(f"{path}: logits must have shape {want}, got {list(a.shape)}")
    if a.shape[0] != population:
        raise SignalError(f"{path}: logits are for {a.shape[0]} examples, the dataset has {population}")
    if a.shape[2] != num_classes:
        raise SignalError(f"{path}: logits have {a.shape[2]} classes, the dataset has {num_classes}")
    if a.shape[1] < 1:
        raise SignalError(f"{path}: logits have no queries")
    if not np.isfinite(a).all():
        raise SignalError(f"{path}: {int((~np.isfinite(a)).sum())} logits are NaN or infinite")
    return a.astype(np.float32)


def _keep(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    k = _load(path)
    if k.dtype != bool or k.shape != shape:
        raise SignalError(f"{path}: membership must be bool {list(shape)}, got {k.dtype} {list(k.shape)}")
    return k


def load_target_logits(path: str | Path, population: int, num_classes: int) -> np.ndarray:
    """A target's logits ``float32 [N, Q, C]`` from a ``.npy`` file."""
    return _logits(Path(path), population, num_classes)


def _experiments(folder: Path) -> list[Path]:
    found = []
    for p in folder.iterdir():
        m = re.fullmatch(r"experiment-(\d+)_(\d+)", p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def load_reference_signals(
    folder: str | Path, population: int, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """(keep bool [M, N], logits float32 [M, N, Q, C]) from a references folder in either layout."""
    folder = Path(folder)
    if not folder.is_dir():
        raise SignalError(f"{folder}: reference signals must be a folder")
    if (folder / "keep.npy").is_file():
        keep = _load(folder / "keep.npy")
        if keep.dtype != bool or keep.ndim != 2 or keep.shape[1] != population:
            raise SignalError(
                f"{folder / 'keep.npy'}: membership must be bool [M, {population}], got {keep.dtype} {list(keep.shape)}"
            )
        logits = [_logits(folder / "logits" / f"{i}.npy", population, num_classes) for i in range(len(keep))]
    else:
        experiments = _experiments(folder)
        if not experiments:
            raise SignalError(
                f"{folder}: neither mia-audit's layout (keep.npy, logits/<i>.npy) nor LiRA's "
                "(experiment-<i>_<M>/keep.npy, experiment-<i>_<M>/logits/*.npy)"
            )
        keeps, logits = [], []
        for exp in experiments:
            keeps.append(_keep(exp / "keep.npy", (population,)))
            files = sorted((exp / "logits").glob("*.npy")) if (exp / "logits").is_dir() else []
            if not files:
                raise SignalError(f"{exp / 'logits'}: no logits file")
            logits.append(_logits(files[-1], population, num_classes, lira=True))
        keep = np.stack(keeps)
    if len(logits) < 2:
        raise SignalError(f"{folder}: at least 2 reference models are needed, found {len(logits)}")
    if len({a.shape for a in logits}) != 1:
        raise SignalError(f"{folder}: reference logits differ in shape: {sorted({a.shape for a in logits})}")
    if (~keep.any(0)).any() or keep.all(0).any():
        raise SignalError(f"{folder}: some examples are IN (or OUT) for every reference model")
    return keep, np.stack(logits)


def export_lira(folder: str | Path, keep: np.ndarray, logits: np.ndarray) -> list[Path]:
    """Write references (keep [M, N], logits [M, N, Q, C]) in the LiRA layout; returns the
    experiment folders. Files are written atomically."""
    folder = Path(folder)
    m = len(keep)
    out = []
    for i in range(m):
        exp = folder / f"experiment-{i}_{m}"
        write_npy(exp / "keep.npy", np.asarray(keep[i], dtype=bool))
        write_npy(exp / "logits" / f"{0:010d}.npy", np.asarray(logits[i], dtype=np.float32)[:, None])
        out.append(exp)
    return out
