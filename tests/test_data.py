"""Datasets, binarization, and the checks that data fit a likelihood."""

import gzip
import struct
import time

import numpy as np
import pytest
import torch
from torch.distributions import constraints

import pyro_vae.data as data
from pyro_vae import DataError, load_dataset


def test_digits_is_bundled_scaled_and_split():
    ds = load_dataset("digits")
    assert ds.splits["train"].shape == (1500, 8, 8)
    assert ds.splits["test"].shape == (297, 8, 8)
    assert ds.splits["train"].min() == 0 and ds.splits["train"].max() == 1
    assert not data.is_binary(ds.splits["train"])
    assert ds.labels["test"].shape == (297,)
    # the split is fixed: the same every call
    assert torch.equal(load_dataset("digits").splits["test"], ds.splits["test"])


def test_binarized_mnist_from_the_shared_folder(shared_datasets):
    ds = load_dataset("binarized-mnist", shared_datasets, download=False)
    sizes = {s: len(x) for s, x in ds.splits.items()}
    assert sizes == {"train": 50_000, "valid": 10_000, "test": 10_000}
    assert ds.event_shape == (28, 28)
    assert data.is_binary(ds.splits["test"])


def test_binarized_mnist_from_amat_files(tmp_path):
    rng = np.random.RandomState(0)
    arrays = {s: rng.randint(0, 2, size=(3, 784)) for s in data.SPLIT_ORDER}
    for split, array in arrays.items():
        np.savetxt(tmp_path / f"binarized_mnist_{split}.amat", array, fmt="%d")
    ds = load_dataset("binarized-mnist", tmp_path, download=False)
    for split, array in arrays.items():
        assert torch.equal(ds.splits[split].reshape(3, 784), torch.as_tensor(array).float())


def test_offline_download_fails_fast_with_a_clear_error(tmp_path, monkeypatch):
    # port 9 on the loopback refuses connections: what an offline machine sees
    monkeypatch.setattr(data, "BINARIZED_MNIST_URL", "http://127.0.0.1:9/bm_{split}.amat")
    start = time.monotonic()
    with pytest.raises(DataError) as info:
        load_dataset("binarized-mnist", tmp_path / "cache", download=True)
    assert time.monotonic() - start < 20
    message = str(info.value)
    assert "binarized-mnist" in message and str(tmp_path / "cache") in message
    assert "--data-dir" in message and "\n" not in message
    assert not list((tmp_path / "cache").glob("*.part"))


def test_missing_files_without_download(tmp_path):
    with pytest.raises(DataError, match="binarized-mnist: no binarized_mnist.npz"):
        load_dataset("binarized-mnist", tmp_path, download=False)
    with pytest.raises(DataError, match="mnist: IDX files not found"):
        load_dataset("mnist", tmp_path, download=False)


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(
        ">" + "I" * array.ndim, *array.shape
    )
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_local_idx_files(tmp_path):
    rng = np.random.RandomState(0)
    files = {
        "train-images-idx3-ubyte.gz": rng.randint(0, 256, size=(5, 28, 28)),
        "train-labels-idx1-ubyte.gz": rng.randint(0, 10, size=5),
        "t10k-images-idx3-ubyte.gz": rng.randint(0, 256, size=(2, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": rng.randint(0, 10, size=2),
    }
    for name, array in files.items():
        _write_idx(tmp_path / name, array)
    ds = load_dataset("fashion-mnist", tmp_path, download=False)
    assert ds.splits["train"].shape == (5, 28, 28)
    expected = torch.as_tensor(files["t10k-images-idx3-ubyte.gz"] / 255.0, dtype=torch.float32)
    assert torch.equal(ds.splits["test"], expected)
    assert ds.labels["train"].tolist() == files["train-labels-idx1-ubyte.gz"].tolist()


def test_npz_user_data(tmp_path):
    x = np.random.RandomState(0).rand(50, 3, 4).astype(np.float32)
    np.savez(tmp_path / "mine.npz", train=x)
    ds = load_dataset(f"npz:{tmp_path / 'mine.npz'}")
    assert ds.event_shape == (3, 4)
    assert len(ds.splits["train"]) == 45 and len(ds.splits["test"]) == 5  # 10% held out


def test_npz_with_nan_is_rejected(tmp_path):
    x = np.zeros((10, 4))
    x[3, 1] = np.nan
    np.savez(tmp_path / "bad.npz", train=x)
    with pytest.raises(DataError, match="1 NaN or infinite values"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_npz_with_mismatched_shapes_is_rejected(tmp_path):
    np.savez(tmp_path / "bad.npz", train=np.zeros((10, 4)), test=np.zeros((5, 3)))
    with pytest.raises(DataError, match="different datum shapes"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


def test_check_fits_names_the_range_and_suggests_binarize():
    x = torch.tensor([[0.0, 0.5], [1.0, 0.25]])
    with pytest.raises(DataError) as info:
        data.check_fits(x, (2,), constraints.boolean, "bernoulli", "npz:x train")
    message = str(info.value)
    assert "[0, 1]" in message and "{0, 1}" in message and "--binarize" in message
    with pytest.raises(DataError, match="expects \\(3,\\)"):
        data.check_fits(x, (3,), constraints.real, "normal", "x")
    data.check_fits(x, (2,), constraints.real, "normal", "x")  # fits: no error


def test_binarize_modes():
    ds = load_dataset("digits")
    auto = data.prepare(ds, "auto", 0, constraints.boolean)
    assert auto.binarize == "dynamic" and auto.dynamic
    assert torch.equal(auto.train, ds.splits["train"])  # probabilities, drawn per batch
    assert data.is_binary(auto.splits["test"])
    static = data.prepare(ds, "static", 0, constraints.boolean)
    assert data.is_binary(static.train)
    # the evaluation splits are the same fixed draw in both modes
    assert torch.equal(static.splits["test"], auto.splits["test"])
    assert torch.equal(data.prepare(ds, "static", 0, constraints.boolean).train, static.train)
    assert not torch.equal(data.prepare(ds, "static", 1, constraints.boolean).train, static.train)
    # binarization is a Bernoulli draw: its mean matches the grey levels (4 standard errors)
    p = ds.splits["train"]
    se = float(torch.sqrt((p * (1 - p)).sum())) / p.numel()
    assert abs(float(static.train.mean() - p.mean())) < 4 * se
    assert data.prepare(ds, "auto", 0, constraints.real).binarize == "none"


def test_binarizing_values_outside_the_unit_interval_is_rejected():
    ds = data.Dataset(
        "x", {"train": torch.tensor([[2.0, 0.0]]), "test": torch.tensor([[0.0, 1.0]])}
    )
    with pytest.raises(DataError, match="cannot be binarized"):
        data.prepare(ds, "static", 0, constraints.boolean)


def test_npy_and_boolean_arrays_are_read(tmp_path):
    x = np.random.RandomState(0).rand(20, 3) < 0.5
    np.save(tmp_path / "plain.npy", x)
    ds = load_dataset(f"npz:{tmp_path / 'plain.npy'}")
    assert ds.splits["train"].dtype == torch.float32 and set(ds.splits) == {"train", "test"}
    np.savez(tmp_path / "bool.npz", train=x)
    assert load_dataset(f"npz:{tmp_path / 'bool.npz'}").splits["train"].max() == 1.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("complex", "must be a real or boolean array"),
        ("empty", "is empty"),
        ("text", "neither a .npz archive nor a .npy array"),
        ("objects", "holds Python objects"),
    ],
)
def test_bad_array_files_are_refused_in_one_line(tmp_path, content, message):
    path = tmp_path / "data.npz"
    if content == "complex":
        np.savez(path, train=np.ones((5, 2), dtype=np.complex64))
    elif content == "empty":
        np.savez(path, train=np.zeros((20, 0)))
    elif content == "text":
        path.write_text("1,2,3\n4,5,6\n")
    else:
        np.savez(path, train=np.array([[object()], [object()]], dtype=object))
    with pytest.raises(DataError, match=message) as info:
        load_dataset(f"npz:{path}")
    assert "\n" not in str(info.value)
