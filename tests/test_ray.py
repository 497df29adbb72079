"""The Ray executor on a real local Ray instance (issue 20): same results as local workers,
a killed worker's job retried, a failing job's error reported, a killed driver resumed."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import ray

from audit.cli import main
from audit.executors import ExecutorSettings, JobError, LocalExecutor, RayExecutor
from audit.references import Recipe, ensure_references

from .test_references import kill_then_resume

# the helpers below run in Ray workers, which may not find this test module on their path
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    out = tmp_path_factory.mktemp("target") / "t"
    argv = ["train", "--dataset", "synthetic", "--synthetic-samples", "300", "--model", "mlp"]
    assert main([*argv, "--epochs", "3", "--batch-size", "32", "--quiet", "--out", str(out)]) == 0
    return out


def _recipe(target):
    meta = json.loads((target / "model.json").read_text())
    return Recipe.from_target_meta(meta, queries=1, seed=0)


def _data(target):
    from audit.data import DataOptions, load_dataset

    meta = json.loads((target / "model.json").read_text())
    return load_dataset(meta["dataset"]["id"], DataOptions(**meta["dataset"]["options"]))


def test_references_through_ray_equal_those_of_local_workers(ray_instance, target, tmp_path):
    data = _data(target)
    local_keep, local = ensure_references(
        tmp_path / "local", _recipe(target), 4, 300, executor=LocalExecutor(2)
    )
    ray_keep, remote = ensure_references(
        tmp_path / "ray", _recipe(target), 4, 300, executor=RayExecutor(), data=data
    )
    np.testing.assert_array_equal(local_keep, ray_keep)
    assert remote.dtype == np.float32 and remote.shape == (4, 300, 1, 2)
    np.testing.assert_array_equal(local, remote)  # bit for bit


def _fail_on_two(x):
    if x == 2:
        raise RuntimeError("boom")
    return x * 10


def test_a_failing_job_reports_its_error(ray_instance):
    with pytest.raises(JobError, match="job 2 failed: RuntimeError: boom"):
        list(RayExecutor().map(_fail_on_two, [0, 1, 2, 3]))
    assert sorted(RayExecutor().map(_fail_on_two, [0, 1, 3])) == [(0, 0), (1, 10), (2, 30)]


def _pid_then_wait(job):
    """Record this worker's pid, then wait (first attempt) for the test to kill it."""
    folder = Path(job["folder"])
    attempt = len(list(folder.glob(f"{job['i']}-*.pid")))
    (folder / f"{job['i']}-{attempt}.pid").write_text(str(os.getpid()))
    if attempt == 0 and job["i"] == 0:
        time.sleep(60)
    return job["i"] + attempt * 100


def _wait_for(path, seconds=60):
    deadline = time.time() + seconds
    while not path.is_file() and time.time() < deadline:
        time.sleep(0.05)
    assert path.is_file(), f"{path} never appeared"
    return int(path.read_text())


def test_a_worker_killed_mid_job_is_retried(ray_instance, tmp_path):
    jobs = [{"i": i, "folder": str(tmp_path)} for i in range(3)]
    results = RayExecutor(ExecutorSettings(kind="ray", retries=2)).map(_pid_then_wait, jobs)
    pid = _wait_for(tmp_path / "0-0.pid")
    os.kill(pid, signal.SIGKILL)
    assert dict(results) == {0: 100, 1: 1, 2: 2}  # job 0 ran again (its second attempt)


def test_a_job_whose_worker_always_dies_stops_the_run(ray_instance, tmp_path):
    def die(job):
        os._exit(3)

    start = time.time()
    with pytest.raises(JobError, match="job 0: its worker died 2 time"):
        list(RayExecutor(ExecutorSettings(kind="ray", retries=1)).map(die, [0]))
    assert time.time() - start < 120


def test_references_survive_a_killed_worker_with_identical_logits(ray_instance, target, tmp_path):
    """A reference whose Ray worker is SIGKILLed mid-training is trained again from its seeds:
    the logits equal those of an undisturbed run."""
    from audit import references

    data = _data(target)
    _, undisturbed = ensure_references(
        tmp_path / "a", _recipe(target), 2, 300, executor=RayExecutor(), data=data
    )

    marker = tmp_path / "pids"
    marker.mkdir()

    def slow_first_attempt(job):
        attempt = len(list(marker.glob(f"{job['index']}-*")))
        (marker / f"{job['index']}-{attempt}").write_text(str(os.getpid()))
        if attempt == 0 and job["index"] == 1:
            time.sleep(60)
        return references.train_reference(job)

    executor = RayExecutor(ExecutorSettings(kind="ray", retries=2))
    original = executor.map

    def map_with_kill(fn, jobs, shared=None):
        results = original(slow_first_attempt, jobs, shared)
        os.kill(_wait_for(marker / "1-0"), signal.SIGKILL)
        yield from results

    executor.map = map_with_kill
    _, again = ensure_references(tmp_path / "b", _recipe(target), 2, 300, executor=executor, data=data)
    assert (marker / "1-1").is_file()  # the killed job ran a second time
    np.testing.assert_array_equal(undisturbed, again)


def test_a_shipped_dataset_is_checked_against_its_hash():
    from audit.data import DataError, install_shared, load_dataset, shared_payload

    payload = shared_payload(load_dataset("digits"))
    payload["x"] = payload["x"].copy()
    payload["x"][0, 0] += 1
    with pytest.raises(DataError, match="corrupted in transit"):
        install_shared(payload)


SMALL = """
seed = 0
[data]
dataset = "synthetic"
synthetic_samples = 300
[target]
model = "mlp"
[attack]
attacks = ["loss", "lira-online", "rmia"]
references = 4
resamples = 100
workers = 2
[[mechanisms]]
name = "sgd"
options = { epochs = 3, batch_size = 32 }
[[mechanisms]]
name = "dpsgd"
budgets = [4.0]
options = { epochs = 2, batch_size = 64, lr = 0.5 }
[canaries]
count = 500
inputs = 40
"""


def test_run_with_the_ray_executor_equals_the_local_run(ray_instance, tmp_path):
    (tmp_path / "c.toml").write_text(SMALL)
    assert main(["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "local"), "--quiet"]) == 0
    argv = ["run", str(tmp_path / "c.toml"), "--out", str(tmp_path / "ray"), "--quiet", "--executor", "ray"]
    assert main(argv) == 0
    local = json.loads((tmp_path / "local" / "results.json").read_text())
    remote = json.loads((tmp_path / "ray" / "results.json").read_text())
    assert [t["attacks"] for t in local["targets"]] == [t["attacks"] for t in remote["targets"]]
    assert [t["canary_audits"] for t in local["targets"]] == [t["canary_audits"] for t in remote["targets"]]
    assert (tmp_path / "local" / "config.toml").read_text() == (tmp_path / "ray" / "config.toml").read_text()
    # targets, their canary records and their twins were trained by Ray workers, bit for bit
    for tid in ("sgd", "dpsgd-eps4"):
        for name in ("model.safetensors", "keep.npy", "canaries.npz", "twin/model.safetensors"):
            if tid == "sgd" and name == "canaries.npz":
                continue
            a = (tmp_path / "local" / "targets" / tid / name).read_bytes()
            assert a == (tmp_path / "ray" / "targets" / tid / name).read_bytes(), (tid, name)


def test_a_killed_driver_resumes_and_trains_only_the_missing_references(tmp_path):
    """SIGKILL of 'mia-audit attack --executor ray' (it started its own Ray instance): the rerun
    keeps every finished reference (same files) and trains the rest."""
    target = tmp_path / "t"  # slow enough (about a second a reference) to be killed mid-way
    argv = ["train", "--dataset", "synthetic", "--synthetic-samples", "300", "--model", "mlp"]
    assert main([*argv, "--epochs", "100", "--batch-size", "16", "--quiet", "--out", str(target)]) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "audit.cli", "attack", "--target", str(target), "--attacks", "lira-online"]
    cmd += ["--references", "8", "--executor", "ray", "--resamples", "100", "--quiet", "--out", str(out)]
    kill_then_resume(cmd, out, references=8, seconds=180)
