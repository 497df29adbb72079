"""Name -> mechanism registry. Duplicates are rejected; unknown names list the known ones."""

from __future__ import annotations

from .base import Mechanism

__all__ = ["get_mechanism", "mechanism_names", "register_mechanism"]

_MECHANISMS: dict[str, Mechanism] = {}


def register_mechanism(mechanism: Mechanism) -> Mechanism:
    if mechanism.name in _MECHANISMS:
        raise ValueError(f"mechanism {mechanism.name!r} is already registered")
    _MECHANISMS[mechanism.name] = mechanism
    return mechanism


def get_mechanism(name: str) -> Mechanism:
    try:
        return _MECHANISMS[name]
    except KeyError:
        raise ValueError(
            f"unknown mechanism {name!r}; known mechanisms: {', '.join(mechanism_names())}"
        ) from None


def mechanism_names() -> list[str]:
    return sorted(_MECHANISMS)
