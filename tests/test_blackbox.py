"""Black-box canary audits: input canaries, canary twins, and what the bounds find."""

import json

import numpy as np
import pytest
import torch

from audit.blackbox import (
    InputCanaries,
    blackbox_audit,
    canary_scores,
    load_input_canaries,
    make_input_canaries,
    save_input_canaries,
    train_twin,
)
from audit.checkpoint import load_checkpoint
from audit.cli import main
from audit.data import DataOptions, load_dataset
from audit.train import TrainRequest, train_target
from mechanisms import build_model


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_mislabelled_canaries_come_from_held_out_images_with_a_wrong_label(digits):
    held_out = np.zeros(digits.population, dtype=bool)
    held_out[::2] = True
    c = make_input_canaries(digits, held_out, 300, "mislabelled", np.random.default_rng(0))
    assert held_out[c.source].all() and len(set(c.source)) == 300
    assert (c.labels != digits.y.numpy()[c.source]).all()
    np.testing.assert_array_equal(c.x, digits.x.numpy()[c.source])
    assert 100 < c.included.sum() < 200  # Binomial(300, 1/2)
    # the wrong labels are spread over every other class
    assert len(np.unique(c.labels)) == digits.num_classes
    with pytest.raises(ValueError, match="only 899 held-out examples"):
        make_input_canaries(digits, held_out, 900, "mislabelled", np.random.default_rng(0))
    ood = make_input_canaries(digits, held_out, 50, "ood", np.random.default_rng(0))
    assert ood.x.shape == (50, *digits.input_shape) and (ood.source == -1).all()
    assert ood.x.min() >= digits.x.min() and ood.x.max() <= digits.x.max()


def test_canary_files_round_trip_and_are_checked(digits, tmp_path):
    held_out = np.ones(digits.population, dtype=bool)
    c = make_input_canaries(digits, held_out, 40, "mislabelled", np.random.default_rng(1))
    save_input_canaries(tmp_path / "c.npz", c, np.arange(40.0))
    back = load_input_canaries(tmp_path / "c.npz", digits)
    np.testing.assert_array_equal(back.labels, c.labels)
    np.testing.assert_array_equal(back.included, c.included)
    assert back.kind == "mislabelled"
    np.savez(tmp_path / "bad.npz", x=c.x, labels=c.labels)
    with pytest.raises(ValueError, match="lacks included"):
        load_input_canaries(tmp_path / "bad.npz")
    np.savez(tmp_path / "range.npz", x=c.x, labels=c.labels + 20, included=c.included)
    with pytest.raises(ValueError, match="labels outside"):
        load_input_canaries(tmp_path / "range.npz", digits)
    np.savez(tmp_path / "shape.npz", x=c.x[:, :, :4], labels=c.labels, included=c.included)
    with pytest.raises(ValueError, match="have shape"):
        load_input_canaries(tmp_path / "shape.npz", digits)
    with pytest.raises(ValueError, match="does not exist"):
        load_input_canaries(tmp_path / "none.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable"):
        load_input_canaries(tmp_path / "junk.npz")


@pytest.fixture(scope="module")
def memorising(tmp_path_factory):
    """A tiny MLP trained to memorise (many epochs, small synthetic data) and its twin."""
    out = tmp_path_factory.mktemp("memo") / "target"
    options = DataOptions(synthetic_samples=400, synthetic_features=20, synthetic_classes=4)
    request = TrainRequest(
        dataset="synthetic",
        model="mlp",
        mechanism="sgd",
        options=dict(epochs=150, batch_size=32, lr=0.05),
        data_options=options,
        seed=0,
        device="cpu",
        progress=False,
    )
    train_target(request, out)
    data = load_dataset("synthetic", options)
    audit = train_twin(
        out,
        data,
        count=150,
        kind="mislabelled",
        seed=0,
        device_name="cpu",
        queries=1,
        delta=1e-5,
        confidence=0.95,
    )
    return out, data, audit


def test_memorised_canaries_reach_the_ceiling(memorising):
    _, _, audit = memorising
    one_run = next(b for b in audit["bounds"] if b["method"] == "one-run")
    assert audit["threat_model"] == "black-box" and audit["m"] == 150 and one_run["valid"]
    # a model that memorises shows every included canary: the bound is the ceiling for m
    assert one_run["saturated"] and one_run["epsilon_lb"] == pytest.approx(one_run["ceiling"])
    assert one_run["epsilon_lb"] > 2.0 and audit["accountant_epsilon"] is None
    assert "twin" in audit and 0 < audit["twin"]["test_accuracy"] <= 1


def test_canaries_never_included_find_nothing(memorising):
    """The same canaries scored on the target, which never saw them: no bound above 0."""
    out, data, _ = memorising
    twin = out / "twin"
    canaries = load_input_canaries(twin / "input_canaries.npz", data)
    target = load_checkpoint(out)
    model = build_model("mlp", data.input_shape, data.num_classes)
    model.load_state_dict(target.state_dict)
    scores = canary_scores(model, canaries, torch.device("cpu"), queries=1, stochastic=False)
    audit = blackbox_audit(
        scores, canaries, delta=1e-5, confidence=0.95, accountant_epsilon=None, formal=False
    )
    assert all(b["epsilon_lb"] == 0.0 for b in audit["bounds"]), audit["bounds"]


def test_twin_is_reused_and_the_target_is_untouched(memorising):
    out, data, audit = memorising
    stamp = (out / "twin" / "model.safetensors").stat().st_mtime_ns
    again = train_twin(
        out,
        data,
        count=150,
        kind="mislabelled",
        seed=0,
        device_name="cpu",
        queries=1,
        delta=1e-5,
        confidence=0.95,
    )
    assert (out / "twin" / "model.safetensors").stat().st_mtime_ns == stamp
    assert again["bounds"] == audit["bounds"]
    meta = json.loads((out / "model.json").read_text())
    twin_meta = json.loads((out / "twin" / "model.json").read_text())
    assert twin_meta["members"] == meta["members"] + audit["included"]


def test_input_canaries_need_both_kinds():
    with pytest.raises(ValueError, match="included and excluded"):
        InputCanaries(
            np.zeros((20, 3), np.float32),
            np.zeros(20, np.int64),
            np.ones(20, bool),
            np.zeros(20, np.int64),
            "ood",
        )


def test_canary_command_black_box(tmp_path, capsys):
    out = tmp_path / "bb"
    argv = ["canary", "--mechanism", "sgd", "--dataset", "digits", "--model", "mlp", "--epochs", "30"]
    argv += ["--threat-model", "black-box", "--input-canaries", "200", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "black-box audit: 200 mislabelled input canaries" in printed and "one-run" in printed
    (target,) = json.loads((out / "results.json").read_text())["targets"]
    assert [a["threat_model"] for a in target["canary_audits"]] == ["black-box"]
    assert not (out / "canaries.npz").exists() and (out / "twin" / "input_canaries.npz").is_file()


def test_a_canary_set_planted_in_your_own_training_is_audited(tmp_path, capsys, digits):
    """Export a canary set, plant it in a plain PyTorch training loop written here, audit."""
    keep = np.zeros(digits.population, dtype=bool)
    keep[np.random.default_rng(0).permutation(digits.population)[:600]] = True
    np.save(tmp_path / "members.npy", keep)
    file = tmp_path / "canaries.npz"
    argv = ["canary-set", "--dataset", "digits", "--members", str(tmp_path / "members.npy"), "--count", "200"]
    assert main([*argv, "--out", str(file)]) == 0
    assert main([*argv, "--out", str(file)]) == 2  # not overwritten
    c = load_input_canaries(file, digits)
    assert not keep[c.source].any()  # drawn from non-members only
    x = torch.cat([digits.x[torch.from_numpy(keep)], torch.from_numpy(c.x[c.included])])
    y = torch.cat([digits.y[torch.from_numpy(keep)], torch.from_numpy(c.labels[c.included])])
    torch.manual_seed(0)
    model = build_model("mlp", digits.input_shape, digits.num_classes, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):  # memorise: full batch, many steps
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    torch.save(model.state_dict(), tmp_path / "mine.pt")
    capsys.readouterr()
    common = ["--model", "mlp", "--dataset", "digits", "--members", str(tmp_path / "members.npy")]
    common += ["--attacks", "loss", "--resamples", "100", "--quiet"]
    assert (
        main(
            [
                "audit",
                str(tmp_path / "mine.pt"),
                *common,
                "--canaries",
                str(file),
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert "black-box audit: 200 mislabelled input canaries" in capsys.readouterr().out
    (target,) = json.loads((tmp_path / "a" / "results.json").read_text())["targets"]
    one_run = next(b for b in target["canary_audits"][0]["bounds"] if b["method"] == "one-run")
    assert one_run["epsilon_lb"] > 1.0
    # without the file, the results say why no canary audit ran
    assert main(["audit", str(tmp_path / "mine.pt"), *common, "--out", str(tmp_path / "b")]) == 0
    (target,) = json.loads((tmp_path / "b" / "results.json").read_text())["targets"]
    assert any("canaries cannot be added" in line for line in target["not_run"])
    assert (
        main(
            [
                "audit",
                str(tmp_path / "mine.pt"),
                *common,
                "--canaries",
                str(tmp_path / "none.npz"),
                "--out",
                str(tmp_path / "c"),
            ]
        )
        == 2
    )
