"""Safe, atomic file writes: a temporary name in the same folder, then an atomic rename.

A killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "ID_RULE",
    "OutputLock",
    "atomic_write",
    "check_id",
    "holds_files",
    "inside",
    "write_json",
    "write_npy",
    "write_text",
]

LOCK = ".mia-audit.lock"


class OutputLock:
    """One writer per output folder: ``OUT/.mia-audit.lock`` holds the writer's pid.

    A second writer is refused with a message naming the first; a lock left by a process that
    no longer runs (killed) is taken over. Released on exit, however the block ends.
    """

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / LOCK

    def __enter__(self) -> OutputLock:
        self.created = not self.path.parent.exists()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid > 0 and pid != os.getpid() and _alive(pid):
                    raise ValueError(
                        f"another mia-audit (pid {pid}) is writing to {self.path.parent}; wait for it to "
                        f"finish, or use another output folder (a stale lock is {self.path})"
                    ) from None
                self.path.unlink(missing_ok=True)  # stale: its writer is gone
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(str(os.getpid()))
            return self
        raise ValueError(f"could not take the lock {self.path}")

    def __exit__(self, *exc: object) -> None:
        self.path.unlink(missing_ok=True)
        if self.created and not any(self.path.parent.iterdir()):
            self.path.parent.rmdir()  # a folder the lock made and nothing else used


def holds_files(folder: str | Path) -> bool:
    """Whether ``folder`` holds anything but mia-audit's own lock."""
    folder = Path(folder)
    return folder.is_dir() and any(p.name != LOCK for p in folder.iterdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# Names that become one component of an output path (target ids, mechanism names): letters,
# digits, '.', '_' and '-', starting with a letter or digit, at most 80 characters. So no
# separator, no '..', no absolute path, nothing hidden.
ID_RULE = "1-80 letters, digits, '.', '_' or '-', starting with a letter or digit"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}")


def check_id(value: object, what: str) -> str:
    """``value`` if it may name one folder under an output root, else ValueError naming it.

    >>> check_id("dpsgd-eps0.5", "target id")
    'dpsgd-eps0.5'
    >>> check_id("../x", "target id")
    Traceback (most recent call last):
    ...
    ValueError: target id '../x' cannot name a folder: use 1-80 letters, digits, '.', '_' or '-', starting with a letter or digit
    """
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise ValueError(f"{what} {value!r} cannot name a folder: use {ID_RULE}")
    return value


def inside(root: str | Path, *parts: str) -> Path:
    """``root / parts`` after checking that, resolved, it stays inside ``root`` (every part is
    also checked with :func:`check_id`)."""
    root = Path(root)
    for part in parts:
        check_id(part, "path component")
    path = root.joinpath(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path} is outside the output folder {root}")
    return path


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def write_npy(path: str | Path, array: np.ndarray) -> Path:
    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    return atomic_write(path, write)
