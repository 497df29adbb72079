"""Name -> attack registry. Duplicates are rejected; unknown names list the known ones.

An attack is ``fn(inputs: AttackInputs, **options) -> AttackResult``; its scores are float [N],
higher = more likely a member.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Attack", "AttackResult", "attack_names", "get_attack", "register_attack"]


@dataclass(frozen=True)
class AttackResult:
    """Scores [N] (higher = member) and notes (e.g. how many examples fell back to a default)."""

    scores: np.ndarray
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        s = np.asarray(self.scores, dtype=np.float64)
        if s.ndim != 1 or not np.isfinite(s).all():
            raise ValueError("an attack must return finite float scores of shape [N]")
        object.__setattr__(self, "scores", s)


@dataclass(frozen=True)
class Attack:
    name: str
    fn: Callable[..., AttackResult]
    needs_references: bool
    description: str


_ATTACKS: dict[str, Attack] = {}


def register_attack(
    name: str, fn: Callable[..., AttackResult], *, needs_references: bool, description: str
) -> Attack:
    if name in _ATTACKS:
        raise ValueError(f"attack {name!r} is already registered")
    _ATTACKS[name] = Attack(name, fn, needs_references, description)
    return _ATTACKS[name]


def get_attack(name: str) -> Attack:
    try:
        return _ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; known attacks: {', '.join(attack_names())}") from None


def attack_names() -> list[str]:
    return sorted(_ATTACKS)
