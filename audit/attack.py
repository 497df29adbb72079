"""Attack a trained target: signals, reference models, every attack, metrics -> results.json."""

from __future__ import annotations

import inspect
import json
import logging
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import attacks
from attacks import AttackInputs, get_attack, summarize
from mechanisms import build_model

from .canary import audits_for_checkpoint
from .checkpoint import apply_weights, load_checkpoint
from .data import Dataset, load_verified
from .executors import ExecutorSettings, make_executor
from .files import atomic_write, check_id, inside, write_json, write_npy
from .references import Recipe, ensure_references
from .signals import model_logits
from .train import released, resolve_device

__all__ = [
    "AttackRequest",
    "attack_checkpoint",
    "attack_logits",
    "attack_target",
    "default_queries",
    "load_results",
    "parse_attack_spec",
    "results_document",
    "target_id",
    "train_references",
]

logger = logging.getLogger(__name__)

RESULTS_SCHEMA = "mia-audit/results/v1"


@dataclass(frozen=True, kw_only=True)
class AttackRequest:
    target: str
    attacks: tuple[str, ...] = tuple(attacks.attack_names())
    references: int = 16
    workers: int | None = None
    queries: int | None = None
    fpr_levels: tuple[float, ...] = (0.001, 0.01, 0.1)
    delta: float = 1e-5
    alpha: float = 0.05
    resamples: int = 1000
    seed: int = 0
    device: str = "cpu"
    progress: bool = True
    model: str | None = None  # the architecture the user typed (confirms a user factory)
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)  # how references train

    def __post_init__(self) -> None:
        def count(name: str, lo: int) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {value!r}")

        count("references", 0)
        count("resamples", MIN_RESAMPLES)
        if self.workers is not None:
            count("workers", 1)
        if self.queries is not None:
            count("queries", 1)
        for name, lo, hi in (("alpha", 0.0, 1.0), ("delta", 0.0, 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not (lo < value < hi):
                raise ValueError(f"{name} must be a number in ({lo:g}, {hi:g}), got {value!r}")
        if not self.fpr_levels:
            raise ValueError("give at least one FPR level")
        for level in self.fpr_levels:
            if isinstance(level, bool) or not isinstance(level, int | float) or not (0 < level < 1):
                raise ValueError(f"FPR levels must be numbers in (0, 1), got {level!r}")
        if not self.attacks:
            raise ValueError("give at least one attack")


# Fewer bootstrap resamples give intervals too coarse to mean anything (a 95% percentile
# interval from 20 resamples is set by one value at each end).
MIN_RESAMPLES = 100


def _value(text: str, kind: Any) -> Any:
    """An attack option's value parsed strictly for its annotated type (bool: true/false).

    Annotations may be strings (``from __future__ import annotations``): ``"bool | None"``
    parses as a bool.
    """
    if isinstance(kind, str):
        names = [k for k in kind.replace(" ", "").split("|") if k != "None"]
        kind = names[0] if len(names) == 1 else kind
    if kind is bool or kind == "bool":
        low = text.lower()
        if low not in ("true", "false"):
            raise ValueError(f"expected true or false, got {text!r}")
        return low == "true"
    if kind in (int, "int"):
        return int(text)
    if kind in (float, "float"):
        value = float(text)
        if not math.isfinite(value):
            raise ValueError(f"expected a finite number, got {text!r}")
        return value
    return text


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``name`` or ``name:key=value:key=value`` -> (name, options), options checked by name.

    >>> parse_attack_spec("lira-online:fixed_variance=true")
    ('lira-online', {'fixed_variance': True})
    """
    name, *parts = spec.split(":")
    attack = get_attack(name)
    accepted = {
        p: param.annotation for p, param in inspect.signature(attack.fn).parameters.items() if p != "inputs"
    }
    options: dict[str, Any] = {}
    for part in parts:
        key, sep, value = part.partition("=")
        key = key.replace("-", "_")
        if not sep or key not in accepted:
            raise ValueError(
                f"bad option {part!r} for attack {name!r}; accepted: "
                f"{', '.join(f'{a}=VALUE' for a in accepted) or 'none'}"
            )
        try:
            options[key] = _value(value, accepted[key])
        except ValueError as err:
            raise ValueError(f"bad value for {name}:{key}: {err}") from None
    return name, options


def target_id(meta: dict[str, Any]) -> str:
    """``<mechanism>`` plus ``-eps<epsilon>`` when the run has a formal epsilon.

    It names a folder of the output, so it must follow ``files.ID_RULE`` (a ``model.json`` is
    input: its mechanism field is checked, never joined into a path as it is).
    """
    privacy = meta.get("privacy", {})
    mechanism = check_id(meta.get("mechanism"), "model.json mechanism")
    if privacy.get("formal") and isinstance(privacy.get("epsilon"), int | float):
        return check_id(f"{mechanism}-eps{privacy['epsilon']:.3g}", "target id")
    return mechanism


def default_queries(input_shape: tuple[int, ...]) -> int:
    """2 queries (the example and one augmentation) for images, 1 for tabular data."""
    return 2 if len(input_shape) == 3 else 1


def load_target_data(meta: dict[str, Any]) -> Dataset:
    ds = meta["dataset"]
    return load_verified(ds["id"], ds.get("options", {}), ds["sha256"])


def run_attacks(
    inputs: AttackInputs,
    is_member: np.ndarray,
    specs: tuple[str, ...],
    *,
    fpr_levels: tuple[float, ...],
    delta: float,
    alpha: float,
    resamples: int,
    seed: int,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Every attack spec on ``inputs``, summarised; returns (metrics json, scores)."""
    results, scores = {}, {}
    for spec in specs:
        name, options = parse_attack_spec(spec)
        result = get_attack(name).fn(inputs, **options)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the same notes are carried in metrics.warnings
            metrics = summarize(
                result.scores,
                is_member,
                fpr_levels=fpr_levels,
                delta=delta,
                alpha=alpha,
                resamples=resamples,
                seed=seed,
            )
        results[spec] = {**metrics.to_json(), "notes": result.notes}
        scores[spec] = result.scores
    return results, scores


def attack_checkpoint(
    meta: dict[str, Any],
    state_dict: dict[str, torch.Tensor],
    keep: np.ndarray,
    data: Dataset,
    *,
    target_dir: Path,
    references_dir: Path,
    request: AttackRequest,
    tid: str,
) -> dict[str, Any]:
    """Signals, references and every attack for one target; returns its results.json entry.

    Writes ``target_dir/{logits.npy, keep.npy, scores.npz}`` and the references under
    ``references_dir`` (resumable).
    """
    if keep.shape != (data.population,) or keep.dtype != bool:
        raise ValueError(f"membership must be bool [{data.population}], got {keep.dtype} {keep.shape}")
    if keep.all() or not keep.any():
        raise ValueError("membership needs both members and non-members")
    specs = tuple(request.attacks)
    needs_refs = any(get_attack(parse_attack_spec(s)[0]).needs_references for s in specs)
    if needs_refs and request.references < 2:
        raise ValueError(
            f"attacks {', '.join(specs)} need at least 2 reference models, got {request.references}"
        )
    queries = request.queries or default_queries(data.input_shape)
    device = resolve_device(request.device)
    model = build_model(meta["model"], data.input_shape, data.num_classes).to(device)
    # the model as its mechanism releases it (residual perturbation keeps its noise on, an
    # ensemble holds its members), then its weights
    inference = released(model, str(meta.get("mechanism")), meta.get("hyperparameters", {}), request.seed)
    apply_weights(inference.model, state_dict)
    target_logits = model_logits(
        inference.model, data.x.to(device), queries=queries, stochastic=inference.stochastic
    )
    references = None
    if needs_refs:
        references = train_references(
            meta,
            data,
            references_dir,
            request,
            queries=queries,
            stochastic=inference.stochastic,
            device=device,
        )
    return attack_logits(
        meta, target_logits, keep, data, references, target_dir=target_dir, request=request, tid=tid
    )


def train_references(
    meta: dict[str, Any],
    data: Dataset,
    folder: Path,
    request: AttackRequest,
    *,
    queries: int,
    stochastic: bool,
    device: torch.device,
) -> tuple[np.ndarray, np.ndarray]:
    """The target's reference models (trained or reused in ``folder``): (keep [M, N], logits)."""
    return ensure_references(
        folder,
        Recipe.from_target_meta(meta, queries=queries, seed=request.seed, stochastic=stochastic),
        request.references,
        data.population,
        executor=make_executor(request.workers, request.executor),
        device=str(device),
        progress=request.progress,
        data=data,
    )


def attack_logits(
    meta: dict[str, Any],
    target_logits: np.ndarray,
    keep: np.ndarray,
    data: Dataset,
    references: tuple[np.ndarray, np.ndarray] | None,
    *,
    target_dir: Path,
    request: AttackRequest,
    tid: str,
) -> dict[str, Any]:
    """Every attack on a target's logits ``float[N, Q, C]`` (and ``references`` = (keep [M, N],
    logits [M, N, Q, C]) when given); writes ``target_dir/{logits.npy, keep.npy, scores.npz}``
    and returns the target's results.json entry. The one path for checkpoints and for logits
    computed elsewhere."""
    specs = tuple(request.attacks)
    write_npy(target_dir / "logits.npy", target_logits)
    existing = target_dir / "keep.npy"
    if not existing.is_file() or not np.array_equal(np.load(existing, allow_pickle=False), keep):
        # another checkpoint attacked onto the same target id: its membership replaces the old one
        write_npy(existing, keep)
    ref_keep, ref_logits = references if references is not None else (None, None)
    inputs = AttackInputs(target_logits, data.y.numpy(), ref_logits, ref_keep, seed=request.seed)
    attack_results, scores = run_attacks(
        inputs,
        keep,
        specs,
        fpr_levels=request.fpr_levels,
        delta=request.delta,
        alpha=request.alpha,
        resamples=request.resamples,
        seed=request.seed,
    )
    atomic_write(target_dir / "scores.npz", lambda p: _savez(p, scores))
    privacy = meta.get("privacy", {})
    return {
        "id": tid,
        "mechanism": meta.get("mechanism"),
        "model": meta["model"],
        "privacy": {k: privacy.get(k) for k in ("epsilon", "delta", "accountant", "formal", "note")},
        "test_accuracy": meta.get("test_accuracy"),
        "train_accuracy": meta.get("train_accuracy"),
        "references": 0 if ref_keep is None else int(ref_keep.shape[0]),
        "queries": int(target_logits.shape[1]),
        "attacks": attack_results,
    }


def results_document(data: Dataset, data_options: dict[str, Any], seed: int, targets: list[dict[str, Any]]):
    """The results.json document (schema mia-audit/results/v1)."""
    return {
        "schema": RESULTS_SCHEMA,
        "dataset": {
            "id": data.id,
            "population": data.population,
            "sha256": data.sha256,
            "options": data_options,
        },
        "seed": seed,
        "targets": targets,
    }


def attack_target(request: AttackRequest, out: str | Path) -> dict[str, Any]:
    """Attack the checkpoint in ``request.target``; write signals, references and results.json."""
    out = Path(out)
    checkpoint = load_checkpoint(request.target)
    meta = checkpoint.meta
    named = meta.get("model")
    if not isinstance(named, str):
        raise ValueError(f"{request.target}/model.json: 'model' must be a model name, got {named!r}")
    if ":" in named and named != request.model:
        raise ValueError(
            f"{request.target}/model.json names the user model factory {named!r}: mia-audit imports and "
            f"runs a factory only when you name it yourself; pass --model {named} to confirm"
        )
    data = load_target_data(meta)
    tid = target_id(meta)
    entry = attack_checkpoint(
        meta,
        checkpoint.state_dict,
        checkpoint.keep,
        data,
        target_dir=inside(out, "targets", tid),
        references_dir=inside(out, "references", tid),
        request=request,
        tid=tid,
    )
    audits = audits_for_checkpoint(request.target, meta, delta=request.delta)
    if audits:  # trained with gradient canaries ('mia-audit canary' or a run's target)
        entry["canary_audits"] = audits
    results = results_document(data, meta["dataset"].get("options", {}), request.seed, [entry])
    write_json(out / "results.json", results)
    return results


def _savez(path: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


def load_results(path: str | Path) -> dict[str, Any]:
    data = json.loads(Path(path).read_text())
    if data.get("schema") != RESULTS_SCHEMA:
        raise ValueError(f"{path} is not a mia-audit results file (schema {data.get('schema')!r})")
    return data
