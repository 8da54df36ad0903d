"""Priors p(z).

Shape contract: ``prior()`` returns a distribution with ``batch_shape == ()``
and ``event_shape == (D,)``; the model's data plate broadcasts it over the
minibatch.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import nn

from .registry import PRIORS


class Prior(nn.Module):
    """Base class of priors: ``forward() -> p(z)`` with event shape ``(D,)``."""

    latent_dim: int

    def forward(self) -> dist.TorchDistribution:  # pragma: no cover - abstract
        """The prior distribution p(z)."""
        raise NotImplementedError


@PRIORS.register("standard-normal")
class StandardNormalPrior(Prior):
    r"""The standard Normal prior :math:`p(z) = \mathcal N(z; 0, I_D)`.

    Args:
        latent_dim: ``D``.

    Example:
        >>> StandardNormalPrior(2)().event_shape
        torch.Size([2])
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    @classmethod
    def from_config(cls, latent_dim: int) -> StandardNormalPrior:
        """Build from a config section (no options)."""
        return cls(latent_dim)

    def forward(self) -> dist.TorchDistribution:
        """:math:`\\mathcal N(0, I_D)` as an ``Independent`` Normal, event shape ``(D,)``."""
        return dist.Normal(self.loc, self.scale).to_event(1)
