"""From a :class:`~pyro_vae.config.Config` to a :class:`~pyro_vae.model.VAE`, via the registries.

Importing this module registers every built-in component.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from . import data as _data  # noqa: F401  (registers the datasets)
from . import exact as _exact  # noqa: F401  (registers the ppca dataset)
from . import guides as _guides  # noqa: F401
from . import likelihoods as _likelihoods  # noqa: F401
from . import objectives as _objectives  # noqa: F401
from . import priors as _priors  # noqa: F401
from .config import ComponentConfig, Config, ModelConfig, TrainConfig
from .data import check_dataset_name
from .errors import ConfigError
from .model import VAE
from .nets import BuildContext
from .registry import (
    GUIDES,
    LIKELIHOODS,
    METHODS,
    NETWORKS,
    OBJECTIVES,
    PRIORS,
    Registry,
)

_COMPONENTS: dict[str, Registry] = {
    "prior": PRIORS,
    "guide": GUIDES,
    "likelihood": LIKELIHOODS,
    "encoder": NETWORKS,
    "decoder": NETWORKS,
}


def resolve(config: Config) -> Config:
    """Validate every name and option of ``config`` and fill in all defaults.

    Raises:
        ConfigError: naming the first unknown name, unknown or missing key, or
            wrong type; nothing is built or trained.
    """
    resolved = {}
    for key, registry in _COMPONENTS.items():
        component: ComponentConfig = getattr(config.model, key)
        registry.get(component.name)
        options = registry.resolve(component.name, component.options, f"model.{key}")
        resolved[key] = ComponentConfig(component.name, options)
    PRIORS.get(config.model.prior.name).check_guide(GUIDES.get(config.model.guide.name))
    OBJECTIVES.get(config.train.elbo)
    OBJECTIVES.resolve(config.train.elbo, objective_options(config.train), "train")
    METHODS.get(config.train.method)
    METHODS.resolve(config.train.method, method_options(config.train), "train")
    check_dataset_name(config.data.name)
    model = dataclasses.replace(config.model, **resolved)
    return dataclasses.replace(config, model=model)


def build_vae(model: ModelConfig, event_shape: tuple[int, ...], num_data: int | None = None) -> VAE:
    """Build the VAE described by ``model`` for data of shape ``event_shape``.

    Every component comes from its registry: ``VAE(prior, guide, likelihood)``.

    Args:
        model: The ``[model]`` section.
        event_shape: The shape of one datum.
        num_data: The training set's size, for per-datum guides (``local``).
    """
    if not event_shape:
        raise ConfigError("a datum must have at least one dimension")
    ctx = BuildContext(model.latent_dim, tuple(event_shape), model.encoder, model.decoder, num_data)
    prior = PRIORS.build(
        model.prior.name, model.prior.options, "model.prior", latent_dim=model.latent_dim
    )
    guide = GUIDES.build(model.guide.name, model.guide.options, "model.guide", ctx=ctx)
    likelihood = LIKELIHOODS.build(
        model.likelihood.name, model.likelihood.options, "model.likelihood", ctx=ctx
    )
    return VAE(prior, guide, likelihood)  # binds the prior to the guide (the VampPrior's q(z|u))


#: ``[train]`` keys that are objective options: each goes to the objective's
#: factory when it takes that keyword (see :data:`~pyro_vae.registry.OBJECTIVES`).
OBJECTIVE_KEYS = ("num_particles", "free_bits")


#: ``[train]`` keys that are options of a training method (see :data:`~pyro_vae.registry.METHODS`).
METHOD_KEYS = ("e_steps", "local_lr")


def _options(
    train: TrainConfig, keys: tuple[str, ...], registry: Registry, name: str, what: str
) -> dict[str, Any]:
    accepted = registry.options(name)
    options = {}
    for key in keys:
        value = getattr(train, key)
        if key in accepted:
            options[key] = value
        elif value != TrainConfig.__dataclass_fields__[key].default:
            takers = [n for n in registry.names() if key in registry.options(n)]
            raise ConfigError(
                f"train.{key} = {value} does not apply to {what} {name!r}; "
                f"it applies to {what}: {', '.join(takers) or 'none'}"
            )
    return options


def objective_options(train: TrainConfig) -> dict[str, Any]:
    """The options of ``train.elbo``'s factory, read from the ``[train]`` keys of the same name.

    Raises:
        ConfigError: a key of :data:`OBJECTIVE_KEYS` set away from its default
            for an objective that does not take it (e.g. ``free_bits`` with ``iwae``).
    """
    return _options(train, OBJECTIVE_KEYS, OBJECTIVES, train.elbo, "elbo")


def method_options(train: TrainConfig) -> dict[str, Any]:
    """The options of ``train.method``'s step strategy, from the ``[train]`` keys of the same name.

    Raises:
        ConfigError: a key of :data:`METHOD_KEYS` set away from its default for a
            method that does not take it (e.g. ``e_steps`` with ``svi``).
    """
    return _options(train, METHOD_KEYS, METHODS, train.method, "method")


def build_objective(config: Config) -> object:
    """The Pyro ELBO named by ``config.train.elbo``, with its options from ``[train]``."""
    return OBJECTIVES.build(config.train.elbo, objective_options(config.train), "train")
