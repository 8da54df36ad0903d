"""Run configuration: frozen dataclasses with a TOML round trip.

A run is described by a TOML file with the sections ``[data]``, ``[model]``
(``latent_dim``), ``[model.prior]``, ``[model.guide]``,
``[model.likelihood]``, ``[model.encoder]``, ``[model.decoder]``,
``[train]`` and ``[eval]``. Each component section has a ``name`` (looked up in the
registries of :mod:`pyro_vae.registry`) plus that component's own keys::

    [model.likelihood]
    name = "normal"
    scale = 0.1

:func:`resolve` fills in every default and validates every key before any
training starts, so the saved ``config.toml`` is complete and rebuilds the
same model.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from .errors import ConfigError
from .files import atomic_write_bytes
from .registry import _check_type

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BINARIZE_MODES = ("auto", "dynamic", "static", "none")


@dataclass(frozen=True)
class ComponentConfig:
    """A registry name plus that component's own options.

    Args:
        name: The registered name (e.g. ``"bernoulli"``).
        options: Keyword options of the component (e.g. ``{"scale": 0.1}``).
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", dict(self.options))

    def to_dict(self) -> dict[str, Any]:
        """The TOML table form: ``{"name": ..., **options}`` (``None``: the default, left out)."""
        return {"name": self.name, **{k: v for k, v in self.options.items() if v is not None}}

    @classmethod
    def from_dict(cls, table: Mapping[str, Any], where: str) -> ComponentConfig:
        """Parse a TOML table; ``where`` names the section in error messages."""
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: expected a table with a 'name' key, got {table!r}")
        if "name" not in table:
            raise ConfigError(f"{where}: missing required key 'name'")
        name = table["name"]
        if not isinstance(name, str):
            raise ConfigError(f"{where}.name: expected str, got {type(name).__name__} {name!r}")
        return cls(name, {k: v for k, v in table.items() if k != "name"})


def _mlp(hidden: list[int]) -> ComponentConfig:
    return ComponentConfig("mlp", {"hidden": hidden, "activation": "relu"})


#: Seeds are 64-bit: what ``torch.manual_seed`` and ``torch.Generator`` accept.
SEED_RANGE = (0, 2**63 - 1)


class _Section:
    """Mixin: type and range checks from the dataclass annotations."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            where = f"{self._section}.{f.name}"
            value = getattr(self, f.name)
            _check_type(value, hints[f.name], where)
            if f.name.endswith("seed") and not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
                raise ConfigError(
                    f"{where} = {value} is out of range; valid: {SEED_RANGE[0]} to {SEED_RANGE[1]}"
                )
        self._check()

    _section = ""

    def _check(self) -> None:
        pass


#: ``data.name`` of a user's array file: ``npz:PATH``.
NPZ_PREFIX = "npz:"
#: ``data.name`` of a user's folder of PNG or JPEG images: ``folder:PATH``.
FOLDER_PREFIX = "folder:"
#: The values of ``data.channels``: grayscale or RGB.
IMAGE_CHANNELS = (1, 3)


def image_size_pair(image_size: int | list[int] | tuple[int, ...] | None) -> tuple[int, int] | None:
    """``data.image_size`` as ``(height, width)``: ``S`` means ``(S, S)``; ``None`` stays ``None``.

    Raises:
        ConfigError: unless it is an int >= 1 or a list ``[height, width]`` of ints >= 1.
    """
    if image_size is None:
        return None
    pair = tuple(image_size) if isinstance(image_size, list | tuple) else (image_size, image_size)
    if len(pair) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in pair):
        pair = (0, 0)
    if min(pair) < 1:
        given = list(image_size) if isinstance(image_size, tuple) else image_size
        raise ConfigError(
            f"data.image_size must be a size >= 1 (e.g. 32) or [height, width] of sizes >= 1 "
            f"(e.g. [32, 48]), got {given!r}"
        )
    return pair


def check_image_channels(channels: int | None) -> None:
    """Raise a one-line :class:`ConfigError` unless ``data.channels`` is ``None``, 1 or 3."""
    if channels is not None and channels not in IMAGE_CHANNELS:
        raise ConfigError(
            f"data.channels must be 1 (grayscale) or 3 (RGB), or unset to follow the images, "
            f"got {channels!r}"
        )


@dataclass(frozen=True)
class DataConfig(_Section):
    """Which data to train on and how to binarize it.

    Args:
        name: A registered dataset (``digits``, ``binarized-mnist``, ``mnist``,
            ``fashion-mnist``), ``npz:PATH`` or ``folder:PATH`` (a folder of images).
        data_dir: Folder with local files; default ``$PYRO_VAE_DATA`` or a cache.
        binarize: ``dynamic`` (a fresh Bernoulli draw of the pixels at every
            batch), ``static`` (one fixed draw), ``none``, or ``auto``
            (``dynamic`` when the likelihood's support is {0, 1} and the data
            are not binary, else ``none``).
        binarize_seed: Seed of the fixed draw used for static binarization and
            for the evaluation splits, so test numbers compare across runs.
        download: Whether a missing dataset may be downloaded.
        image_size: ``folder:PATH`` only: the size every image is scaled to, ``S``
            (S x S) or ``[height, width]``; unset, the images' own size (all alike).
        channels: ``folder:PATH`` only: 1 (grayscale) or 3 (RGB); unset, 1 when
            every image is grayscale, else 3.
    """

    name: str = "digits"
    data_dir: str | None = None
    binarize: str = "auto"
    binarize_seed: int = 0
    download: bool = True
    image_size: int | tuple[int, ...] | None = None
    channels: int | None = None
    _section = "data"

    def _check(self) -> None:
        if self.binarize not in BINARIZE_MODES:
            raise ConfigError(
                f"data.binarize: unknown mode {self.binarize!r}; valid: {', '.join(BINARIZE_MODES)}"
            )
        if isinstance(self.image_size, list):
            object.__setattr__(self, "image_size", tuple(self.image_size))
        image_size_pair(self.image_size)
        check_image_channels(self.channels)
        for key in ("image_size", "channels"):
            if getattr(self, key) is not None and not self.name.startswith(FOLDER_PREFIX):
                raise ConfigError(
                    f"data.{key} applies only to folder:PATH datasets, not {self.name!r}; "
                    f"unset it (other datasets keep their own image size)"
                )

    def absolute(self, base: str | os.PathLike[str]) -> DataConfig:
        """A copy with absolute ``data_dir``, ``npz:`` and ``folder:`` paths (from ``base``).

        ``~`` is expanded. A run records its paths this way, so it works from any folder.
        """

        def absolute_path(path: str) -> str:
            return os.path.normpath(Path(base, Path(path).expanduser()).absolute())

        name = self.name
        for prefix in (NPZ_PREFIX, FOLDER_PREFIX):
            if name.startswith(prefix):
                name = prefix + absolute_path(name.removeprefix(prefix))
        data_dir = absolute_path(self.data_dir) if self.data_dir else self.data_dir
        return dataclasses.replace(self, name=name, data_dir=data_dir)


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The VAE: latent size and one component config per part."""

    latent_dim: int = 16
    prior: ComponentConfig = ComponentConfig("standard-normal")
    guide: ComponentConfig = ComponentConfig("mean-field")
    likelihood: ComponentConfig = ComponentConfig("bernoulli")
    encoder: ComponentConfig = _mlp([400])
    decoder: ComponentConfig = _mlp([400])
    _section = "model"

    def _check(self) -> None:
        if self.latent_dim < 1:
            raise ConfigError(f"model.latent_dim must be >= 1, got {self.latent_dim}")


#: The learning-rate schedules of ``train.lr_schedule``.
LR_SCHEDULES = ("none", "exponential", "plateau")


@dataclass(frozen=True)
class TrainConfig(_Section):
    """Optimization settings.

    Args:
        elbo: Objective name (``trace``: Monte Carlo KL; ``meanfield``: analytic KL;
            ``iwae``: importance weighted bound with K = ``num_particles``).
        num_particles: Samples of z per datum in the ELBO estimate (vectorized).
        beta: KL weight β after warm-up (1 is the ELBO; Higgins et al. 2017).
        kl_warmup_epochs: Epochs W of linear KL warm-up: epoch e has weight
            :math:`\\beta \\min(1, s + (e-1)/W)`; 0 means none.
        kl_warmup_start: The warm-up's weight s in its first epoch, as a fraction
            of β (0 by default; ``1 / kl_warmup_epochs`` is the VampPrior paper's
            :math:`\\min(1, e/W)`).
        free_bits: Per-dimension KL floor λ in nats (Kingma et al. 2016); ``meanfield`` only.
        epochs: Passes over the training data.
        batch_size: Minibatch size.
        lr: Adam learning rate.
        seed: Seed of every random draw of the run.
        device: ``cpu``, ``cuda`` or ``cuda:N``.
        method: The training method, a name in :data:`~pyro_vae.registry.METHODS`:
            ``svi`` (one joint SVI step per minibatch) or ``variational-em`` (one q
            per datum, E- and M-steps); both run in :func:`~pyro_vae.train.fit`.
        e_steps: ``variational-em``: E-step updates of the minibatch's q per M-step.
        local_lr: ``variational-em``: Adam learning rate of the per-datum q.
        eval_every: Evaluate the ELBO of the evaluation splits (``valid`` and
            ``test``) every this many epochs, and at the last epoch.
        early_stopping_patience: Stop when the validation ELBO has not improved
            for this many epochs, counted from the end of the KL warm-up; 0 never
            stops early. Needs a ``valid`` split.
        lr_schedule: ``none`` (constant), ``exponential`` (the learning rate is
            multiplied by ``lr_gamma`` after every epoch) or ``plateau``
            (multiplied by ``lr_gamma`` when the validation ELBO has not improved
            for ``lr_patience`` epochs; PyTorch's ``ReduceLROnPlateau``). The
            learning rate never goes below ``lr_min``.
        lr_gamma: The schedule's factor, in (0, 1].
        lr_patience: ``plateau``: epochs without improvement before a decay.
        lr_min: The smallest learning rate a schedule reaches.
        clip_norm: Clip the gradient's global 2-norm to this value before each
            step (``torch.nn.utils.clip_grad_norm_``); 0 means no clipping.
        image_every: Every this many epochs, and at the last epoch, keep a
            snapshot of decoded prior samples (the same noise each time) in the
            run directory, for the report's "samples over training", and draw
            image grids to TensorBoard (``--tensorboard``); 0 means never.

    The run keeps ``best.pt``, the checkpoint with the highest validation ELBO
    so far, whenever the data have a ``valid`` split.
    """

    elbo: str = "meanfield"
    num_particles: int = 1
    epochs: int = 100
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    device: str = "cpu"
    beta: float = 1.0
    kl_warmup_epochs: int = 0
    kl_warmup_start: float = 0.0
    free_bits: float = 0.0
    method: str = "svi"
    e_steps: int = 5
    local_lr: float = 0.05
    eval_every: int = 1
    early_stopping_patience: int = 0
    lr_schedule: str = "none"
    lr_gamma: float = 0.5
    lr_patience: int = 10
    lr_min: float = 0.0
    clip_norm: float = 0.0
    image_every: int = 0
    _section = "train"

    def _check(self) -> None:
        for key in ("num_particles", "epochs", "batch_size", "e_steps", "eval_every"):
            if getattr(self, key) < 1:
                raise ConfigError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        for key in ("lr", "local_lr"):
            if not 0 < getattr(self, key) < float("inf"):
                raise ConfigError(f"train.{key} must be finite and > 0, got {getattr(self, key)}")
        for key in (
            "beta", "kl_warmup_epochs", "free_bits", "early_stopping_patience", "lr_patience",
            "lr_min", "clip_norm", "image_every",
        ):  # fmt: skip
            if not 0 <= getattr(self, key) < float("inf"):
                raise ConfigError(f"train.{key} must be finite and >= 0, got {getattr(self, key)}")
        if not 0 <= self.kl_warmup_start <= 1:
            raise ConfigError(
                f"train.kl_warmup_start must be in [0, 1], got {self.kl_warmup_start}"
            )
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(
                f"train.lr_schedule: unknown schedule {self.lr_schedule!r}; "
                f"valid: {', '.join(LR_SCHEDULES)}"
            )
        if not 0 < self.lr_gamma <= 1:
            raise ConfigError(f"train.lr_gamma must be in (0, 1], got {self.lr_gamma}")
        if not (self.device == "cpu" or self.device.split(":")[0] == "cuda"):
            raise ConfigError(f"train.device: unknown device {self.device!r}; valid: cpu, cuda")


@dataclass(frozen=True)
class EvalConfig(_Section):
    """Defaults of ``pyro-vae evaluate`` (:func:`pyro_vae.evaluate.evaluate`).

    Args:
        num_samples: K, importance samples per datum for :math:`\\log p(x)`.
        iwae_k: The K of the IWAE bounds :math:`\\mathcal L_K` reported (each <= ``num_samples``).
        batch_size: Data per batch.
        chunk_size: Samples (particles x data) per decoder call; bounds memory.
        seed: Seed of the importance samples.
    """

    num_samples: int = 5000
    iwae_k: tuple[int, ...] = (1, 10, 100, 1000, 5000)
    batch_size: int = 100
    chunk_size: int = 4096
    seed: int = 0
    _section = "eval"

    def _check(self) -> None:
        object.__setattr__(self, "iwae_k", tuple(self.iwae_k))
        for key in ("num_samples", "batch_size", "chunk_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"eval.{key} must be >= 1, got {getattr(self, key)}")
        if not self.iwae_k or min(self.iwae_k) < 1:
            raise ConfigError(f"eval.iwae_k must be a non-empty list of K >= 1, got {self.iwae_k}")


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
}


@dataclass(frozen=True)
class Config:
    """A whole run: ``data``, ``model``, ``train`` and ``eval`` sections.

    ``plugins`` (a top-level TOML key) lists the importable modules that
    register the run's user components (see :mod:`pyro_vae.plugins`); every
    command that reads the run imports them first.
    """

    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    plugins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        plugins = self.plugins
        if isinstance(plugins, str) or not all(isinstance(p, str) and p for p in plugins):
            raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
        object.__setattr__(self, "plugins", tuple(dict.fromkeys(plugins)))

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict, the TOML document; ``None`` values are left out."""
        out: dict[str, Any] = {"plugins": list(self.plugins)} if self.plugins else {}
        for section in _SECTIONS:
            table: dict[str, Any] = {}
            for f in dataclasses.fields(getattr(self, section)):
                value = getattr(getattr(self, section), f.name)
                if isinstance(value, ComponentConfig):
                    value = value.to_dict()
                if value is not None:
                    table[f.name] = value
            out[section] = table
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> Config:
        """Parse the nested dict form; unknown sections or keys are errors."""
        plugins = doc.get("plugins", ())
        if not isinstance(plugins, list | tuple):
            raise ConfigError(f"plugins: expected a list of module names, got {plugins!r}")
        unknown = sorted(set(doc) - set(_SECTIONS) - {"plugins"})
        if unknown:
            raise ConfigError(
                f"unknown config section [{unknown[0]}]; valid sections: {', '.join(_SECTIONS)}"
            )
        sections = {}
        for section, klass in _SECTIONS.items():
            table = doc.get(section, {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"[{section}] must be a table, got {table!r}")
            fields = {f.name: f for f in dataclasses.fields(klass)}
            extra = sorted(set(table) - set(fields))
            if extra:
                raise ConfigError(
                    f"{section}: unknown key {extra[0]!r}; valid keys: {', '.join(fields)}"
                )
            kwargs = {}
            for key, value in table.items():
                if isinstance(klass.__dataclass_fields__[key].default, ComponentConfig):
                    value = ComponentConfig.from_dict(value, f"{section}.{key}")
                kwargs[key] = value
            sections[section] = klass(**kwargs)
        return cls(**sections, plugins=tuple(plugins))

    def to_toml(self) -> str:
        """The TOML document."""
        return tomli_w.dumps(self.to_dict())

    @classmethod
    def from_toml(cls, text: str) -> Config:
        """Parse a TOML document."""
        try:
            doc = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"invalid TOML: {e}") from None
        return cls.from_dict(doc)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the TOML document to ``path`` atomically."""
        atomic_write_bytes(Path(path), self.to_toml().encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, relative_to_file: bool = True) -> Config:
        """Read a TOML config file.

        Args:
            path: The file.
            relative_to_file: Read relative paths in it (``data.data_dir``, an
                ``npz:`` or ``folder:`` dataset) relative to the file's folder, as whoever wrote
                the file meant them. Off for the ``config.toml`` of a run
                directory, whose paths are absolute (0.1/0.2 runs: relative to
                the folder the run was trained from).
        """
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not UTF-8 text (TOML must be)") from None
        config = cls.from_toml(text)
        if relative_to_file:
            config = dataclasses.replace(config, data=config.data.absolute(Path(path).parent))
        return config

    def override(self, overrides: Mapping[str, Any]) -> Config:
        """A copy with dotted keys replaced, e.g. ``{"train.epochs": 5}``.

        Setting a component's ``name`` to a different name drops that
        component's old options (they belong to the old component), except
        options set in the same call.
        """
        doc = self.to_dict()
        for dotted, value in overrides.items():
            *path, key = dotted.split(".")
            if not path:
                raise ConfigError(f"--set {dotted}: expected section.key=value")
            table = doc
            for part in path:
                if not isinstance(table.get(part, {}), dict):
                    raise ConfigError(f"--set {dotted}: {part!r} is not a section")
                table = table.setdefault(part, {})
            if key == "name" and table.get("name") != value:
                prefix = ".".join(path) + "."
                kept = {k.removeprefix(prefix) for k in overrides if k.startswith(prefix)}
                for old in [k for k in table if k not in kept]:
                    del table[old]
            table[key] = value
        return Config.from_dict(doc)


def parse_override(assignment: str) -> tuple[str, Any]:
    """Parse ``section.key=value``; the value is read as TOML, else as a string."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value
