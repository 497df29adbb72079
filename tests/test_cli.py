"""The command line: train end to end, listings, exit codes, nothing lost on bad input."""

import json

import numpy as np
import pytest
from safetensors.torch import load_file

from audit.cli import main


def _train(tmp_path, *extra, name="run"):
    out = tmp_path / name
    argv = [
        "train",
        "--dataset",
        "digits",
        "--model",
        "mlp",
        "--epochs",
        "10",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]
    return main(argv), out


def test_train_digits_mlp_writes_checkpoint_and_reaches_accuracy(tmp_path, capsys):
    code, out = _train(tmp_path)
    assert code == 0
    meta = json.loads((out / "model.json").read_text())
    keep = np.load(out / "keep.npy")
    assert keep.dtype == bool and keep.shape == (1797,) and keep.sum() == 1797 // 2
    assert meta["mechanism"] == "sgd" and meta["privacy"]["formal"] is False
    assert meta["test_accuracy"] >= 0.90, meta["test_accuracy"]
    assert meta["dataset"]["id"] == "digits" and meta["seed"] == 0
    assert set(load_file(out / "model.safetensors")) == {"1.weight", "1.bias", "3.weight", "3.bias"}
    assert "held-out accuracy" in capsys.readouterr().out


def test_same_seed_same_weights_other_seed_differs(tmp_path):
    _, a = _train(tmp_path, "--epochs", "2", name="a")
    _, b = _train(tmp_path, "--epochs", "2", name="b")
    _, c = _train(tmp_path, "--epochs", "2", "--seed", "1", name="c")
    wa, wb, wc = (load_file(d / "model.safetensors") for d in (a, b, c))
    assert all((wa[k] == wb[k]).all() for k in wa)
    assert not all((wa[k] == wc[k]).all() for k in wa)
    assert (np.load(a / "keep.npy") == np.load(b / "keep.npy")).all()


def test_existing_output_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _ = _train(tmp_path)
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    code, _ = _train(tmp_path, "--epochs", "1", "--overwrite")
    assert code == 0 and (out / "model.json").exists() and (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--dataset", "imagenet", "--model", "mlp"], "known datasets"),
        (["--dataset", "digits", "--model", "vgg"], "known models"),
        (["--dataset", "digits", "--model", "mlp", "--mechanism", "magic"], "known mechanisms: dplis, dpsgd"),
        (
            ["--dataset", "digits", "--model", "mlp", "--noise-multiplier", "1"],
            "does not apply to mechanism 'sgd'",
        ),
        (["--dataset", "mnist", "--model", "mlp", "--data-root", "/nonexistent"], "does not exist"),
        (["--dataset", "digits", "--model", "mlp", "--epochs", "0"], "epochs must be >= 1"),
        (
            [
                "--dataset",
                "digits",
                "--model",
                "tests.user_models:with_batchnorm",
                "--mechanism",
                "dpsgd",
                "--noise-multiplier",
                "1",
            ],
            "BatchNorm",
        ),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert main(["train", *argv, "--quiet", "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_non_finite_loss_stops_and_keeps_nothing(tmp_path, capsys):
    code, out = _train(tmp_path, "--lr", "1e30", "--momentum", "0")
    err = capsys.readouterr().err
    assert code == 2 and "non-finite loss" in err and "epoch 1, step" in err
    assert not out.exists() or not any(out.iterdir())


def test_listings(capsys):
    for kind, expected in [("datasets", "mnist5k"), ("models", "resnet20"), ("mechanisms", "dpsgd")]:
        assert main([kind]) == 0
        assert expected in capsys.readouterr().out
    assert main(["attacks"]) == 0


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0 and "--noise-multiplier" in capsys.readouterr().out


def test_canary_command_audits_a_mechanism(tmp_path, capsys):
    out = tmp_path / "canary"
    argv = ["canary", "--mechanism", "dpsgd", "--dataset", "digits", "--model", "mlp", "--epsilon", "4"]
    argv += ["--epochs", "4", "--batch-size", "64", "--canaries", "4000", "--quiet", "--out", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "white-box-steps" in printed and "clopper-pearson" in printed and "<= epsilon 4" in printed
    results = json.loads((out / "results.json").read_text())
    (target,) = results["targets"]
    assert target["attacks"] == {} and len(target["canary_audits"]) == 2
    meta = json.loads((out / "model.json").read_text())
    assert meta["canaries"]["count"] == 4000 and meta["canaries"]["law"]["noise"] == "gaussian"
    assert (out / "report.html").is_file() and (out / "canaries.npz").is_file()
    # the gate checks it against the accountant with no baseline needed
    assert main(["gate", str(out / "results.json")]) == 0
    # attacking the checkpoint later carries its canary audits along
    attacked = tmp_path / "attacked"
    assert main(["attack", "--target", str(out), "--attacks", "loss", "--quiet", "--out", str(attacked)]) == 0
    (again,) = json.loads((attacked / "results.json").read_text())["targets"]
    assert again["canary_audits"] == target["canary_audits"] and "loss" in again["attacks"]
    # the same output folder is not overwritten
    assert main(argv) == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--mechanism", "residual", "--model", "resnet8", "--threat-model", "white-box"],
            "no gradient to plant",
        ),
        (
            ["--mechanism", "sgd", "--threat-model", "black-box", "--input-canaries", "1000"],
            "only 899 held-out",
        ),
        (["--mechanism", "dpsgd", "--noise-multiplier", "1", "--canaries", "50"], "at least 100"),
        (["--mechanism", "dpsgd", "--noise-multiplier", "1", "--calibration", "1.5"], "calibration"),
        (["--mechanism", "dpsgd", "--noise-multiplier", "1", "--canary-norm", "0.5"], "norm"),
        (["--mechanism", "dpsgd", "--noise-multiplier", "1", "--confidence", "1"], "confidence"),
        (["--mechanism", "dpsgd"], "exactly one of noise_multiplier or epsilon"),
    ],
)
def test_canary_bad_input_exits_2(tmp_path, capsys, extra, message):
    out = tmp_path / "c"
    assert (
        main(["canary", "--dataset", "digits", "--model", "mlp", *extra, "--quiet", "--out", str(out)]) == 2
    )
    assert message in capsys.readouterr().err
    assert not out.exists() or not any(out.iterdir())


def test_help_listings_and_argument_errors_answer_without_importing_torch():
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from audit.cli import main\n"
        "for argv in (['datasets'], ['--help'], ['train', '--bogus'], ['nonsense']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('torch' in sys.modules, 'mechanisms' in sys.modules)\n"
    )
    # train --bogus builds the train options (they come from the mechanisms): allowed to import
    out = subprocess.run(
        [sys.executable, "-c", code.replace(", ['train', '--bogus']", "")], capture_output=True, text=True
    )
    assert out.stdout.strip().splitlines()[-1] == "False False", out.stdout + out.stderr
    assert "mnist5k" in out.stdout
