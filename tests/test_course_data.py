"""course.image_dataset: binarized MNIST from $PYRO_VAE_DATA when it is there, else the digits."""

from pathlib import Path

import numpy as np
import pytest
import torch

from pyro_vae import course
from pyro_vae.data import DATA_ENV

SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def _fake_mnist(folder, n=(30, 10, 20)):
    """A tiny binarized_mnist.npz (train/valid/test of 0/1 uint8 rows of 784 pixels)."""
    rng = np.random.default_rng(0)
    arrays = {
        split: (rng.random((size, 784)) < 0.2).astype(np.uint8)
        for split, size in zip(("train", "valid", "test"), n, strict=True)
    }
    np.savez(folder / "binarized_mnist.npz", **arrays)
    return arrays


def test_without_the_data_folder_it_is_the_digits(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    images = course.image_dataset(train_size=50, test_size=20)
    assert images.name == course.DIGITS
    assert images.event_shape == (8, 8)
    assert images.splits["train"].shape == (50, 8, 8)
    assert images.splits["test"].shape == (20, 8, 8)
    assert images.binarize == "dynamic"  # grey levels: a Bernoulli model binarizes them
    assert set(images.labels) == {"train", "test"}
    assert images.labels["train"].shape == (50,)
    for x in images.splits.values():
        assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert "digits" in images.note and "$PYRO_VAE_DATA is not set" in images.note
    assert "\n" not in images.note


def test_the_digits_subset_is_the_start_of_the_full_split(monkeypatch):
    monkeypatch.delenv(DATA_ENV, raising=False)
    full = course.image_dataset()
    part = course.image_dataset(train_size=30, test_size=5)
    assert len(full.splits["train"]) == 1500 and len(full.splits["test"]) == 297
    assert torch.equal(part.splits["train"], full.splits["train"][:30])
    assert torch.equal(part.labels["test"], full.labels["test"][:5])
    assert "1500 train, 297 test" in full.note


def test_a_folder_without_mnist_falls_back_to_the_digits(monkeypatch, tmp_path):
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    images = course.image_dataset(train_size=10, test_size=10)
    assert images.name == course.DIGITS
    assert str(tmp_path) in images.note and "has no readable binarized MNIST" in images.note


def test_mnist_in_the_data_folder_is_used(monkeypatch, tmp_path):
    arrays = _fake_mnist(tmp_path)
    monkeypatch.setenv(DATA_ENV, str(tmp_path))
    images = course.image_dataset(train_size=12, test_size=50)  # more test images than exist
    assert images.name == course.MNIST
    assert images.event_shape == (28, 28)
    assert images.splits["train"].shape == (12, 28, 28)
    assert images.splits["test"].shape == (20, 28, 28)
    assert images.binarize == "none"  # already binary
    assert images.labels == {}  # the binarized MNIST files have no labels
    expected = torch.as_tensor(arrays["train"][:12], dtype=torch.float32).reshape(12, 28, 28)
    assert torch.equal(images.splits["train"], expected)
    assert "binarized MNIST" in images.note and "12 train, 20 test" in images.note


def test_the_images_train_a_vae(monkeypatch, tmp_path):
    # what the notebooks do with them: fit(vae, splits, config) with the binarization named
    import pyro_vae

    _fake_mnist(tmp_path)
    for folder in (None, tmp_path):
        if folder is None:
            monkeypatch.delenv(DATA_ENV, raising=False)
        else:
            monkeypatch.setenv(DATA_ENV, str(folder))
        images = course.image_dataset(train_size=16, test_size=8)
        config = pyro_vae.Config().override(
            {
                "model.latent_dim": 2,
                "model.encoder.hidden": [8],
                "model.decoder.hidden": [8],
                "train.epochs": 1,
                "train.batch_size": 8,
                "data.binarize": images.binarize,
            }
        )
        vae = pyro_vae.build_vae(config.model, images.event_shape)
        result = pyro_vae.fit(vae, images.splits, config=config)
        assert result.data.binarize == images.binarize
        assert np.isfinite(result.history[-1]["test_elbo"])


@pytest.mark.skipif(
    not (SHARED / "binarized_mnist.npz").is_file(),
    reason=f"the shared datasets folder ({SHARED}) has no binarized_mnist.npz",
)
def test_the_shared_binarized_mnist(monkeypatch):
    monkeypatch.setenv(DATA_ENV, str(SHARED))
    images = course.image_dataset(train_size=100, test_size=10)
    assert images.name == course.MNIST
    assert images.splits["train"].shape == (100, 28, 28)
    assert set(images.splits["train"].unique().tolist()) == {0.0, 1.0}
