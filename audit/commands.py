"""What each ``mia-audit`` command does with its parsed arguments, and what it prints."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from .cli_args import (
    EXIT_GATE_FAILED,
    EXIT_OK,
    UsageError,
    attack_request,
    canary_settings,
    data_options,
    executor_settings,
    train_request,
)


def print_results(results: dict, out: Path) -> None:
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


def cmd_train(args: argparse.Namespace) -> int:
    from mechanisms import get_mechanism

    from .train import train_target

    get_mechanism(args.mechanism)  # fail fast on an unknown name
    meta = train_target(train_request(args), args.out)
    print_trained(meta, Path(args.out))
    return EXIT_OK


def print_trained(meta: dict[str, Any], out: Path) -> None:
    privacy = meta["privacy"]
    if privacy["formal"]:
        eps = f"epsilon={privacy['epsilon']:.4g} (delta={privacy['delta']:g}, {privacy['accountant']})"
    else:
        eps = "no formal guarantee"
    print(
        f"trained {meta['model']} with {meta['mechanism']} on {meta['dataset']['id']}: "
        f"train accuracy {meta['train_accuracy']:.4f}, held-out accuracy {meta['test_accuracy']:.4f} "
        f"({meta['test_split']}), {eps} -> {out}"
    )
    t = meta.get("seconds", {})
    if t:
        print(
            f"  time: training {t['training']:.1f}s, accounting {t['accounting']:.1f}s, "
            f"evaluation {t['evaluation']:.1f}s, total {t['total']:.1f}s"
        )


def print_canary_audits(target: dict[str, Any]) -> None:
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


def cmd_canary(args: argparse.Namespace) -> int:
    from mechanisms import get_mechanism

    from .attack import results_document, target_id
    from .canary import audits_for_checkpoint
    from .data import load_dataset
    from .files import write_json
    from .pipeline import render_report
    from .train import train_target

    mechanism = get_mechanism(args.mechanism)
    settings = canary_settings(args, mechanism.gradient_canaries)
    data = load_dataset(args.dataset, data_options(args))
    held_out = data.population - data.population // 2  # the target's non-members
    if settings.inputs and settings.input_kind == "mislabelled" and settings.inputs > held_out:
        raise UsageError(
            f"--input-canaries {settings.inputs}: only {held_out} held-out examples of {data.id} can serve as "
            "mislabelled canaries; ask for fewer, or --input-kind ood"
        )
    request = train_request(args, settings)
    out = Path(args.out)
    meta = train_target(request, out)
    print_trained(meta, out)
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
    print_canary_audits(entry)
    print(f"wrote {out / 'results.json'} and {render_report(out, data=data)}")
    return EXIT_OK


def cmd_canary_set(args: argparse.Namespace) -> int:
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
    data = load_dataset(args.dataset, data_options(args))
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


def cmd_attack(args: argparse.Namespace) -> int:
    from .attack import attack_target

    request = attack_request(args, target=args.target)
    out = Path(args.out)
    print_results(attack_target(request, out), out)
    return EXIT_OK


def cmd_audit(args: argparse.Namespace) -> int:
    from .checkpoint_audit import audit_checkpoint, read_members
    from .data import load_dataset
    from .pipeline import render_report

    request = attack_request(args)
    data = load_dataset(args.dataset, data_options(args))
    members = read_members(data.population, args.members, args.member_indices)
    out = Path(args.out)
    results = audit_checkpoint(
        args.checkpoint,
        logits=args.logits,
        reference_logits=args.reference_logits,
        model=args.model,
        data=data,
        data_options=data_options(args),
        members=members,
        recipe=args.recipe,
        request=request,
        out=out,
        canaries=args.canaries,
        epsilon=args.claimed_epsilon,
    )
    print_results(results, out)
    for target in results["targets"]:
        for prefix in target.get("checkpoint_prefixes_removed", []):
            print(f"removed the prefix {prefix} from every tensor name of {args.checkpoint}")
        print_canary_audits(target)
    print(f"wrote {render_report(out, data=data)}")
    return EXIT_OK


def cmd_export(args: argparse.Namespace) -> int:
    import numpy as np

    from .files import holds_files, inside, write_npy
    from .references import load_reference_logits
    from .signals_io import export_lira

    run = Path(args.run_dir)
    targets = (
        sorted(p.name for p in (run / "targets").iterdir() if p.is_dir())
        if (run / "targets").is_dir()
        else []
    )
    if not targets:
        raise UsageError(f"{run} holds no targets (expected a folder written by run, attack or audit)")
    tid = args.target or (targets[0] if len(targets) == 1 else None)
    if tid is None or tid not in targets:
        raise UsageError(f"choose a target with --target: {', '.join(targets)}")
    out = Path(args.lira)
    if holds_files(out) and not args.overwrite:
        raise UsageError(f"{out} already holds files; pass --overwrite")
    tdir, rdir = inside(run, "targets", tid), inside(run, "references", tid)
    if not (rdir / "keep.npy").is_file():
        raise UsageError(f"{rdir}: no references to export (attacks that need references were not run)")
    keep = np.load(rdir / "keep.npy", allow_pickle=False)
    experiments = export_lira(out, keep, load_reference_logits(rdir, len(keep)))
    write_npy(out / "target" / "keep.npy", np.load(tdir / "keep.npy", allow_pickle=False))
    write_npy(
        out / "target" / "logits" / f"{0:010d}.npy", np.load(tdir / "logits.npy", allow_pickle=False)[:, None]
    )
    print(f"wrote {len(experiments)} references and the target {tid} to {out} (LiRA layout)")
    return EXIT_OK


def cmd_run(args: argparse.Namespace) -> int:
    from .config import load_config
    from .pipeline import run

    if args.config and args.preset:
        raise UsageError("give a CONFIG.toml or --preset, not both")
    config = load_config(args.config, preset=args.preset)
    config = dataclasses.replace(config, executor=executor_settings(args, config.executor))
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
    print_results(results, out)
    print(f"wrote {out / 'report.html'} and {out / 'summary.md'}")
    return EXIT_OK


def cmd_report(args: argparse.Namespace) -> int:
    from .pipeline import render_report

    print(f"wrote {render_report(args.run_dir)}")
    return EXIT_OK


def cmd_gate(args: argparse.Namespace) -> int:
    import json
    import shutil

    from .files import write_text
    from .gate import GateError, accountant_checks, compare, junit_xml, load_gate_limits
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


def cmd_list(kind: str) -> int:
    if kind == "datasets":
        from .data import dataset_names

        print("\n".join(dataset_names()))
    elif kind == "models":
        from mechanisms import model_names

        print("\n".join([*model_names(), "package.module:factory"]))
    elif kind == "mechanisms":
        from mechanisms import get_mechanism, mechanism_names

        for name in mechanism_names():
            print(f"{name:12s} {get_mechanism(name).description}")
    else:
        import attacks

        for name in attacks.attack_names():
            print(f"{name:16s} {attacks.get_attack(name).description}")
    return EXIT_OK
