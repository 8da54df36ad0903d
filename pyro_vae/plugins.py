"""User components from outside the package: plugin modules and entry points.

A *plugin* is an importable module that registers components when imported
(``@pyro_vae.PRIORS.register("my-prior")`` on a :class:`~pyro_vae.Prior`
subclass, and so on). It reaches pyro-vae in two ways:

* by name: ``pyro-vae train --plugin my_module`` (every subcommand takes
  ``--plugin``) or ``Config(plugins=("my_module",))``; the run's
  ``config.toml`` records it, so ``evaluate``, ``report``, ``sample`` and
  :func:`pyro_vae.load` import it by themselves in a fresh process;
* installed: a distribution that declares an entry point in the group
  :data:`ENTRY_POINT_GROUP`::

      [project.entry-points."pyro_vae.plugins"]
      my_components = "my_package.components"

  is imported the first time a registry is asked for a name it lacks.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Iterable

from .errors import ConfigError

#: The entry-point group that installed plugins declare.
ENTRY_POINT_GROUP = "pyro_vae.plugins"

_entry_points_loaded = False


def import_plugins(modules: Iterable[str]) -> None:
    """Import each plugin module (each registers its components on import).

    Raises:
        ConfigError: a module cannot be imported; the message names it and the error.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(
                f"cannot import plugin {name!r} ({e}); it must be an importable module "
                "(on sys.path, e.g. installed or in the current directory)"
            ) from None


def load_entry_points() -> bool:
    """Import every installed plugin of :data:`ENTRY_POINT_GROUP` once per process.

    Returns:
        Whether this call imported any (``False`` when already done or none exist).
    """
    global _entry_points_loaded
    if _entry_points_loaded:
        return False
    _entry_points_loaded = True
    found = list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))
    for entry_point in found:
        try:
            entry_point.load()
        except Exception as e:  # a broken plugin must not hide the built-in components
            raise ConfigError(
                f"installed plugin {entry_point.name!r} ({entry_point.value}) failed to "
                f"import: {type(e).__name__}: {e}"
            ) from None
    return bool(found)
