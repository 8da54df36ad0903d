"""Explicit name-to-component registries.

Every swappable part of a VAE (network, prior, guide, likelihood, objective,
dataset) is looked up by name in one of the registries below, never through
``if name == ...`` branches. An entry is a class with a ``from_config``
classmethod, or a plain function; its keyword arguments (after the build
context) are the options that a config section may set.

Example:
    >>> from pyro_vae.registry import PRIORS
    >>> "standard-normal" in PRIORS.names()
    True
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

from .errors import ConfigError
from .plugins import load_entry_points

T = TypeVar("T")

_CONTEXT_PARAMS = {"self", "cls", "ctx"}

#: Option values a config can hold (TOML scalars and lists of them).
_PLAIN = (bool, int, float, str)


class Describable:
    """Mixin: remember the arguments of the outermost ``__init__`` call.

    A component built by hand (``MeanFieldGuide(MLP((8, 8), None, [32]), 4)``)
    can then describe itself as a registry name plus options
    (:meth:`Registry.describe`), so a hand-built VAE saves a config that
    rebuilds it. Every base class of a component (prior, guide, likelihood,
    network) derives from it.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_arguments", False):
            return
        signature = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self: Any, *args: Any, **kw: Any) -> None:
            if "_init_arguments" not in self.__dict__:  # the outermost __init__ only
                bound = signature.bind(self, *args, **kw)
                bound.apply_defaults()
                arguments = dict(list(bound.arguments.items())[1:])
                object.__setattr__(self, "_init_arguments", arguments)
            init(self, *args, **kw)

        recording_init._records_arguments = True  # type: ignore[attr-defined]
        cls.__init__ = recording_init  # type: ignore[method-assign]


def _plain(value: Any) -> bool:
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, _PLAIN)


class Registry(Generic[T]):
    """A named collection of components of one kind.

    Args:
        kind: What the entries are ("prior", "guide", ...), used in messages.
        context: Names of keyword arguments that the builder supplies (not
            options a user may set), e.g. ``("in_shape", "out_features")``.
    """

    def __init__(self, kind: str, context: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.context = frozenset(context) | _CONTEXT_PARAMS
        self._entries: dict[str, T] = {}
        self._examples: dict[str, dict[str, Any]] = {}

    def register(self, name: str, example: Mapping[str, Any] | None = None) -> Callable[[T], T]:
        """Decorator that adds an entry under ``name``.

        Registering the same entry again under the same name is allowed (a
        notebook cell run twice, a plugin imported twice: the newer class
        object replaces the older when it is the same class by module and
        qualified name); another entry under a taken name raises.

        Args:
            name: The registered name.
            example: Options for a small working instance (required options
                included); the contract tests build every entry with them.
        """

        def decorator(entry: T) -> T:
            old = self._entries.get(name)
            if old is not None and _identity(old) != _identity(entry):
                raise ValueError(
                    f"{self.kind} {name!r} is already registered as {_identity(old)}; "
                    f"cannot register {_identity(entry)} under the same name"
                )
            self._entries[name] = entry
            self._examples[name] = dict(example or {})
            return entry

        return decorator

    def example(self, name: str) -> dict[str, Any]:
        """The example options registered with entry ``name``."""
        self.get(name)
        return dict(self._examples[name])

    def name_of(self, entry: Any) -> str | None:
        """The name ``entry`` (a class or function) is registered under, or ``None``."""
        return next((n for n, e in self._entries.items() if e is entry), None)

    def describe(self, component: Any) -> tuple[str, dict[str, Any]] | None:
        """``(name, options)`` that rebuild ``component`` through this registry, or ``None``.

        Read from the arguments its constructor was called with
        (:class:`Describable`): each option of the entry that the constructor
        took under the same name. ``None`` when the class is not registered,
        was not recorded, or an option's value is not plain config data.
        """
        name = self.name_of(type(component))
        arguments = component.__dict__.get("_init_arguments")
        if name is None or arguments is None:
            return None
        options = {}
        for key in self.options(name):
            if key in arguments:
                value = arguments[key]
                if isinstance(value, tuple):
                    value = list(value)
                if not _plain(value):
                    return None
                options[key] = value
        return name, options

    def names(self) -> list[str]:
        """The registered names, in registration order."""
        return list(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def get(self, name: str) -> T:
        """The entry registered as ``name``.

        Raises:
            ConfigError: if no entry has that name; the message lists valid names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            pass
        if isinstance(name, str) and load_entry_points() and name in self._entries:
            return self._entries[name]
        valid = ", ".join(self.names())
        raise ConfigError(
            f"unknown {self.kind} {name!r}; valid names: {valid} (a component of your own: "
            "import the plugin that registers it, --plugin MODULE)"
        )

    def factory(self, name: str) -> Callable[..., Any]:
        """The callable that builds entry ``name`` (its ``from_config`` if it has one)."""
        entry = self.get(name)
        return getattr(entry, "from_config", entry)  # type: ignore[return-value]

    def options(self, name: str) -> dict[str, inspect.Parameter]:
        """The user-settable options of entry ``name``, as signature parameters."""
        params = inspect.signature(self.factory(name)).parameters
        return {
            key: p
            for key, p in params.items()
            if key not in self.context and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        }

    def resolve(self, name: str, options: Mapping[str, Any], where: str) -> dict[str, Any]:
        """Check ``options`` against entry ``name`` and fill in defaults.

        Args:
            name: The registered name.
            options: The options given in the config.
            where: The config section, for messages (e.g. ``"model.prior"``).

        Returns:
            Every option of the entry, with defaults where not given.

        Raises:
            ConfigError: on an unknown key, a missing required key or a wrong type.
        """
        params = self.options(name)
        unknown = sorted(set(options) - set(params))
        if unknown:
            valid = ", ".join(params) or "none"
            raise ConfigError(
                f"{where}: unknown key {unknown[0]!r} for {self.kind} {name!r}; valid keys: {valid}"
            )
        hints = _type_hints(self.factory(name))
        resolved: dict[str, Any] = {}
        for key, param in params.items():
            if key in options:
                value = options[key]
                _check_type(value, hints.get(key), f"{where}.{key}")
                resolved[key] = list(value) if isinstance(value, tuple) else value
            elif param.default is inspect.Parameter.empty:
                raise ConfigError(f"{where}: missing required key {key!r} for {self.kind} {name!r}")
            else:
                default = param.default
                resolved[key] = list(default) if isinstance(default, tuple) else default
        return resolved

    def build(self, name: str, options: Mapping[str, Any], where: str, **context: Any) -> Any:
        """Resolve ``options`` and call the entry's factory with them and ``context``."""
        resolved = self.resolve(name, options, where)
        return self.factory(name)(**context, **resolved)


def _identity(entry: Any) -> str:
    return f"{getattr(entry, '__module__', '?')}.{getattr(entry, '__qualname__', repr(entry))}"


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    try:
        return typing.get_type_hints(fn)
    except Exception:  # unresolvable forward references: skip type checks
        return {}


def _check_type(value: Any, hint: Any, where: str) -> None:
    """Raise :class:`ConfigError` if ``value`` does not match the simple type ``hint``."""
    if hint is None or hint is Any:
        return
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(hint):
            try:
                _check_type(value, arm, where)
                return
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if hint is type(None):
        if value is not None:
            raise ConfigError(f"{where}: expected nothing, got {value!r}")
        return
    if origin in (list, tuple, Sequence):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        args = typing.get_args(hint)
        for item in value:
            if args:
                _check_type(item, args[0], where)
        return
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif hint is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(hint, type):
        ok = isinstance(value, hint)
    else:
        return
    if not ok:
        name = getattr(hint, "__name__", str(hint))
        raise ConfigError(f"{where}: expected {name}, got {type(value).__name__} {value!r}")


NETWORKS: Registry[Any] = Registry("network", context=("in_shape", "out_features"))
PRIORS: Registry[Any] = Registry("prior", context=("latent_dim",))
GUIDES: Registry[Any] = Registry("guide")
LIKELIHOODS: Registry[Any] = Registry("likelihood")
OBJECTIVES: Registry[Any] = Registry("objective")
DATASETS: Registry[Any] = Registry("dataset", context=("data_dir", "download"))
#: Training methods: step strategies of the one trainer (:mod:`pyro_vae.train`).
METHODS: Registry[Any] = Registry("training method", context=("vae", "objective", "train"))
