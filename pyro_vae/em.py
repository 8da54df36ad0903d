"""Variational EM with one q per datum, and amortized SVI beside it on the same budget.

Variational EM (Neal & Hinton 1998) maximizes the same ELBO as a VAE,

.. math::

    \\mathcal L(\\theta, \\{\\lambda_i\\}) = \\sum_{i=1}^N
        \\mathbb E_{q_{\\lambda_i}(z)}[\\log p_\\theta(x_i \\mid z)]
        - \\mathrm{KL}(q_{\\lambda_i}(z) \\,\\|\\, p(z)),

but with a separate :math:`q_{\\lambda_i} = \\mathcal N(\\mu_i,
\\mathrm{diag}\\,\\sigma_i^2)` for every training datum (the ``local`` guide)
instead of an encoder :math:`q_\\phi(z|x)`. On each minibatch:

* **E-step** -- ``train.e_steps`` Adam steps on the local parameters
  :math:`\\lambda_i` of the minibatch, :math:`\\theta` fixed
  (:func:`~pyro_vae.elbo.refine_step`, the same per-datum refinement as the
  gap decomposition's);
* **M-step** -- one Adam step on the model parameters :math:`\\theta`
  (decoder and prior), :math:`q` fixed, on the run's Pyro objective.

Both steps weight the KL term by the epoch's β (``train.beta`` with
``train.kl_warmup_epochs``). :class:`VariationalEMStep` is the
``variational-em`` step strategy of the one trainer
(:class:`~pyro_vae.train.Trainer`): checkpoints, Ctrl-C and :func:`~pyro_vae.train.resume`
work as for SVI.

Beside it, :func:`fit_em` trains the amortized VAE (encoder and decoder
jointly, one SVI step per minibatch) from the same initial decoder, on the
same minibatches in the same order (the same data, the same number of epochs
and of :math:`\\theta` updates), and records both ELBOs on the full training
set after every epoch, with the seconds and gradient evaluations each method
spent, so the two views can be compared in one plot.

Memory: the local guide holds :math:`2ND` parameters and this module's
optimizer two moment estimates for each (:math:`6ND` floats in all, plus
:math:`N` step counts), growing linearly with the data size :math:`N`; an
encoder's size does not depend on :math:`N`. At :math:`D = 50`, 1500 digits
take 1.8 MB and 50 000 MNIST images 60 MB. Meant for small data.

References:
    Neal & Hinton (1998), "A view of the EM algorithm that justifies
    incremental, sparse, and other variants".
    Hoffman, Blei, Wang & Paisley (2013), "Stochastic variational inference".
    Cremer, Li & Duvenaud (2018), "Inference suboptimality in variational
    autoencoders".
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import ComponentConfig, Config, TrainConfig
from .data import PreparedData
from .elbo import RowAdam, refine_step
from .errors import ConfigError
from .model import VAE
from .registry import GUIDES, METHODS
from .train import StepStrategy, fit, with_guide

#: Sub-directory of an EM run that holds the amortized comparison run.
AMORTIZED_DIR = "amortized"

__all__ = ["AMORTIZED_DIR", "EMResult", "RowAdam", "VariationalEMStep", "fit_em"]


@METHODS.register("variational-em")
class VariationalEMStep(StepStrategy):
    """E-steps and an M-step per minibatch for a VAE whose guide is per-datum (``local``).

    Args:
        vae: A VAE whose guide is not amortized and has ``loc`` and ``log_scale`` rows.
        objective: The Pyro ELBO of the M-step (``differentiable_loss``).
        lr: Adam learning rate of :math:`\\theta` (decoder and prior).
        local_lr: Adam learning rate of the local parameters.
        e_steps: E-step updates per minibatch.
        num_particles: Draws of z per datum in the E-step.
    """

    objectives = ("meanfield", "trace")
    free_bits = False
    fixed_data = True
    compare_with_amortized = True

    def __init__(
        self,
        vae: VAE,
        objective: Any,
        lr: float,
        local_lr: float = 0.05,
        e_steps: int = 5,
        num_particles: int = 1,
    ) -> None:
        if vae.posterior.is_amortized:
            raise ConfigError("variational EM needs a per-datum guide ('local': one q per datum)")
        self.vae = vae
        self.objective = objective
        self.e_steps = int(e_steps)
        self.num_particles = int(num_particles)
        self.gradients_per_step = self.e_steps + 1
        self.local = [vae.posterior.loc, vae.posterior.log_scale]
        local_ids = {id(p) for p in self.local}
        self.theta = [p for p in vae.parameters() if id(p) not in local_ids]
        self.optimizer = torch.optim.Adam(self.theta, lr=lr)
        self.local_optimizer = RowAdam(self.local, lr=local_lr)

    @classmethod
    def from_config(
        cls, vae: VAE, objective: Any, train: TrainConfig, e_steps: int = 5, local_lr: float = 0.05
    ) -> VariationalEMStep:
        """Build from ``[train]`` (``lr``, ``num_particles``, ``e_steps``, ``local_lr``)."""
        return cls(vae, objective, train.lr, local_lr, e_steps, train.num_particles)

    @classmethod
    def configure(cls, config: Config) -> Config:
        """The per-datum ``local`` guide in place of an amortized one.

        A local :math:`q_i` belongs to one fixed datum, so data that would be
        binarized afresh at every batch are binarized once (``static``, with
        ``data.binarize_seed``): ``fixed_data``.
        """
        if GUIDES.get(config.model.guide.name).is_amortized:
            config = with_guide(config, ComponentConfig("local"))
        return config

    def e_step(self, x: torch.Tensor, index: torch.Tensor, kl_scale: float = 1.0) -> float:
        """``e_steps`` updates of :math:`\\lambda_i`, ``i`` in ``index``, :math:`\\theta` fixed.

        Returns:
            The mean per-datum objective before the last update (NaN stops early).
        """
        value = float("nan")
        for _ in range(self.e_steps):
            objective = refine_step(
                self.vae, x, index, *self.local, self.local_optimizer,
                num_particles=self.num_particles, kl_scale=kl_scale,
            )  # fmt: skip
            value = float(objective.mean())
            if value != value or abs(value) == float("inf"):
                break
        return value

    def m_step(
        self, x: torch.Tensor, index: torch.Tensor, data_size: int, kl_scale: float = 1.0
    ) -> float:
        """One update of :math:`\\theta` with the :math:`q_i` fixed; returns the loss."""
        loss = self.objective.differentiable_loss(
            self.vae.model, self.vae.guide, x, index, data_size, kl_scale
        )
        value = loss.item()
        if value != value or abs(value) == float("inf"):
            return value
        grads = torch.autograd.grad(loss, self.theta, allow_unused=True)
        for p, g in zip(self.theta, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value

    def step(self, x: torch.Tensor, index: torch.Tensor, data_size: int, kl_scale: float) -> float:
        """E-steps then an M-step on the minibatch; the M-step's loss (NaN: nothing more done)."""
        if self.local[0].shape[0] != data_size:
            raise ConfigError(
                f"the per-datum guide has {self.local[0].shape[0]} parameter sets "
                f"but there are {data_size} training data"
            )
        value = self.e_step(x, index, kl_scale)
        if value != value or abs(value) == float("inf"):
            return value
        return self.m_step(x, index, data_size, kl_scale)

    def state_dict(self) -> dict[str, Any]:
        """Both optimizers' states."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "local_optimizer": self.local_optimizer.state_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.optimizer.load_state_dict(state["optimizer"])
        self.local_optimizer.load_state_dict(state["local_optimizer"])


@dataclass
class EMResult:
    """What :func:`fit_em` returns.

    Args:
        vae: The model trained by variational EM (``local`` guide), in eval mode.
        config: Its resolved config.
        history: One record per epoch: both methods side by side (see :func:`fit_em`).
        data: The prepared data.
        amortized: The amortized VAE trained beside it (``None`` without ``compare``).
        amortized_config: Its config.
        amortized_history: Its records as :func:`pyro_vae.fit` writes them.
        em_history: The EM run's own records as :func:`pyro_vae.fit` writes them.
    """

    vae: VAE
    config: Config
    history: list[dict[str, Any]]
    data: PreparedData
    amortized: VAE | None = None
    amortized_config: Config | None = None
    amortized_history: list[dict[str, Any]] | None = None
    em_history: list[dict[str, Any]] | None = None

    def summary(self) -> str:
        """One line: both training-set ELBOs at the first and the last epoch."""
        if not self.history:
            return "no epochs run"
        first, last = self.history[0], self.history[-1]
        line = (
            f"train ELBO, variational EM: {first['em_train_elbo']:.2f} (epoch {first['epoch']}) "
            f"-> {last['em_train_elbo']:.2f} (epoch {last['epoch']})"
        )
        if "amortized_train_elbo" in last:
            line += (
                f"; amortized SVI: {first['amortized_train_elbo']:.2f} -> "
                f"{last['amortized_train_elbo']:.2f} nats per datum"
            )
        return line


def _amortized_guide(config: Config) -> ComponentConfig:
    """The run's guide if amortized, else ``mean-field``."""
    guide = config.model.guide
    if GUIDES.get(guide.name).is_amortized:
        return guide
    return ComponentConfig("mean-field")


def fit_em(
    config: Config,
    out_dir: str | Path | None = None,
    *,
    e_steps: int | None = None,
    local_lr: float | None = None,
    compare: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> EMResult:
    """Train by variational EM and, with ``compare``, amortized SVI beside it.

    Both are runs of the one trainer (:func:`pyro_vae.fit`). The EM model is
    ``config``'s model with an amortized guide replaced by ``local``; it is
    written to ``out_dir``. The amortized model keeps ``config``'s guide
    (``mean-field`` if that is per-datum), starts from the EM model's initial
    decoder and prior, sees the same minibatches in the same order (the same
    seed and binarization) and is written to ``out_dir/amortized``. Either
    run resumes with ``pyro-vae train --resume``.

    ``history`` has one record per epoch: ``epoch``, ``train_elbo`` (EM's
    running objective), ``em_train_elbo`` and ``amortized_train_elbo``
    (each model's ELBO on the whole training set, the same estimator),
    ``amortized_test_elbo`` (where a test split exists),
    ``em_seconds``/``amortized_seconds`` and
    ``em_gradient_steps``/``amortized_gradient_steps`` (cumulative).

    Args:
        config: The run config (``train.method`` is set to ``variational-em``).
        out_dir: Run directory, or ``None`` to keep everything in memory.
        e_steps: E-step updates per minibatch (default ``train.e_steps``).
        local_lr: Adam learning rate of the local parameters (default ``train.local_lr``).
        compare: Also train the amortized model.
        progress: Show a progress bar.
        log: Called with one line per epoch.
    """
    train = {"method": "variational-em"}
    train.update({k: v for k, v in (("e_steps", e_steps), ("local_lr", local_lr)) if v is not None})
    em_config = dataclasses.replace(config, train=dataclasses.replace(config.train, **train))
    initial: dict[str, Any] = {}

    def remember(vae: VAE) -> None:
        initial["likelihood"] = copy.deepcopy(vae.likelihood.state_dict())
        initial["prior"] = copy.deepcopy(vae.prior.state_dict())

    em = fit(em_config, out_dir, progress=progress, log=log, initialize=remember)
    result = EMResult(em.vae, em.config, [], em.data, em_history=em.history)
    if compare:
        defaults = TrainConfig()
        svi_config = dataclasses.replace(
            with_guide(em.config, _amortized_guide(config)),
            train=dataclasses.replace(
                em.config.train, method="svi", e_steps=defaults.e_steps, local_lr=defaults.local_lr
            ),
        )

        def start_alike(vae: VAE) -> None:
            vae.likelihood.load_state_dict(initial["likelihood"])
            vae.prior.load_state_dict(initial["prior"])

        splits = ("train_set", "test") if "test" in em.data.splits else ("train_set",)
        amortized = fit(
            svi_config,
            None if out_dir is None else Path(out_dir) / AMORTIZED_DIR,
            progress=progress,
            initialize=start_alike,
            evaluate_splits=splits,
        )
        result.amortized = amortized.vae
        result.amortized_config = amortized.config
        result.amortized_history = amortized.history
    result.history = _side_by_side(em.history, result.amortized_history)
    return result


def _side_by_side(
    em: list[dict[str, Any]], amortized: list[dict[str, Any]] | None
) -> list[dict[str, Any]]:
    """One record per epoch with both methods' training-set ELBOs, seconds and gradients."""
    records = []
    em_seconds = svi_seconds = 0.0
    for i, e in enumerate(em):
        em_seconds += e["seconds"]
        record: dict[str, Any] = {
            "epoch": e["epoch"],
            "train_elbo": e["train_elbo"],
            "em_train_elbo": e["train_set_elbo"],
            "em_seconds": em_seconds,
            "em_gradient_steps": e["gradient_steps"],
        }
        if amortized is not None:
            a = amortized[i]
            svi_seconds += a["seconds"]
            record["amortized_train_elbo"] = a["train_set_elbo"]
            if "test_elbo" in a:
                record["amortized_test_elbo"] = a["test_elbo"]
            record["amortized_seconds"] = svi_seconds
            record["amortized_gradient_steps"] = a["gradient_steps"]
        records.append(record)
    return records
