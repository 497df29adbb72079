"""End to end: run (with resume), audit of a checkpoint from its files, report, gate."""

import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.cli import main
from audit.config import load_config

SMALL = """
seed = 0
[data]
dataset = "synthetic"
synthetic_samples = 300
[target]
model = "mlp"
[attack]
attacks = ["loss", "lira-online", "rmia"]
references = 2
resamples = 100
workers = 1
[[mechanisms]]
name = "sgd"
options = { epochs = 20, batch_size = 16 }
[[mechanisms]]
name = "dpsgd"
budgets = [8.0]
options = { epochs = 3, batch_size = 50, lr = 0.5 }
[canaries]
count = 2000
inputs = 60
[gate]
epsilon_margin = 1.0
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    (root / "small.toml").write_text(SMALL)
    assert main(["run", str(root / "small.toml"), "--out", str(root / "out"), "--quiet"]) == 0
    return root


def test_run_writes_every_file(run_dir):
    out = run_dir / "out"
    results = json.loads((out / "results.json").read_text())
    assert [t["id"] for t in results["targets"]] == ["sgd", "dpsgd-eps8"]
    eps = results["targets"][1]["privacy"]
    assert eps["formal"] is True and eps["epsilon"] <= 8.0
    for tid in ("sgd", "dpsgd-eps8"):
        for name in ("model.safetensors", "model.json", "keep.npy", "logits.npy", "scores.npz"):
            assert (out / "targets" / tid / name).is_file()
        assert len(list((out / "references" / tid / "logits").glob("*.npy"))) == 2
    assert (out / "config.toml").is_file() and (out / "summary.md").is_file()
    assert "dpsgd-eps8" in (out / "summary.md").read_text()


def test_run_audits_every_gradient_target_with_canaries(run_dir):
    out = run_dir / "out"
    results = json.loads((out / "results.json").read_text())
    for target in results["targets"]:
        audits = target["canary_audits"]
        assert [a["threat_model"] for a in audits] == ["white-box-steps", "white-box-final", "black-box"]
        black = audits.pop()
        assert black["m"] == 60 and {b["method"] for b in black["bounds"]} == {"one-run", "f-dp-one-run"}
        assert (out / "targets" / target["id"] / "twin" / "input_canaries.npz").is_file()
        for a in audits:
            assert a["canary_kind"] == "gradient" and a["m"] + a["calibration_canaries"] == 2000
            assert {b["method"] for b in a["bounds"]} == {
                "one-run",
                "f-dp-one-run",
                "clopper-pearson",
                "gdp-estimate",
            }
            for b in a["bounds"]:
                assert {"method", "epsilon_lb", "confidence", "delta", "assumptions", "counts"} <= set(b)
            assert a["guesses"] >= a["correct"] >= 0
        assert (out / "targets" / target["id"] / "canaries.npz").is_file()
    dp = results["targets"][1]["canary_audits"][0]
    assert dp["accountant_epsilon"] == results["targets"][1]["privacy"]["epsilon"] and dp["formal"] is True
    assert all(b["epsilon_lb"] <= dp["accountant_epsilon"] for b in dp["bounds"] if b["valid"])
    summary = (out / "summary.md").read_text()
    assert "### Canary audits" in summary and "white-box-steps" in summary
    page = (out / "report.html").read_text()
    assert "Canary audits" in page and "strongest valid ε lower bound" in page


def test_report_is_self_contained(run_dir):
    page = (run_dir / "out" / "report.html").read_text()
    assert page.count("<svg") >= 4  # trade-off, epsilon, one ROC per target
    assert "<script" not in page
    # no external resource of any kind: every src/href is a fragment or inline data
    for url in re.findall(r'(?:src|href)\s*=\s*["\']([^"\']+)', page):
        assert url.startswith(("#", "data:")), url
    assert "http://" not in page.replace("http://www.w3.org", "") and "https://" not in page
    assert "no formal guarantee" in page and "ε = " in page


def test_run_resumes_without_retraining(run_dir):
    out = run_dir / "out"
    model = out / "targets" / "sgd" / "model.safetensors"
    stamp = model.stat().st_mtime_ns
    assert main(["run", str(run_dir / "small.toml"), "--out", str(out), "--quiet"]) == 0
    assert model.stat().st_mtime_ns == stamp


def test_targets_and_twins_trained_by_worker_processes_equal_those_trained_in_process(tmp_path):
    # two worker processes (one torch thread each) train the two targets at once, then the two
    # twins, and the driver writes what they return; the same run in this process with one
    # thread gives the same bytes (with more threads the float order, and the bits, may differ)
    import torch

    (tmp_path / "w.toml").write_text(SMALL.replace("workers = 1", "workers = 2"))
    (tmp_path / "s.toml").write_text(SMALL)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(tmp_path / "s.toml"), "--out", str(tmp_path / "serial"), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)
    assert main(["run", str(tmp_path / "w.toml"), "--out", str(tmp_path / "workers"), "--quiet"]) == 0
    for tid in ("sgd", "dpsgd-eps8"):
        names = (
            "model.safetensors",
            "keep.npy",
            "canaries.npz",
            "twin/model.safetensors",
            "twin/input_canaries.npz",
        )
        for name in names:
            a = (tmp_path / "serial" / "targets" / tid / name).read_bytes()
            assert a == (tmp_path / "workers" / "targets" / tid / name).read_bytes(), (tid, name)
        a, b = (
            json.loads((tmp_path / d / "targets" / tid / "model.json").read_text())
            for d in ("serial", "workers")
        )
        for meta in (a, b):
            meta.pop("train_seconds"), meta.pop("seconds")  # wall times differ
        assert a == b
    serial, workers = (
        json.loads((tmp_path / d / "results.json").read_text())["targets"] for d in ("serial", "workers")
    )
    assert [t["canary_audits"] for t in serial] == [t["canary_audits"] for t in workers]
    assert [t["attacks"] for t in serial] == [t["attacks"] for t in workers]


def test_run_refuses_another_config_in_the_same_folder(run_dir, capsys):
    (run_dir / "other.toml").write_text(SMALL.replace("seed = 0", "seed = 1"))
    assert main(["run", str(run_dir / "other.toml"), "--out", str(run_dir / "out"), "--quiet"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_config_rejects_unknown_keys(tmp_path):
    (tmp_path / "bad.toml").write_text(SMALL.replace("references = 2", "referenses = 2"))
    with pytest.raises(ValueError, match="unknown key 'referenses' in .*\\[attack\\]"):
        load_config(str(tmp_path / "bad.toml"))
    with pytest.raises(ValueError, match="unknown preset 'fast'"):
        load_config(preset="fast")
    from mechanisms import mechanism_names

    # the default job runs every registered mechanism; residual perturbation on a ResNet
    quick = load_config()
    assert quick.dataset == "mnist5k" and {m.name for m in quick.mechanisms} == set(mechanism_names())
    assert [m.model for m in quick.mechanisms if m.name == "residual"] == ["resnet8"]


def test_report_rerenders(run_dir):
    out = run_dir / "out"
    (out / "report.html").unlink()
    assert main(["report", str(out)]) == 0
    assert (out / "report.html").is_file()


def test_audit_from_files_matches_attack(tmp_path):
    target = tmp_path / "target"
    assert (
        main(
            [
                "train",
                "--dataset",
                "synthetic",
                "--synthetic-samples",
                "300",
                "--model",
                "mlp",
                "--epochs",
                "20",
                "--batch-size",
                "16",
                "--quiet",
                "--out",
                str(target),
            ]
        )
        == 0
    )
    common = [
        "--attacks",
        "loss,lira-online,rmia",
        "--references",
        "2",
        "--workers",
        "1",
        "--resamples",
        "100",
        "--quiet",
    ]
    assert main(["attack", "--target", str(target), *common, "--out", str(tmp_path / "attacked")]) == 0
    meta = json.loads((target / "model.json").read_text())
    opts = ", ".join(f"{k} = {json.dumps(v)}" for k, v in meta["hyperparameters"].items() if v is not None)
    (tmp_path / "recipe.toml").write_text(f'[recipe]\nmechanism = "sgd"\noptions = {{ {opts} }}\n')
    # a .pt state dict works too; here the safetensors file, and member indices as text
    np.savetxt(tmp_path / "members.txt", np.flatnonzero(np.load(target / "keep.npy")), fmt="%d")
    argv = [
        "audit",
        str(target / "model.safetensors"),
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "300",
        "--member-indices",
        str(tmp_path / "members.txt"),
        "--recipe",
        str(tmp_path / "recipe.toml"),
        *common,
        "--out",
        str(tmp_path / "audited"),
    ]
    assert main(argv) == 0
    a = json.loads((tmp_path / "attacked" / "results.json").read_text())["targets"][0]["attacks"]
    b = json.loads((tmp_path / "audited" / "results.json").read_text())["targets"][0]["attacks"]
    for name in a:
        for key in ("auc", "auc_ci", "tpr_at_fpr", "epsilon_lb"):
            assert a[name][key] == b[name][key], (name, key)
    assert (tmp_path / "audited" / "report.html").is_file()
    # without a recipe only the reference-free attacks run, and the results say why
    argv = [
        "audit",
        str(target / "model.safetensors"),
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "300",
        "--members",
        str(target / "keep.npy"),
        *common,
        "--out",
        str(tmp_path / "bare"),
    ]
    assert main(argv) == 0
    t = json.loads((tmp_path / "bare" / "results.json").read_text())["targets"][0]
    assert list(t["attacks"]) == ["loss"] and any("--recipe" in line for line in t["not_run"])


def test_audit_refuses_pickled_models_and_bad_membership(tmp_path, capsys):
    import torch

    from mechanisms.models import build_model

    model = build_model("mlp", (20,), 2)
    torch.save(model, tmp_path / "full.pt")
    keep = np.zeros(300, dtype=bool)
    keep[:150] = True
    np.save(tmp_path / "keep.npy", keep)
    base = [
        "--model",
        "mlp",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "300",
        "--attacks",
        "loss",
        "--quiet",
    ]
    code = main(
        [
            "audit",
            str(tmp_path / "full.pt"),
            *base,
            "--members",
            str(tmp_path / "keep.npy"),
            "--out",
            str(tmp_path / "a"),
        ]
    )
    assert code == 2 and "state_dict" in capsys.readouterr().err
    np.save(tmp_path / "short.npy", keep[:10])
    torch.save(model.state_dict(), tmp_path / "w.pt")
    code = main(
        [
            "audit",
            str(tmp_path / "w.pt"),
            *base,
            "--members",
            str(tmp_path / "short.npy"),
            "--out",
            str(tmp_path / "b"),
        ]
    )
    assert code == 2 and "shape (300,)" in capsys.readouterr().err


def _shifted(results, delta):
    out = json.loads(json.dumps(results))
    for t in out["targets"]:
        for m in t["attacks"].values():
            m["auc"] -= delta
            m["auc_ci"] = [v - delta for v in m["auc_ci"]]
    return out


def test_gate(run_dir, tmp_path, capsys):
    results = run_dir / "out" / "results.json"
    base = tmp_path / "baseline.json"
    assert main(["gate", str(results), "--baseline", str(base), "--update-baseline"]) == 0
    assert main(["gate", str(results), "--baseline", str(base), "--junit", str(tmp_path / "g.xml")]) == 0
    xml = (tmp_path / "g.xml").read_text()
    assert 'failures="0"' in xml and xml.count("<testcase") > 10
    # a baseline with clearly lower leakage fails the gate
    lower = tmp_path / "lower.json"
    lower.write_text(json.dumps(_shifted(json.loads(results.read_text()), 0.3)))
    capsys.readouterr()
    assert main(["gate", str(results), "--baseline", str(lower), "--junit", str(tmp_path / "f.xml")]) == 1
    assert "FAIL" in capsys.readouterr().out and "<failure" in (tmp_path / "f.xml").read_text()
    # absolute limits from the config's [gate] table
    (tmp_path / "limits.toml").write_text("[gate]\nmax_auc = 0.2\n")
    assert (
        main(["gate", str(results), "--baseline", str(base), "--config", str(tmp_path / "limits.toml")]) == 1
    )
    # unreadable or mismatched files: exit 2
    (tmp_path / "broken.json").write_text("{")
    assert main(["gate", str(results), "--baseline", str(tmp_path / "broken.json")]) == 2
    fewer = json.loads(results.read_text())
    fewer["targets"] = fewer["targets"][:1]
    (tmp_path / "fewer.json").write_text(json.dumps(fewer))
    assert main(["gate", str(tmp_path / "fewer.json"), "--baseline", str(base)]) == 2


def test_gate_fails_when_a_valid_bound_exceeds_the_accountant(run_dir, tmp_path, capsys):
    results = json.loads((run_dir / "out" / "results.json").read_text())
    # without a baseline, only the accountant checks run: they pass on a correct DP-SGD
    assert main(["gate", str(run_dir / "out" / "results.json")]) == 0
    assert "checks passed" in capsys.readouterr().out
    # the same audit against a (wrongly) claimed epsilon far below what it shows fails
    target = results["targets"][1]
    strongest = max(b["epsilon_lb"] for a in target["canary_audits"] for b in a["bounds"] if b["valid"])
    target["privacy"]["epsilon"] = strongest / 4
    (tmp_path / "claimed.json").write_text(json.dumps(results))
    assert main(["gate", str(tmp_path / "claimed.json"), "--junit", str(tmp_path / "g.xml")]) == 1
    out = capsys.readouterr().out
    assert "FAIL dpsgd-eps8" in out and "ABOVE it" in out and "DP bug" in out
    assert "<failure" in (tmp_path / "g.xml").read_text()
    # a results file with nothing to check is an error, not a pass
    results["targets"] = []
    (tmp_path / "empty.json").write_text(json.dumps(results))
    assert main(["gate", str(tmp_path / "empty.json")]) == 2


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _page_requests(browser, page, tmp, name):
    """Render ``page`` headless; return (DOM, URLs the page itself asked the network for).

    Chromium's own background requests (initiator "not an origin") are told apart from the
    page's (network isolation key of the file:// page) in Chromium's net log.
    """
    log = tmp / f"{name}.netlog.json"
    flags = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp / ('profile-' + name)}",
        f"--log-net-log={log}",
        "--net-log-capture-mode=Default",
    ]
    dom = subprocess.run([*flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    text = log.read_text()
    try:
        net = json.loads(text)
    except json.JSONDecodeError:  # a log cut short at exit
        net = json.loads(text.rstrip().rstrip(",") + "]}")
    start_job = net["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    urls = set()
    for event in net["events"]:
        params = event.get("params", {})
        if event["type"] == start_job and "file://" in params.get("network_isolation_key", ""):
            if not params["url"].startswith(("file:", "data:")):
                urls.add(params["url"])
    return dom.stdout, urls, flags


def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    """Every figure is drawn by a real browser, and the page asks for nothing over the network."""
    import os

    browser = _chromium()
    if browser is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is required in CI (.ci/run installs it)")
        pytest.skip("Debian's chromium is not installed here (apt-get install chromium); CI installs it")
    # the check can fail: a page with an external image is caught
    bad = tmp_path / "bad.html"
    bad.write_text('<html><body><img src="http://example.invalid/x.png"></body></html>')
    assert _page_requests(browser, bad, tmp_path, "bad")[1] == {"http://example.invalid/x.png"}

    page = run_dir / "out" / "report.html"
    dom, urls, flags = _page_requests(browser, page, tmp_path, "report")
    assert not urls, urls
    svgs = re.findall(r"<svg.*?</svg>", dom, flags=re.S)
    assert len(svgs) >= 4
    for svg in svgs:
        assert "<path" in svg or "<image" in svg  # every figure actually draws something
    shot = tmp_path / "report.png"
    subprocess.run(
        [*flags, "--window-size=1200,3000", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
    )
    assert shot.is_file() and shot.stat().st_size > 20_000


@settings(max_examples=150, deadline=None)
@given(
    key=st.sampled_from(
        ["count", "norm", "calibration", "threat_models", "confidence", "inputs", "input_kind", "bogus"]
    ),
    value=st.one_of(
        st.integers(-(10**12), 10**12),
        st.floats(allow_nan=True, allow_infinity=True),
        st.booleans(),
        st.text(alphabet="abc-xyz01 ", max_size=5),
        st.lists(st.one_of(st.text(alphabet="white-boxstepsfinal", max_size=20), st.integers()), max_size=3),
        st.sampled_from(
            [["white-box-steps"], ["white-box-final", "white-box-steps"], 0.3, 0.99, 2000, "ood"]
        ),
    ),
)
def test_canaries_table_fuzz_loads_or_says_what_is_wrong(tmp_path_factory, key, value):
    """Any value in the [canaries] table loads, or fails with a ValueError naming the table
    (exit 2 on the command line), never another exception."""
    from audit.config import _toml

    path = tmp_path_factory.mktemp("fuzz") / "c.toml"
    text = SMALL.replace("[canaries]\ncount = 2000\ninputs = 60", f"[canaries]\n{key} = {_toml(value)}")
    path.write_text(text)
    try:
        config = load_config(str(path))
    except ValueError as err:
        assert "[canaries]" in str(err)
    else:
        assert config.canaries.count >= 0
