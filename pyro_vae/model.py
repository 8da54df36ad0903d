"""The VAE as a Pyro program, assembled from injected components.

.. math::

    z \\sim p(z), \\qquad x \\mid z \\sim p_\\theta(x \\mid z), \\qquad
    q_\\phi(z \\mid x) \\approx p_\\theta(z \\mid x),

    \\mathrm{ELBO}(x) = \\mathbb E_{q_\\phi(z|x)}[\\log p_\\theta(x|z)]
        - \\mathrm{KL}(q_\\phi(z|x) \\,\\|\\, p(z)) \\le \\log p_\\theta(x).

Reference: Kingma & Welling (2014), "Auto-Encoding Variational Bayes".
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn
from torch.distributions import kl_divergence

from .guides import Guide
from .likelihoods import Likelihood
from .priors import Prior

#: Name of the latent sample site in :meth:`VAE.model` and :meth:`VAE.guide`.
LATENT_SITE = "z"
#: Name of the observed sample site in :meth:`VAE.model`.
OBSERVED_SITE = "x"
#: Name of the plate over data points.
DATA_PLATE = "data"


class VAE(nn.Module):
    """A variational autoencoder ``VAE(prior, guide, likelihood)``.

    The three components are ``nn.Module`` s that return distributions:

    * ``vae.prior()`` -> :math:`p(z)`, event shape ``(D,)``;
    * ``vae.posterior(x)`` -> :math:`q(z|x)`, batch ``(B,)``, event ``(D,)``
      (the injected guide module);
    * ``vae.likelihood(z)`` -> :math:`p(x|z)`, batch ``z.shape[:-1]``, event
      = one datum's shape.

    ``vae.model`` and ``vae.guide`` are the Pyro programs built from them.
    The latent site is weighted by ``kl_scale`` (β) times the guide's
    ``kl_weight`` (0 for a point-estimate guide: the KL term is dropped).
    Parameters live in this module only (no ``pyro.param`` / global param
    store), so two VAEs in one process never share parameters; optimize
    ``vae.parameters()`` with any ``torch.optim`` optimizer and a Pyro ELBO's
    ``differentiable_loss``.

    Args:
        prior: The prior module.
        guide: The encoder module, stored as ``self.posterior``.
        likelihood: The decoder module.
    """

    def __init__(self, prior: Prior, guide: Guide, likelihood: Likelihood) -> None:
        super().__init__()
        self.prior = prior
        self.posterior = guide
        self.likelihood = likelihood
        #: Weight β of the latent site's log densities, i.e. of the KL term
        #: (set by the trainer for KL warm-up; 1 is the ELBO).
        self.kl_scale = 1.0

    def _latent_weight(self) -> AbstractContextManager[None]:
        """Scale the latent site by β times the guide's ``kl_weight`` (mask it out at 0)."""
        weight = self.kl_scale * self.posterior.kl_weight
        if weight == 1.0:
            return nullcontext()
        if weight == 0.0:
            return poutine.mask(mask=False)
        return poutine.scale(scale=weight)

    @property
    def latent_dim(self) -> int:
        """``D``, the size of z."""
        return self.prior.latent_dim

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one datum."""
        return self.likelihood.event_shape

    def _plate(
        self, x: torch.Tensor, index: torch.Tensor | None, data_size: int | None
    ) -> pyro.plate:
        batch = x.shape[0]
        if data_size is None:
            return pyro.plate(DATA_PLATE, batch, dim=-1)
        if index is None:
            index = torch.arange(batch, device=x.device)
        return pyro.plate(DATA_PLATE, data_size, subsample=index, dim=-1)

    def model(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        data_size: int | None = None,
    ) -> torch.Tensor:
        """The generative model :math:`p(z)\\,p(x|z)` with ``x`` observed.

        Args:
            x: A minibatch ``(B, *event_shape)``.
            index: Positions of the minibatch in the training set ``(B,)``.
            data_size: ``N``; when given, the data plate is subsampled and log
                densities are scaled by ``N / B`` (an unbiased full-data ELBO).

        Returns:
            The latent sample z, ``(B, D)`` (more dims with vectorized particles).
        """
        with self._plate(x, index, data_size):
            with self._latent_weight():
                z = pyro.sample(LATENT_SITE, self.prior())
            pyro.sample(OBSERVED_SITE, self.likelihood(z), obs=x)
        return z

    def guide(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        data_size: int | None = None,
    ) -> torch.Tensor:
        """The amortized guide: ``z ~ q(z|x)``, reparameterized. Same arguments as :meth:`model`."""
        with self._plate(x, index, data_size), self._latent_weight():
            return pyro.sample(LATENT_SITE, self.posterior(x, index))

    def elbo_terms(
        self, x: torch.Tensor, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-datum ELBO parts from one reparameterized draw :math:`z \\sim q(z|x)`.

        .. math::

            \\mathrm{rec}(x) = \\log p(x|z), \\qquad
            \\mathrm{kl}(x) = \\mathrm{KL}(q(z|x) \\| p(z)),

        the KL analytic where registered for the pair of distributions, else
        the one-sample estimate :math:`\\log q(z|x) - \\log p(z)`.
        ``ELBO = rec - kl``, each of shape ``(B,)``, in nats.
        """
        q = self.posterior(x, index)
        p = self.prior()
        z = q.rsample()
        reconstruction = self.likelihood(z).log_prob(x)
        kl = analytic_kl(q, p)
        if kl is None:
            kl = q.log_prob(z) - p.log_prob(z)
        return reconstruction, kl


def analytic_kl(q: dist.Distribution, p: dist.Distribution) -> torch.Tensor | None:
    """:math:`\\mathrm{KL}(q\\|p)` in closed form, shape ``q.batch_shape``, or ``None``.

    ``p`` is broadcast to ``q``'s batch shape. For diagonal Normals,
    :math:`\\mathrm{KL} = \\tfrac12 \\sum_d (\\mu_d^2 + \\sigma_d^2 - \\log\\sigma_d^2 - 1)`
    against :math:`\\mathcal N(0, I)`.
    """
    try:
        return kl_divergence(q, p.expand(q.batch_shape))
    except NotImplementedError:
        return None


def kl_per_dim(q: dist.Distribution, p: dist.Distribution) -> torch.Tensor | None:
    """Closed-form KL per latent dimension, shape ``q.batch_shape + (D,)``, or ``None``.

    Defined when both ``q`` and ``p`` factorize over dimensions (``Independent``
    of a univariate family with a registered KL, e.g. diagonal Normals).
    """
    if not (isinstance(q, dist.Independent) and isinstance(p, dist.Independent)):
        return None
    try:
        return kl_divergence(q.base_dist, p.base_dist.expand(q.base_dist.batch_shape))
    except (NotImplementedError, RuntimeError):
        return None
