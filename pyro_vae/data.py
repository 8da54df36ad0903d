"""Datasets by name, binarization, and checks that data fit a likelihood.

Every dataset is returned as float32 tensors of shape ``(N, *event_shape)``:

* ``digits`` -- scikit-learn's bundled 8x8 handwritten digits (no download),
  scaled to [0, 1]; a fixed split of 1500 train / 297 test images.
* ``binarized-mnist`` -- the static binarization of Larochelle & Murray
  (2011), 50k/10k/10k, read from ``binarized_mnist.npz`` (keys
  train/valid/test) or the original ``binarized_mnist_{split}.amat`` files
  in the data folder; downloaded from the original release when absent.
* ``mnist``, ``fashion-mnist`` -- the IDX files, read from the data folder
  (or Debian's ``/usr/share/datasets/fashion-mnist``), else through
  torchvision's datasets, which download them.
* ``npz:PATH`` -- a user array file with key ``train`` and optional ``valid``
  and ``test``, each of shape ``(N, ...)``; without ``test``, a fixed 10% of
  ``train`` is held out as the test split.
* ``folder:PATH`` -- a user folder of PNG or JPEG images, flat or one
  subfolder per class (labels from the folder names, as torchvision's
  ``ImageFolder``), scaled to [0, 1] as ``(H, W)`` (grayscale) or
  ``(3, H, W)`` (RGB) tensors; a fixed 10% is the validation and another 10%
  the test split (see :func:`load_folder`).

The data folder is ``--data-dir``, else ``$PYRO_VAE_DATA``, else
``~/.cache/pyro-vae``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributions import constraints

from .config import FOLDER_PREFIX, NPZ_PREFIX, check_image_channels, image_size_pair
from .errors import ConfigError, DataError
from .files import removing_new_folders
from .registry import DATASETS

DATA_ENV = "PYRO_VAE_DATA"
DOWNLOAD_TIMEOUT = 30.0
BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)
SPLIT_ORDER = ("train", "valid", "test")
#: The file name endings (any case) that a ``folder:PATH`` dataset reads as images.
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
#: The share of a ``folder:PATH`` dataset held out as each of ``valid`` and ``test``.
FOLDER_HOLDOUT = 0.1
#: ``data.name`` of a run that :func:`pyro_vae.fit` trained on in-memory tensors.
IN_MEMORY = "tensor"


@dataclass
class Dataset:
    """Named splits of one dataset.

    Args:
        name: The dataset's name.
        splits: Split name -> float32 tensor ``(N, *event_shape)``.
        labels: Split name -> int64 labels ``(N,)``, where the data have labels.
    """

    name: str
    splits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one datum."""
        return tuple(self.splits["train"].shape[1:])

    def split(self, name: str) -> torch.Tensor:
        """The data of split ``name``; a :class:`DataError` lists the valid splits."""
        if name not in self.splits:
            valid = ", ".join(self.splits)
            raise DataError(f"dataset {self.name!r} has no split {name!r}; valid splits: {valid}")
        return self.splits[name]


def default_data_dir() -> Path:
    """``$PYRO_VAE_DATA`` if set, else ``~/.cache/pyro-vae``."""
    env = os.environ.get(DATA_ENV)
    return Path(env) if env else Path.home() / ".cache" / "pyro-vae"


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    image_size: int | list[int] | tuple[int, ...] | None = None,
    channels: int | None = None,
) -> Dataset:
    """Load a dataset by name (see the module docstring) and check it is finite.

    Args:
        name: A registered name, ``npz:PATH`` or ``folder:PATH``.
        data_dir: The data folder of the registered datasets.
        download: Whether a missing registered dataset may be downloaded.
        image_size: ``folder:PATH`` only: ``data.image_size`` (see :func:`load_folder`).
        channels: ``folder:PATH`` only: ``data.channels``, 1 or 3.

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones), or
            an image size or channel count that is invalid or given for a dataset
            that is not a folder.
        DataError: when files are missing and cannot be downloaded, unreadable,
            or hold NaN or infinite values.
    """
    folder = Path(data_dir) if data_dir else default_data_dir()
    if name == IN_MEMORY:
        raise DataError(
            "this run was trained on in-memory data (pyro_vae.fit(vae, data)), which is not "
            "on disk; evaluate it from Python with the same tensors"
        )
    if not name.startswith(FOLDER_PREFIX) and (image_size is not None or channels is not None):
        raise ConfigError(
            f"data.image_size and data.channels apply only to folder:PATH datasets, not {name!r}"
        )
    if name.startswith(NPZ_PREFIX):
        dataset = load_npz(Path(name.removeprefix(NPZ_PREFIX)).expanduser())
    elif name.startswith(FOLDER_PREFIX):
        path = Path(name.removeprefix(FOLDER_PREFIX)).expanduser()
        dataset = load_folder(path, image_size, channels)
    else:
        dataset = DATASETS.get(name)(data_dir=folder, download=download)
    for split, x in dataset.splits.items():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"{dataset.name}: split {split!r} has {bad} NaN or infinite values")
    return dataset


def check_dataset_name(name: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``name`` can name a dataset.

    Registered names, ``npz:PATH``, ``folder:PATH`` and the in-memory data of
    ``fit(vae, data)``.
    """
    if not (name.startswith((NPZ_PREFIX, FOLDER_PREFIX)) or name == IN_MEMORY):
        DATASETS.get(name)


def dataset_slug(name: str) -> str:
    """A file-name-safe form of a dataset name (``npz:data/x.npz`` -> ``data_x.npz``)."""
    for prefix in (NPZ_PREFIX, FOLDER_PREFIX):
        name = name.removeprefix(prefix)
    return name.rstrip("/").replace("/", "_")


def dataset_names() -> list[str]:
    """Every dataset name, ``npz:PATH`` and ``folder:PATH`` included."""
    return [*DATASETS.names(), f"{NPZ_PREFIX}PATH", f"{FOLDER_PREFIX}PATH"]


@DATASETS.register("digits")
def load_digits(data_dir: Path, download: bool) -> Dataset:
    """scikit-learn's 8x8 digits (bundled), scaled to [0, 1]: 1500 train, 297 test.

    Read from the CSV file that scikit-learn ships, as ``sklearn.datasets.load_digits``
    reads it, without importing scikit-learn (two seconds per process).
    """
    pixels, target = _read_sklearn_digits()
    images = torch.as_tensor(pixels.reshape(-1, 8, 8) / 16.0, dtype=torch.float32)
    labels = torch.as_tensor(target, dtype=torch.int64)
    order = torch.as_tensor(np.random.RandomState(0).permutation(len(images)))
    train, test = order[:1500], order[1500:]
    return Dataset(
        "digits",
        {"train": images[train], "test": images[test]},
        {"train": labels[train], "test": labels[test]},
    )


def _read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(pixels (1797, 64), target (1797,))`` exactly as scikit-learn's ``load_digits``."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    folder = Path(spec.origin).parent if spec and spec.origin else None
    path = folder / "datasets" / "data" / "digits.csv.gz" if folder else None
    if path is None or not path.exists():  # another layout: ask scikit-learn itself
        from sklearn.datasets import load_digits as sk_load_digits

        bunch = sk_load_digits()
        return bunch.data, bunch.target
    data = np.loadtxt(path, delimiter=",")
    return data[:, :-1], data[:, -1].astype(int)


@DATASETS.register("binarized-mnist")
def load_binarized_mnist(data_dir: Path, download: bool) -> Dataset:
    """Static binarized MNIST (Larochelle & Murray 2011), 50k/10k/10k, 28x28."""
    npz = data_dir / "binarized_mnist.npz"
    amat = {s: data_dir / f"binarized_mnist_{s}.amat" for s in SPLIT_ORDER}
    if not npz.exists() and not all(p.exists() for p in amat.values()):
        if not download:
            raise DataError(
                f"binarized-mnist: no binarized_mnist.npz or binarized_mnist_{{train,valid,test}}"
                f".amat in {data_dir}; put the files there or pass --data-dir DIR"
            )
        for split, path in amat.items():
            if not path.exists():
                _download("binarized-mnist", BINARIZED_MNIST_URL.format(split=split), path)
    if npz.exists():
        try:
            with np.load(npz) as f:
                arrays = {s: f[s] for s in SPLIT_ORDER}
        except (OSError, KeyError, ValueError) as e:
            raise DataError(f"binarized-mnist: cannot read {npz}: {e}") from None
    else:
        arrays = {s: _read_amat(p) for s, p in amat.items()}
    splits = {
        s: torch.as_tensor(a, dtype=torch.float32).reshape(-1, 28, 28) for s, a in arrays.items()
    }
    return Dataset("binarized-mnist", splits)


def _read_amat(path: Path) -> np.ndarray:
    """Parse an ``.amat`` file: one image per line, 784 space-separated 0/1 values."""
    try:
        array = np.loadtxt(path, dtype=np.uint8, ndmin=2)
    except (OSError, ValueError) as e:
        raise DataError(f"binarized-mnist: cannot parse {path}: {e}") from None
    if array.shape[1] != 784:
        raise DataError(
            f"binarized-mnist: {path} has {array.shape[1]} values per line, expected 784"
        )
    return array


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _download(dataset: str, url: str, dest: Path) -> None:
    """Fetch ``url`` to ``dest`` atomically, or raise a one-line :class:`DataError`."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        with (
            urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response,
            removing_new_folders(dest.parent),  # a failed download leaves no empty folders
        ):
            try:
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as out:
                    while chunk := response.read(1 << 20):
                        out.write(chunk)
                os.replace(tmp, dest)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DataError(
            f"{dataset}: not found in {dest.parent} and the download from {url} failed ({reason}); "
            f"fetch the files on a machine that is online and pass --data-dir DIR "
            f"(or set {DATA_ENV})"
        ) from None


_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of the MNIST releases."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    if dtype_code != 0x08:
        raise DataError(f"{path}: unsupported IDX element type {dtype_code:#x}")
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.exists():
                return candidate
    return None


def _torchvision_dataset(
    name: str, klass: str, folders: list[Path], data_dir: Path, download: bool
) -> Dataset:
    files = {s: [_find_idx(folders, stem) for stem in stems] for s, stems in _IDX_FILES.items()}
    if not all(p is not None for paths in files.values() for p in paths):
        if not download:
            raise DataError(
                f"{name}: IDX files not found in {', '.join(map(str, folders))}; "
                "put them there or pass --data-dir DIR"
            )
        import torchvision.datasets

        try:
            with _socket_timeout(DOWNLOAD_TIMEOUT), removing_new_folders(data_dir / klass / "raw"):
                for train in (True, False):
                    getattr(torchvision.datasets, klass)(str(data_dir), train=train, download=True)
        except Exception as e:  # torchvision raises RuntimeError/URLError/OSError
            raise DataError(
                f"{name}: not found in {data_dir} and torchvision's download failed "
                f"({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                f"fetch the files on a machine that is online and pass --data-dir DIR "
                f"(or set {DATA_ENV})"
            ) from None
        files = {s: [_find_idx(folders, stem) for stem in stems] for s, stems in _IDX_FILES.items()}
    splits, labels = {}, {}
    for split, (images, targets) in files.items():
        assert images is not None and targets is not None
        splits[split] = torch.as_tensor(_read_idx(images) / 255.0, dtype=torch.float32)
        labels[split] = torch.as_tensor(_read_idx(targets).astype(np.int64))
    return Dataset(name, splits, labels)


@DATASETS.register("mnist")
def load_mnist(data_dir: Path, download: bool) -> Dataset:
    """MNIST (60k/10k, grayscale in [0, 1], with labels) via torchvision's files."""
    folders = [data_dir / "MNIST" / "raw", data_dir]
    return _torchvision_dataset("mnist", "MNIST", folders, data_dir, download)


@DATASETS.register("fashion-mnist")
def load_fashion_mnist(data_dir: Path, download: bool) -> Dataset:
    """Fashion-MNIST (60k/10k, grayscale in [0, 1], with labels) via torchvision's files."""
    folders = [
        data_dir / "FashionMNIST" / "raw",
        data_dir,
        Path("/usr/share/datasets/fashion-mnist"),
    ]
    return _torchvision_dataset("fashion-mnist", "FashionMNIST", folders, data_dir, download)


def load_npz(path: Path) -> Dataset:
    """A user array file: a ``.npz`` (``train``, optional ``valid``/``test``) or a ``.npy``.

    Each array has shape ``(N, ...)``; a ``.npy`` is the training set. Real
    numbers of any width, integers and booleans (the natural form of binary
    data) are read as float32; complex numbers, object arrays and empty data
    are refused in one line.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise DataError(f"cannot read npz:{path}: {e.strerror}") from None
    if magic[:4] != b"PK\x03\x04" and magic != b"\x93NUMPY":
        raise DataError(
            f"npz:{path} is neither a .npz archive nor a .npy array (save one with numpy.savez "
            "or numpy.save)"
        )
    try:
        if magic == b"\x93NUMPY":
            arrays = {"train": np.load(path, allow_pickle=False)}
        else:
            with np.load(path, allow_pickle=False) as f:
                keys = set(f.files)
                if "train" not in keys:
                    raise DataError(
                        f"npz:{path} has no 'train' array (found: {', '.join(sorted(keys))})"
                    )
                arrays = {s: np.asarray(f[s]) for s in SPLIT_ORDER if s in keys}
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "pickle" in first.lower():
            first = "it holds Python objects, not numbers"
        raise DataError(f"cannot read npz:{path}: {first}") from None
    splits = {}
    for split, array in arrays.items():
        numeric = np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_
        if array.ndim < 2 or not numeric or np.iscomplexobj(array):
            raise DataError(
                f"npz:{path}: {split!r} must be a real or boolean array of shape (N, ...), "
                f"got {array.dtype} {array.shape}"
            )
        if array.size == 0:
            raise DataError(f"npz:{path}: {split!r} is empty, shape {array.shape}")
        splits[split] = torch.as_tensor(array.astype(np.float32))
    shapes = {tuple(x.shape[1:]) for x in splits.values()}
    if len(shapes) > 1:
        raise DataError(f"npz:{path}: splits have different datum shapes {sorted(shapes)}")
    if "test" not in splits:
        # hold out a fixed 10% (at least one datum) so that test metrics exist
        order = torch.as_tensor(np.random.RandomState(0).permutation(len(splits["train"])))
        held = max(1, len(order) // 10)
        if len(order) < 2:
            raise DataError(f"npz:{path}: 'train' needs at least 2 data when there is no 'test'")
        splits["test"] = splits["train"][order[:held]]
        splits["train"] = splits["train"][order[held:]]
    return Dataset(f"npz:{path}", splits)


# --- a folder of images -------------------------------------------------------------


def load_folder(
    path: Path,
    image_size: int | list[int] | tuple[int, ...] | None = None,
    channels: int | None = None,
) -> Dataset:
    """A user folder of PNG or JPEG images, read through ``torchvision.io.decode_image``.

    The layout is that of torchvision's ``ImageFolder``: either every image
    directly in ``path`` (no labels), or one subfolder per class, whose images
    (at any depth inside it) get the label of the folder's position among the
    sorted class folder names. Hidden files and folders are skipped. Pixels are
    scaled to [0, 1]; a datum is ``(H, W)`` for grayscale and ``(3, H, W)``
    (channels first, as torchvision) for RGB; an alpha channel is dropped.

    The split is fixed: the sorted relative file paths, permuted with seed 0;
    the first 10% (at least one image) are ``test``, the next 10% (at least
    one) ``valid``, the rest ``train``.

    Args:
        path: The folder.
        image_size: ``S`` (S x S) or ``(H, W)``: each image is scaled (keeping
            its aspect ratio, antialiased) to cover that size and centre-cropped
            to it. ``None``: the images' own size, which must be the same for all.
        channels: 1 (grayscale) or 3 (RGB); ``None``: 1 when every image is
            grayscale (its decoded R, G and B are equal), else 3.

    Returns:
        A :class:`Dataset` named ``folder:PATH`` with float32 splits
        ``(N, H, W)`` or ``(N, 3, H, W)``, and int64 labels for class folders.

    Raises:
        ConfigError: ``image_size`` or ``channels`` invalid.
        DataError: no such folder, no images, fewer than 3 images, an image
            that cannot be decoded, or sizes that differ without ``image_size``.
    """
    size = image_size_pair(image_size)
    check_image_channels(channels)
    where = f"{FOLDER_PREFIX}{path}"
    files, labels = list_image_files(path)
    if len(files) < 3:
        raise DataError(
            f"{where} has {len(files)} image(s); it needs at least 3 (for the train, valid "
            "and test splits)"
        )
    gray = channels != 3
    images = []
    for f in files:  # scaled one by one: large photos are never all in memory at full size
        image = _read_image(path, f, channels)
        gray = gray and _is_gray(image)
        images.append(_fit_size(image, size))
    if size is None:
        _check_same_size(images, files, where)
    x = torch.stack(images)
    if gray:
        x = x[:, 0]  # grayscale: (N, H, W), as the package's other grayscale datasets
    y = None if labels is None else torch.as_tensor(labels, dtype=torch.int64)
    return _split_held_out(where, x, y)


def list_image_files(path: Path) -> tuple[list[Path], list[int] | None]:
    """The image files of a ``folder:PATH`` dataset, sorted, and their class labels.

    Returns:
        ``(files, labels)``: paths relative to ``path``, sorted; ``labels[i]``
        the index of ``files[i]``'s class folder among the sorted class names,
        or ``labels = None`` for a flat folder.

    Raises:
        DataError: no such folder, no images, images both at the top and in
            subfolders, or a class folder without images.
    """
    where = f"{FOLDER_PREFIX}{path}"
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else "does not exist"
        raise DataError(
            f"{where}: {path} {problem}; give a folder of PNG or JPEG images (flat, or one "
            "subfolder per class)"
        )
    top = sorted(p.relative_to(path) for p in path.iterdir() if _is_image(p))
    folders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    nested = {
        d.name: sorted(
            p.relative_to(path)
            for p in d.rglob("*")
            if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(d).parts)
        )
        for d in folders
    }
    suffixes = ", ".join(IMAGE_SUFFIXES)
    if top and any(nested.values()):
        raise DataError(
            f"{where} has images both at its top level and in subfolders; use one layout: "
            "all images in the folder, or one subfolder of images per class"
        )
    if top:
        return top, None
    empty = [name for name, files in nested.items() if not files]
    if not nested or len(empty) == len(nested):
        raise DataError(
            f"{where} holds no images ({suffixes}); put them in the folder, or in one "
            "subfolder per class"
        )
    if empty:
        raise DataError(
            f"{where}: class folder {empty[0]!r} holds no images ({suffixes}); every "
            "subfolder is a class and needs images (remove it, or hide it with a leading '.')"
        )
    pairs = [(f, label) for label, files in enumerate(nested.values()) for f in files]
    return [f for f, _ in pairs], [label for _, label in pairs]


def _is_image(path: Path) -> bool:
    """A visible file whose name ends in one of :data:`IMAGE_SUFFIXES` (any case)."""
    return (
        path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
    )


def _read_image(root: Path, file: Path, channels: int | None) -> torch.Tensor:
    """Decode ``root / file`` to float32 ``(C, h, w)`` in [0, 1], C = ``channels`` (``None``: 3).

    Raises:
        DataError: the file cannot be read or decoded (one line, naming ``file``).
    """
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    try:
        image = decode_image(str(root / file), mode=mode, apply_exif_orientation=True)
    except (RuntimeError, OSError, ValueError) as e:
        raise DataError(
            f"{FOLDER_PREFIX}{root}: cannot decode {file} ({_first_sentence(e)}); images must be "
            "PNG or JPEG files"
        ) from None
    return to_dtype(image, torch.float32, scale=True)


def _first_sentence(error: Exception) -> str:
    """The first sentence of a torchvision error, without its C++ source location prefix."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = re.sub(r"^.*?\.cpp:\d+, ", "", text)  # "decode_png, .../x.cpp:79, message"
    return text.split(". ")[0].rstrip(".")


def _check_same_size(images: Sequence[torch.Tensor], files: Sequence[Path], where: str) -> None:
    """Raise a one-line :class:`DataError` unless every image ``(C, h, w)`` has the same h, w."""
    first = images[0].shape[-2:]
    for image, file in zip(images, files, strict=True):
        if image.shape[-2:] != first:
            raise DataError(
                f"{where}: images differ in size ({files[0]} is {first[0]}x{first[1]}, {file} "
                f"is {image.shape[-2]}x{image.shape[-1]}); set data.image_size to scale them "
                "all, e.g. --set data.image_size=32 or --set data.image_size=[32,48]"
            )


def _fit_size(image: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
    """Scale ``(C, h, w)`` to cover ``size = (H, W)`` (aspect ratio kept), centre-crop to it."""
    if size is None or tuple(image.shape[-2:]) == size:
        return image
    from torchvision.transforms.v2.functional import center_crop, resize

    (height, width), (h, w) = size, image.shape[-2:]
    scale = max(height / h, width / w)
    covering = [max(height, round(h * scale)), max(width, round(w * scale))]
    scaled = resize(image, covering, antialias=True).clamp(0.0, 1.0)
    return center_crop(scaled, [height, width])


def _is_gray(image: torch.Tensor) -> bool:
    """Whether an image ``(C, h, w)`` is grayscale: one channel, or R = G = B."""
    return bool((image[:1] == image[1:]).all())


def _split_held_out(name: str, x: torch.Tensor, labels: torch.Tensor | None) -> Dataset:
    """The fixed split of a ``folder:PATH`` dataset: seed-0 permutation, test, valid, train.

    Args:
        name: The dataset's name.
        x: All data ``(N, *event_shape)`` in sorted file order, ``N >= 3``.
        labels: ``(N,)`` or ``None``.
    """
    order = torch.as_tensor(np.random.RandomState(0).permutation(len(x)))
    held = max(1, int(len(x) * FOLDER_HOLDOUT))
    parts = {"train": order[2 * held :], "valid": order[held : 2 * held], "test": order[:held]}
    splits = {s: x[i] for s, i in parts.items()}
    split_labels = {} if labels is None else {s: labels[i] for s, i in parts.items()}
    return Dataset(name, splits, split_labels)


# --- binarization and checks ---------------------------------------------------


def is_binary(x: torch.Tensor) -> bool:
    """Whether every value is 0 or 1."""
    return bool(((x == 0) | (x == 1)).all())


def resolve_binarize(mode: str, train: torch.Tensor, support: constraints.Constraint) -> str:
    """Turn ``auto`` into ``dynamic`` or ``none``; other modes pass through.

    ``auto`` binarizes dynamically exactly when the likelihood's support is
    {0, 1} and the training data are not binary already.
    """
    if mode != "auto":
        return mode
    return "dynamic" if support is constraints.boolean and not is_binary(train) else "none"


_SPLIT_SEED_OFFSET = {"train": 0, "valid": 1, "test": 2}


def binarize_static(x: torch.Tensor, seed: int, split: str) -> torch.Tensor:
    """One fixed draw :math:`x_b \\sim \\mathrm{Bern}(x)` of the pixels, seeded per split."""
    generator = torch.Generator().manual_seed(seed + _SPLIT_SEED_OFFSET.get(split, 3))
    return torch.bernoulli(x, generator=generator)


def check_unit_interval(x: torch.Tensor, where: str) -> None:
    """Binarization draws Bernoulli(x): require every value in [0, 1]."""
    lo, hi = float(x.min()), float(x.max())
    if lo < 0 or hi > 1:
        raise DataError(
            f"{where}: values in [{lo:g}, {hi:g}] cannot be binarized (they must lie in [0, 1]); "
            "rescale the data, or use --binarize none with a likelihood for real values "
            "(e.g. --likelihood normal)"
        )


def check_fits(
    x: torch.Tensor,
    event_shape: tuple[int, ...],
    support: constraints.Constraint,
    likelihood: str,
    where: str,
) -> None:
    """Raise a one-line :class:`DataError` unless ``x`` fits the model.

    Checks that the datum shape equals ``event_shape`` and that every value
    lies in the likelihood's ``support`` (never by turning validation off).
    """
    if tuple(x.shape[1:]) != tuple(event_shape):
        raise DataError(
            f"{where}: a datum has shape {tuple(x.shape[1:])} "
            f"but the model expects {tuple(event_shape)}"
        )
    if bool(support.check(x).all()):
        return
    lo, hi = float(x.min()), float(x.max())
    if support is constraints.boolean:
        raise DataError(
            f"{where}: values in [{lo:g}, {hi:g}] are not in {{0, 1}}, the support of the "
            f"{likelihood!r} likelihood; use --binarize dynamic|static, or a likelihood for "
            "continuous data (e.g. --likelihood normal)"
        )
    raise DataError(
        f"{where}: values in [{lo:g}, {hi:g}] are outside the support {support} of the "
        f"{likelihood!r} likelihood; choose a likelihood whose support fits the data"
    )


@dataclass
class PreparedData:
    """Data ready for a model.

    Args:
        name: The dataset's name.
        binarize: The resolved binarization mode (never ``auto``).
        train: Training data; with ``dynamic`` binarization these are pixel
            probabilities, binarized afresh at every batch.
        splits: Evaluation-ready data of every split, ``train`` included
            (binarized once, with the fixed seed, where binarization is on).
        labels: Labels per split, where the dataset has them.
        fingerprint: :func:`fingerprint` of the data as loaded (before binarization).
    """

    name: str
    binarize: str
    train: torch.Tensor
    splits: dict[str, torch.Tensor]
    labels: dict[str, torch.Tensor]
    fingerprint: str = ""

    @property
    def dynamic(self) -> bool:
        """Whether the training data are binarized afresh at every batch."""
        return self.binarize == "dynamic"

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one datum."""
        return tuple(self.train.shape[1:])

    def split(self, name: str) -> torch.Tensor:
        """Evaluation data of split ``name``; a :class:`DataError` lists the valid splits."""
        if name not in self.splits:
            valid = ", ".join(self.splits)
            raise DataError(f"dataset {self.name!r} has no split {name!r}; valid splits: {valid}")
        return self.splits[name]


def prepare(
    dataset: Dataset, binarize: str, binarize_seed: int, support: constraints.Constraint
) -> PreparedData:
    """Binarize ``dataset`` as ``binarize`` says (see :class:`~pyro_vae.config.DataConfig`)."""
    mode = resolve_binarize(binarize, dataset.splits["train"], support)
    if mode == "none":
        splits = dict(dataset.splits)
        train = splits["train"]
    else:
        for split, x in dataset.splits.items():
            check_unit_interval(x, f"{dataset.name} {split}")
        splits = {s: binarize_static(x, binarize_seed, s) for s, x in dataset.splits.items()}
        train = dataset.splits["train"] if mode == "dynamic" else splits["train"]
    return PreparedData(
        dataset.name, mode, train, splits, dict(dataset.labels), fingerprint(dataset.splits)
    )


def fingerprint(splits: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of data: every split's name, dtype, shape and values.

    A run records it; resuming on changed data is refused and evaluating warns.
    """
    digest = hashlib.sha256()
    for name in sorted(splits):
        x = splits[name].detach().cpu().contiguous()
        digest.update(f"{name}:{x.dtype}:{tuple(x.shape)};".encode())
        digest.update(x.numpy())
    return digest.hexdigest()
