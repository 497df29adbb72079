"""Checkpoints: safe formats only, and mismatches named precisely."""

import numpy as np
import pytest
import torch

from audit.checkpoint import CheckpointError, apply_weights, load_checkpoint, load_weights, save_checkpoint
from mechanisms.models import build_model


def test_roundtrip(tmp_path):
    model = build_model("mlp", (4,), 3, seed=0)
    keep = np.array([True, False, True])
    meta = {"model": "mlp", "mechanism": "sgd", "dataset": {"id": "digits", "sha256": "abc", "options": {}}}
    save_checkpoint(tmp_path, model.state_dict(), meta, keep)
    ck = load_checkpoint(tmp_path)
    assert {k: v for k, v in ck.meta.items() if k != "files"} == meta
    assert set(ck.meta["files"]) == {"model.safetensors", "keep.npy"}
    assert ck.keep.dtype == bool and ck.keep.tolist() == keep.tolist()
    other = apply_weights(build_model("mlp", (4,), 3, seed=1), ck.state_dict)
    for k, v in model.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    assert not list(tmp_path.glob(".*tmp"))  # no temporary files left behind
    # a model.json without what mia-audit reads from it is refused, naming the field
    save_checkpoint(tmp_path, model.state_dict(), {"model": "mlp"}, keep)
    with pytest.raises(CheckpointError, match="'mechanism' must be a name"):
        load_checkpoint(tmp_path)


def test_pt_state_dict_loads_and_pickled_model_is_refused(tmp_path):
    model = build_model("mlp", (4,), 3, seed=0)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    assert set(load_weights(tmp_path / "w.pt")) == set(model.state_dict())
    torch.save(model, tmp_path / "full.pt")
    with pytest.raises(CheckpointError, match="state_dict"):
        load_weights(tmp_path / "full.pt")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=".safetensors, .pt or .pth"):
        load_weights(tmp_path / "w.bin")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!garbage!")
    with pytest.raises(CheckpointError, match="not a valid safetensors"):
        load_weights(tmp_path / "bad.safetensors")


def test_mismatch_names_the_first_tensor():
    state = build_model("mlp", (4,), 3).state_dict()
    wrong = dict(state, **{"1.weight": torch.zeros(5, 4)})
    with pytest.raises(
        CheckpointError, match=r"'1.weight' has shape \(5, 4\) in the checkpoint but \(256, 4\)"
    ):
        apply_weights(build_model("mlp", (4,), 3), wrong)
    missing = {k: v for k, v in state.items() if k != "3.bias"}
    with pytest.raises(CheckpointError, match="no tensor '3.bias'"):
        apply_weights(build_model("mlp", (4,), 3), missing)
    with pytest.raises(CheckpointError, match="'extra' is not part"):
        apply_weights(build_model("mlp", (4,), 3), dict(state, extra=torch.zeros(1)))


def test_integer_weights_are_refused(tmp_path):
    model = build_model("mlp", (4,), 3, seed=0)
    state = {k: v.to(torch.int64) for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match="floating point"):
        apply_weights(build_model("mlp", (4,), 3, seed=0), state)


def test_files_are_checked_against_the_manifest(tmp_path):
    """Issue 19: a kill between renames in 'train --overwrite' left new weights with the old keep.npy."""
    meta = {"model": "mlp", "mechanism": "sgd", "dataset": {"id": "digits", "sha256": "abc", "options": {}}}
    model = build_model("mlp", (4,), 3, seed=0)
    save_checkpoint(tmp_path, model.state_dict(), meta, np.array([True, False]))
    np.save(tmp_path / "keep.npy", np.array([False, True]))  # a file from another run
    with pytest.raises(CheckpointError, match="keep.npy is not the file"):
        load_checkpoint(tmp_path)
