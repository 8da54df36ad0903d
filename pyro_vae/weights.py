"""Importance weights: what follows from them, and where they come from.

The small computations shared by every estimator of :math:`\\log p(x)`
(importance sampling in :mod:`pyro_vae.evaluate`, annealed importance
sampling in :mod:`pyro_vae.ais`): the log-mean-exp of log weights, Kish's
effective sample size, the delta-method Monte Carlo standard error, and the
proposal distribution by name.
"""

from __future__ import annotations

import math

import torch
from torch.distributions import Distribution

from .errors import ConfigError, UserError
from .model import VAE

#: Proposals by name: the guide :math:`q(z|x)` or the prior :math:`p(z)`.
PROPOSALS = ("guide", "prior")

Proposal = str | Distribution


def log_mean_exp(log_w: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """:math:`\\log \\frac1K \\sum_k e^{\\log w_k}` along ``dim``, computed stably."""
    return torch.logsumexp(log_w, dim) - math.log(log_w.shape[dim])


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """Per-datum ESS :math:`(\\sum_k w_k)^2 / \\sum_k w_k^2`, shape ``(B,)``, in ``[1, K]``.

    Kish's effective sample size of self-normalized importance sampling (Kong
    1992, "A note on importance sampling using standardized weights").
    """
    return torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))


def log_likelihood_mc_stderr(ess: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Delta-method Monte Carlo standard error of :math:`\\log \\hat p(x)`, per datum.

    .. math::

        \\operatorname{Var}\\big[\\log \\tfrac1K \\textstyle\\sum_k w_k\\big]
        \\approx \\frac{\\operatorname{Var}[w]}{K\\,\\mathbb E[w]^2}
        \\approx \\frac{1}{\\mathrm{ESS}} - \\frac1K,

    using :math:`\\mathrm{Var}[w]/\\mathbb E[w]^2 \\approx K/\\mathrm{ESS} - 1`
    (Owen 2013, "Monte Carlo theory, methods and examples", Sec. 9.3). It
    trusts the weights: where :math:`\\hat k > 0.7` it understates the error.
    """
    return (1.0 / ess - 1.0 / num_samples).clamp(min=0).sqrt()


def _check_batch_distribution(q: Distribution, batch: int, latent_dim: int, what: str) -> None:
    if tuple(q.batch_shape) != (batch,) or tuple(q.event_shape) != (latent_dim,):
        raise ConfigError(
            f"{what} must have batch shape ({batch},) and event shape ({latent_dim},), "
            f"got {tuple(q.batch_shape)} and {tuple(q.event_shape)}"
        )


def proposal_distribution(
    vae: VAE, x: torch.Tensor, proposal: Proposal, index: torch.Tensor | None
) -> Distribution:
    """The proposal ``r(z | x)``: ``"guide"`` (:math:`q(z|x)`), ``"prior"`` or a distribution.

    Returns:
        A distribution of batch shape ``(B,)`` and event shape ``(D,)``.

    Raises:
        ConfigError: an unknown name, or a distribution of other shapes.
        UserError: the guide is a point estimate (no density).
    """
    batch = x.shape[0]
    if isinstance(proposal, str) and proposal == "prior":
        r = vae.prior().expand((batch,))
    elif isinstance(proposal, str):
        if proposal != "guide":
            raise ConfigError(f"unknown proposal {proposal!r}; valid: {', '.join(PROPOSALS)}")
        if vae.posterior.is_point_estimate:
            raise UserError(
                "the guide is a point estimate (no density): importance sampling needs a "
                "proposal with a density; use the prior proposal"
            )
        r = vae.posterior(x, index)
    else:
        r = proposal
    _check_batch_distribution(r, batch, vae.latent_dim, "the proposal")
    return r
