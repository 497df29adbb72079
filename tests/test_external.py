"""Auditing models trained anywhere (issue 21): the user's own training function as the recipe,
precomputed logits in mia-audit's and the LiRA code's layouts, checkpoints saved through
training wrappers (Opacus, torch.compile, DataParallel), and the Python API."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from audit.cli import main
from audit.data import DataOptions, load_dataset
from mechanisms import build_model

TRAINER = '''
import torch
from torch.nn import functional as F


def train(model, x, y, *, seed, epochs=8, lr=0.2, batch_size=32):
    """A plain PyTorch loop, nothing of mia-audit."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=g)
        for start in range(0, len(y), batch_size):
            idx = order[start : start + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
'''

DATA = ["--dataset", "synthetic", "--synthetic-samples", "240"]


@pytest.fixture
def user_code(tmp_path, monkeypatch):
    (tmp_path / "plain_train.py").write_text(TRAINER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import plain_train

    return importlib.reload(plain_train)


def _target(tmp_path, user_code):
    """A target trained by the user's script; its weights, membership and logits as files."""
    data = load_dataset("synthetic", DataOptions(synthetic_samples=240))
    members = np.zeros(data.population, dtype=bool)
    members[np.random.default_rng(0).permutation(data.population)[: data.population // 2]] = True
    model = build_model("mlp", data.input_shape, data.num_classes, seed=1)
    user_code.train(model, data.x[members], data.y[members], seed=2)
    save_file(model.state_dict(), str(tmp_path / "target.safetensors"))
    np.save(tmp_path / "members.npy", members)
    with torch.no_grad():
        logits = model.eval()(data.x)[:, None, :].numpy()  # [N, Q = 1, C], computed by the user
    np.save(tmp_path / "target_logits.npy", logits)
    return data, model


def _attacks(path):
    return json.loads(path.read_text())["targets"][0]["attacks"]


def test_a_user_trainer_and_imported_logits_give_identical_metrics(tmp_path, user_code):
    _target(tmp_path, user_code)
    (tmp_path / "recipe.toml").write_text(
        '[recipe]\ntrainer = "plain_train:train"\noptions = { epochs = 8, lr = 0.2 }\n'
    )
    common = ["--members", str(tmp_path / "members.npy"), "--references", "4", "--workers", "1"]
    common += ["--attacks", "loss,lira-online,lira-offline,rmia", "--resamples", "200", "--quiet"]
    a = tmp_path / "trainer"
    argv = ["audit", str(tmp_path / "target.safetensors"), "--model", "mlp", *DATA, *common]
    assert main([*argv, "--recipe", str(tmp_path / "recipe.toml"), "--out", str(a)]) == 0
    recipe = json.loads((a / "references" / "audit" / "recipe.json").read_text())
    assert recipe["trainer"] == "plain_train:train" and recipe["mechanism"] == "trainer"
    # the references' logits in the LiRA code's layout, the target's logits from the user's model
    lira = tmp_path / "lira"
    assert main(["export", str(a), "--lira", str(lira)]) == 0
    assert len(list(lira.glob("experiment-*_4"))) == 4
    assert np.load(lira / "experiment-0_4" / "logits" / "0000000000.npy").shape == (240, 1, 1, 2)
    b = tmp_path / "imported"
    argv = ["audit", "--logits", str(tmp_path / "target_logits.npy"), *DATA, *common]
    assert main([*argv, "--reference-logits", str(lira), "--out", str(b)]) == 0
    assert _attacks(a / "results.json") == _attacks(b / "results.json")
    with (
        np.load(a / "targets" / "audit" / "scores.npz") as sa,
        np.load(b / "targets" / "audit" / "scores.npz") as sb,
    ):
        assert sorted(sa.files) == sorted(sb.files)
        for name in sa.files:  # every attack's scores, bit for bit
            np.testing.assert_array_equal(sa[name], sb[name])
    # and mia-audit's own layout reads back the same
    c = tmp_path / "ours"
    argv = ["audit", "--logits", str(tmp_path / "target_logits.npy"), *DATA, *common]
    assert main([*argv, "--reference-logits", str(a / "references" / "audit"), "--out", str(c)]) == 0
    assert _attacks(c / "results.json") == _attacks(a / "results.json")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda z, k: (z.astype(object), k), "not a plain numeric"),
        (lambda z, k: (z[:100], k), "examples"),
        (lambda z, k: (z[..., :1], k), "classes"),
        (lambda z, k: (np.where(np.arange(240)[:, None, None, None] == 3, np.nan, z), k), "NaN"),
        (lambda z, k: (z[:, 0], k), "shape"),
        (lambda z, k: (z, None), "keep.npy: no such file"),
        (lambda z, k: (z, k.astype(np.int64)), "membership must be bool"),
    ],
)
def test_malformed_reference_files_are_refused_naming_them(tmp_path, make, message, capsys):
    rng = np.random.default_rng(0)
    lira = tmp_path / "lira"
    for i in range(4):
        exp = lira / f"experiment-{i}_4"
        (exp / "logits").mkdir(parents=True)
        z, k = (
            rng.normal(size=(240, 1, 1, 2)).astype(np.float32),
            np.arange(240) % 4 < 2 if i % 2 else np.arange(240) % 4 >= 2,
        )
        if i == 2:
            z, k = make(z, k)
        np.save(exp / "logits" / "0000000000.npy", z, allow_pickle=True)
        if k is not None:
            np.save(exp / "keep.npy", k)
    np.save(tmp_path / "t.npy", rng.normal(size=(240, 1, 2)).astype(np.float32))
    np.save(tmp_path / "m.npy", np.arange(240) % 2 == 0)
    argv = ["audit", "--logits", str(tmp_path / "t.npy"), *DATA, "--members", str(tmp_path / "m.npy")]
    argv += [
        "--reference-logits",
        str(lira),
        "--attacks",
        "lira-online",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "experiment-2_4" in err, err


def test_target_logits_are_checked(tmp_path, capsys):
    np.save(tmp_path / "m.npy", np.arange(240) % 2 == 0)
    for bad, message in (
        (np.zeros((240, 1, 3), np.float32), "classes"),
        (np.zeros((240, 1, 2), np.int64), "floating"),
    ):
        np.save(tmp_path / "t.npy", bad)
        argv = ["audit", "--logits", str(tmp_path / "t.npy"), *DATA, "--members", str(tmp_path / "m.npy")]
        assert main([*argv, "--attacks", "loss", "--out", str(tmp_path / "o"), "--overwrite", "--quiet"]) == 2
        assert message in capsys.readouterr().err
    argv = [
        "audit",
        *DATA,
        "--members",
        str(tmp_path / "m.npy"),
        "--attacks",
        "loss",
        "--out",
        str(tmp_path / "p"),
    ]
    assert main(argv) == 2
    assert "WEIGHTS or its precomputed --logits" in capsys.readouterr().err


@pytest.mark.parametrize("prefix", ["_module.", "_orig_mod.", "module.", "module._orig_mod."])
def test_wrapper_prefixes_are_removed_and_named(tmp_path, user_code, prefix, capsys):
    _, model = _target(tmp_path, user_code)
    save_file({prefix + k: v for k, v in model.state_dict().items()}, str(tmp_path / "wrapped.safetensors"))
    argv = ["audit", str(tmp_path / "wrapped.safetensors"), "--model", "mlp", *DATA]
    argv += ["--members", str(tmp_path / "members.npy"), "--attacks", "loss", "--out", str(tmp_path / "o")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for part in prefix.split(".")[:-1]:
        assert f"removed the prefix {part}." in out
    plain = tmp_path / "plain"
    argv = ["audit", str(tmp_path / "target.safetensors"), "--model", "mlp", *DATA]
    argv += ["--members", str(tmp_path / "members.npy"), "--attacks", "loss", "--out", str(plain)]
    assert main(argv) == 0
    assert _attacks(tmp_path / "o" / "results.json") == _attacks(plain / "results.json")


def test_an_opacus_trained_cnn_audits_without_editing(tmp_path):
    opacus = pytest.importorskip("opacus")
    data = load_dataset("mnist5k")
    members = np.arange(data.population) % 2 == 0
    model = build_model("cnn", data.input_shape, data.num_classes, seed=0)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data.x[members][:512], data.y[members][:512]), batch_size=128
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    engine = opacus.PrivacyEngine()
    private, optimizer, loader = engine.make_private(
        module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    for xb, yb in loader:
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(private(xb), yb).backward()
        optimizer.step()
    state = private.state_dict()
    assert all(k.startswith("_module.") for k in state)
    torch.save(state, tmp_path / "opacus.pt")
    np.save(tmp_path / "members.npy", members)
    argv = ["audit", str(tmp_path / "opacus.pt"), "--model", "cnn", "--dataset", "mnist5k"]
    argv += [
        "--members",
        str(tmp_path / "members.npy"),
        "--attacks",
        "loss",
        "--out",
        str(tmp_path / "o"),
        "--quiet",
    ]
    assert main(argv) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())["targets"][0]
    assert results["checkpoint_prefixes_removed"] == ["_module. (Opacus GradSampleModule)"]
    assert 0.0 <= results["attacks"]["loss"]["auc"] <= 1.0


def test_the_python_api_equals_the_command_line(tmp_path, user_code):
    from audit import audit_model

    data, model = _target(tmp_path, user_code)
    members = np.load(tmp_path / "members.npy")
    lira = tmp_path / "lira"
    (tmp_path / "recipe.toml").write_text('[recipe]\ntrainer = "plain_train:train"\n')
    argv = [
        "audit",
        str(tmp_path / "target.safetensors"),
        "--model",
        "mlp",
        *DATA,
        "--members",
        str(tmp_path / "members.npy"),
    ]
    argv += ["--references", "4", "--workers", "1", "--attacks", "loss,lira-online", "--resamples", "200"]
    assert (
        main([*argv, "--recipe", str(tmp_path / "recipe.toml"), "--out", str(tmp_path / "cli"), "--quiet"])
        == 0
    )
    api = audit_model(
        model,
        data.x,
        data.y,
        members,
        trainer=user_code.train,
        make_model=lambda: build_model("mlp", data.input_shape, data.num_classes),
        references=4,
        attacks=("loss", "lira-online"),
        resamples=200,
    )
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())["targets"][0]["attacks"]
    assert api["targets"][0]["attacks"] == cli
    del lira
