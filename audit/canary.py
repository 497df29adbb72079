"""Canary audits of a training run: settings, the files a run writes, and the audit entries.

Gradient canaries (``mechanisms.canaries``) ride along in a target's training; what they
recorded is written next to the checkpoint as ``canaries.npz`` (arrays) with its settings in
``model.json`` under ``canaries``, and turned into ``canary_audits`` entries of results.json
(AUDITING.md) by :func:`canary_audits` with the bounds of ``attacks.bounds``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks.canary_audit import audit_canaries
from mechanisms.canaries import CanaryRecord, GradientCanaries, StepLaw

from .files import atomic_write

__all__ = [
    "CANARY_FILE",
    "THREAT_MODELS",
    "CanarySettings",
    "audits_for_checkpoint",
    "canary_audits",
    "canary_seed",
    "load_record",
    "make_canaries",
    "save_record",
]

CANARY_FILE = "canaries.npz"
THREAT_MODELS = ("white-box-steps", "white-box-final")
DEFAULT_COUNT = 100_000
DEFAULT_INPUTS = 1000
# A canary costs a few float64 statistics and one coordinate of noise per step: 10^7 is about
# 0.5 GB of state and seconds per step, beyond any audit's need (10^5-10^6 reach the ceilings).
MAX_COUNT = 10_000_000


@dataclass(frozen=True, kw_only=True)
class CanarySettings:
    """How many gradient canaries to plant and how to audit them.

    ``count`` gradient canaries in all (0: no white-box audit), of which a ``calibration``
    share only chooses thresholds and guess counts; ``norm`` is a canary gradient's norm in
    units of the clipping norm; ``threat_models`` the white-box ones. ``inputs`` input canaries
    go into each target's canary twin for the black-box audit (0: no twin), of ``input_kind``
    (audit.blackbox). ``confidence`` is that of every bound.
    """

    count: int = DEFAULT_COUNT
    norm: float = 10.0
    calibration: float = 0.25
    threat_models: tuple[str, ...] = THREAT_MODELS
    confidence: float = 0.95
    inputs: int = DEFAULT_INPUTS
    input_kind: str = "mislabelled"

    def __post_init__(self) -> None:
        if (
            isinstance(self.count, bool)
            or not isinstance(self.count, int)
            or not (0 <= self.count <= MAX_COUNT)
        ):
            raise ValueError(f"canary count must be an integer in [0, {MAX_COUNT:,}], got {self.count!r}")
        if 0 < self.count < 100:
            raise ValueError(f"a canary audit needs at least 100 canaries, got {self.count}")
        if (
            isinstance(self.norm, bool)
            or not isinstance(self.norm, int | float)
            or not (1 <= self.norm < 1e6)
        ):
            raise ValueError(
                f"canary norm must be a number >= 1 (units of the clipping norm), got {self.norm!r}"
            )
        if not isinstance(self.calibration, int | float) or not (0 < self.calibration < 1):
            raise ValueError(f"calibration share must be in (0, 1), got {self.calibration!r}")
        if not isinstance(self.confidence, int | float) or not (0.5 < self.confidence < 1):
            raise ValueError(f"confidence must be in (0.5, 1), got {self.confidence!r}")
        if (
            isinstance(self.inputs, bool)
            or not isinstance(self.inputs, int)
            or not (0 <= self.inputs <= 10**6)
        ):
            raise ValueError(f"input canary count must be an integer in [0, 1,000,000], got {self.inputs!r}")
        if 0 < self.inputs < 10:
            raise ValueError(f"a black-box audit needs at least 10 input canaries, got {self.inputs}")
        if self.input_kind not in ("mislabelled", "ood"):
            raise ValueError(f"input_kind must be 'mislabelled' or 'ood', got {self.input_kind!r}")
        if not isinstance(self.threat_models, list | tuple):
            raise ValueError(f"threat models must be a list of names, got {self.threat_models!r}")
        models = tuple(self.threat_models)
        bad = [t for t in models if t not in THREAT_MODELS]
        if bad or not models:
            raise ValueError(
                f"threat models must be among {', '.join(THREAT_MODELS)}, got {', '.join(map(str, models)) or 'none'}"
            )
        object.__setattr__(self, "threat_models", models)

    @property
    def enabled(self) -> bool:
        """Whether gradient canaries ride along in the targets (the white-box audit)."""
        return self.count > 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "threat_models": list(self.threat_models)}

    def gradient_json(self) -> dict[str, Any]:
        """The settings a target trained with gradient canaries depends on."""
        return {k: v for k, v in self.to_json().items() if k not in ("inputs", "input_kind", "confidence")}


def canary_seed(root: int) -> int:
    """The canaries' stream: a fourth child of the run's root seed, independent of the member
    mask, weight initialisation and training streams (which are the first three)."""
    return int(np.random.SeedSequence(root).spawn(4)[3].generate_state(1)[0])


def make_canaries(settings: CanarySettings, root_seed: int, device: torch.device) -> GradientCanaries:
    return GradientCanaries(
        settings.count,
        seed=canary_seed(root_seed),
        norm=settings.norm,
        calibration=settings.calibration,
        device=device,
    )


def save_record(directory: str | Path, record: CanaryRecord) -> dict[str, Any]:
    """Write ``canaries.npz`` (atomically); returns the ``model.json`` fields describing it."""
    arrays = {
        "included": record.included.numpy().astype(bool),
        "calibration": record.calibration.numpy().astype(bool),
        "final": record.final.numpy().astype(np.float64),
        "llr": record.llr.numpy().astype(np.float64),
        "variance": record.variance.numpy().astype(np.float64),
    }

    def write(path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, **arrays)

    atomic_write(Path(directory) / CANARY_FILE, write)
    return {
        "count": len(arrays["included"]),
        "steps": record.steps,
        "candidates": record.candidates,
        "norm": record.norm,
        "law": record.law.to_json() if record.law is not None else None,
    }


def load_record(directory: str | Path, meta: dict[str, Any]) -> CanaryRecord | None:
    """The canary record of a checkpoint, or None when it was trained without canaries."""
    path = Path(directory) / CANARY_FILE
    info = meta.get("canaries")
    if not path.is_file() or not isinstance(info, dict):
        return None
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in ("included", "calibration", "final", "llr", "variance")}
    n = len(arrays["included"])
    if any(a.shape != (n,) for a in arrays.values()) or n != info.get("count"):
        raise ValueError(f"{path}: arrays do not match the {info.get('count')} canaries model.json records")
    law = info.get("law")
    return CanaryRecord(
        included=torch.from_numpy(arrays["included"].astype(bool)),
        calibration=torch.from_numpy(arrays["calibration"].astype(bool)),
        final=torch.from_numpy(arrays["final"]),
        llr=torch.from_numpy(arrays["llr"]),
        variance=torch.from_numpy(arrays["variance"]),
        steps=int(info["steps"]),
        candidates=int(info["candidates"]),
        norm=float(info["norm"]),
        law=StepLaw(**law) if law else None,
    )


def _scores(record: CanaryRecord, threat_model: str) -> dict[str, np.ndarray]:
    """Scores (higher = more likely included) offered to the bounds for one threat model."""
    if threat_model == "white-box-final":
        # a canary's gradient is positive, so training moves an included canary's coordinate down
        return {"final": -record.final.numpy()}
    return {"llr": record.llr.numpy(), "variance": record.variance.numpy()}


def canary_audits(
    record: CanaryRecord,
    *,
    threat_models: tuple[str, ...],
    delta: float,
    confidence: float,
    accountant_epsilon: float | None,
    formal: bool,
) -> list[dict[str, Any]]:
    """The ``canary_audits`` entries of results.json for one target (one per threat model)."""
    included = record.included.numpy()
    cal = record.calibration.numpy()
    out = []
    for threat_model in threat_models:
        scores = _scores(record, threat_model)
        bounds = audit_canaries(
            {k: v[~cal] for k, v in scores.items()},
            included[~cal],
            delta=delta,
            confidence=confidence,
            calibration=({k: v[cal] for k, v in scores.items()}, included[cal]),
            independent=True,  # dedicated coordinates: canaries are independent by construction
        )
        one_run = next(b for b in bounds if b.method == "one-run")
        valid = [b for b in bounds if b.valid]
        strongest = max(valid, key=lambda b: b.epsilon_lb)
        out.append(
            {
                "threat_model": threat_model,
                "canary_kind": "gradient",
                "m": int((~cal).sum()),
                "included": int(included[~cal].sum()),
                "calibration_canaries": int(cal.sum()),
                "guesses": one_run.counts["guesses"],
                "correct": one_run.counts["correct"],
                "steps": record.steps,
                "law": record.law.to_json() if record.law is not None else None,
                "norm": record.norm,
                "bounds": [b.to_json() for b in bounds],
                "strongest_valid": {"method": strongest.method, "epsilon_lb": strongest.epsilon_lb},
                "accountant_epsilon": accountant_epsilon,
                "formal": formal,
            }
        )
    return out


def audits_for_checkpoint(
    directory: str | Path, meta: dict[str, Any], *, delta: float
) -> list[dict[str, Any]]:
    """``canary_audits`` of a checkpoint trained with canaries (empty without).

    Bounds use the target's own delta when it has one (so they compare with its accountant's
    epsilon), else ``delta``.
    """
    record = load_record(directory, meta)
    if record is None:
        return []
    info = meta["canaries"]
    privacy = meta.get("privacy") or {}
    return canary_audits(
        record,
        threat_models=tuple(info.get("threat_models", THREAT_MODELS)),
        delta=float(privacy.get("delta") or delta),
        confidence=float(info.get("confidence", 0.95)),
        accountant_epsilon=privacy.get("epsilon"),
        formal=bool(privacy.get("formal")),
    )
