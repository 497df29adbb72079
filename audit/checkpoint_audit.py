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

from .attack import AttackRequest, attack_checkpoint, default_queries, parse_attack_spec, results_document
from .blackbox import blackbox_audit, canary_scores, load_input_canaries
from .checkpoint import apply_weights, load_weights
from .data import DataOptions, Dataset
from .files import write_json
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


def read_recipe(path: str) -> tuple[str, dict[str, Any]]:
    """(mechanism, full hyperparameters) from a recipe TOML; validated by the mechanism's config."""
    raw = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    unknown = sorted(set(raw) - {"recipe"})
    if unknown or "recipe" not in raw:
        raise ValueError(f"{path}: expected a [recipe] table with mechanism and options, found {sorted(raw)}")
    table = raw["recipe"]
    bad = sorted(set(table) - {"mechanism", "options"})
    if bad:
        raise ValueError(f"unknown key {bad[0]!r} in [recipe]; accepted: mechanism, options")
    mechanism = get_mechanism(table.get("mechanism", "sgd"))
    config = config_from_mapping(mechanism.config_type, dict(table.get("options", {})))
    hyper = {k: v for k, v in dataclasses.asdict(config).items() if k != "progress"}
    return mechanism.name, hyper


def audit_checkpoint(
    weights: str,
    *,
    model: str,
    data: Dataset,
    data_options: DataOptions,
    members: np.ndarray,
    recipe: str | None,
    request: AttackRequest,
    out: str | Path,
    canaries: str | None = None,
    epsilon: float | None = None,
) -> dict[str, Any]:
    """Attack a checkpoint trained elsewhere; with ``canaries`` (a canary file the user planted
    in its training), also audit it black-box; ``epsilon`` is the epsilon its training claims,
    to compare the bounds with (not verified: the entry says formal: false)."""
    out = Path(out)
    planted = load_input_canaries(canaries, data) if canaries else None
    state = load_weights(weights)
    device = resolve_device(request.device)
    net = build_model(model, data.input_shape, data.num_classes).to(device)
    mechanism, hyper = read_recipe(recipe) if recipe else ("unknown", {})
    inference = released(net, mechanism, hyper, request.seed)
    apply_weights(inference.model, state)
    test_acc, split = heldout_accuracy(inference.model, data, members, device, inference.passes)
    meta = {
        "model": model,
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
    specs, not_run = [], []
    for spec in request.attacks:
        name, _ = parse_attack_spec(spec)
        if get_attack(name).needs_references and recipe is None:
            not_run.append(
                f"{spec}: not run, it needs reference models, and training them needs the "
                "checkpoint's training recipe (--recipe RECIPE.toml)"
            )
        else:
            specs.append(spec)
    if not specs:
        raise ValueError("no attack can run: every requested attack needs references; pass --recipe")
    request = dataclasses.replace(request, attacks=tuple(specs))
    entry = attack_checkpoint(
        meta,
        state,
        members,
        data,
        target_dir=out / "targets" / "audit",
        references_dir=out / "references" / "audit",
        request=request,
        tid="audit",
    )
    if planted is not None:
        scores = canary_scores(
            inference.model,
            planted,
            device,
            queries=request.queries or default_queries(data.input_shape),
            stochastic=inference.stochastic,
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
