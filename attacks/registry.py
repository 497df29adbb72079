"""Name -> attack registry. Duplicates are rejected; unknown names list the known ones."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["attack_names", "get_attack", "register_attack"]

_ATTACKS: dict[str, Callable[..., object]] = {}


def register_attack(name: str, fn: Callable[..., object]) -> Callable[..., object]:
    if name in _ATTACKS:
        raise ValueError(f"attack {name!r} is already registered")
    _ATTACKS[name] = fn
    return fn


def get_attack(name: str) -> Callable[..., object]:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise ValueError(
            f"unknown attack {name!r}; known attacks: {', '.join(attack_names()) or 'none yet'}"
        ) from None


def attack_names() -> list[str]:
    return sorted(_ATTACKS)
