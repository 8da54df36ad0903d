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
5. ``elbo``, ``weights``, ``objectives``, ``data``, ``exact``, ``build``, ``checkpoint``:
   computations on a model, objectives, data, building and run directories;
   ``export``: TorchScript files of a trained model;
6. ``distributed``, ``train``, ``em``: the one trainer and its step strategies;
7. ``ais``, ``evaluate``, ``diagnostics``: evaluation; ``plots``, ``report``,
   ``course``, ``tensorboard``: presentation;
8. ``cli``: the command line.

Importing the package itself is cheap: the names below are loaded, with
every module (so every registered component), on first use (PEP 562), so
the ``pyro-vae`` command can exit quietly on a Ctrl-C while torch loads.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

if TYPE_CHECKING:  # for type checkers and IDEs; at run time see __getattr__
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
        NonFiniteStartError,
        PyroVAEError,
        RunInUseError,
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
    from .tensorboard import TensorBoardCallback
    from .train import Callback, StepStrategy, Trainer, TrainResult, fit, load_data, resume

#: Public name -> the module that defines it.
_EXPORTS: dict[str, str] = {
    "Callback": "train",
    "CheckpointError": "errors",
    "ComponentConfig": "config",
    "Config": "config",
    "ConfigError": "errors",
    "DATASETS": "registry",
    "DATA_PLATE": "model",
    "DataConfig": "config",
    "DataError": "errors",
    "Dataset": "data",
    "EMResult": "em",
    "EvalConfig": "config",
    "Evaluation": "evaluate",
    "GUIDES": "registry",
    "Guide": "guides",
    "LATENT_SITE": "model",
    "LIKELIHOODS": "registry",
    "Likelihood": "likelihoods",
    "LinearGaussian": "exact",
    "METHODS": "registry",
    "ModelConfig": "config",
    "NETWORKS": "registry",
    "Network": "nets",
    "NonFiniteLossError": "errors",
    "NonFiniteStartError": "errors",
    "OBJECTIVES": "registry",
    "OBSERVED_SITE": "model",
    "PRIORS": "registry",
    "Prior": "priors",
    "PyroVAEError": "errors",
    "RunInUseError": "errors",
    "Refinement": "elbo",
    "StepStrategy": "train",
    "TensorBoardCallback": "tensorboard",
    "TrainConfig": "config",
    "TrainResult": "train",
    "Trainer": "train",
    "TrainingInterrupted": "errors",
    "UserError": "errors",
    "VAE": "model",
    "VariationalEMStep": "em",
    "analytic_kl": "model",
    "build_objective": "build",
    "build_vae": "build",
    "effective_sample_size": "evaluate",
    "evaluate_elbo": "elbo",
    "evaluate_run": "evaluate",
    "fit": "train",
    "fit_em": "em",
    "iwae_bounds": "evaluate",
    "linear_gaussian": "exact",
    "load": "checkpoint",
    "load_data": "train",
    "load_dataset": "data",
    "log_importance_weights": "evaluate",
    "log_likelihood_quadrature": "exact",
    "pareto_khat": "evaluate",
    "read_metrics": "checkpoint",
    "refine_posterior": "elbo",
    "resolve": "build",
    "resume": "train",
}


def __getattr__(name: str) -> Any:
    """Load every module on first use of a public name (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for name_, module_ in _EXPORTS.items():
        globals()[name_] = getattr(importlib.import_module(f".{module_}", __name__), name_)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


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
    "NonFiniteStartError",
    "PyroVAEError",
    "RunInUseError",
    "TensorBoardCallback",
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
