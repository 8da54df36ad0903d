"""Likelihoods p(x | z): the decoder's distribution over one datum.

Shape contract: ``likelihood(z)`` for ``z`` of shape ``(..., D)`` returns a
distribution with ``batch_shape == z.shape[:-1]`` and
``event_shape == event_shape`` (the shape of one datum). The class attribute
``support`` states which data values the likelihood accepts; data outside it
are rejected before training, never silenced.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints

from .errors import ConfigError
from .nets import BuildContext
from .registry import LIKELIHOODS


class Likelihood(nn.Module):
    """Base class: a decoder network plus a distribution head.

    Args:
        network: ``(..., D) -> (..., params_per_element * prod(event_shape))``.
        event_shape: Shape of one datum.
    """

    support: constraints.Constraint = constraints.real
    params_per_element: int = 1

    def __init__(self, network: nn.Module, event_shape: Sequence[int]) -> None:
        super().__init__()
        self.network = network
        self.event_shape = tuple(int(s) for s in event_shape)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Decoder output reshaped to ``z.shape[:-1] + (params_per_element?,) + event_shape``."""
        out = self.network(z)
        if self.params_per_element == 1:
            return out.reshape(*z.shape[:-1], *self.event_shape)
        return out.reshape(*z.shape[:-1], self.params_per_element, *self.event_shape)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:  # pragma: no cover - abstract
        """The distribution :math:`p(x|z)`."""
        raise NotImplementedError


@LIKELIHOODS.register("bernoulli")
class BernoulliLikelihood(Likelihood):
    r"""Independent Bernoulli pixels, :math:`p(x|z) = \prod_i \mathrm{Bern}(x_i; \sigma(f_i(z)))`.

    The decoder outputs logits; :math:`\log p(x|z)` is minus the binary
    cross-entropy with logits. For binary data only (support {0, 1}).

    Args:
        network: Decoder ``(..., D) -> (..., prod(event_shape))`` of logits.
        event_shape: Shape of one datum.
    """

    support = constraints.boolean

    @classmethod
    def from_config(cls, ctx: BuildContext) -> BernoulliLikelihood:
        """Build from a config section (no options; the network is ``[model.decoder]``)."""
        return cls(ctx.decoder_network(math.prod(ctx.event_shape)), ctx.event_shape)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        """:math:`p(x|z)`, batch shape ``z.shape[:-1]``, event shape ``event_shape``."""
        logits = self.decode(z)
        return dist.Bernoulli(logits=logits).to_event(len(self.event_shape))


@LIKELIHOODS.register("normal")
class NormalLikelihood(Likelihood):
    r"""Independent Normal pixels with a fixed scale, :math:`\mathcal N(x_i; f_i(z), \sigma^2)`.

    :math:`-\log p(x|z) = \lVert x - f(z)\rVert^2 / (2\sigma^2) + n \log(\sigma\sqrt{2\pi})`,
    the squared error weighted by :math:`1/(2\sigma^2)`: σ is the constant that
    balances reconstruction against the KL term.

    Args:
        network: Decoder ``(..., D) -> (..., prod(event_shape))`` of means.
        event_shape: Shape of one datum.
        scale: The fixed standard deviation σ > 0.
    """

    support = constraints.real

    def __init__(self, network: nn.Module, event_shape: Sequence[int], scale: float = 1.0) -> None:
        super().__init__(network, event_shape)
        if not scale > 0:
            raise ConfigError(f"model.likelihood.scale must be > 0, got {scale}")
        self.register_buffer("scale", torch.tensor(float(scale)))

    @classmethod
    def from_config(cls, ctx: BuildContext, scale: float = 1.0) -> NormalLikelihood:
        """Build from a config section (``scale``)."""
        return cls(ctx.decoder_network(math.prod(ctx.event_shape)), ctx.event_shape, scale)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        """:math:`p(x|z)`, batch shape ``z.shape[:-1]``, event shape ``event_shape``."""
        loc = self.decode(z)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(len(self.event_shape))
