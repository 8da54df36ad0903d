"""pyro-vae: the variational autoencoder as a Pyro probabilistic program.

>>> import pyro_vae
>>> config = pyro_vae.Config()                      # digits, N(0, I), mean-field, Bernoulli
>>> result = pyro_vae.fit(config, "runs/digits")    # doctest: +SKIP
>>> vae = pyro_vae.load("runs/digits")              # doctest: +SKIP
"""

from .build import build_objective, build_vae, resolve
from .checkpoint import load, read_metrics
from .config import ComponentConfig, Config, DataConfig, EvalConfig, ModelConfig, TrainConfig
from .data import Dataset, load_dataset
from .em import EMResult, VariationalEM, fit_em
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
    refine_posterior,
)
from .exact import LinearGaussian, linear_gaussian, log_likelihood_quadrature
from .model import DATA_PLATE, LATENT_SITE, OBSERVED_SITE, VAE, analytic_kl
from .registry import DATASETS, GUIDES, LIKELIHOODS, NETWORKS, OBJECTIVES, PRIORS
from .train import TrainResult, evaluate_elbo, fit, load_data, resume

__version__ = "0.1.0"

__all__ = [
    "DATASETS",
    "DATA_PLATE",
    "GUIDES",
    "LATENT_SITE",
    "LIKELIHOODS",
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
    "VariationalEM",
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
