"""Hostile input (issue 19): no write outside --out, a gate that cannot be fooled, one exit code
per meaning, strict option values. Each test failed before its fix."""

import json
import math
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.cli import main
from audit.config import load_config
from reports import render_markdown

SMALL = """
seed = 0
[data]
dataset = "synthetic"
synthetic_samples = 200
[target]
model = "mlp"
[attack]
attacks = ["loss"]
references = 0
resamples = 100
[[mechanisms]]
name = "sgd"
options = { epochs = 2, batch_size = 32 }
"""


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("hard")
    (root / "small.toml").write_text(SMALL)
    assert main(["run", str(root / "small.toml"), "--out", str(root / "out"), "--quiet"]) == 0
    return root


@pytest.mark.parametrize("bad", ["../../escaped", "/tmp/abs-escape", "a/b", ".hidden", "x" * 81, ""])
def test_a_target_id_cannot_leave_the_run_folder(tmp_path, capsys, bad):
    config = SMALL.replace('name = "sgd"', f'name = "sgd"\nid = {json.dumps(bad)}')
    (tmp_path / "c.toml").write_text(config)
    out = tmp_path / "deep" / "out"
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(out), "--quiet"]) == 2
    assert "cannot name a folder" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not out.exists()


def test_a_model_json_cannot_name_an_output_path(small_run, tmp_path, capsys):
    target = tmp_path / "target"
    shutil.copytree(small_run / "out" / "targets" / "sgd", target)
    meta = json.loads((target / "model.json").read_text())
    victim = tmp_path / "victim"
    meta["mechanism"] = str(victim)
    (target / "model.json").write_text(json.dumps(meta))
    assert (
        main(
            ["attack", "--target", str(target), "--attacks", "loss", "--quiet", "--out", str(tmp_path / "o")]
        )
        == 2
    )
    assert "cannot name a folder" in capsys.readouterr().err
    assert not victim.exists()


def test_a_model_json_cannot_make_us_import_code(small_run, tmp_path, capsys):
    target = tmp_path / "target"
    shutil.copytree(small_run / "out" / "targets" / "sgd", target)
    meta = json.loads((target / "model.json").read_text())
    meta["model"] = "tests.user_models:tiny"
    (target / "model.json").write_text(json.dumps(meta))
    argv = ["attack", "--target", str(target), "--attacks", "loss", "--quiet", "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "only when you name it yourself" in capsys.readouterr().err


def test_summary_md_is_escaped():
    results = {
        "dataset": {"id": "x", "population": 2},
        "targets": [
            {
                "id": "t",
                "privacy": {"formal": False, "note": "<img src=x onerror=alert(1)> | cell"},
                "test_accuracy": 0.5,
                "attacks": {},
            }
        ],
    }
    text = render_markdown(results)
    assert "<img" not in text and "&lt;img" in text and "\\| cell" in text


def _results(small_run):
    return json.loads((small_run / "out" / "results.json").read_text())


def _gate(tmp_path, current, baseline=None, *extra):
    (tmp_path / "cur.json").write_text(json.dumps(current, allow_nan=True))
    argv = ["gate", str(tmp_path / "cur.json")]
    if baseline is not None:
        (tmp_path / "base.json").write_text(json.dumps(baseline, allow_nan=True))
        argv += ["--baseline", str(tmp_path / "base.json")]
    return main([*argv, *extra])


@pytest.mark.parametrize("field", ["auc", "auc_ci", "epsilon_lb", "tpr"])
@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_gate_refuses_non_finite_numbers(small_run, tmp_path, capsys, field, value):
    base = _results(small_run)
    cur = json.loads(json.dumps(base))
    m = cur["targets"][0]["attacks"]["loss"]
    m["auc"] = 0.95
    if field == "auc_ci":
        m["auc_ci"] = [value, value]
    elif field == "tpr":
        m["tpr_at_fpr"]["0.01"] = value
    else:
        m[field] = value
    assert _gate(tmp_path, cur, base) == 2
    assert "finite number" in capsys.readouterr().err


def test_gate_refuses_empty_or_mismatched_inputs(small_run, tmp_path, capsys):
    base = _results(small_run)
    empty = {**base, "targets": []}
    assert _gate(tmp_path, base, empty) == 2 and "no targets" in capsys.readouterr().err
    fewer_levels = json.loads(json.dumps(base))
    m = fewer_levels["targets"][0]["attacks"]["loss"]
    del m["tpr_at_fpr"]["0.01"], m["tpr_at_fpr_ci"]["0.01"]
    assert _gate(tmp_path, fewer_levels, base) == 2 and "lack TPR at FPR 0.01" in capsys.readouterr().err
    missing = json.loads(json.dumps(base))
    del missing["targets"][0]["attacks"]["loss"]["auc_ci"]
    assert _gate(tmp_path, missing, base) == 2 and "auc_ci" in capsys.readouterr().err
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    assert main(["gate", str(tmp_path / "deep.json")]) == 2 and "nested too deeply" in capsys.readouterr().err
    # --update-baseline refuses what the gate would refuse
    nan = json.loads(json.dumps(base))
    nan["targets"][0]["attacks"]["loss"]["auc"] = math.nan
    (tmp_path / "nan.json").write_text(json.dumps(nan, allow_nan=True))
    argv = ["gate", str(tmp_path / "nan.json"), "--baseline", str(tmp_path / "b.json"), "--update-baseline"]
    assert main(argv) == 2 and not (tmp_path / "b.json").exists()


def test_gate_limit_keys_are_levels_compared_as_numbers(small_run, tmp_path, capsys):
    base = _results(small_run)
    (tmp_path / "lim.toml").write_text('[gate]\nmax_tpr_at_fpr = { "0.10" = 0.0 }\n')
    # "0.10" names the 0.1 level: the (impossible) limit of 0 fails the gate
    assert _gate(tmp_path, base, base, "--config", str(tmp_path / "lim.toml")) == 1
    (tmp_path / "lim.toml").write_text('[gate]\nmax_tpr_at_fpr = { "0.5" = 1.0 }\n')
    assert _gate(tmp_path, base, base, "--config", str(tmp_path / "lim.toml")) == 2
    assert "not among the results' FPR levels" in capsys.readouterr().err
    (tmp_path / "lim.toml").write_text('[gate]\nmax_auc = "high"\n')
    assert _gate(tmp_path, base, base, "--config", str(tmp_path / "lim.toml")) == 2


def test_huge_synthetic_data_is_an_input_error(tmp_path, capsys):
    # found by the run-configuration fuzz: 262,772,464 samples went to scikit-learn and failed
    # with a MemoryError reported as an internal error (exit 3)
    argv = ["train", "--dataset", "synthetic", "--synthetic-samples", "262772464", "--model", "mlp"]
    assert main([*argv, "--out", str(tmp_path / "t")]) == 2
    assert "synthetic" in capsys.readouterr().err


def test_running_out_of_memory_is_exit_2_with_a_message(monkeypatch, capsys):
    import audit.commands as commands

    def hungry(kind):
        raise MemoryError("Unable to allocate 39.2 GiB")

    monkeypatch.setattr(commands, "cmd_list", hungry)
    assert main(["models"]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "Traceback" not in err


def test_an_internal_error_is_exit_3_with_one_line(monkeypatch, capsys):
    import audit.commands as commands

    def boom(kind):
        raise KeyError("oops")

    monkeypatch.setattr(commands, "cmd_list", boom)
    assert main(["models"]) == 3
    err = capsys.readouterr().err
    assert "internal error: KeyError" in err and "Traceback" not in err
    assert main(["--debug", "models"]) == 3
    assert "Traceback" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--alpha", "2"], "alpha must be"),
        (["--alpha", "1"], "alpha must be"),
        (["--resamples", "1"], "resamples must be"),
        (["--queries", "0"], "queries must be"),
        (["--fpr-levels", "0.01,1.5"], "FPR levels must be"),
        (["--fpr-levels", "0,0.1"], "FPR levels must be"),
        (["--attacks", "lira-online:fixed_variance=no"], "expected true or false"),
        (["--attacks", "rmia:gamma=abc"], "bad value for rmia:gamma"),
        (["--device", "meta"], "unknown device"),
    ],
)
def test_attack_option_values_are_checked(small_run, tmp_path, capsys, extra, message):
    argv = ["attack", "--target", str(small_run / "out" / "targets" / "sgd"), "--attacks", "loss", "--quiet"]
    assert main([*argv, *extra, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "old, new, message",
    [
        ('model = "mlp"', "model = 42", "model must be a string"),
        ("[attack]", "[attack]\nqueries = 1", "unknown key 'queries'"),
        ("[target]", '[target]\nqueries = "2"', "queries must be an integer"),
        ('attacks = ["loss"]', "attacks = [1, 2]", "attacks must be a list of strings"),
        ("resamples = 100", "fpr_levels = 0.1", "fpr_levels must be a list of numbers"),
        ("seed = 0", 'seed = "zero"', "seed must be an integer"),
        ("options = { epochs = 2, batch_size = 32 }", "options = 3", "options must be a table"),
    ],
)
def test_run_configuration_types_are_checked(tmp_path, capsys, old, new, message):
    (tmp_path / "c.toml").write_text(SMALL.replace(old, new))
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "o"), "--quiet"]) == 2
    assert message in capsys.readouterr().err


_json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True), st.text(max_size=4)),
    lambda children: st.one_of(
        st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    path=st.lists(
        st.sampled_from(
            [
                "targets",
                0,
                "attacks",
                "loss",
                "auc",
                "auc_ci",
                "tpr_at_fpr",
                "privacy",
                "dataset",
                "schema",
                "canary_audits",
            ]
        ),
        min_size=1,
        max_size=4,
    ),
    value=_json_values,
)
def test_gate_fuzz_never_a_traceback(small_run, tmp_path_factory, path, value):
    """A results.json with any one field replaced: the gate answers 0, 1 or 2, never 3."""
    doc = _results(small_run)
    node = doc
    for key in path[:-1]:
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return
    try:
        node[path[-1]] = value
    except (IndexError, TypeError):
        return
    tmp = tmp_path_factory.mktemp("fuzz")
    (tmp / "r.json").write_text(json.dumps(doc, allow_nan=True))
    code = main(["gate", str(tmp / "r.json"), "--baseline", str(small_run / "out" / "results.json")])
    assert code in (0, 1, 2)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    key=st.sampled_from(["model", "mechanism", "dataset", "hyperparameters", "privacy"]), value=_json_values
)
def test_model_json_fuzz_is_an_input_error(small_run, tmp_path_factory, key, value):
    target = tmp_path_factory.mktemp("mj") / "t"
    shutil.copytree(small_run / "out" / "targets" / "sgd", target)
    meta = json.loads((target / "model.json").read_text())
    meta[key] = value
    (target / "model.json").write_text(json.dumps(meta, allow_nan=True))
    argv = [
        "attack",
        "--target",
        str(target),
        "--attacks",
        "loss",
        "--quiet",
        "--out",
        str(target.parent / "o"),
    ]
    assert main(argv) in (0, 2)


def test_load_config_still_reads_the_presets():
    for preset in ("quick", "smoke", "paper"):
        assert load_config(preset=preset).mechanisms


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "t"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / ".mia-audit.lock").write_text(str(holder.pid))
        argv = [
            "train",
            "--dataset",
            "digits",
            "--model",
            "mlp",
            "--epochs",
            "1",
            "--quiet",
            "--out",
            str(out),
        ]
        assert main(argv) == 2
        assert f"another mia-audit (pid {holder.pid})" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over, then released
    assert main(argv) == 0 and not (out / ".mia-audit.lock").exists()


def test_run_overwrite_retrains_what_the_configuration_changed(tmp_path):
    """Issue 19: 'run --overwrite' after a configuration change reused targets trained with the
    old options."""
    two = SMALL + '[[mechanisms]]\nname = "sgd"\nid = "other"\noptions = { epochs = 2, batch_size = 32 }\n'
    (tmp_path / "a.toml").write_text(two)
    out = tmp_path / "out"
    assert main(["run", str(tmp_path / "a.toml"), "--out", str(out), "--quiet"]) == 0
    stamps = {t: (out / "targets" / t / "model.safetensors").stat().st_mtime_ns for t in ("sgd", "other")}
    changed = two.replace(
        "options = { epochs = 2, batch_size = 32 }", "options = { epochs = 3, batch_size = 32 }", 1
    )
    (tmp_path / "b.toml").write_text(changed)
    assert (
        main(["run", str(tmp_path / "b.toml"), "--out", str(out), "--quiet"]) == 2
    )  # refused without --overwrite
    assert main(["run", str(tmp_path / "b.toml"), "--out", str(out), "--quiet", "--overwrite"]) == 0
    meta = json.loads((out / "targets" / "sgd" / "model.json").read_text())
    assert meta["hyperparameters"]["epochs"] == 3
    assert (out / "targets" / "sgd" / "model.safetensors").stat().st_mtime_ns != stamps["sgd"]
    assert (out / "targets" / "other" / "model.safetensors").stat().st_mtime_ns == stamps["other"]


def test_attack_overwrite_from_another_checkpoint_replaces_the_membership(small_run, tmp_path):
    """Issue 19: 'attack --overwrite' onto the same target id from another checkpoint kept the old keep.npy."""
    import numpy as np

    first = small_run / "out" / "targets" / "sgd"
    out = tmp_path / "att"
    common = ["--attacks", "loss", "--quiet", "--out", str(out)]
    assert main(["attack", "--target", str(first), *common]) == 0
    second = tmp_path / "second"
    argv = [
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "200",
        "--model",
        "mlp",
        "--epochs",
        "2",
    ]
    assert main([*argv, "--seed", "7", "--quiet", "--out", str(second)]) == 0
    assert main(["attack", "--target", str(second), *common, "--overwrite"]) == 0
    np.testing.assert_array_equal(np.load(out / "targets" / "sgd" / "keep.npy"), np.load(second / "keep.npy"))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=st.text(alphabet="lirasomfx-:=_.,01235eatruvbg", max_size=30))
def test_attack_specs_fuzz_is_an_input_error(small_run, tmp_path_factory, spec):
    """Any --attacks string: it runs (a valid spec) or exits 2 with a message, never 3."""
    out = tmp_path_factory.mktemp("spec")
    argv = ["attack", "--target", str(small_run / "out" / "targets" / "sgd"), f"--attacks={spec}"]
    assert main([*argv, "--references", "0", "--quiet", "--out", str(out)]) in (0, 2)
