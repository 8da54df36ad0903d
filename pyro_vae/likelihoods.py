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
import torch.nn.functional as F
from torch import nn
from torch.distributions import constraints

from .errors import ConfigError
from .nets import BuildContext
from .registry import LIKELIHOODS, Describable


class IndependentBernoulli(dist.Independent):
    r"""``Bernoulli(logits).to_event(n)`` with a fused log density.

    :math:`\log p(x) = -\sum_i \mathrm{BCE}(\ell_i, x_i)`, the cross-entropy with
    logits summed over the ``n`` event dimensions *before* the sign flip, so the
    full-size tensor is not negated in the forward and backward passes (the
    hot path of training on images). Otherwise it is Pyro's ``Independent``.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log p(x)`, shape ``batch_shape`` (broadcast with ``value``'s)."""
        if self._validate_args:
            self.base_dist._validate_sample(value)
        logits, value = torch.broadcast_tensors(self.base_dist.logits, value)
        bce = F.binary_cross_entropy_with_logits(logits, value, reduction="none")
        n = self.reinterpreted_batch_ndims
        return -bce.sum(dim=tuple(range(-n, 0))) if n else -bce


class Likelihood(Describable, nn.Module):
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

    def linear_gaussian(self) -> tuple[nn.Linear, torch.Tensor] | None:
        r"""``(linear, σ)`` when :math:`p(x|z) = \mathcal N(Wz + b, \sigma^2 I)` exactly, else None.

        The capability that the closed forms of :mod:`pyro_vae.exact` need
        (with a standard Normal prior: probabilistic PCA). Only a fixed-scale
        Normal head on a decoder that is one linear map declares it.
        """
        return None


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
        return IndependentBernoulli(dist.Bernoulli(logits=logits), len(self.event_shape))


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

    def linear_gaussian(self) -> tuple[nn.Linear, torch.Tensor] | None:
        """``(linear, σ)`` when the decoder is one linear map (``mlp`` with ``hidden = []``)."""
        if isinstance(self.network, nn.Linear):
            return self.network, self.scale
        as_linear = getattr(self.network, "as_linear", None)
        linear = as_linear() if as_linear is not None else None
        return None if linear is None else (linear, self.scale)


@LIKELIHOODS.register("normal-learned", example={"per_pixel": True})
class LearnedNormalLikelihood(Likelihood):
    r"""Independent Normal pixels with a learned scale, :math:`\mathcal N(x_i; f_i(z), \sigma_i^2)`.

    σ is a parameter, not a decoder output: one σ for all pixels
    (``per_pixel=False``) or one per pixel (``per_pixel=True``), fitted by the
    ELBO together with the networks. It is parameterized as
    :math:`\sigma = \sigma_{\min} + e^{\rho}` (so that optimizer steps change σ
    by a factor, whatever its size); the floor
    :math:`\sigma_{\min}` keeps the density bounded on pixels that never
    change (e.g. MNIST's black border, where the maximum-likelihood σ is 0 and
    :math:`\log p(x|z) \to \infty`).

    For a fixed decoder mean the optimal global σ is the root mean squared
    residual, :math:`\hat\sigma^2 = \lVert x - f(z)\rVert^2 / n`, and the per-pixel
    one the root mean squared residual of each pixel over the data.

    Args:
        network: Decoder ``(..., D) -> (..., prod(event_shape))`` of means.
        event_shape: Shape of one datum.
        per_pixel: Learn one σ per pixel instead of one shared σ.
        init_scale: The initial σ (> ``min_scale``).
        min_scale: The floor :math:`\sigma_{\min} \ge 0`.
    """

    support = constraints.real

    def __init__(
        self,
        network: nn.Module,
        event_shape: Sequence[int],
        per_pixel: bool = False,
        init_scale: float = 1.0,
        min_scale: float = 1e-3,
    ) -> None:
        super().__init__(network, event_shape)
        if not min_scale >= 0:
            raise ConfigError(f"model.likelihood.min_scale must be >= 0, got {min_scale}")
        if not init_scale > min_scale:
            raise ConfigError(
                f"model.likelihood.init_scale must be > min_scale = {min_scale}, got {init_scale}"
            )
        shape = self.event_shape if per_pixel else ()
        rho = math.log(float(init_scale) - float(min_scale))
        self.log_scale_excess = nn.Parameter(torch.full(shape, rho))
        self.register_buffer("min_scale", torch.tensor(float(min_scale)))

    @classmethod
    def from_config(
        cls,
        ctx: BuildContext,
        per_pixel: bool = False,
        init_scale: float = 1.0,
        min_scale: float = 1e-3,
    ) -> LearnedNormalLikelihood:
        """Build from a config section (``per_pixel``, ``init_scale``, ``min_scale``)."""
        network = ctx.decoder_network(math.prod(ctx.event_shape))
        return cls(network, ctx.event_shape, per_pixel, init_scale, min_scale)

    @property
    def scale(self) -> torch.Tensor:
        """The current σ: shape ``()`` (global) or ``event_shape`` (per pixel)."""
        return self.min_scale + torch.exp(self.log_scale_excess)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        """:math:`p(x|z)`, batch shape ``z.shape[:-1]``, event shape ``event_shape``."""
        loc = self.decode(z)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(len(self.event_shape))


def continuous_bernoulli_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    r""":math:`\log C` of the continuous Bernoulli from its logits, stable in float32.

    .. math::

        C(\lambda) = \frac{2\,\mathrm{artanh}(1 - 2\lambda)}{1 - 2\lambda}
        = \frac{l}{\tanh(l/2)}, \qquad \lambda = \sigma(l), \qquad C(0) = 2,

    computed as :math:`\log|l| - \log|\tanh(l/2)|`, and for :math:`|l| < 0.1` by its
    series :math:`\log 2 + u/3 - 7u^2/90` with :math:`u = (l/2)^2` (error below
    :math:`10^{-9}`). Unlike torch's ``ContinuousBernoulli``, which clamps
    :math:`\lambda` to :math:`[\epsilon, 1 - \epsilon]` inside the normalizer but
    not in the cross-entropy (a density of total mass 0.80 at :math:`l = \pm 20` in
    float32), this is exact for every finite logit and has the gradient
    :math:`1/l - 1/\sinh(l)`.

    Args:
        logits: :math:`l`, any shape.

    Returns:
        :math:`\log C`, the shape of ``logits``.
    """
    small = logits.abs() < 0.1
    safe = torch.where(small, torch.ones_like(logits), logits)
    exact = torch.log(safe.abs()) - torch.log(torch.tanh(safe / 2).abs())
    u = (logits / 2) ** 2
    series = math.log(2.0) + u / 3 - 7 * u * u / 90
    return torch.where(small, series, exact)


class StableContinuousBernoulli(dist.ContinuousBernoulli):
    """Pyro's ``ContinuousBernoulli`` with :func:`continuous_bernoulli_log_normalizer`."""

    def _cont_bern_log_norm(self) -> torch.Tensor:
        return continuous_bernoulli_log_normalizer(self.logits)


@LIKELIHOODS.register("continuous-bernoulli")
class ContinuousBernoulliLikelihood(Likelihood):
    r"""Continuous Bernoulli pixels for data in [0, 1] (Loaiza-Ganem & Cunningham 2019).

    .. math::

        p(x_i|z) = C(\lambda_i)\, \lambda_i^{x_i} (1-\lambda_i)^{1-x_i},
        \qquad C(\lambda) = \frac{2\,\mathrm{artanh}(1 - 2\lambda)}{1 - 2\lambda}
        \quad (C(\tfrac12) = 2),

    with :math:`\lambda_i = \sigma(f_i(z))` from the decoder's logits: the
    Bernoulli cross-entropy plus the normalizing constant :math:`\log C(\lambda)`
    that makes it a density on [0, 1], so grayscale pixels are modelled
    without binarizing and without turning validation off. The constant is
    computed from the logits (:func:`continuous_bernoulli_log_normalizer`), so
    the density integrates to 1 in float32 for any logit.

    References:
        Loaiza-Ganem & Cunningham (2019), "The continuous Bernoulli: fixing a
        pervasive error in variational autoencoders", NeurIPS.

    Args:
        network: Decoder ``(..., D) -> (..., prod(event_shape))`` of logits.
        event_shape: Shape of one datum.
    """

    support = constraints.unit_interval

    @classmethod
    def from_config(cls, ctx: BuildContext) -> ContinuousBernoulliLikelihood:
        """Build from a config section (no options; the network is ``[model.decoder]``)."""
        return cls(ctx.decoder_network(math.prod(ctx.event_shape)), ctx.event_shape)

    def forward(self, z: torch.Tensor) -> dist.TorchDistribution:
        """:math:`p(x|z)`, batch shape ``z.shape[:-1]``, event shape ``event_shape``."""
        logits = self.decode(z)
        return StableContinuousBernoulli(logits=logits).to_event(len(self.event_shape))
