"""The ``mia-audit`` command line. Exit codes: 0 success, 1 gate failed, 2 usage/input error."""

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

__all__ = ["main"]

EXIT_OK, EXIT_GATE_FAILED, EXIT_USAGE = 0, 1, 2


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


def _add_train_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, help="dataset id (see 'mia-audit datasets')")
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
    g = p.add_argument_group("model and training")
    g.add_argument(
        "--model", required=True, help="model name (see 'mia-audit models') or package.module:factory"
    )
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
            g.add_argument(_flag(name), action="store_const", const=True, default=None, help=helptext)
        else:
            g.add_argument(_flag(name), type=tp, default=None, help=helptext)
    g = p.add_argument_group("output")
    g.add_argument("--out", required=True, help="output directory for the checkpoint")
    g.add_argument("--overwrite", action="store_true", help="replace files in a non-empty --out")
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


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainRequest, check_output_dir, train_target

    get_mechanism(args.mechanism)  # fail fast on an unknown name
    check_output_dir(args.out, args.overwrite)
    data_opts = DataOptions(
        data_root=args.data_root,
        download=args.download,
        label_column=args.label_column,
        synthetic_samples=args.synthetic_samples,
        synthetic_features=args.synthetic_features,
        synthetic_classes=args.synthetic_classes,
        synthetic_seed=args.synthetic_seed,
    )
    request = TrainRequest(
        dataset=args.dataset,
        model=args.model,
        mechanism=args.mechanism,
        options=_train_options(args),
        data_options=data_opts,
        seed=args.seed,
        device=args.device,
        progress=not args.quiet,
    )
    meta = train_target(request, args.out)
    privacy = meta["privacy"]
    eps = (
        f"epsilon={privacy['epsilon']:.4g} (delta={privacy['delta']:g}, {privacy['accountant']})"
        if privacy["formal"]
        else "no formal guarantee"
    )
    print(
        f"trained {meta['model']} with {meta['mechanism']} on {meta['dataset']['id']}: "
        f"train accuracy {meta['train_accuracy']:.4f}, held-out accuracy {meta['test_accuracy']:.4f} "
        f"({meta['test_split']}), {eps}, {meta['train_seconds']:.1f}s -> {args.out}"
    )
    return EXIT_OK


def _cmd_attack(args: argparse.Namespace) -> int:
    from .attack import AttackRequest, attack_target, parse_attack_spec

    specs = (
        tuple(a.strip() for a in args.attacks.split(",") if a.strip())
        if args.attacks
        else tuple(attacks.attack_names())
    )
    for spec in specs:
        parse_attack_spec(spec)  # fail fast on unknown names or options
    out = Path(args.out)
    if (out / "results.json").exists() and not args.overwrite:
        raise UsageError(
            f"{out / 'results.json'} exists; pass --overwrite to recompute it (finished "
            "reference models are reused either way)"
        )
    levels = tuple(float(v) for v in args.fpr_levels.split(","))
    request = AttackRequest(
        target=args.target,
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
    )
    results = attack_target(request, out)
    target = results["targets"][0]
    print(
        f"target {target['id']} ({target['model']}, held-out accuracy {target['test_accuracy']:.4f}), "
        f"{target['references']} references, {target['queries']} queries"
    )
    print(f"{'attack':36s} {'AUC':>6s} {'AUC 95% CI':>15s} {'TPR@0.1%':>9s} {'TPR@1%':>8s} {'eps_lb':>7s}")
    for name, m in target["attacks"].items():
        t = m["tpr_at_fpr"]
        print(
            f"{name:36s} {m['auc']:6.3f} [{m['auc_ci'][0]:.3f}, {m['auc_ci'][1]:.3f}] "
            f"{t.get('0.001', float('nan')):9.4f} {t.get('0.01', float('nan')):8.4f} {m['epsilon_lb']:7.3f}"
        )
    print(f"wrote {out / 'results.json'}")
    return EXIT_OK


def _cmd_list(kind: str) -> int:
    if kind == "datasets":
        names = dataset_names()
    elif kind == "models":
        names = [*model_names(), "package.module:factory"]
    elif kind == "mechanisms":
        for name in mechanism_names():
            print(f"{name:12s} {get_mechanism(name).description}")
        return EXIT_OK
    else:
        for name in attacks.attack_names():
            print(f"{name:16s} {attacks.get_attack(name).description}")
        return EXIT_OK
    print("\n".join(names))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mia-audit",
        description="Membership-inference auditing for PyTorch: train privately, attack, measure leakage.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = sub.add_parser("train", help="train one target model on a random half of a dataset")
    _add_train_args(train)
    attack = sub.add_parser("attack", help="attack a trained target with membership inference")
    attack.add_argument("--target", required=True, help="checkpoint directory written by 'mia-audit train'")
    attack.add_argument(
        "--attacks",
        help="comma-separated attacks, each NAME or NAME:key=value[:key=value] "
        "(e.g. lira-online:fixed_variance=true); default: all",
    )
    attack.add_argument("--references", type=int, default=16, help="reference models (even; default 16)")
    attack.add_argument("--workers", type=int, default=None, help="worker processes (default: one per core)")
    attack.add_argument(
        "--queries", type=int, default=None, help="queries per example (default 2 for images)"
    )
    attack.add_argument("--fpr-levels", default="0.001,0.01,0.1", help="FPR levels (default 0.001,0.01,0.1)")
    attack.add_argument("--delta", type=float, default=1e-5, help="delta of the epsilon lower bound")
    attack.add_argument("--alpha", type=float, default=0.05, help="1 - confidence of intervals and bounds")
    attack.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples (default 1000)")
    attack.add_argument("--seed", type=int, default=0, help="seed of references and bootstrap (default 0)")
    attack.add_argument("--device", default="cpu", help="device for training references (default cpu)")
    attack.add_argument("--out", required=True, help="output directory")
    attack.add_argument("--overwrite", action="store_true", help="recompute an existing results.json")
    attack.add_argument("--quiet", action="store_true", help="no progress bar")
    for kind in ("datasets", "models", "mechanisms", "attacks"):
        sub.add_parser(kind, help=f"list the known {kind}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "train":
            return _cmd_train(args)
        if args.command == "attack":
            return _cmd_attack(args)
        return _cmd_list(args.command)
    except (UsageError, DataError, CheckpointError, NonFiniteLossError, JobError, ValueError) as err:
        print(f"mia-audit: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("mia-audit: interrupted; finished files are kept, nothing half-written", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
