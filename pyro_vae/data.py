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

The data folder is ``--data-dir``, else ``$PYRO_VAE_DATA``, else
``~/.cache/pyro-vae``.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import socket
import struct
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.distributions import constraints

from .config import NPZ_PREFIX
from .errors import DataError
from .files import removing_new_folders
from .registry import DATASETS

DATA_ENV = "PYRO_VAE_DATA"
DOWNLOAD_TIMEOUT = 30.0
BINARIZED_MNIST_URL = (
    "http://www.cs.toronto.edu/~larocheh/public/datasets/binarized_mnist/"
    "binarized_mnist_{split}.amat"
)
SPLIT_ORDER = ("train", "valid", "test")
#: The prefix of a user's array file as a dataset name, ``npz:PATH``.
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
    name: str, data_dir: str | os.PathLike[str] | None = None, download: bool = True
) -> Dataset:
    """Load a dataset by name (see the module docstring) and check it is finite.

    Raises:
        ConfigError: for an unknown name (the message lists the valid ones).
        DataError: when files are missing and cannot be downloaded, unreadable,
            or hold NaN or infinite values.
    """
    folder = Path(data_dir) if data_dir else default_data_dir()
    if name == IN_MEMORY:
        raise DataError(
            "this run was trained on in-memory data (pyro_vae.fit(vae, data)), which is not "
            "on disk; evaluate it from Python with the same tensors"
        )
    if name.startswith(NPZ_PREFIX):
        dataset = load_npz(Path(name.removeprefix(NPZ_PREFIX)).expanduser())
    else:
        dataset = DATASETS.get(name)(data_dir=folder, download=download)
    for split, x in dataset.splits.items():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"{dataset.name}: split {split!r} has {bad} NaN or infinite values")
    return dataset


def check_dataset_name(name: str) -> None:
    """Raise a one-line :class:`ConfigError` unless ``name`` can name a dataset.

    Registered names, ``npz:PATH`` and the in-memory data of ``fit(vae, data)``.
    """
    if not (name.startswith(NPZ_PREFIX) or name == IN_MEMORY):
        DATASETS.get(name)


def dataset_slug(name: str) -> str:
    """A file-name-safe form of a dataset name (``npz:data/x.npz`` -> ``data_x.npz``)."""
    return name.removeprefix(NPZ_PREFIX).replace("/", "_")


def dataset_names() -> list[str]:
    """Every dataset name, ``npz:PATH`` included."""
    return [*DATASETS.names(), f"{NPZ_PREFIX}PATH"]


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
