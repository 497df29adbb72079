"""``mia-audit run``: every mechanism x budget -> target, references, attacks, report.

Resumable: a target whose ``model.json`` exists is not retrained, finished reference models
are reused, and every file is written atomically.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from mechanisms import get_mechanism
from reports import TargetArrays, render_html, render_markdown

from .attack import (
    AttackRequest,
    attack_checkpoint,
    default_queries,
    load_results,
    parse_attack_spec,
    results_document,
)
from .blackbox import run_twin_job, twin_audit, twin_job, write_twin
from .canary import audits_for_checkpoint
from .checkpoint import load_checkpoint
from .config import RunConfig
from .data import DataOptions, Dataset, load_dataset, shared_payload
from .executors import Executor, make_executor
from .files import check_id, holds_files, inside, write_json, write_text
from .train import TrainRequest, target_job, write_target

__all__ = ["render_report", "run"]

logger = logging.getLogger(__name__)


def _targets(config: RunConfig) -> list[tuple[str, str, dict[str, Any], str]]:
    """(target id, mechanism, options, model) for every mechanism x budget."""
    out = []
    for spec in config.mechanisms:
        for budget in spec.budgets or (None,):
            options = dict(spec.options)
            tid = spec.id or spec.name
            if budget is not None:
                options["epsilon"] = budget
                tid = f"{tid}-eps{budget:g}"
            out.append((tid, spec.name, options, spec.model or config.model))
    ids = [check_id(t[0], "target id") for t in out]
    if len(set(ids)) != len(ids):
        raise ValueError(f"two targets share an id in the configuration: {ids}")
    return out


def check_plan(config: RunConfig) -> tuple[list[tuple[str, str, dict[str, Any], str]], Any]:
    """Everything a run will need, checked before anything is trained or written: target ids,
    mechanisms and their options (types and ranges), models, attack specs and options, the
    dataset and its options. Returns the targets and the loaded dataset; raises ValueError
    naming what is wrong (a bad option of the last mechanism must not surface after the
    first ones have trained for an hour)."""
    from mechanisms import config_from_mapping
    from mechanisms.models import model_names

    plan = _targets(config)
    for tid, mechanism, options, model in plan:
        try:
            config_from_mapping(get_mechanism(mechanism).config_type, options)
        except (TypeError, ValueError) as err:
            raise ValueError(f"target {tid}: {err}") from None
        if ":" not in model and model not in model_names():
            raise ValueError(
                f"target {tid}: unknown model {model!r}; known models: {', '.join(model_names())}"
            )
    for spec in config.attacks:
        parse_attack_spec(spec)
    _request(config, progress=False)
    data = load_dataset(config.dataset, DataOptions(**config.data_options))
    return plan, data


def _request(config: RunConfig, *, progress: bool) -> AttackRequest:
    return AttackRequest(
        target="",
        attacks=config.attacks,
        references=config.references,
        workers=config.workers,
        queries=config.queries,
        fpr_levels=config.fpr_levels,
        delta=config.delta,
        alpha=config.alpha,
        resamples=config.resamples,
        seed=config.seed,
        device=config.device,
        progress=progress,
        executor=config.executor,
    )


def run(
    config: RunConfig, out: str | Path, *, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train, attack and report every target of ``config`` into ``out``."""
    out = Path(out)
    resolved = config.to_toml()
    existing = out / "config.toml"
    if existing.is_file() and existing.read_text(encoding="utf-8") != resolved and not overwrite:
        raise ValueError(
            f"{out} holds a run with another configuration ({existing}); use another --out, or --overwrite "
            "to replace it"
        )
    if holds_files(out) and not existing.is_file() and not overwrite:
        raise ValueError(f"output directory {str(out)!r} already holds other files; pass --overwrite")
    plan, data = check_plan(config)
    data_opts = DataOptions(**config.data_options)
    held_out = data.population - data.population // 2  # every target's non-members
    c = config.canaries
    if c.inputs and c.input_kind == "mislabelled" and c.inputs > held_out:
        raise ValueError(
            f"[canaries] inputs = {c.inputs}: only {held_out} held-out examples of {data.id} can serve as "
            'mislabelled canaries; ask for fewer, or input_kind = "ood"'
        )
    write_text(existing, resolved)
    request = _request(config, progress=progress)
    executor = make_executor(config.workers, config.executor)
    todo: list[tuple[Path, TrainRequest]] = []
    white_box: dict[str, Any] = {}  # target id -> the white-box canary settings it trains with, or None
    for k, (tid, mechanism, options, model) in enumerate(plan, 1):
        tdir = inside(out, "targets", tid)
        canaries = white_box[tid] = _gradient_canaries(config, tid, mechanism, options)
        stale = (tdir / "model.json").is_file() and _changed(tdir, model, mechanism, options, config, data)
        if stale:
            # trained with another recipe: its references and twin are the old recipe's too
            logger.info("target %s: the configuration changed it; training it again", tid)
            if progress:
                print(f"[{k}/{len(plan)}] target {tid}: its recipe changed, training it again", flush=True)
            shutil.rmtree(inside(out, "references", tid), ignore_errors=True)
            shutil.rmtree(tdir, ignore_errors=True)
        if not (tdir / "model.json").is_file() or not _has_canaries(tdir, canaries):
            todo.append(
                (
                    tdir,
                    TrainRequest(
                        dataset=config.dataset,
                        model=model,
                        mechanism=mechanism,
                        options=options,
                        data_options=data_opts,
                        seed=config.seed,
                        device=config.device,
                        progress=False,
                        canaries=canaries,
                    ),
                )
            )
        elif progress:
            print(f"[{k}/{len(plan)}] target {tid}: reusing the trained model", flush=True)
    _train_targets(todo, data, executor, progress)
    if config.canaries.inputs > 0:
        _train_twins(plan, out, config, data, request, executor, progress)
    entries = []
    for k, (tid, _mechanism, _options, _model) in enumerate(plan, 1):
        tdir = inside(out, "targets", tid)
        ck = load_checkpoint(tdir)
        if progress:
            print(f"[{k}/{len(plan)}] attacking target {tid}", flush=True)
        entry = attack_checkpoint(
            ck.meta,
            ck.state_dict,
            ck.keep,
            data,
            target_dir=tdir,
            references_dir=inside(out, "references", tid),
            request=request,
            tid=tid,
        )
        if white_box[tid] is not None:
            entry["canary_audits"] = audits_for_checkpoint(tdir, ck.meta, delta=config.delta)
        if config.canaries.inputs > 0:
            twin = twin_audit(tdir, data, delta=config.delta, confidence=config.canaries.confidence)
            entry.setdefault("canary_audits", []).append(twin)
        entries.append(entry)
    results = results_document(data, data_opts.to_json(), config.seed, entries)
    write_json(out / "results.json", results)
    render_report(out, data=data)
    return results


def _gradient_canaries(config: RunConfig, tid: str, mechanism: str, options: dict[str, Any]) -> Any:
    """The white-box canary settings target ``tid`` (``mechanism`` with ``options``) trains
    with, or None: none asked for, no gradient, or a setting whose gradient the canaries cannot
    stand for (encoding's microbatches), which is logged as a warning."""
    c = config.canaries
    if not c.enabled:
        return None
    reason = _canaries_refused(mechanism, options)
    if reason is not None and get_mechanism(mechanism).gradient_canaries:
        logger.warning("target %s: no white-box canaries: %s", tid, reason)
    return c if reason is None else None


def _canaries_refused(mechanism: str, options: dict[str, Any]) -> str | None:
    from mechanisms import config_from_mapping

    entry = get_mechanism(mechanism)
    if not entry.gradient_canaries:
        return "no gradient to plant canaries in"
    return entry.canaries_refused(config_from_mapping(entry.config_type, options))


def _train_targets(
    todo: list[tuple[Path, TrainRequest]], data: Dataset, executor: Executor, progress: bool
) -> None:
    """Train the targets of ``todo`` through ``executor`` (independent targets at once); the
    driver writes each checkpoint as soon as its job returns, so a killed run keeps them."""
    if not todo:
        return
    from tqdm.auto import tqdm

    jobs = [{"request": request, "sha256": data.sha256} for _, request in todo]
    names = ", ".join(tdir.name for tdir, _ in todo)
    if progress:
        print(f"training {len(todo)} target(s): {names}", flush=True)
    with tqdm(total=len(todo), desc="targets", disable=not progress, unit="model") as bar:
        for i, trained in executor.map(target_job, jobs, shared_payload(data)):
            tdir, request = todo[i]
            write_target(tdir, request, trained)
            logger.info("trained target %s", tdir.name)
            bar.update(1)


def _train_twins(
    plan: list[tuple[str, str, dict[str, Any], str]],
    out: Path,
    config: RunConfig,
    data: Dataset,
    request: AttackRequest,
    executor: Executor,
    progress: bool,
) -> None:
    """Train the canary twins that are missing (or were made with other settings), at once."""
    from tqdm.auto import tqdm

    jobs = []
    for tid, _mechanism, _options, _model in plan:
        tdir = inside(out, "targets", tid)
        job = twin_job(
            tdir,
            count=config.canaries.inputs,
            kind=config.canaries.input_kind,
            seed=config.seed,
            device_name=config.device,
            queries=request.queries or default_queries(data.input_shape),
        )
        if job is not None:
            jobs.append(job)
    if not jobs:
        return
    if progress:
        print(
            f"training {len(jobs)} canary twin(s), {config.canaries.inputs} input canaries each", flush=True
        )
    with tqdm(total=len(jobs), desc="canary twins", disable=not progress, unit="model") as bar:
        for i, twin in executor.map(run_twin_job, jobs, shared_payload(data)):
            write_twin(Path(jobs[i]["target"]), twin)
            bar.update(1)


def _changed(
    tdir: Path, model: str, mechanism: str, options: dict[str, Any], config: RunConfig, data: Dataset
) -> bool:
    """Whether the target trained in ``tdir`` differs from what the configuration asks now."""
    import dataclasses
    import json

    from mechanisms import config_from_mapping

    try:
        meta = json.loads((tdir / "model.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    wanted = config_from_mapping(get_mechanism(mechanism).config_type, options)
    hyper = json.loads(json.dumps({k: v for k, v in dataclasses.asdict(wanted).items() if k != "progress"}))
    return (
        meta.get("model") != model
        or meta.get("mechanism") != mechanism
        or meta.get("seed") != config.seed
        or (meta.get("dataset") or {}).get("sha256") != data.sha256
        or meta.get("hyperparameters") != hyper
    )


def _has_canaries(tdir: Path, wanted: Any) -> bool:
    """Whether a trained target carries the canary audit the configuration asks for (a target
    trained without canaries, or with other settings, is trained again)."""
    if wanted is None:
        return True
    import json

    meta = json.loads((tdir / "model.json").read_text(encoding="utf-8"))
    have = meta.get("canaries") or {}
    return (
        all(have.get(k) == v for k, v in wanted.gradient_json().items()) and (tdir / "canaries.npz").is_file()
    )


def _arrays(run_dir: Path, tid: str) -> TargetArrays | None:
    tdir = inside(run_dir, "targets", tid)
    if not (tdir / "scores.npz").is_file() or not (tdir / "keep.npy").is_file():
        return None
    with np.load(tdir / "scores.npz", allow_pickle=False) as z:
        scores = {k: z[k] for k in z.files}
    return TargetArrays(scores, np.load(tdir / "keep.npy", allow_pickle=False))


def render_report(
    run_dir: str | Path, *, data: Dataset | None = None, notes: list[str] | None = None
) -> Path:
    """(Re-)render ``report.html`` and ``summary.md`` of a run folder from its files."""
    run_dir = Path(run_dir)
    results = load_results(run_dir / "results.json")
    if data is None:
        ds = results["dataset"]
        data = load_dataset(ds["id"], DataOptions(**ds.get("options", {})))
        if data.sha256 != ds["sha256"]:
            notes = [*(notes or []), "the dataset changed since the run: thumbnails may not match"]
    arrays = {t["id"]: a for t in results["targets"] if (a := _arrays(run_dir, t["id"])) is not None}
    images = data.x.numpy() if data.kind == "image" else None
    page = render_html(
        results, arrays, data.y.numpy(), images, title=f"Privacy audit: {data.id}", notes=notes
    )
    write_text(run_dir / "report.html", page)
    write_text(run_dir / "summary.md", render_markdown(results))
    return run_dir / "report.html"
