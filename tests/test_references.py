"""Reference models: balanced halves, resume without retraining, recipe checks, executors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from audit.attack import AttackRequest, attack_target
from audit.cli import main
from audit.executors import JobError, LocalExecutor, SerialExecutor
from audit.references import balanced_keep


def test_balanced_keep():
    keep = balanced_keep(6, 500, np.random.default_rng(0))
    assert keep.shape == (6, 500) and (keep.sum(0) == 3).all()
    assert 0.4 < keep.mean(1).min() <= keep.mean(1).max() < 0.6
    with pytest.raises(ValueError, match="even"):
        balanced_keep(5, 10, np.random.default_rng(0))


def _fail_on_two(x):
    if x == 2:
        raise RuntimeError("boom")
    return x * 10


def _die(x):
    os._exit(3)


def test_executors_surface_job_errors():
    assert sorted(SerialExecutor().map(_fail_on_two, [0, 1])) == [(0, 0), (1, 10)]
    with pytest.raises(JobError, match="job 2 failed: RuntimeError: boom"):
        list(SerialExecutor().map(_fail_on_two, [0, 1, 2]))
    with pytest.raises(JobError, match="job 2 failed: RuntimeError: boom"):
        list(LocalExecutor(2).map(_fail_on_two, [0, 1, 2, 3]))
    with pytest.raises(JobError, match="worker process died"):
        list(LocalExecutor(2).map(_die, [0, 1]))


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    out = tmp_path_factory.mktemp("target")
    argv = [
        "train",
        "--dataset",
        "synthetic",
        "--synthetic-samples",
        "400",
        "--model",
        "mlp",
        "--epochs",
        "30",
        "--batch-size",
        "32",
        "--quiet",
        "--overwrite",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    return out


def test_attack_writes_results_and_resumes_without_retraining(target, tmp_path):
    out = tmp_path / "attack"
    request = AttackRequest(
        target=str(target),
        attacks=("loss", "lira-online", "rmia"),
        references=4,
        workers=1,
        resamples=100,
        progress=False,
    )
    results = attack_target(request, out)
    assert results["schema"] == "mia-audit/results/v1"
    t = results["targets"][0]
    assert t["id"] == "sgd" and t["references"] == 4 and t["queries"] == 1
    assert set(t["attacks"]) == {"loss", "lira-online", "rmia"}
    for m in t["attacks"].values():
        assert m["members"] == 200 and m["non_members"] == 200 and 0 <= m["auc"] <= 1
    folder = out / "references" / "sgd"
    keep = np.load(folder / "keep.npy")
    assert keep.shape == (4, 400) and (keep.sum(0) == 2).all()
    logits = np.load(folder / "logits" / "0.npy")
    assert logits.shape == (400, 1, 2) and logits.dtype == np.float32
    # a finished reference is never trained again
    stamps = {p.name: p.stat().st_mtime_ns for p in (folder / "logits").iterdir()}
    third = np.load(folder / "logits" / "3.npy")
    (folder / "logits" / "3.npy").unlink()
    again = attack_target(request, out)
    assert again["targets"][0]["attacks"]["loss"] == t["attacks"]["loss"]
    for name, stamp in stamps.items():
        if name != "3.npy":
            assert (folder / "logits" / name).stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(np.load(folder / "logits" / "3.npy"), third)  # same seeds, same model


def test_references_with_another_recipe_are_refused(target, tmp_path):
    out = tmp_path / "attack"
    request = AttackRequest(
        target=str(target), attacks=("lira-online",), references=2, workers=1, resamples=100, progress=False
    )
    attack_target(request, out)
    recipe = out / "references" / "sgd" / "recipe.json"
    saved = json.loads(recipe.read_text())
    saved["hyperparameters"]["lr"] = 0.5
    recipe.write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="another recipe: hyperparameters.lr: 0.5 in the folder"):
        attack_target(request, out)


def test_too_few_references_is_a_clear_error(target, tmp_path, capsys):
    code = main(
        [
            "attack",
            "--target",
            str(target),
            "--attacks",
            "lira-online",
            "--references",
            "1",
            "--out",
            str(tmp_path / "a"),
            "--quiet",
        ]
    )
    assert code == 2 and "at least 2 reference models" in capsys.readouterr().err
    code = main(
        [
            "attack",
            "--target",
            str(target),
            "--attacks",
            "lira-online:bogus=1",
            "--out",
            str(tmp_path / "b"),
            "--quiet",
        ]
    )
    assert code == 2 and "bad option 'bogus=1'" in capsys.readouterr().err


def test_kill_9_resumes(target, tmp_path):
    """A run killed with SIGKILL mid-way keeps its finished references and resumes from them."""
    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "audit.cli",
        "attack",
        "--target",
        str(target),
        "--attacks",
        "lira-online",
        "--references",
        "8",
        "--workers",
        "1",
        "--resamples",
        "100",
        "--quiet",
        "--out",
        str(out),
    ]
    kill_then_resume(cmd, out, references=8)


def kill_then_resume(cmd, out, *, references, seconds=120):
    """SIGKILL ``cmd`` once 2 references are written; the rerun keeps them untouched and
    trains the rest (shared with tests/test_ray.py)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    logits = out / "references" / "sgd" / "logits"
    deadline = time.time() + seconds
    while time.time() < deadline and (not logits.is_dir() or len(list(logits.glob("*.npy"))) < 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in logits.glob("*.npy"))
    assert 2 <= len(done) < references, done
    stamps = {name: (logits / name).stat().st_mtime_ns for name in done}
    rerun = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    for name, stamp in stamps.items():
        assert (logits / name).stat().st_mtime_ns == stamp
    assert len(list(logits.glob("*.npy"))) == references and (out / "results.json").is_file()


def _running(pid):
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _descendants(pid):
    """Every process below ``pid`` (Linux /proc)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker cleanup is tested on Linux")
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_workers_die_with_the_main_process(target, tmp_path, sig):
    """Issue 19: after kill -9 or SIGTERM of the main process, the forkserver and its workers
    kept training and held the caller's pipes open (a captured run blocked for 11 minutes)."""
    out = tmp_path / "orphans"
    cmd = [sys.executable, "-m", "audit.cli", "attack", "--target", str(target), "--attacks", "lira-online"]
    cmd += ["--references", "16", "--workers", "2", "--resamples", "100", "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    logits = out / "references" / "sgd" / "logits"
    deadline = time.time() + 120
    while time.time() < deadline and (not logits.is_dir() or not list(logits.glob("*.npy"))):
        time.sleep(0.05)
    below = _descendants(proc.pid)
    assert below, "the workers should be running"
    proc.send_signal(sig)
    proc.wait(timeout=30)
    proc.communicate(timeout=30)  # EOF only once no process holds the pipe (TimeoutExpired: held)
    deadline = time.time() + 20
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in below):
        time.sleep(0.1)
    alive = [p for p in below if _running(p)]
    assert not alive, f"{len(alive)} worker processes outlived the main one"
