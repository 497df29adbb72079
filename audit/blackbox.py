"""Black-box canary audits: input canaries in a *canary twin* of a target (AUDITING.md).

A twin is trained with the target's recipe and seeds on the target's members plus the
included input canaries, through the mechanism's normal data path; the target itself never
sees a canary, so its membership metrics are untouched. Input canaries are examples the model
would not learn by generalising: held-out images with a random wrong label (``mislabelled``,
the default) or generated inputs (``ood``: uniform noise over the data's range) with a random
label; each is included with probability 1/2. The auditor sees only the twin's outputs: the
score of a canary is minus its loss (mean over the queries the attacks use; repeated passes
for a model whose inference is random). Input canaries are not independent of each other, so
only the one-run bounds apply, with guess counts from a fixed grid (Bonferroni).
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from attacks import cross_entropy
from attacks.canary_audit import audit_canaries

from .checkpoint import load_checkpoint, save_checkpoint
from .data import Dataset
from .files import atomic_write
from .signals import model_logits

__all__ = [
    "INPUT_KINDS",
    "InputCanaries",
    "blackbox_audit",
    "input_canary_seed",
    "load_input_canaries",
    "make_input_canaries",
    "run_twin_job",
    "save_input_canaries",
    "train_twin",
    "twin_audit",
    "twin_job",
    "write_twin",
]

INPUT_KINDS = ("mislabelled", "ood")
INPUT_FILE = "input_canaries.npz"
TWIN = "twin"


@dataclass(frozen=True)
class InputCanaries:
    """m input canaries: inputs ``x`` [m, ...], the ``labels`` they are trained with [m],
    ``included`` [m] (in the twin's training set), ``source`` [m] (population index of a
    mislabelled canary's image, -1 for a generated one) and their ``kind``."""

    x: np.ndarray
    labels: np.ndarray
    included: np.ndarray
    source: np.ndarray
    kind: str

    def __post_init__(self) -> None:
        m = len(self.labels)
        if self.kind not in INPUT_KINDS:
            raise ValueError(f"input canary kind must be one of {', '.join(INPUT_KINDS)}, got {self.kind!r}")
        if len(self.x) != m or self.included.shape != (m,) or self.source.shape != (m,):
            raise ValueError(
                f"input canaries: {len(self.x)} inputs, {m} labels, {self.included.shape} inclusion mask and "
                f"{self.source.shape} sources do not match"
            )
        if self.included.dtype != bool:
            raise ValueError(f"the inclusion mask must be boolean, got {self.included.dtype}")
        if not np.isfinite(self.x).all():
            raise ValueError("input canaries contain NaN or infinite inputs")
        if m < 10 or self.included.all() or not self.included.any():
            raise ValueError(
                f"need at least 10 input canaries, included and excluded ones, got {int(self.included.sum())} of {m}"
            )


def input_canary_seed(root: int) -> np.random.SeedSequence:
    """The input canaries' stream: a fifth child of the run's root seed (the first three
    draw the member mask, initialisation and training; the fourth the gradient canaries)."""
    return np.random.SeedSequence(root).spawn(5)[4]


def make_input_canaries(
    data: Dataset, candidates: np.ndarray, count: int, kind: str, rng: np.random.Generator
) -> InputCanaries:
    """``count`` canaries of ``kind``; mislabelled ones take their images from the population
    examples marked in ``candidates`` (held out from the target: its non-members)."""
    if kind not in INPUT_KINDS:
        raise ValueError(f"input canary kind must be one of {', '.join(INPUT_KINDS)}, got {kind!r}")
    c = data.num_classes
    if kind == "mislabelled":
        pool = np.flatnonzero(candidates)
        if count > len(pool):
            raise ValueError(
                f"{count} mislabelled input canaries asked for, but only {len(pool)} held-out examples of "
                f"{data.id} can serve (the target's non-members); ask for fewer"
            )
        source = np.sort(rng.choice(pool, size=count, replace=False))
        x = data.x.numpy()[source]
        true = data.y.numpy()[source]
        labels = (true + rng.integers(1, c, size=count)) % c  # uniform over the wrong classes
    else:
        pop = data.x.numpy()
        lo, hi = pop.min(axis=0), pop.max(axis=0)
        x = (lo + (hi - lo) * rng.random((count, *pop.shape[1:]))).astype(np.float32)
        labels = rng.integers(0, c, size=count)
        source = np.full(count, -1, dtype=np.int64)
    included = rng.random(count) < 0.5
    return InputCanaries(np.asarray(x, dtype=np.float32), labels.astype(np.int64), included, source, kind)


def save_input_canaries(path: str | Path, canaries: InputCanaries, scores: np.ndarray | None = None) -> Path:
    arrays = {
        "x": canaries.x,
        "labels": canaries.labels,
        "included": canaries.included,
        "source": canaries.source,
        "kind": np.array(canaries.kind),
    }
    if scores is not None:
        arrays["scores"] = np.asarray(scores, dtype=np.float64)

    def write(p: Path) -> None:
        with open(p, "wb") as fh:
            np.savez(fh, **arrays)

    return atomic_write(path, write)


def load_input_canaries(path: str | Path, data: Dataset | None = None) -> InputCanaries:
    """Read a canary file (``x``, ``labels``, ``included``; optional ``source``, ``kind``),
    checked against ``data`` (input shape, label range) when given."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"canary file {str(path)!r} does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as err:
        raise ValueError(f"{path}: not a readable .npz canary file ({type(err).__name__})") from err
    missing = sorted({"x", "labels", "included"} - set(arrays))
    if missing:
        raise ValueError(f"{path}: canary file lacks {', '.join(missing)} (needs x, labels, included)")
    x, labels, included = arrays["x"], arrays["labels"], arrays["included"]
    source = arrays.get("source", np.full(len(labels), -1, dtype=np.int64))
    kind = str(arrays["kind"]) if "kind" in arrays else "mislabelled"
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be a 1-D integer array, got {labels.dtype} {labels.shape}")
    if x.dtype.kind != "f":
        raise ValueError(f"{path}: inputs x must be floating point, got {x.dtype}")
    if data is not None:
        if tuple(x.shape[1:]) != tuple(data.input_shape):
            raise ValueError(
                f"{path}: canary inputs have shape {x.shape[1:]}, the data {tuple(data.input_shape)}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= data.num_classes):
            raise ValueError(f"{path}: canary labels outside 0..{data.num_classes - 1}")
    try:
        return InputCanaries(
            x.astype(np.float32), labels.astype(np.int64), included, source.astype(np.int64), kind
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def canary_scores(
    model: torch.nn.Module, canaries: InputCanaries, device: torch.device, *, queries: int, stochastic: bool
) -> np.ndarray:
    """Minus each canary's loss on the label it was trained with.

    A canary is memorised at its exact input, so a deterministic model is queried with the
    canary itself only (augmented queries, which help attacks on ordinary members, dilute it:
    measured, one-run bound 3.23 with the input alone against 2.43 with a one-pixel shift
    averaged in, on the quick preset's sgd twin); a model whose inference is random is queried
    ``queries`` times and the losses averaged.
    """
    q = queries if stochastic else 1
    logits = model_logits(model, torch.from_numpy(canaries.x).to(device), queries=q, stochastic=stochastic)
    return -cross_entropy(logits, canaries.labels).mean(-1)


def blackbox_audit(
    scores: np.ndarray,
    canaries: InputCanaries,
    *,
    delta: float,
    confidence: float,
    accountant_epsilon: float | None,
    formal: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``canary_audits`` entry of a black-box audit (one-run bounds, Bonferroni grid)."""
    bounds = audit_canaries(
        {"loss": scores},
        canaries.included,
        delta=delta,
        confidence=confidence,
        methods=("one-run", "f-dp-one-run"),
    )
    one_run = next(b for b in bounds if b.method == "one-run")
    return {
        "threat_model": "black-box",
        "canary_kind": canaries.kind,
        "m": len(canaries.labels),
        "included": int(canaries.included.sum()),
        "calibration_canaries": 0,
        "guesses": one_run.counts["guesses"],
        "correct": one_run.counts["correct"],
        "bounds": [b.to_json() for b in bounds],
        "strongest_valid": {"method": one_run.method, "epsilon_lb": one_run.epsilon_lb},
        "accountant_epsilon": accountant_epsilon,
        "formal": formal,
        **(extra or {}),
    }


def _reusable_twin(twin_dir: Path, settings: dict[str, Any]) -> bool:
    existing = twin_dir / "model.json"
    return (
        existing.is_file()
        and (twin_dir / INPUT_FILE).is_file()
        and load_checkpoint(twin_dir).meta.get("input_canaries", {}).get("settings") == settings
    )


def twin_job(
    target_dir: Path, *, count: int, kind: str, seed: int, device_name: str, queries: int
) -> dict[str, Any] | None:
    """The executor job that trains ``target_dir``'s canary twin, or None when a twin with these
    settings is already there. The job carries the target's checkpoint (small) and the data's
    identity, not the data."""
    if _reusable_twin(target_dir / TWIN, {"count": count, "kind": kind}):
        return None
    target = load_checkpoint(target_dir)
    return {
        "target": str(target_dir),
        "meta": target.meta,
        "keep": target.keep,
        "state_dict": target.state_dict,
        "count": count,
        "kind": kind,
        "seed": seed,
        "device": device_name,
        "queries": queries,
    }


def run_twin_job(job: dict[str, Any], data: Dataset | None = None, progress: bool = False) -> dict[str, Any]:
    """Train and score a canary twin (in a worker, perhaps on another machine); returns what
    :func:`write_twin` writes. ``data`` is loaded by identity (and checked) when not given."""
    from mechanisms import build_model, get_mechanism

    from .checkpoint import apply_weights
    from .data import load_verified
    from .train import fit, heldout_accuracy, released, resolve_device, seeds

    meta, keep, seed = job["meta"], job["keep"], job["seed"]
    if data is None:
        d = meta["dataset"]
        data = load_verified(d["id"], d["options"], d["sha256"])
    device = resolve_device(job["device"])
    mechanism = get_mechanism(meta["mechanism"])
    options = {k: v for k, v in meta["hyperparameters"].items() if k != "progress"}
    settings = {"count": job["count"], "kind": job["kind"]}
    canaries = make_input_canaries(
        data, ~keep, job["count"], job["kind"], np.random.default_rng(input_canary_seed(seed))
    )
    _, init_seed, train_seed = seeds(seed)
    fitted = fit(
        data,
        model_name=meta["model"],
        mechanism_name=meta["mechanism"],
        options=options,
        members=keep,
        init_seed=init_seed,
        train_seed=train_seed,
        device=device,
        progress=progress,
        extra=(
            torch.from_numpy(canaries.x[canaries.included]),
            torch.from_numpy(canaries.labels[canaries.included]),
        ),
    )
    config = fitted.config
    passes = mechanism.eval_passes(config)
    stochastic = mechanism.stochastic(config)
    model = fitted.model
    scores = canary_scores(model, canaries, device, queries=job["queries"], stochastic=stochastic)
    # held-out accuracy on the non-members that are not canary images, for twin and target alike
    clean = keep.copy()
    clean[canaries.source[canaries.source >= 0]] = True
    twin_acc, split = heldout_accuracy(model, data, clean, device, passes)
    plain = build_model(meta["model"], data.input_shape, data.num_classes).to(device)
    inference = released(plain, meta["mechanism"], options, seed)
    apply_weights(inference.model, job["state_dict"])
    target_acc, _ = heldout_accuracy(inference.model, data, clean, device, inference.passes)
    twin_meta = {
        **{k: v for k, v in meta.items() if k not in ("canaries", "history", "extras", "files")},
        "privacy": fitted.result.privacy.to_json(),
        "test_accuracy": twin_acc,
        "test_split": split + " without canary images",
        "train_seconds": round(fitted.seconds, 3),
        "members": int(keep.sum()) + int(canaries.included.sum()),
        "input_canaries": {
            "settings": settings,
            "included": int(canaries.included.sum()),
            "target_test_accuracy_same_split": target_acc,
        },
        "history": fitted.result.history,
    }
    state = {k: v.detach().cpu() for k, v in fitted.result.state_dict.items()}
    return {
        "target": job["target"],
        "state_dict": state,
        "meta": twin_meta,
        "keep": keep,
        "canaries": canaries,
        "scores": scores,
    }


def write_twin(target_dir: Path, twin: dict[str, Any]) -> None:
    """Write a twin computed by :func:`run_twin_job` under ``target_dir/twin``."""
    twin_dir = target_dir / TWIN
    save_input_canaries(twin_dir / INPUT_FILE, twin["canaries"], twin["scores"])
    save_checkpoint(twin_dir, twin["state_dict"], twin["meta"], twin["keep"], (INPUT_FILE,))


def train_twin(
    target_dir: Path,
    data: Dataset,
    *,
    count: int,
    kind: str,
    seed: int,
    device_name: str,
    queries: int,
    delta: float,
    confidence: float,
    progress: bool = False,
) -> dict[str, Any]:
    """Train (or reuse) a target's canary twin under ``target_dir/twin`` and audit it.

    Returns the black-box ``canary_audits`` entry. The twin's checkpoint records its own
    accountant epsilon (more training data at the same lot size calibrates to a smaller noise).
    """
    job = twin_job(target_dir, count=count, kind=kind, seed=seed, device_name=device_name, queries=queries)
    if job is not None:
        write_twin(target_dir, run_twin_job(job, data, progress))
    return twin_audit(target_dir, data, delta=delta, confidence=confidence)


def twin_audit(target_dir: Path, data: Dataset, *, delta: float, confidence: float) -> dict[str, Any]:
    """The black-box audit of the canary twin already written under ``target_dir/twin``."""
    twin_dir = target_dir / TWIN
    twin_meta = load_checkpoint(twin_dir).meta
    canaries = load_input_canaries(twin_dir / INPUT_FILE, data)
    scores = np.load(twin_dir / INPUT_FILE, allow_pickle=False)["scores"]
    privacy = twin_meta["privacy"]
    return blackbox_audit(
        scores,
        canaries,
        delta=float(privacy.get("delta") or delta),
        confidence=confidence,
        accountant_epsilon=privacy.get("epsilon"),
        formal=bool(privacy.get("formal")),
        extra={
            "twin": {
                "test_accuracy": twin_meta["test_accuracy"],
                "target_test_accuracy": twin_meta["input_canaries"]["target_test_accuracy_same_split"],
                "test_split": twin_meta["test_split"],
                "epsilon": privacy.get("epsilon"),
            }
        },
    )
