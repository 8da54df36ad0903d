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
from .errors import ConfigError
from .model import VAE
from .nets import BuildContext
from .registry import DATASETS, GUIDES, LIKELIHOODS, NETWORKS, OBJECTIVES, PRIORS, Registry

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
    if not config.data.name.startswith("npz:"):
        DATASETS.get(config.data.name)
    model = dataclasses.replace(config.model, **resolved)
    return dataclasses.replace(config, model=model)


def build_vae(model: ModelConfig, event_shape: tuple[int, ...]) -> VAE:
    """Build the VAE described by ``model`` for data of shape ``event_shape``.

    Every component comes from its registry: ``VAE(prior, guide, likelihood)``.
    """
    if not event_shape:
        raise ConfigError("a datum must have at least one dimension")
    ctx = BuildContext(model.latent_dim, tuple(event_shape), model.encoder, model.decoder)
    prior = PRIORS.build(
        model.prior.name, model.prior.options, "model.prior", latent_dim=model.latent_dim
    )
    guide = GUIDES.build(model.guide.name, model.guide.options, "model.guide", ctx=ctx)
    likelihood = LIKELIHOODS.build(
        model.likelihood.name, model.likelihood.options, "model.likelihood", ctx=ctx
    )
    prior.bind(guide, ctx.event_shape)  # the VampPrior mixes the guide's q(z|u); others ignore it
    return VAE(prior, guide, likelihood)


#: ``[train]`` keys that are objective options: each goes to the objective's
#: factory when it takes that keyword (see :data:`~pyro_vae.registry.OBJECTIVES`).
OBJECTIVE_KEYS = ("num_particles", "free_bits")


def objective_options(train: TrainConfig) -> dict[str, Any]:
    """The options of ``train.elbo``'s factory, read from the ``[train]`` keys of the same name.

    Raises:
        ConfigError: a key of :data:`OBJECTIVE_KEYS` set away from its default
            for an objective that does not take it (e.g. ``free_bits`` with ``iwae``).
    """
    accepted = OBJECTIVES.options(train.elbo)
    options = {}
    for key in OBJECTIVE_KEYS:
        value = getattr(train, key)
        if key in accepted:
            options[key] = value
        elif value != TrainConfig.__dataclass_fields__[key].default:
            takers = [n for n in OBJECTIVES.names() if key in OBJECTIVES.options(n)]
            raise ConfigError(
                f"train.{key} = {value} does not apply to elbo {train.elbo!r}; "
                f"it applies to elbo: {', '.join(takers) or 'none'}"
            )
    return options


def build_objective(config: Config) -> object:
    """The Pyro ELBO named by ``config.train.elbo``, with its options from ``[train]``."""
    return OBJECTIVES.build(config.train.elbo, objective_options(config.train), "train")
