"""Exact answers that the estimators of :mod:`pyro_vae.evaluate` are checked against.

* The **linear-Gaussian VAE** (probabilistic PCA, Tipping & Bishop 1999):

  .. math::

      z \\sim \\mathcal N(0, I_D), \\qquad
      x \\mid z \\sim \\mathcal N(Wz + b, \\sigma^2 I_d).

  Everything is Gaussian, so :math:`\\log p(x)`, the posterior
  :math:`p(z|x)`, the ELBO of any Gaussian :math:`q` and
  :math:`\\mathrm{KL}(q \\| p(z|x))` have closed forms
  (:class:`LinearGaussian`). A :class:`~pyro_vae.model.VAE` with the
  ``standard-normal`` prior, a decoder that is one ``nn.Linear``
  (``[model.decoder] name = "mlp", hidden = []``) and the fixed-scale
  ``normal`` likelihood *is* this model; :func:`linear_gaussian` recognizes
  it and returns its closed forms.
* **Quadrature** for any decoder with a 2-D latent:
  :func:`log_likelihood_quadrature` integrates :math:`p(x|z)\\,p(z)` on a
  fine grid.
* The ``ppca`` dataset: fixed-seed data drawn from a linear-Gaussian model,
  so a linear VAE trained on it can be checked against exact numbers
  (``pyro-vae train --dataset ppca --likelihood normal --latent-dim 2
  --set model.decoder.hidden=[]``).

References:
    Tipping & Bishop (1999), "Probabilistic principal component analysis".
    Lucas, Tucker, Grosse & Norouzi (2019), "Don't blame the ELBO! A linear
    VAE perspective on posterior collapse".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyro.distributions as dist
import torch
from torch.distributions import Distribution

from .data import Dataset
from .errors import ConfigError
from .model import VAE
from .registry import DATASETS

#: Datum size ``d``, latent size, noise scale and split sizes of the ``ppca`` dataset.
PPCA_DIM = 10
PPCA_LATENT_DIM = 2
PPCA_NOISE = 1.0
PPCA_SIZES = {"train": 2000, "test": 500}
PPCA_SEED = 0


def _gaussian_moments(q: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(..., D)`` and covariance ``(..., D, D)`` of a Gaussian ``q``.

    Accepts a multivariate Normal or a diagonal Normal (``Independent`` of a
    univariate ``Normal`` with one reinterpreted dimension).
    """
    if isinstance(q, torch.distributions.MultivariateNormal):
        return q.mean, q.covariance_matrix
    if (
        isinstance(q, torch.distributions.Independent)
        and isinstance(q.base_dist, torch.distributions.Normal)
        and q.reinterpreted_batch_ndims == 1
    ):
        return q.base_dist.loc, torch.diag_embed(q.base_dist.scale**2)
    raise ConfigError(
        f"expected a Gaussian q (MultivariateNormal or diagonal Normal), got {type(q).__name__}"
    )


@dataclass(frozen=True)
class LinearGaussian:
    """The linear-Gaussian latent variable model and its closed forms.

    .. math::

        z \\sim \\mathcal N(0, I_D), \\quad x \\mid z \\sim \\mathcal N(Wz + b, \\sigma^2 I_d),
        \\quad x \\sim \\mathcal N(b, WW^\\top + \\sigma^2 I_d),

        p(z \\mid x) = \\mathcal N\\big(\\Sigma W^\\top (x - b) / \\sigma^2,\\ \\Sigma\\big),
        \\quad \\Sigma = (I_D + W^\\top W / \\sigma^2)^{-1}.

    Data are flattened to ``(B, d)``. Computations run in float64.

    Args:
        weight: :math:`W`, shape ``(d, D)``.
        bias: :math:`b`, shape ``(d,)``.
        noise_scale: :math:`\\sigma > 0`.

    Reference:
        Tipping & Bishop (1999), "Probabilistic principal component analysis".
    """

    weight: torch.Tensor
    bias: torch.Tensor
    noise_scale: float

    @property
    def data_dim(self) -> int:
        """``d``."""
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        """``D``."""
        return self.weight.shape[1]

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).to(self.weight)

    def marginal(self) -> dist.MultivariateNormal:
        """:math:`p(x) = \\mathcal N(b, WW^\\top + \\sigma^2 I)`, event shape ``(d,)``."""
        eye = torch.eye(self.data_dim, dtype=self.weight.dtype, device=self.weight.device)
        cov = self.weight @ self.weight.T + self.noise_scale**2 * eye
        return dist.MultivariateNormal(self.bias, covariance_matrix=cov)

    def log_likelihood(self, x: torch.Tensor) -> torch.Tensor:
        """Exact :math:`\\log p(x)` per datum, shape ``(B,)``, for ``x`` of shape ``(B, ...)``."""
        return self.marginal().log_prob(self._flat(x))

    def posterior(self, x: torch.Tensor) -> dist.MultivariateNormal:
        """Exact :math:`p(z|x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        precision = eye + self.weight.T @ self.weight / self.noise_scale**2
        cov = torch.linalg.inv(precision)
        cov = 0.5 * (cov + cov.T)
        mean = (self._flat(x) - self.bias) @ self.weight @ cov / self.noise_scale**2
        return dist.MultivariateNormal(mean, covariance_matrix=cov.expand(len(mean), -1, -1))

    def elbo(self, x: torch.Tensor, q: Distribution) -> torch.Tensor:
        """Exact ELBO of a Gaussian :math:`q(z) = \\mathcal N(m, S)` per datum, shape ``(B,)``.

        .. math::

            \\mathrm{ELBO}(q) = -\\tfrac d2 \\log(2\\pi\\sigma^2)
              - \\frac{\\lVert x - Wm - b\\rVert^2 + \\mathrm{tr}(W S W^\\top)}{2\\sigma^2}
              - \\tfrac12\\big(\\mathrm{tr}\\,S + m^\\top m - D - \\log\\det S\\big).

        Args:
            x: Data ``(B, ...)``.
            q: A Gaussian with batch shape ``(B,)`` and event shape ``(D,)``
                (diagonal ``Normal(...).to_event(1)`` or ``MultivariateNormal``).
        """
        mean, cov = _gaussian_moments(q)
        mean, cov = mean.to(self.weight), cov.to(self.weight)
        var = self.noise_scale**2
        resid = self._flat(x) - mean @ self.weight.T - self.bias
        trace_wsw = torch.einsum("ij,bjk,ik->b", self.weight, cov, self.weight)
        expected_log_lik = -0.5 * self.data_dim * math.log(2 * math.pi * var) - (
            resid.pow(2).sum(-1) + trace_wsw
        ) / (2 * var)
        kl = 0.5 * (
            torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)
            + mean.pow(2).sum(-1)
            - self.latent_dim
            - torch.logdet(cov)
        )
        return expected_log_lik - kl

    def kl_to_posterior(self, x: torch.Tensor, q: Distribution) -> torch.Tensor:
        """:math:`\\mathrm{KL}(q \\| p(z|x))` per datum, shape ``(B,)``, computed directly.

        Equals ``log_likelihood(x) - elbo(x, q)``; tests check the identity.
        """
        mean, cov = _gaussian_moments(q)
        mean, cov = mean.to(self.weight), cov.to(self.weight)
        q_full = dist.MultivariateNormal(mean, covariance_matrix=cov)
        return torch.distributions.kl_divergence(q_full, self.posterior(x))

    def optimal_diagonal(self, x: torch.Tensor) -> dist.Independent:
        """The diagonal Normal :math:`q^*` of highest ELBO, batch ``(B,)``, event ``(D,)``.

        Maximizing the ELBO over diagonal Gaussians (the mean-field fixed point
        for a Gaussian posterior) gives the posterior mean and variances
        :math:`1/\\Lambda_{jj}`, :math:`\\Lambda = I + W^\\top W/\\sigma^2` the
        posterior precision (Bishop 2006, "Pattern Recognition and Machine
        Learning", Sec. 10.1.2).
        """
        eye = torch.eye(self.latent_dim, dtype=self.weight.dtype, device=self.weight.device)
        precision = eye + self.weight.T @ self.weight / self.noise_scale**2
        mean = self.posterior(x).mean
        scale = torch.diagonal(precision).rsqrt().expand_as(mean)
        return dist.Normal(mean, scale).to_event(1)


def linear_gaussian(vae: VAE) -> LinearGaussian | None:
    """The closed forms of ``vae`` when it is a linear-Gaussian model, else ``None``.

    The components declare it: a prior with ``is_standard_normal`` and a
    likelihood whose :meth:`~pyro_vae.likelihoods.Likelihood.linear_gaussian`
    gives its linear map and fixed scale (``normal`` on an ``mlp`` with
    ``hidden = []``). The returned parameters are float64 copies (no gradient).
    """
    if not vae.prior.is_standard_normal:
        return None
    declared = vae.likelihood.linear_gaussian()
    if declared is None:
        return None
    linear, noise_scale = declared
    with torch.no_grad():
        weight = linear.weight.detach().double().clone()
        bias = (
            linear.bias.detach().double().clone()
            if linear.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device)
        )
        scale = float(noise_scale)
    return LinearGaussian(weight, bias, scale)


@torch.no_grad()
def log_likelihood_quadrature(
    vae: VAE,
    x: torch.Tensor,
    *,
    num_points: int = 401,
    bound: float = 7.0,
    max_elements: int = 1 << 22,
) -> torch.Tensor:
    """:math:`\\log p(x)` per datum by quadrature over a 2-D latent, shape ``(B,)``.

    .. math::

        \\log p(x) \\approx \\log \\sum_{g} h^2\\, p(x \\mid z_g)\\, p(z_g),

    the midpoint rule on a ``num_points`` x ``num_points`` grid over
    :math:`[-\\mathrm{bound}, \\mathrm{bound}]^2`. For smooth integrands that
    decay like a Gaussian the rule converges exponentially fast in the grid
    spacing :math:`h` (Trefethen & Weideman 2014, "The exponentially
    convergent trapezoidal rule"), provided :math:`h` is small against the
    width of the posterior and the box holds its mass.

    Args:
        vae: A VAE with a 2-D latent.
        x: Data ``(B, *event_shape)``.
        num_points: Grid points per axis.
        bound: Half-width of the box.
        max_elements: Bound on ``grid points x B x datum size`` per chunk (memory).

    Raises:
        ConfigError: when the latent is not 2-D.
    """
    if vae.latent_dim != 2:
        raise ConfigError(f"quadrature needs a 2-D latent, this model has {vae.latent_dim}")
    device = x.device
    h = 2 * bound / num_points
    axis = -bound + h * (torch.arange(num_points, device=device, dtype=x.dtype) + 0.5)
    grid = torch.cartesian_prod(axis, axis)  # (G, 2)
    prior = vae.prior()
    per_point = len(x) * max(1, math.prod(vae.event_shape))
    chunk = max(1, max_elements // per_point)
    parts = []
    for start in range(0, len(grid), chunk):
        z = grid[start : start + chunk]  # (g, 2)
        log_joint = vae.likelihood(z.unsqueeze(1)).log_prob(x) + prior.log_prob(z).unsqueeze(1)
        parts.append(torch.logsumexp(log_joint, dim=0))  # (B,)
    return torch.logsumexp(torch.stack(parts), dim=0) + 2 * math.log(h)


@DATASETS.register("ppca")
def load_ppca(data_dir: Path, download: bool) -> Dataset:
    """Synthetic linear-Gaussian data: 2000 train / 500 test points in 10-D.

    .. math::

        x = W z + b + \\sigma \\varepsilon, \\quad z \\sim \\mathcal N(0, I_2),\\
        \\varepsilon \\sim \\mathcal N(0, I_{10}), \\quad \\sigma = 1,

    with :math:`W` (entries :math:`\\mathcal N(0, 2^2)`), :math:`b` and the data
    drawn from a fixed seed (NumPy ``RandomState(0)``): the same numbers on
    every machine. Nothing is read or downloaded.
    """
    rng = np.random.RandomState(PPCA_SEED)
    weight = 2.0 * rng.randn(PPCA_DIM, PPCA_LATENT_DIM)
    bias = rng.randn(PPCA_DIM)
    splits = {}
    for split, n in PPCA_SIZES.items():
        z = rng.randn(n, PPCA_LATENT_DIM)
        x = z @ weight.T + bias + PPCA_NOISE * rng.randn(n, PPCA_DIM)
        splits[split] = torch.as_tensor(x, dtype=torch.float32)
    return Dataset("ppca", splits)
