"""The mechanism contract: configuration, result and the registry entry type.

A mechanism is ``train(model, x, y, *, config, generator) -> TrainResult``. ``config`` is a
frozen dataclass: :class:`TrainConfig` for the shared optimisation settings, subclassed by
mechanisms that add options of their own. Every field reaches the code that uses it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from dp_accounting import DpEvent
from torch import nn

__all__ = [
    "Mechanism",
    "NonFiniteLossError",
    "Privacy",
    "TrainConfig",
    "TrainResult",
    "config_from_mapping",
]


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; nothing of the run is kept."""

    def __init__(self, epoch: int, step: int, value: float) -> None:
        super().__init__(
            f"non-finite loss {value} at epoch {epoch}, step {step}; training stopped. "
            "Lower the learning rate or check the inputs."
        )
        self.epoch, self.step, self.value = epoch, step, value


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimisation settings shared by every mechanism.

    ``batch_size`` is the (expected) number of examples per step; ``lr`` is the learning rate
    applied to the *mean* gradient of a batch; ``schedule`` is ``constant`` or ``cosine``
    (cosine decay to zero over all steps); ``optimizer`` is ``sgd`` (with ``momentum``) or
    ``adam``.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.05
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    schedule: str = "constant"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not (self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"schedule must be 'constant' or 'cosine', got {self.schedule!r}")
        if not (0 <= self.momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")


@dataclass(frozen=True, kw_only=True)
class Privacy:
    """What a training run guarantees, as recorded in ``model.json`` under ``privacy``.

    ``formal`` is True only when ``epsilon`` is a proven bound computed by a dp-accounting
    accountant from the run's DpEvent; ``note`` says why when it is not.
    """

    formal: bool
    epsilon: float | None = None
    delta: float | None = None
    accountant: str | None = None
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    clip_norm: float | None = None
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainResult:
    """Weights, per-epoch history, the DpEvent (None without a formal guarantee), privacy."""

    state_dict: dict[str, torch.Tensor]
    history: list[dict[str, float]]
    event: DpEvent | None
    privacy: Privacy
    extras: dict[str, Any] = field(default_factory=dict)


TrainFn = Callable[..., TrainResult]


@dataclass(frozen=True)
class Mechanism:
    """A registry entry: name, config type, train function, one-line description.

    ``prepare`` turns a freshly built architecture into the *released predictor* of this
    mechanism for a given config (e.g. residual perturbation installs its noisy slots, which
    stay on at inference); it is applied before training and whenever a checkpoint is loaded
    for evaluation or attack. ``eval_passes(config)`` is the number of stochastic forward
    passes whose softmax is averaged for predictions (1 for deterministic models), and
    ``stochastic(config)`` says whether inference is random (then attack queries are repeated
    passes instead of augmentations). ``gradient_canaries`` says that ``train`` accepts a
    ``canaries=`` argument (mechanisms.canaries) and threads it through its privatisation;
    ``canaries_refused(config)`` gives the reason a config cannot take them, or None.
    """

    name: str
    config_type: type[TrainConfig]
    train: TrainFn
    description: str
    validate_model: Callable[[nn.Module], None] | None = None
    prepare: Callable[[nn.Module, TrainConfig, int], nn.Module] | None = None
    stochastic: Callable[[TrainConfig], bool] = lambda config: False
    eval_passes: Callable[[TrainConfig], int] = lambda config: 1
    gradient_canaries: bool = False
    canaries_refused: Callable[[TrainConfig], str | None] = lambda config: None

    def released(self, model: nn.Module, config: TrainConfig, seed: int = 0) -> nn.Module:
        """The model as this mechanism releases it (see ``prepare``)."""
        return self.prepare(model, config, seed) if self.prepare is not None else model


def config_from_mapping(cls: type[TrainConfig], values: Mapping[str, Any]) -> TrainConfig:
    """Build config ``cls`` from a mapping, rejecting keys it does not have and values not of
    the field's type (a configuration file's ``epochs = "2"`` or ``lr = true`` is an input
    error with the option's name, not a crash inside training). Integers are accepted where a
    float is expected; booleans are never numbers."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; known: {', '.join(sorted(known))}"
        )
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        kind = hints[key]
        optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
        if optional:
            kind = next(k for k in typing.get_args(kind) if k is not type(None))
            if value is None:
                continue
        ok = {
            bool: lambda v: isinstance(v, bool),
            int: lambda v: isinstance(v, int) and not isinstance(v, bool),
            float: lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
            str: lambda v: isinstance(v, str),
        }[kind](value)
        if not ok:
            name = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string"}[kind]
            raise ValueError(f"option {key} must be {name}, got {value!r}")
    return cls(
        **{
            k: float(v) if hints[k] in (float, float | None) and v is not None else v
            for k, v in values.items()
        }
    )
