"""Reference ("shadow") models: the target's exact recipe on balanced random halves.

Layout of a references folder (DESIGN.md)::

    recipe.json        dataset (id, options, sha256), model, mechanism, hyperparameters,
                       queries, seed, count M: everything that must match to reuse the folder
    keep.npy           bool [M, N]; every example is IN for exactly M/2 references
    logits/<i>.npy     float32 [N, Q, C], written (atomically) as soon as reference i finishes

A finished reference is never trained again: an interrupted run resumes with the missing ones.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .data import Dataset, load_verified, shared_payload
from .executors import Executor, SerialExecutor
from .files import write_json, write_npy

__all__ = ["Recipe", "balanced_keep", "ensure_references", "load_reference_logits"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Recipe:
    """What defines a reference model: the target's data, model, mechanism and options."""

    dataset: str
    data_options: dict[str, Any]
    data_sha256: str
    model: str
    mechanism: str
    hyperparameters: dict[str, Any]
    queries: int
    stochastic: bool
    seed: int
    trainer: str | None = None  # the user's training function (package.module:function)

    @classmethod
    def from_target_meta(
        cls, meta: dict[str, Any], *, queries: int, seed: int, stochastic: bool = False
    ) -> Recipe:
        """The target's recipe. A noise multiplier calibrated from a target epsilon is reused
        as it is (the same sigma for the same q and steps), so references skip calibration."""
        hyper = dict(meta["hyperparameters"])
        sigma = meta.get("privacy", {}).get("noise_multiplier")
        if hyper.get("epsilon") is not None and sigma is not None:
            hyper["epsilon"], hyper["noise_multiplier"] = None, sigma
        return cls(
            dataset=meta["dataset"]["id"],
            data_options=meta["dataset"]["options"],
            data_sha256=meta["dataset"]["sha256"],
            model=meta["model"],
            mechanism=meta["mechanism"],
            hyperparameters=hyper,
            queries=queries,
            stochastic=stochastic,
            seed=seed,
            trainer=meta.get("trainer"),
        )

    def to_json(self) -> dict[str, Any]:
        out = dict(self.__dict__)
        if out["trainer"] is None:  # recipes of mia-audit's own mechanisms: as before
            del out["trainer"]
        return out


def _differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key), b.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _differences(va, vb, f"{prefix}{key}.")
        elif va != vb:
            out.append(f"{prefix}{key}: {vb!r} in the folder, {va!r} for this target")
    return out


def balanced_keep(m: int, n: int, rng: np.random.Generator) -> np.ndarray:
    """bool [m, n]: each column has exactly m/2 True (arg-sort a uniform matrix per column)."""
    if m < 2 or m % 2:
        raise ValueError(f"the number of references must be even and >= 2, got {m}")
    return np.argsort(rng.random((m, n)), axis=0) < m // 2


@functools.lru_cache(maxsize=2)
def _dataset(id: str, options_json: str, sha256: str) -> Dataset:
    # cached per worker process: a worker trains several references on the same data
    return load_verified(id, json.loads(options_json), sha256)


def train_reference(job: dict[str, Any]) -> dict[str, Any]:
    """Train reference ``job['index']`` and return its logits; runs in a worker process, perhaps
    on another machine (the caller writes the logits)."""
    import torch

    from mechanisms import get_mechanism

    from .signals import model_logits
    from .train import fit, heldout_accuracy

    recipe = job["recipe"]
    data = _dataset(
        recipe["dataset"], json.dumps(recipe["data_options"], sort_keys=True), recipe["data_sha256"]
    )
    device = torch.device(job["device"])
    members = np.asarray(job["keep"], dtype=bool)
    if recipe.get("trainer"):
        from .train import fit_with_trainer

        model = fit_with_trainer(
            data,
            model_name=recipe["model"],
            trainer=recipe["trainer"],
            options=recipe["hyperparameters"],
            members=members,
            init_seed=job["init_seed"],
            train_seed=job["train_seed"],
            device=device,
        )
        logits = model_logits(model, data.x.to(device), queries=recipe["queries"], stochastic=False)
        return {"index": job["index"], "logits": logits.astype(np.float32)}
    fitted = fit(
        data,
        model_name=recipe["model"],
        mechanism_name=recipe["mechanism"],
        options=recipe["hyperparameters"],
        members=members,
        init_seed=job["init_seed"],
        train_seed=job["train_seed"],
        device=device,
    )
    logits = model_logits(
        fitted.model, data.x.to(device), queries=recipe["queries"], stochastic=recipe["stochastic"]
    )
    passes = get_mechanism(recipe["mechanism"]).eval_passes(fitted.config)
    acc, _ = heldout_accuracy(fitted.model, data, members, device, passes)
    return {
        "index": job["index"],
        "logits": logits.astype(np.float32),
        "test_accuracy": acc,
        "seconds": fitted.seconds,
    }


def ensure_references(
    folder: str | Path,
    recipe: Recipe,
    count: int,
    population: int,
    *,
    executor: Executor | None = None,
    device: str = "cpu",
    progress: bool = False,
    data: Dataset | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Train the references of ``folder`` that are missing; return (keep [M, N], logits [M, N, Q, C]).

    Each reference's logits are written (atomically) here as soon as it finishes, so a killed
    run resumes with the missing ones whichever executor trained them. ``data`` (the recipe's
    dataset) is shipped to executors that want it. A folder made for another recipe is
    refused, naming the first differences.
    """
    folder = Path(folder)
    recipe_json = recipe.to_json()
    if (folder / "recipe.json").is_file():
        saved = json.loads((folder / "recipe.json").read_text())
        diff = _differences(recipe_json, saved)
        if diff:
            raise ValueError(
                f"references in {folder} were trained with another recipe: " + "; ".join(diff[:3])
            )
    else:
        write_json(folder / "recipe.json", recipe_json)
    if (folder / "keep.npy").is_file():
        keep = np.load(folder / "keep.npy", allow_pickle=False)
        if keep.shape != (count, population):
            raise ValueError(
                f"{folder / 'keep.npy'} is for {keep.shape[0]} references over {keep.shape[1]} examples, "
                f"asked for {count} over {population}; use another output folder or the same count"
            )
    else:
        keep = balanced_keep(
            count, population, np.random.default_rng(np.random.SeedSequence([recipe.seed, 2]))
        )
        write_npy(folder / "keep.npy", keep)
    children = np.random.SeedSequence([recipe.seed, 1]).spawn(count)
    jobs = []
    for i in range(count):
        if (folder / "logits" / f"{i}.npy").is_file():
            continue
        init_seed, train_seed = (int(v) for v in children[i].generate_state(2))
        jobs.append(
            {
                "index": i,
                "recipe": recipe_json,
                "keep": keep[i],
                "init_seed": init_seed,
                "train_seed": train_seed,
                "device": device,
            }
        )
    if jobs:
        logger.info("training %d of %d reference models", len(jobs), count)
        from tqdm.auto import tqdm

        with tqdm(
            total=count, initial=count - len(jobs), desc="references", disable=not progress, unit="model"
        ) as bar:
            shared = shared_payload(data) if data is not None and data.sha256 == recipe.data_sha256 else None
            for _, result in (executor or SerialExecutor()).map(train_reference, jobs, shared):
                write_npy(folder / "logits" / f"{result['index']}.npy", result["logits"])
                bar.update(1)
    return keep, load_reference_logits(folder, count)


def load_reference_logits(folder: str | Path, count: int) -> np.ndarray:
    folder = Path(folder)
    arrays = [np.load(folder / "logits" / f"{i}.npy", allow_pickle=False) for i in range(count)]
    return np.stack(arrays)
