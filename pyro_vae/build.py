"""From a :class:`~pyro_vae.config.Config` to a :class:`~pyro_vae.model.VAE`, via the registries.

Importing this module registers every built-in component.
"""

from __future__ import annotations

import dataclasses

from . import data as _data  # noqa: F401  (registers the datasets)
from . import guides as _guides  # noqa: F401
from . import likelihoods as _likelihoods  # noqa: F401
from . import objectives as _objectives  # noqa: F401
from . import priors as _priors  # noqa: F401
from .config import ComponentConfig, Config, ModelConfig
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
    OBJECTIVES.get(config.train.elbo)
    OBJECTIVES.resolve(config.train.elbo, {"num_particles": config.train.num_particles}, "train")
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
    return VAE(prior, guide, likelihood)


def build_objective(config: Config) -> object:
    """The Pyro ELBO named by ``config.train.elbo``."""
    return OBJECTIVES.build(
        config.train.elbo, {"num_particles": config.train.num_particles}, "train"
    )
