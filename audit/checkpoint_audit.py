"""``mia-audit audit``: audit a checkpoint trained elsewhere, from its weights and membership.

References are trained with a recipe given as TOML::

    [recipe]
    mechanism = "sgd"
    options = { epochs = 20, batch_size = 64, lr = 0.05 }

Without a recipe only the reference-free attacks run, and the results say which attacks were
not possible and why.

A canary audit cannot be added to a model after it was trained: canaries must be in (or, at
random, out of) the training set. A user who planted a canary set exported by ``mia-audit
canary-set`` passes it with ``--canaries FILE.npz``; its canaries are then scored on the
checkpoint (black box, by their loss) and bounded like a twin's.
"""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import numpy as np

from attacks import get_attack
from mechanisms import build_model, config_from_mapping, get_mechanism
from mechanisms.models import import_callable

from .attack import (
    AttackRequest,
    attack_logits,
    default_queries,
    parse_attack_spec,
    results_document,
    train_references,
)
from .blackbox import blackbox_audit, canary_scores, load_input_canaries
from .checkpoint import WRAPPER_PREFIXES, apply_weights, load_weights, strip_wrappers
from .data import DataOptions, Dataset
from .files import write_json
from .signals import model_logits
from .signals_io import load_reference_signals, load_target_logits
from .train import heldout_accuracy, released, resolve_device

__all__ = ["audit_checkpoint", "read_members", "read_recipe"]


def read_members(population: int, members: str | None, member_indices: str | None) -> np.ndarray:
    """A bool [N] membership mask from ``--members FILE.npy`` or ``--member-indices FILE``."""
    if (members is None) == (member_indices is None):
        raise ValueError("give exactly one of --members FILE.npy (bool mask) or --member-indices FILE")
    if members is not None:
        mask = np.load(members, allow_pickle=False)
        if mask.dtype != bool or mask.shape != (population,):
            raise ValueError(
                f"--members must hold a bool array of shape ({population},), got {mask.dtype} {mask.shape}"
            )
    else:
        path = Path(member_indices)  # type: ignore[arg-type]
        idx = (
            np.load(path, allow_pickle=False)
            if path.suffix == ".npy"
            else np.loadtxt(path, dtype=np.int64, ndmin=1)
        )
        idx = np.asarray(idx)
        if idx.dtype.kind not in "iu" or idx.ndim != 1:
            raise ValueError(f"--member-indices must hold integer indices, got {idx.dtype} {idx.shape}")
        if len(idx) and (idx.min() < 0 or idx.max() >= population):
            raise ValueError(
                f"--member-indices out of range: {idx.min()}..{idx.max()} for {population} examples"
            )
        if len(np.unique(idx)) != len(idx):
            raise ValueError("--member-indices contains duplicates")
        mask = np.zeros(population, dtype=bool)
        mask[idx] = True
    if mask.all() or not mask.any():
        raise ValueError(
            f"membership has {int(mask.sum())} members of {population}: need members and non-members"
        )
    return mask


def read_recipe(path: str) -> tuple[str, dict[str, Any], str | None]:
    """(mechanism, hyperparameters, trainer) from a recipe TOML.

    ``[recipe] mechanism = ...`` with ``options`` (validated by the mechanism's config), or
    ``[recipe] trainer = "package.module:function"`` with ``options`` passed to the user's
    function as keyword arguments (mechanism ``trainer``; its code is imported and run).
    """
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    unknown = sorted(set(raw) - {"recipe"})
    if unknown or "recipe" not in raw:
        raise ValueError(f"{path}: expected a [recipe] table with mechanism and options, found {sorted(raw)}")
    table = raw["recipe"]
    if not isinstance(table, dict):
        raise ValueError(f"{path}: [recipe] must be a table")
    bad = sorted(set(table) - {"mechanism", "options", "trainer"})
    if bad:
        raise ValueError(f"unknown key {bad[0]!r} in [recipe]; accepted: mechanism, options, trainer")
    options = table.get("options", {})
    if not isinstance(options, dict):
        raise ValueError(f"{path}: [recipe] options must be a table")
    if "trainer" in table:
        if "mechanism" in table:
            raise ValueError(f"{path}: give [recipe] mechanism or trainer, not both")
        trainer = table["trainer"]
        import_callable(trainer, "trainer")  # fails now, naming it, rather than in a worker
        return "trainer", dict(options), trainer
    mechanism = get_mechanism(table.get("mechanism", "sgd"))
    config = config_from_mapping(mechanism.config_type, dict(options))
    hyper = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    return mechanism.name, hyper, None


def _logits_accuracy(logits: np.ndarray, data: Dataset, members: np.ndarray) -> float:
    """Accuracy of precomputed logits (first query) on the non-members."""
    out = ~members
    return float((logits[out, 0].argmax(-1) == data.y.numpy()[out]).mean())


def audit_checkpoint(
    weights: str | None,
    *,
    model: str | None,
    data: Dataset,
    data_options: DataOptions,
    members: np.ndarray,
    recipe: str | None,
    request: AttackRequest,
    out: str | Path,
    canaries: str | None = None,
    epsilon: float | None = None,
    logits: str | None = None,
    reference_logits: str | None = None,
) -> dict[str, Any]:
    """Attack a model trained elsewhere, from its ``weights`` (with the ``model`` architecture)
    or from its precomputed ``logits``; references are trained with a ``recipe`` (one of
    mia-audit's mechanisms or the user's ``trainer``) or read from ``reference_logits``. With
    ``canaries`` (a canary file the user planted in its training) the checkpoint is also
    audited black-box; ``epsilon`` is the epsilon its training claims, to compare the bounds
    with (not verified: the entry says formal: false)."""
    out = Path(out)
    if (weights is None) == (logits is None):
        raise ValueError("give the model's WEIGHTS or its precomputed --logits FILE.npy (exactly one)")
    if weights is not None and model is None:
        raise ValueError("--model ID is needed with WEIGHTS (the architecture to load them into)")
    if reference_logits is not None and recipe is not None:
        raise ValueError(
            "give --recipe (train references) or --reference-logits (computed elsewhere), not both"
        )
    if canaries is not None and weights is None:
        raise ValueError("--canaries needs the model's WEIGHTS (the canaries are scored on the model)")
    planted = load_input_canaries(canaries, data) if canaries else None
    mechanism, hyper, trainer = read_recipe(recipe) if recipe else ("unknown", {}, None)
    device = resolve_device(request.device)
    stripped: list[str] = []
    inference = None
    if weights is not None:
        state, stripped = strip_wrappers(load_weights(weights))
        net = build_model(model, data.input_shape, data.num_classes).to(device)
        inference = released(net, mechanism, hyper, request.seed)
        apply_weights(inference.model, state)
        target_logits = model_logits(
            inference.model,
            data.x.to(device),
            queries=request.queries or default_queries(data.input_shape),
            stochastic=inference.stochastic,
        )
        test_acc, split = heldout_accuracy(inference.model, data, members, device, inference.passes)
    else:
        target_logits = load_target_logits(logits, data.population, data.num_classes)
        test_acc, split = _logits_accuracy(target_logits, data, members), "population-out"
    queries = int(target_logits.shape[1])
    meta = {
        "model": model or "unknown",
        "mechanism": mechanism,
        "dataset": {"id": data.id, "options": data_options.to_json(), "sha256": data.sha256},
        "hyperparameters": hyper,
        "privacy": {
            "formal": False,
            "note": "audited checkpoint: how it was trained is not verified by mia-audit",
        },
        "test_accuracy": test_acc,
        "train_accuracy": None,
    }
    if trainer is not None:
        meta["trainer"] = trainer
    can_reference = reference_logits is not None or (recipe is not None and model is not None)
    specs, not_run = [], []
    for spec in request.attacks:
        name, _ = parse_attack_spec(spec)
        if get_attack(name).needs_references and not can_reference:
            not_run.append(
                f"{spec}: not run, it needs reference models: pass their logits (--reference-logits DIR) or "
                "the training recipe to train them (--recipe RECIPE.toml, with --model)"
            )
        else:
            specs.append(spec)
    if not specs:
        raise ValueError(
            "no attack can run: every requested attack needs reference models; pass --reference-logits or --recipe"
        )
    request = dataclasses.replace(request, attacks=tuple(specs))
    needs_refs = any(get_attack(parse_attack_spec(s)[0]).needs_references for s in specs)
    references = None
    if needs_refs and reference_logits is not None:
        references = load_reference_signals(reference_logits, data.population, data.num_classes)
        if references[1].shape[2] != queries:
            raise ValueError(
                f"{reference_logits}: reference logits have {references[1].shape[2]} queries, the target's {queries}"
            )
    elif needs_refs:
        if request.references < 2:
            raise ValueError(
                f"attacks {', '.join(specs)} need at least 2 reference models, got {request.references}"
            )
        stochastic = inference.stochastic if inference is not None else False
        references = train_references(
            meta,
            data,
            out / "references" / "audit",
            request,
            queries=queries,
            stochastic=stochastic,
            device=device,
        )
    entry = attack_logits(
        meta,
        target_logits,
        members,
        data,
        references,
        target_dir=out / "targets" / "audit",
        request=request,
        tid="audit",
    )
    if stripped:
        entry["checkpoint_prefixes_removed"] = [f"{p} ({WRAPPER_PREFIXES[p]})" for p in stripped]
    if planted is not None:
        assert inference is not None
        scores = canary_scores(
            inference.model, planted, device, queries=queries, stochastic=inference.stochastic
        )
        entry["canary_audits"] = [
            blackbox_audit(
                scores,
                planted,
                delta=request.delta,
                confidence=1 - request.alpha,
                accountant_epsilon=epsilon,
                formal=False,
                extra={"canary_file": str(canaries)},
            )
        ]
    else:
        not_run.append(
            "canary audit: not run, canaries cannot be added to a model after training; plant a canary "
            "set from 'mia-audit canary-set' in its training and pass it with --canaries FILE.npz"
        )
    entry["not_run"] = not_run
    entry["test_split"] = split
    results = results_document(data, data_options.to_json(), request.seed, [entry])
    write_json(out / "results.json", results)
    return results
