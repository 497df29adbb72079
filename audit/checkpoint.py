"""Checkpoints: ``model.safetensors`` + ``model.json`` + ``keep.npy`` (DESIGN.md).

Weights load from safetensors, or from a ``.pt``/``.pth`` *state dict* read with
``torch.load(..., weights_only=True)``; never from an arbitrary pickle. Loading into an
architecture checks every tensor's name and shape and names the first mismatch.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .files import atomic_write, write_json, write_npy
from .schema import SchemaError, validate_model_meta

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "apply_weights",
    "load_checkpoint",
    "load_weights",
    "save_checkpoint",
    "strip_wrappers",
]

WEIGHTS, META, KEEP = "model.safetensors", "model.json", "keep.npy"


class CheckpointError(ValueError):
    """A checkpoint is missing, unsafe to load, or does not match the architecture."""


@dataclass(frozen=True)
class Checkpoint:
    state_dict: dict[str, torch.Tensor]
    meta: dict[str, Any]
    keep: np.ndarray


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_checkpoint(
    directory: str | Path,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any],
    keep: np.ndarray,
    extra_files: tuple[str, ...] = (),
) -> None:
    """Write the checkpoint files atomically (each to a temporary name, then renamed).

    ``model.json`` is written last and records the sha256 of the weights, ``keep.npy`` and any
    ``extra_files`` already written to ``directory`` (e.g. ``canaries.npz``): its presence marks
    a complete checkpoint, and loading checks that the files are the ones it was written with
    (a run killed while replacing a checkpoint cannot pair new weights with an old membership).
    """
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    atomic_write(directory / WEIGHTS, lambda p: save_file(tensors, str(p)))
    write_npy(directory / KEEP, np.asarray(keep, dtype=bool))
    files = {name: _sha256(directory / name) for name in (WEIGHTS, KEEP, *extra_files)}
    write_json(directory / META, {**meta, "files": files})


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors``, or ``.pt``/``.pth`` with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{path}: not a valid safetensors file ({err})") from err
    if suffix in (".pt", ".pth"):
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises UnpicklingError, RuntimeError, ...
            raise CheckpointError(
                f"{path}: refused to load: it is not a plain state dict that loads with "
                f"weights_only=True ({type(err).__name__}). If it is a whole pickled model, "
                "export its weights with torch.save(model.state_dict(), 'model.pt') or "
                "safetensors.torch.save_file(model.state_dict(), 'model.safetensors')."
            ) from err
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
        ):
            raise CheckpointError(f"{path}: expected a dict of name -> tensor (a state dict)")
        return obj
    raise CheckpointError(f"{path}: weights must be .safetensors, .pt or .pth, got {suffix or 'no suffix'!r}")


# Prefixes that training wrappers put before every parameter name of the module they wrap.
WRAPPER_PREFIXES = {
    "_module.": "Opacus GradSampleModule",
    "_orig_mod.": "torch.compile",
    "module.": "DataParallel / DistributedDataParallel",
}


def strip_wrappers(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Remove the prefixes training wrappers add (Opacus ``_module.``, ``torch.compile``'s
    ``_orig_mod.``, DataParallel's ``module.``), outermost first, when *every* name carries
    it; returns the state and the prefixes removed (a partial prefix is left for
    :func:`apply_weights` to name)."""
    removed: list[str] = []
    while state:
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix) :]: v for k, v in state.items()}
                removed.append(prefix)
                break
        else:
            break
    return state, removed


def apply_weights(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Load ``state`` into ``model`` after checking names and shapes; names the first mismatch."""
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in state:
            raise CheckpointError(f"checkpoint has no tensor {name!r} that the architecture needs")
        if tensor.is_floating_point() and not state[name].is_floating_point():
            raise CheckpointError(
                f"tensor {name!r} is {state[name].dtype} in the checkpoint but the architecture needs floating point"
            )
        if tuple(state[name].shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(state[name].shape)} in the checkpoint but "
                f"{tuple(tensor.shape)} in the architecture"
            )
    extra = sorted(set(state) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint tensor {extra[0]!r} is not part of the architecture")
    model.load_state_dict(state)
    return model


def load_checkpoint(directory: str | Path) -> Checkpoint:
    directory = Path(directory)
    if not (directory / META).is_file():
        raise CheckpointError(f"{directory} is not a checkpoint: {META} is missing")
    try:
        meta = json.loads((directory / META).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointError(f"{directory / META}: not valid JSON ({type(err).__name__})") from None
    try:
        validate_model_meta(meta, str(directory / META))
    except SchemaError as err:
        raise CheckpointError(str(err)) from None
    files = meta.get("files", {})
    if not isinstance(files, dict):
        raise CheckpointError(f"{directory / META}: 'files' must map file names to sha256 digests")
    for name, digest in files.items():
        if not isinstance(name, str) or "/" in name or name.startswith("."):
            raise CheckpointError(f"{directory / META}: bad file name {name!r} in 'files'")
        path = directory / name
        if not path.is_file() or _sha256(path) != digest:
            raise CheckpointError(
                f"{path} is not the file {META} was written with (missing, or changed since): the checkpoint "
                "is inconsistent, e.g. a run was killed while replacing it; train it again"
            )
    keep = np.load(directory / KEEP, allow_pickle=False)
    return Checkpoint(load_weights(directory / WEIGHTS), meta, keep)
