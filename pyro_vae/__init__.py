"""pyro-vae: the variational autoencoder as a Pyro probabilistic program.

>>> import pyro_vae
>>> config = pyro_vae.Config()                      # digits, N(0, I), mean-field, Bernoulli
>>> result = pyro_vae.fit(config, "runs/digits")    # doctest: +SKIP
>>> vae = pyro_vae.load("runs/digits")              # doctest: +SKIP

The modules form layers; each imports only from the layers below it
(``tests/test_layers.py`` checks it):

1. ``_version``, ``errors``, ``files``, ``plugins``, ``registry``: foundations;
2. ``config``: frozen configs with a TOML round trip;
3. ``nets``, ``likelihoods``, ``guides``, ``priors``: the components;
4. ``model``: ``VAE(prior, guide, likelihood)``, the Pyro model and guide;
5. ``elbo``, ``objectives``, ``data``, ``exact``, ``build``, ``checkpoint``:
   computations on a model, objectives, data, building and run directories;
6. ``distributed``, ``train``, ``em``: the one trainer and its step strategies;
7. ``evaluate``, ``diagnostics``: evaluation; ``plots``, ``report``, ``course``: presentation;
8. ``cli``: the command line.
"""

from ._version import __version__
from .build import build_objective, build_vae, resolve
from .checkpoint import load, read_metrics
from .config import ComponentConfig, Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from .data import Dataset, load_dataset
from .elbo import Refinement, evaluate_elbo, refine_posterior
from .em import EMResult, VariationalEMStep, fit_em
from .errors import (
    CheckpointError,
    ConfigError,
    DataError,
    NonFiniteLossError,
    PyroVAEError,
    TrainingInterrupted,
    UserError,
)
from .evaluate import (
    Evaluation,
    effective_sample_size,
    evaluate_run,
    iwae_bounds,
    log_importance_weights,
    pareto_khat,
)
from .exact import LinearGaussian, linear_gaussian, log_likelihood_quadrature
from .guides import Guide
from .likelihoods import Likelihood
from .model import DATA_PLATE, LATENT_SITE, OBSERVED_SITE, VAE, analytic_kl
from .nets import Network
from .priors import Prior
from .registry import DATASETS, GUIDES, LIKELIHOODS, METHODS, NETWORKS, OBJECTIVES, PRIORS
from .train import Callback, StepStrategy, Trainer, TrainResult, fit, load_data, resume

__all__ = [
    "DATASETS",
    "DATA_PLATE",
    "GUIDES",
    "LATENT_SITE",
    "LIKELIHOODS",
    "METHODS",
    "NETWORKS",
    "OBJECTIVES",
    "OBSERVED_SITE",
    "PRIORS",
    "VAE",
    "CheckpointError",
    "ComponentConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "DataError",
    "Dataset",
    "EMResult",
    "EvalConfig",
    "Evaluation",
    "LinearGaussian",
    "ModelConfig",
    "NonFiniteLossError",
    "PyroVAEError",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "VariationalEMStep",
    "Callback",
    "Guide",
    "Likelihood",
    "Network",
    "Prior",
    "Refinement",
    "StepStrategy",
    "Trainer",
    "UserError",
    "__version__",
    "analytic_kl",
    "build_objective",
    "build_vae",
    "effective_sample_size",
    "evaluate_elbo",
    "evaluate_run",
    "fit",
    "fit_em",
    "iwae_bounds",
    "linear_gaussian",
    "load",
    "load_data",
    "load_dataset",
    "log_importance_weights",
    "log_likelihood_quadrature",
    "pareto_khat",
    "read_metrics",
    "refine_posterior",
    "resolve",
    "resume",
]
