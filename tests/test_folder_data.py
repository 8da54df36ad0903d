"""``folder:PATH`` datasets: a folder of PNG or JPEG images, flat or one subfolder per class.

Every image is written here with torchvision, small (8x8 to 12x12) and
seeded; its pixels encode its class and its index, so labels and splits can
be checked against the content.
"""

import dataclasses
from pathlib import Path

import pytest
import torch
from torchvision.io import write_jpeg, write_png

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.config import Config, DataConfig
from pyro_vae.data import FOLDER_HOLDOUT, dataset_slug, fingerprint, load_dataset
from pyro_vae.errors import ConfigError, DataError


def image(index: int, label: int, size=(8, 8), channels: int = 3, seed: int = 0) -> torch.Tensor:
    """A uint8 image ``(channels, H, W)``: pixel (0, 0) holds ``label``, pixel (0, 1) ``index``."""
    g = torch.Generator().manual_seed(seed * 1000 + index)
    x = torch.randint(0, 256, (channels, *size), generator=g, dtype=torch.uint8)
    x[:, 0, 0] = 255 * label
    x[:, 0, 1] = 10 * index
    return x


def class_folder(root: Path, per_class: int = 6, classes=("dogs", "cats"), **kw) -> Path:
    """``root/<class>/<i>.png``: ``per_class`` RGB images per class."""
    for name in classes:
        label = sorted(classes).index(name)
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            index = label * per_class + i
            write_png(image(index, label, **kw), str(root / name / f"{i:02d}.png"))
    return root


def flat_folder(root: Path, n: int = 12, **kw) -> Path:
    """``root/<i>.png``: ``n`` images directly in the folder."""
    root.mkdir(parents=True)
    for i in range(n):
        write_png(image(i, 0, **kw), str(root / f"{i:02d}.png"))
    return root


def index_of(x: torch.Tensor) -> torch.Tensor:
    """The index that :func:`image` wrote into each datum of ``x`` ``(N, 3, H, W)``."""
    return (x[:, 0, 0, 1] * 255 / 10).round().long()


def test_class_folders_give_labels_shapes_and_a_disjoint_split(tmp_path):
    root = class_folder(tmp_path / "pets")
    ds = load_dataset(f"folder:{root}")
    assert ds.name == f"folder:{root}"
    assert set(ds.splits) == {"train", "valid", "test"}
    assert ds.event_shape == (3, 8, 8)
    held = max(1, int(12 * FOLDER_HOLDOUT))
    assert [len(ds.splits[s]) for s in ("train", "valid", "test")] == [12 - 2 * held, held, held]
    indices = torch.cat([index_of(ds.splits[s]) for s in ("train", "valid", "test")])
    assert sorted(indices.tolist()) == list(range(12))  # disjoint, and every image once
    for split, x in ds.splits.items():
        assert x.dtype == torch.float32 and 0 <= float(x.min()) and float(x.max()) <= 1
        # labels are the sorted class folders' positions: cats 0, dogs 1, as ImageFolder
        torch.testing.assert_close(ds.labels[split], (x[:, 0, 0, 0] > 0.5).long())
    assert ds.labels["train"].dtype == torch.int64
    assert set(torch.cat(list(ds.labels.values())).tolist()) == {0, 1}


def test_the_split_is_deterministic_and_pixels_are_exact(tmp_path):
    root = class_folder(tmp_path / "pets")
    first, second = load_dataset(f"folder:{root}"), load_dataset(f"folder:{root}")
    assert fingerprint(first.splits) == fingerprint(second.splits)
    for split in first.splits:
        assert torch.equal(first.splits[split], second.splits[split])
    # the file sorted first (cats/00.png) is read back exactly, scaled to [0, 1]
    everything = torch.cat(list(first.splits.values()))
    found = everything[index_of(everything) == 0][0]
    torch.testing.assert_close(found, image(0, 0).float() / 255)


def test_flat_folder_has_no_labels_and_grayscale_is_h_by_w(tmp_path):
    rgb = load_dataset(f"folder:{flat_folder(tmp_path / 'rgb')}")
    assert rgb.labels == {} and rgb.event_shape == (3, 8, 8)
    gray_root = flat_folder(tmp_path / "gray", channels=1)
    gray = load_dataset(f"folder:{gray_root}")
    assert gray.event_shape == (8, 8)  # like mnist and digits: no channel dimension
    as_rgb = load_dataset(f"folder:{gray_root}", channels=3)
    assert as_rgb.event_shape == (3, 8, 8)
    assert torch.equal(as_rgb.splits["train"][:, 0], gray.splits["train"])
    assert torch.equal(as_rgb.splits["train"][:, 0], as_rgb.splits["train"][:, 2])
    assert load_dataset(f"folder:{tmp_path / 'rgb'}", channels=1).event_shape == (8, 8)


def test_image_size_scales_and_crops_and_jpeg_is_read(tmp_path):
    root = flat_folder(tmp_path / "wide", size=(8, 12))
    write_jpeg(image(20, 0, size=(8, 12)), str(root / "extra.JPG"))
    ds = load_dataset(f"folder:{root}")
    assert ds.event_shape == (3, 8, 12) and sum(len(x) for x in ds.splits.values()) == 13
    assert load_dataset(f"folder:{root}", image_size=6).event_shape == (3, 6, 6)
    ds = load_dataset(f"folder:{root}", image_size=[4, 10], channels=1)
    assert ds.event_shape == (4, 10)
    assert all(0 <= float(x.min()) and float(x.max()) <= 1 for x in ds.splits.values())


def test_images_of_different_sizes_need_image_size(tmp_path):
    root = flat_folder(tmp_path / "mixed")
    write_png(image(21, 0, size=(10, 9)), str(root / "odd.png"))
    with pytest.raises(DataError, match=r"differ in size .*odd\.png is 10x9.*data\.image_size"):
        load_dataset(f"folder:{root}")
    assert load_dataset(f"folder:{root}", image_size=8).event_shape == (3, 8, 8)


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda root: root, "does not exist"),
        (lambda root: root.mkdir() or root, "holds no images (.png, .jpg, .jpeg)"),
        (lambda root: flat_folder(root, n=2), "has 2 image(s); it needs at least 3"),
        (lambda root: class_folder(root) and (root / "empty").mkdir(), "class folder 'empty'"),
        (
            lambda root: class_folder(root) and (root / "loose.png").write_bytes(b"x"),
            "both at its top level and in subfolders",
        ),
        (
            lambda root: flat_folder(root) and (root / "broken.png").write_bytes(b"not a png"),
            "cannot decode broken.png",
        ),
    ],
    ids=["missing", "empty", "too-few", "empty-class", "mixed-layout", "corrupt"],
)
def test_bad_folders_are_one_line_data_errors(tmp_path, make, expected):
    root = tmp_path / "imgs"
    make(root)
    with pytest.raises(DataError) as e:
        load_dataset(f"folder:{root}")
    assert expected in _one_line(e)


def test_hidden_files_and_folders_are_skipped(tmp_path):
    root = class_folder(tmp_path / "pets")
    (root / ".thumbnails").mkdir()
    write_png(image(22, 0), str(root / ".thumbnails" / "t.png"))
    (root / "cats" / ".hidden.png").write_bytes(b"not a png")
    ds = load_dataset(f"folder:{root}")
    assert sum(len(x) for x in ds.splits.values()) == 12


@pytest.mark.parametrize(
    "options, expected",
    [
        ({"image_size": 0}, "data.image_size must be a size >= 1"),
        ({"image_size": [8, 8, 8]}, "got [8, 8, 8]"),
        ({"image_size": True}, "data.image_size"),
        ({"channels": 2}, "data.channels must be 1 (grayscale) or 3 (RGB)"),
    ],
)
def test_bad_image_options_are_one_line_config_errors(tmp_path, options, expected):
    with pytest.raises(ConfigError) as e:
        DataConfig(name="folder:imgs", **options)
    assert expected in _one_line(e)
    root = flat_folder(tmp_path / "imgs")
    with pytest.raises(ConfigError) as e:  # the Python API checks the same
        load_dataset(f"folder:{root}", **options)
    assert expected.split(" got")[0] in _one_line(e)


def test_image_options_belong_to_folder_datasets_only():
    with pytest.raises(ConfigError, match="applies only to folder:PATH datasets"):
        DataConfig(name="digits", image_size=8)
    with pytest.raises(ConfigError, match="apply only to folder:PATH datasets"):
        load_dataset("digits", channels=1)


def test_config_round_trip_and_absolute_paths(tmp_path):
    config = Config(data=DataConfig(name="folder:imgs", image_size=[16, 24], channels=3))
    assert config.data.image_size == (16, 24)
    assert Config.from_toml(config.to_toml()) == config
    assert "image_size" in config.to_toml() and "channels = 3" in config.to_toml()
    square = Config(data=DataConfig(name="folder:imgs", image_size=32))
    assert Config.from_toml(square.to_toml()) == square
    assert "image_size" not in Config(data=DataConfig(name="folder:imgs")).to_toml()
    absolute = config.data.absolute(tmp_path)
    assert absolute.name == f"folder:{tmp_path / 'imgs'}"
    assert dataclasses.replace(absolute, name=config.data.name) == config.data
    assert dataset_slug("folder:data/my images/") == "data_my images"


def test_the_config_keys_reach_the_loader(tmp_path):
    root = flat_folder(tmp_path / "imgs", size=(12, 12))
    data = DataConfig(name=f"folder:{root}", image_size=8, channels=1)
    prepared = pyro_vae.load_data(Config(data=data).override({"model.likelihood.name": "normal"}))
    assert prepared.event_shape == (8, 8)


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_and_evaluate_a_folder_with_conv_networks(tmp_path, capsys):
    root = class_folder(tmp_path / "pets")
    out = tmp_path / "run"
    argv = ["train", "--dataset", f"folder:{root}", "--latent-dim", "2", "--epochs", "1"]
    argv += ["--set", "model.encoder.name=conv", "--set", "model.decoder.name=conv"]
    argv += ["--set", "model.encoder.channels=[4]", "--set", "model.decoder.channels=[4]"]
    argv += ["--set", "model.encoder.features=8", "--set", "model.decoder.features=8"]
    code, _, err = run(
        [*argv, "--likelihood", "continuous-bernoulli", "--quiet", "--out", str(out)], capsys
    )
    assert code == 0, err
    saved = Config.load(out / "config.toml")
    assert saved.data.name == f"folder:{root}" and saved.data.binarize == "none"
    assert pyro_vae.load(out).event_shape == (3, 8, 8)
    code, stdout, err = run(["evaluate", str(out), "--num-samples", "4"], capsys)
    assert code == 0, err
    assert "split test: 1 data" in stdout


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--dataset", "folder:{tmp}/nowhere"], "nowhere does not exist"),
        (["--dataset", "folder:{tmp}", "--set", "data.channels=4"], "data.channels must be 1"),
        (["--dataset", "folder:{tmp}", "--set", "data.image_size=-2"], "data.image_size must be"),
        (["--set", "data.image_size=8"], "applies only to folder:PATH datasets, not 'digits'"),
    ],
    ids=["missing", "channels", "image-size", "not-a-folder"],
)
def test_bad_folder_input_exits_2_with_one_line(argv, expected, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    out = tmp_path / "run"
    code, _, err = run(["train", *argv, "--epochs", "1", "--quiet", "--out", str(out)], capsys)
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()  # refused before any training work
