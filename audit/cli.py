"""The ``mia-audit`` command line. Exit codes: 0 success, 1 gate failed (and only that), 2 usage,
configuration or input error, 3 an unexpected internal error (a bug: one line, the traceback
with ``--debug``), 130 interrupted."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attacks
from mechanisms import NonFiniteLossError, TrainConfig, get_mechanism, mechanism_names, model_names

from .checkpoint import CheckpointError
from .data import DataError, DataOptions, dataset_names
from .executors import JobError
from .gate import GateError

__all__ = ["main"]

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3


class UsageError(ValueError):
    """Bad command-line input: printed and answered with exit code 2."""


def _field_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        tp = args[0]
    return tp


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _mechanism_fields() -> dict[str, tuple[type, set[str]]]:
    """Option fields that mechanisms add to TrainConfig: name -> (type, mechanisms using it)."""
    base = {f.name for f in dataclasses.fields(TrainConfig)}
    out: dict[str, tuple[type, set[str]]] = {}
    for name in mechanism_names():
        cls = get_mechanism(name).config_type
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name in base:
                continue
            tp = _field_type(hints[f.name])
            out.setdefault(f.name, (tp, set()))[1].add(name)
    return out


def _add_data_args(p: argparse.ArgumentParser, default: str | None = None) -> None:
    g = p.add_argument_group("data")
    if default is None:
        g.add_argument("--dataset", required=True, help="dataset id (see 'mia-audit datasets')")
    else:
        g.add_argument(
            "--dataset", default=default, help=f"dataset id (see 'mia-audit datasets'; default {default})"
        )
    g.add_argument("--data-root", help="folder holding torchvision datasets")
    g.add_argument("--download", action="store_true", help="download torchvision datasets to --data-root")
    g.add_argument("--label-column", help="label column of a csv:PATH dataset")
    for f in dataclasses.fields(DataOptions):
        if f.name.startswith("synthetic_"):
            g.add_argument(
                _flag(f.name),
                type=int,
                default=f.default,
                help=f"synthetic dataset: {f.name[10:]} (default {f.default})",
            )


def _data_options(args: argparse.Namespace) -> DataOptions:
    return DataOptions(
        data_root=args.data_root,
        download=args.download,
        label_column=args.label_column,
        synthetic_samples=args.synthetic_samples,
        synthetic_features=args.synthetic_features,
        synthetic_classes=args.synthetic_classes,
        synthetic_seed=args.synthetic_seed,
    )


def _add_train_args(p: argparse.ArgumentParser, *, canary: bool = False) -> None:
    _add_data_args(p, "mnist5k" if canary else None)
    g = p.add_argument_group("model and training")
    model_help = "model name (see 'mia-audit models') or package.module:factory"
    if canary:
        g.add_argument("--model", default="cnn", help=model_help + " (default cnn)")
        g.add_argument(
            "--mechanism", required=True, help="gradient mechanism to audit (see 'mia-audit mechanisms')"
        )
    else:
        g.add_argument("--model", required=True, help=model_help)
        g.add_argument(
            "--mechanism", default="sgd", help="training mechanism (see 'mia-audit mechanisms'; default sgd)"
        )
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "progress":
            continue
        g.add_argument(
            _flag(f.name), type=_field_type(hints[f.name]), default=None, help=f"(default {f.default})"
        )
    g.add_argument("--seed", type=int, default=0, help="root seed (default 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    g = p.add_argument_group("mechanism options (each applies to the mechanisms named)")
    for name, (tp, users) in sorted(_mechanism_fields().items()):
        helptext = "mechanisms: " + ", ".join(sorted(users))
        if tp is bool:
            g.add_argument(_flag(name), action=argparse.BooleanOptionalAction, default=None, help=helptext)
        else:
            g.add_argument(_flag(name), type=tp, default=None, help=helptext)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory for the checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_executor_args(g: Any) -> None:
    g.add_argument(
        "--executor",
        choices=["local", "ray"],
        default=None,
        help="where reference models train: local worker processes (default) or Ray",
    )
    g.add_argument(
        "--ray-address",
        default=None,
        help="join the Ray cluster at ADDRESS (e.g. 10.0.0.1:6379); default: start Ray on this machine",
    )


def _executor_settings(args: argparse.Namespace, base: Any = None):
    """The [executor] settings of a configuration (or the defaults) with the flags on top."""
    from .executors import ExecutorSettings

    base = base or ExecutorSettings()
    kind = args.executor or ("ray" if args.ray_address else base.kind)
    address = args.ray_address if args.ray_address is not None else base.address
    return dataclasses.replace(base, kind=kind, address=address)


def _add_attack_args(p: argparse.ArgumentParser, *, references: int = 16) -> None:
    g = p.add_argument_group("attacks")
    g.add_argument(
        "--attacks",
        help="comma-separated attacks, each NAME or NAME:key=value[:key=value] "
        "(e.g. lira-online:fixed_variance=false); default: all",
    )
    g.add_argument(
        "--references", type=int, default=references, help=f"reference models (even; default {references})"
    )
    g.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    _add_executor_args(g)
    g.add_argument("--queries", type=int, default=None, help="queries per example (default 2 for images)")
    g.add_argument("--fpr-levels", default="0.001,0.01,0.1", help="FPR levels (default 0.001,0.01,0.1)")
    g.add_argument("--delta", type=float, default=1e-5, help="delta of the epsilon lower bound")
    g.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of intervals and bounds")
    g.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    g.add_argument("--seed", type=int, default=0, help="seed of references and bootstrap (default 0)")
    g.add_argument("--device", default="cpu", help="device (default cpu)")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--overwrite", action="store_true", help="recompute an existing results.json")
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def _train_options(args: argparse.Namespace) -> dict[str, Any]:
    mechanism = get_mechanism(args.mechanism)
    accepted = {f.name for f in dataclasses.fields(mechanism.config_type)}
    values: dict[str, Any] = {}
    candidates = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "progress"]
    candidates += list(_mechanism_fields())
    for name in candidates:
        value = getattr(args, name, None)
        if value is None:
            continue
        if name not in accepted:
            raise UsageError(f"{_flag(name)} does not apply to mechanism {args.mechanism!r}")
        values[name] = value
    return values


def _attack_request(args: argparse.Namespace, target: str = ""):
    from .attack import AttackRequest, parse_attack_spec

    if args.attacks:
        specs = tuple(a.strip() for a in args.attacks.split(",") if a.strip())
    else:
        specs = tuple(attacks.attack_names())
    for spec in specs:
        parse_attack_spec(spec)  # fail fast on unknown names or options
    try:
        levels = tuple(float(v) for v in args.fpr_levels.split(","))
    except ValueError as err:
        raise UsageError(f"--fpr-levels must be comma-separated numbers, got {args.fpr_levels!r}") from err
    if (Path(args.out) / "results.json").exists() and not args.overwrite:
        raise UsageError(
            f"{Path(args.out) / 'results.json'} exists; pass --overwrite to recompute it "
            "(finished reference models are reused either way)"
        )
    return AttackRequest(
        target=target,
        attacks=specs,
        references=args.references,
        workers=args.workers,
        queries=args.queries,
        fpr_levels=levels,
        delta=args.delta,
        alpha=args.alpha,
        resamples=args.resamples,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        model=getattr(args, "model", None),
        executor=_executor_settings(args),
    )


def _print_results(results: dict, out: Path) -> None:
    for target in results["targets"]:
        acc = target.get("test_accuracy")
        acc_text = "n/a" if acc is None else f"{acc:.4f}"
        print(
            f"target {target['id']} ({target['model']}, held-out accuracy {acc_text}), "
            f"{target['references']} references, {target['queries']} queries"
        )
        for line in target.get("not_run", []):
            print(f"  {line}")
        print(
            f"{'attack':36s} {'AUC':>6s} {'AUC 95% CI':>15s} {'TPR@0.1%':>9s} {'TPR@1%':>8s} {'eps_lb':>7s}"
        )
        for name, m in target["attacks"].items():
            t = m["tpr_at_fpr"]
            print(
                f"{name:36s} {m['auc']:6.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] "
                f"{t.get('0.001', float('nan')):9.4f} {t.get('0.01', float('nan')):8.4f} {m['epsilon_lb']:7.3f}"
            )
    print(f"wrote {out / 'results.json'}")


def _train_request(args: argparse.Namespace, canaries: Any = None):
    """The training request of ``train`` and ``canary`` (after the output folder is checked)."""
    from .train import TrainRequest, check_output_dir

    check_output_dir(args.out, args.overwrite)
    return TrainRequest(
        dataset=args.dataset,
        model=args.model,
        mechanism=args.mechanism,
        options=_train_options(args),
        data_options=_data_options(args),
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
        canaries=canaries,
    )


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import train_target

    get_mechanism(args.mechanism)  # fail fast on an unknown name
    meta = train_target(_train_request(args), args.out)
    _print_trained(meta, Path(args.out))
    return EXIT_OK


def _print_trained(meta: dict[str, Any], out: Path) -> None:
    privacy = meta["privacy"]
    if privacy["formal"]:
        eps = f"epsilon={privacy['epsilon']:.4g} (delta={privacy['delta']:g}, {privacy['accountant']})"
    else:
        eps = "no formal guarantee"
    print(
        f"trained {meta['model']} with {meta['mechanism']} on {meta['dataset']['id']}: "
        f"train accuracy {meta['train_accuracy']:.4f}, held-out accuracy {meta['test_accuracy']:.4f} "
        f"({meta['test_split']}), {eps}, {meta['train_seconds']:.1f}s -> {out}"
    )


def _add_canary_args(p: argparse.ArgumentParser) -> None:
    from .canary import DEFAULT_COUNT, THREAT_MODELS

    g = p.add_argument_group("canary audit")
    g.add_argument(
        "--canaries",
        type=int,
        default=DEFAULT_COUNT,
        help=f"gradient canaries planted, calibration ones included (default {DEFAULT_COUNT:,})",
    )
    g.add_argument(
        "--threat-model",
        default=None,
        choices=[*THREAT_MODELS, "white-box", "black-box", "all"],
        help="what the auditor sees: every privatised step, the final weights (white-box: both; "
        "gradient canaries), or only the outputs (black-box: input canaries in a canary twin); "
        "default white-box for gradient mechanisms, else black-box",
    )
    g.add_argument(
        "--input-canaries",
        type=int,
        default=1000,
        help="black box: input canaries planted in the twin (default 1000)",
    )
    g.add_argument(
        "--input-kind",
        default="mislabelled",
        choices=["mislabelled", "ood"],
        help="black box: held-out images with a wrong label, or generated inputs (default mislabelled)",
    )
    g.add_argument(
        "--canary-norm", type=float, default=10.0, help="canary gradient norm in clipping norms (default 10)"
    )
    g.add_argument(
        "--calibration",
        type=float,
        default=0.25,
        help="share of canaries that only choose thresholds and guess counts (default 0.25)",
    )
    g.add_argument("--confidence", type=float, default=0.95, help="confidence of every bound (default 0.95)")


def _canary_settings(args: argparse.Namespace, gradient: bool):
    from .canary import THREAT_MODELS, CanarySettings

    choice = args.threat_model or ("white-box" if gradient else "black-box")
    white = {"all": THREAT_MODELS, "white-box": THREAT_MODELS, "black-box": ()}.get(choice, (choice,))
    black = choice in ("all", "black-box")
    if white and not gradient:
        raise UsageError(
            f"mechanism {args.mechanism!r} has no gradient to plant canaries in: audit it with "
            "--threat-model black-box (input canaries in a canary twin)"
        )
    if white and args.canaries < 100:
        raise UsageError(f"--canaries must be at least 100, got {args.canaries}")
    if black and args.input_canaries < 10:
        raise UsageError(f"--input-canaries must be at least 10, got {args.input_canaries}")
    try:
        return CanarySettings(
            count=args.canaries if white else 0,
            norm=args.canary_norm,
            calibration=args.calibration,
            threat_models=white or THREAT_MODELS,
            confidence=args.confidence,
            inputs=args.input_canaries if black else 0,
            input_kind=args.input_kind,
        )
    except ValueError as err:
        raise UsageError(str(err)) from err


def _print_canary_audits(target: dict[str, Any]) -> None:
    audits = target.get("canary_audits", [])
    if not audits:
        return
    for audit in audits:
        if audit["threat_model"] == "black-box":
            twin = audit.get("twin")
            where = "the canary twin's" if twin else "the"
            line = (
                f"black-box audit: {audit['m']:,} {audit['canary_kind']} input canaries "
                f"({audit['included']:,} in {where} training set)"
            )
            if twin:
                line += (
                    f"; twin held-out accuracy {twin['test_accuracy']:.4f} "
                    f"(target {twin['target_test_accuracy']:.4f} on the same examples)"
                )
            print(line)
        elif audit["threat_model"] == "white-box-steps" or audit is audits[0]:
            print(
                f"white-box audit: {audit['m'] + audit['calibration_canaries']:,} {audit['canary_kind']} canaries "
                f"({audit['m']:,} audited, {audit['calibration_canaries']:,} calibrating), "
                f"{audit['steps']} released steps"
            )
    first = audits[0]
    print(f"{'threat model':18s} {'method':16s} {'eps_lb':>7s} {'valid':>6s} {'conf.':>6s}  counts")
    for audit in audits:
        for b in audit["bounds"]:
            counts = ", ".join(f"{k}={v}" for k, v in b["counts"].items())
            flag = " (ceiling)" if b.get("saturated") else ""
            print(
                f"{audit['threat_model']:18s} {b['method']:16s} {b['epsilon_lb']:7.3f} "
                f"{'yes' if b['valid'] else 'no':>6s} {b['confidence']:6.1%}  {counts}{flag}"
            )
    eps = first.get("accountant_epsilon")
    best = max(audits, key=lambda a: a["strongest_valid"]["epsilon_lb"])
    sv = best["strongest_valid"]
    text = f"strongest valid bound {sv['epsilon_lb']:.3f} ({sv['method']}, {best['threat_model']})"
    if eps is None:
        print(text + "; the mechanism states no epsilon")
    elif sv["epsilon_lb"] > eps:
        kind = "accountant's" if first.get("formal") else "stated (not formal)"
        print(
            text + f" EXCEEDS the {kind} epsilon {eps:.4g}: a privacy bug or a wrong accounting "
            "(see 'mia-audit gate' for the check at the gate's confidence)"
        )
    else:
        print(
            text
            + f" <= epsilon {eps:.4g}"
            + (" (accountant)" if first.get("formal") else " (stated, not formal)")
        )


def _cmd_canary(args: argparse.Namespace) -> int:
    from .attack import results_document, target_id
    from .canary import audits_for_checkpoint
    from .data import load_dataset
    from .files import write_json
    from .pipeline import render_report
    from .train import train_target

    mechanism = get_mechanism(args.mechanism)
    settings = _canary_settings(args, mechanism.gradient_canaries)
    data = load_dataset(args.dataset, _data_options(args))
    held_out = data.population - data.population // 2  # the target's non-members
    if settings.inputs and settings.input_kind == "mislabelled" and settings.inputs > held_out:
        raise UsageError(
            f"--input-canaries {settings.inputs}: only {held_out} held-out examples of {data.id} can serve as "
            "mislabelled canaries; ask for fewer, or --input-kind ood"
        )
    request = _train_request(args, settings)
    out = Path(args.out)
    meta = train_target(request, out)
    _print_trained(meta, out)
    privacy = meta["privacy"]
    entry = {
        "id": target_id(meta),
        "mechanism": meta["mechanism"],
        "model": meta["model"],
        "privacy": {k: privacy.get(k) for k in ("epsilon", "delta", "accountant", "formal", "note")},
        "test_accuracy": meta["test_accuracy"],
        "train_accuracy": meta["train_accuracy"],
        "references": 0,
        "queries": 0,
        "attacks": {},
        "canary_audits": audits_for_checkpoint(out, meta, delta=1e-5),
    }
    if settings.inputs:
        from .attack import default_queries
        from .blackbox import train_twin

        entry["canary_audits"].append(
            train_twin(
                out,
                data,
                count=settings.inputs,
                kind=settings.input_kind,
                seed=args.seed,
                device_name=args.device,
                queries=default_queries(data.input_shape),
                delta=1e-5,
                confidence=settings.confidence,
                progress=not args.quiet,
            )
        )
    results = results_document(data, meta["dataset"]["options"], args.seed, [entry])
    write_json(out / "results.json", results)
    _print_canary_audits(entry)
    print(f"wrote {out / 'results.json'} and {render_report(out, data=data)}")
    return EXIT_OK


def _cmd_canary_set(args: argparse.Namespace) -> int:
    import numpy as np

    from .blackbox import input_canary_seed, make_input_canaries, save_input_canaries
    from .checkpoint_audit import read_members
    from .data import load_dataset

    out = Path(args.out)
    if out.suffix != ".npz":
        raise UsageError(f"--out must name a .npz file, got {str(out)!r}")
    if out.exists() and not args.overwrite:
        raise UsageError(f"{out} exists; pass --overwrite to replace it")
    if args.count < 10:
        raise UsageError(f"--count must be at least 10, got {args.count}")
    data = load_dataset(args.dataset, _data_options(args))
    if args.members or args.member_indices:
        held_out = ~read_members(data.population, args.members, args.member_indices)
    else:
        held_out = np.ones(data.population, dtype=bool)
    canaries = make_input_canaries(
        data, held_out, args.count, args.kind, np.random.default_rng(input_canary_seed(args.seed))
    )
    save_input_canaries(out, canaries)
    print(
        f"wrote {out}: {args.count} {args.kind} canaries of {data.id}, {int(canaries.included.sum())} to plant "
        "(arrays x, labels, included, source). Add x[included] with labels[included] to the training set, "
        "train, then run 'mia-audit audit WEIGHTS ... --canaries' with this file."
    )
    return EXIT_OK


def _cmd_attack(args: argparse.Namespace) -> int:
    from .attack import attack_target

    request = _attack_request(args, target=args.target)
    out = Path(args.out)
    _print_results(attack_target(request, out), out)
    return EXIT_OK


def _cmd_audit(args: argparse.Namespace) -> int:
    from .checkpoint_audit import audit_checkpoint, read_members
    from .data import load_dataset
    from .pipeline import render_report

    request = _attack_request(args)
    data = load_dataset(args.dataset, _data_options(args))
    members = read_members(data.population, args.members, args.member_indices)
    out = Path(args.out)
    results = audit_checkpoint(
        args.checkpoint,
        model=args.model,
        data=data,
        data_options=_data_options(args),
        members=members,
        recipe=args.recipe,
        request=request,
        out=out,
        canaries=args.canaries,
        epsilon=args.claimed_epsilon,
    )
    _print_results(results, out)
    for target in results["targets"]:
        _print_canary_audits(target)
    print(f"wrote {render_report(out, data=data)}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import run

    if args.config and args.preset:
        raise UsageError("give a CONFIG.toml or --preset, not both")
    config = load_config(args.config, preset=args.preset)
    config = dataclasses.replace(config, executor=_executor_settings(args, config.executor))
    if args.check:
        from .pipeline import check_plan

        plan, data = check_plan(config)
        print(f"{config.source}: valid; dataset {data.id} ({data.population} examples), {len(plan)} targets:")
        for tid, mechanism, options, model in plan:
            print(f"  {tid}: {mechanism} on {model} {options}")
        return EXIT_OK
    name = Path(args.config).stem if args.config else (args.preset or "quick")
    out = Path(args.out or f"runs/{name}")
    results = run(config, out, progress=not args.quiet, overwrite=args.overwrite)
    _print_results(results, out)
    print(f"wrote {out / 'report.html'} and {out / 'summary.md'}")
    return EXIT_OK


def _cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import render_report

    print(f"wrote {render_report(args.run_dir)}")
    return EXIT_OK


def _cmd_gate(args: argparse.Namespace) -> int:
    import json
    import shutil

    from .files import write_text
    from .gate import accountant_checks, compare, junit_xml, load_gate_limits
    from .schema import validate_results

    def read(path: str, what: str) -> dict:
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise GateError(f"cannot read {what} {path!r}: {err}") from err
        except RecursionError:
            raise GateError(f"cannot read {what} {path!r}: nested too deeply") from None
        return validate_results(doc, f"{what} {path}")

    current = read(args.results, "results")
    if args.update_baseline:
        if not args.baseline:
            raise UsageError("--update-baseline needs --baseline FILE")
        shutil.copyfile(args.results, args.baseline)  # validated by read(): only results the gate accepts
        print(f"baseline {args.baseline} updated from {args.results}")
        return EXIT_OK
    checks = accountant_checks(current)
    if args.baseline:
        checks += compare(current, read(args.baseline, "baseline"), load_gate_limits(args.config))
    if not checks:
        raise GateError(
            f"nothing to check in {args.results}: no baseline given and no valid epsilon bound of a target "
            "with a formal epsilon (pass --baseline, or audit a private mechanism)"
        )
    if args.junit:
        write_text(args.junit, junit_xml(checks))
    failed = [c for c in checks if not c.passed]
    for c in failed:
        print(f"FAIL {c.target} {c.attack} {c.metric}: {c.message}")
    print(
        f"gate: {len(checks) - len(failed)} of {len(checks)} checks passed" + (" -> FAILED" if failed else "")
    )
    return EXIT_GATE_FAILED if failed else EXIT_OK


def _cmd_list(kind: str) -> int:
    if kind == "datasets":
        print("\n".join(dataset_names()))
    elif kind == "models":
        print("\n".join([*model_names(), "package.module:factory"]))
    elif kind == "mechanisms":
        for name in mechanism_names():
            print(f"{name:12s} {get_mechanism(name).description}")
    else:
        for name in attacks.attack_names():
            print(f"{name:16s} {attacks.get_attack(name).description}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mia-audit",
        description="Membership-inference auditing for PyTorch: train privately, attack, measure leakage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    parser.add_argument("--debug", action="store_true", help="print the traceback of an internal error")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    run = sub.add_parser("run", help="train, attack and report every mechanism x budget of a configuration")
    run.add_argument("config", nargs="?", help="CONFIG.toml (default: the quick preset)")
    run.add_argument("--preset", help="a shipped preset: quick (default), smoke, paper")
    run.add_argument("--out", help="run directory (default runs/<config or preset name>)")
    run.add_argument("--overwrite", action="store_true", help="replace a run made with another configuration")
    run.add_argument("--quiet", action="store_true", help="no progress output")
    _add_executor_args(run)
    run.add_argument(
        "--check",
        action="store_true",
        help="check the configuration (options, models, attacks, data) and list its targets; train nothing",
    )
    train = sub.add_parser("train", help="train one target model on a random half of a dataset")
    _add_train_args(train)
    canary = sub.add_parser(
        "canary",
        help="audit a mechanism's privatisation white-box: train with gradient canaries, bound epsilon",
        description="Train a target with gradient canaries riding along (the model's weights are the "
        "same as without them) and turn what the canaries recorded into empirical epsilon lower "
        "bounds (one-run, f-DP one-run, Clopper-Pearson, and a Gaussian-DP estimate), to compare "
        "with the mechanism's accountant.",
    )
    _add_train_args(canary, canary=True)
    _add_canary_args(canary)
    attack = sub.add_parser("attack", help="attack a trained target with membership inference")
    attack.add_argument("--target", required=True, help="checkpoint directory written by 'mia-audit train'")
    attack.add_argument(
        "--model",
        help="confirm a user model factory (package.module:factory) that the checkpoint's model.json names: "
        "its code is imported only when you type it",
    )
    _add_attack_args(attack)
    audit = sub.add_parser("audit", help="audit a checkpoint trained elsewhere")
    audit.add_argument("checkpoint", help="weights: .safetensors, or a .pt/.pth state dict")
    audit.add_argument(
        "--model", required=True, help="architecture: a registry name or package.module:factory"
    )
    _add_data_args(audit)
    audit.add_argument("--members", help="bool [N] .npy mask of the population's training members")
    audit.add_argument("--member-indices", help="member indices: .npy int array or a text file, one per line")
    audit.add_argument("--recipe", help="TOML with [recipe] mechanism and options, for reference models")
    audit.add_argument(
        "--canaries",
        help="canary file (from 'mia-audit canary-set') whose included canaries were planted in the training "
        "set: audits the checkpoint black-box",
    )
    audit.add_argument(
        "--claimed-epsilon",
        type=float,
        help="the epsilon the checkpoint's training claims, to compare bounds with",
    )
    _add_attack_args(audit)
    cset = sub.add_parser(
        "canary-set",
        help="export input canaries to plant in your own training, for 'audit --canaries'",
        description="Draw input canaries (held-out images of the dataset with a random wrong label, or "
        "generated inputs), each marked for inclusion with probability 1/2, and write them to a .npz "
        "file. Plant the included ones in your training set; 'mia-audit audit --canaries' then bounds "
        "epsilon black-box from the trained model.",
    )
    _add_data_args(cset)
    cset.add_argument("--count", type=int, default=1000, help="number of canaries (default 1000)")
    cset.add_argument("--kind", default="mislabelled", choices=["mislabelled", "ood"], help="canary kind")
    cset.add_argument("--members", help="bool [N] .npy mask of your training members (canaries avoid them)")
    cset.add_argument("--member-indices", help="member indices (.npy or text, one per line)")
    cset.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    cset.add_argument("--out", required=True, help="output .npz file")
    cset.add_argument("--overwrite", action="store_true", help="replace an existing file")
    report = sub.add_parser("report", help="re-render report.html and summary.md of a run directory")
    report.add_argument("run_dir")
    gate = sub.add_parser(
        "gate",
        help="exit 1 when leakage grew beyond a baseline, or a valid bound exceeds an accountant's epsilon",
    )
    gate.add_argument("results", help="results.json of the new run")
    gate.add_argument(
        "--baseline",
        help="baseline results.json (without one, only the checks against the accountants' epsilons run)",
    )
    gate.add_argument("--config", help="configuration whose [gate] table sets absolute limits and the margin")
    gate.add_argument("--junit", help="write a JUnit XML file, one test case per check")
    gate.add_argument(
        "--update-baseline", action="store_true", help="copy RESULTS.json to the baseline and pass"
    )
    for kind in ("datasets", "models", "mechanisms", "attacks"):
        sub.add_parser(kind, help=f"list the known {kind}")
    return parser


def _output_folder(args: argparse.Namespace) -> Path | None:
    """The folder a command writes (locked for its duration), None for those that write none."""
    if args.command == "run" and args.check:
        return None
    if args.command == "run":
        name = Path(args.config).stem if args.config else (args.preset or "quick")
        return Path(args.out or f"runs/{name}")
    if args.command in ("train", "attack", "audit", "canary"):
        return Path(args.out)
    return None


_COMMANDS = {
    "run": _cmd_run,
    "train": _cmd_train,
    "canary": _cmd_canary,
    "canary-set": _cmd_canary_set,
    "attack": _cmd_attack,
    "audit": _cmd_audit,
    "report": _cmd_report,
    "gate": _cmd_gate,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command in _COMMANDS:
            folder = _output_folder(args)
            if folder is None:
                return _COMMANDS[args.command](args)
            from .files import OutputLock

            with OutputLock(folder):
                return _COMMANDS[args.command](args)
        return _cmd_list(args.command)
    except (
        UsageError,
        DataError,
        CheckpointError,
        NonFiniteLossError,
        JobError,
        GateError,
        ValueError,
        OSError,
    ) as err:
        print(f"mia-audit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mia-audit: interrupted; finished files are kept, nothing half-written", file=sys.stderr)
        return 130
    except Exception as err:  # anything else is a bug of ours: never exit 1 (a gate failure)
        if args.debug:
            import traceback

            traceback.print_exc()
        print(
            f"mia-audit: internal error: {type(err).__name__}: {err} (a bug in mia-audit; rerun with "
            "--debug for the traceback and report it)",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
