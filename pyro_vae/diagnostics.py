"""Diagnostics computed from a model and data: posterior means, active units, KL per dimension.

Computation only; :mod:`pyro_vae.plots` and :mod:`pyro_vae.report` draw and
explain what these return.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .errors import DataError
from .model import VAE, kl_per_dim

#: Burda et al. (2016): dimension d is active when Cov_x(E_q[z_d]) exceeds this.
ACTIVE_UNIT_THRESHOLD = 0.01


@contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Draw from a fixed seed without touching the caller's CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def require_amortized(vae: VAE) -> None:
    """Raise a one-line :class:`DataError` unless the guide has a q(z|x) for new data."""
    if not vae.posterior.is_amortized:
        raise DataError(
            "the guide is not amortized (it has parameters per training datum), so it has "
            "no posterior for new data; latent figures need an amortized guide"
        )


@torch.no_grad()
def posterior_mean(
    vae: VAE, x: torch.Tensor, batch_size: int = 1024, num_samples: int = 64, seed: int = 0
) -> torch.Tensor:
    """The posterior means :math:`\\mathbb E_{q(z|x_n)}[z]`, shape ``(N, D)``.

    Closed form where the guide's distribution has a ``mean``; otherwise
    (e.g. a flow) the average of ``num_samples`` draws.

    Raises:
        DataError: the guide is not amortized (no posterior for new data).
    """
    require_amortized(vae)
    with seeded(seed):
        return torch.cat(
            [
                vae.encode(x[start : start + batch_size], draws=num_samples)
                for start in range(0, len(x), batch_size)
            ]
        )


@dataclass
class ActiveUnits:
    """Activity of each latent dimension (Burda et al. 2016, "Importance Weighted Autoencoders").

    .. math::

        A_d = \\mathrm{Cov}_x\\big(\\mathbb E_{q(z|x)}[z_d]\\big),
        \\qquad d \\text{ is active} \\iff A_d > \\text{threshold}.

    Args:
        activity: :math:`A_d`, shape ``(D,)``.
        threshold: The activity threshold (0.01 in Burda et al.).
    """

    activity: torch.Tensor
    threshold: float = ACTIVE_UNIT_THRESHOLD

    @property
    def active(self) -> torch.Tensor:
        """Boolean mask ``(D,)`` of the active dimensions."""
        return self.activity > self.threshold

    @property
    def count(self) -> int:
        """How many dimensions are active."""
        return int(self.active.sum())


def active_units(
    vae: VAE, x: torch.Tensor, threshold: float = ACTIVE_UNIT_THRESHOLD
) -> ActiveUnits:
    """The activity of every latent dimension on data ``x`` ``(N, *event_shape)``.

    :math:`A_d` is the variance over the data of the posterior mean of
    :math:`z_d` (the unbiased sample variance, N - 1 in the denominator). A
    dimension the decoder ignores has a posterior equal to the prior whatever
    x is, so its mean does not vary: :math:`A_d \\approx 0`.

    Reference: Burda, Grosse & Salakhutdinov (2016), "Importance Weighted
    Autoencoders", section 5.2.
    """
    if len(x) < 2:
        raise DataError("active units need at least 2 data")
    return ActiveUnits(posterior_mean(vae, x).var(dim=0), threshold)


@torch.no_grad()
def mean_kl_per_dim(vae: VAE, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Mean closed-form KL of each latent dimension over new data ``x``, ``(D,)``, no sampling.

    Raises:
        DataError: the guide is not amortized, or the KL does not factorize over dimensions.
    """
    require_amortized(vae)
    total = None
    for start in range(0, len(x), batch_size):
        dims = kl_per_dim(vae.posterior(x[start : start + batch_size]), vae.prior())
        if dims is None:
            raise DataError(
                "the KL has no per-dimension closed form for this guide and prior "
                "(both must factorize over latent dimensions)"
            )
        total = dims.sum(0) if total is None else total + dims.sum(0)
    assert total is not None
    return total / len(x)
