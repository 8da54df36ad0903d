"""Guides q(z | x): the encoder's distribution over the latent code.

Shape contract: ``guide(x)`` for ``x`` of shape ``(B, *event_shape)`` returns
a distribution with ``batch_shape == (B,)`` and ``event_shape == (D,)`` whose
samples are reparameterized (``has_rsample``). ``index`` (the positions of
the minibatch in the training set) is accepted by every guide and used by the
non-amortized ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.nn import functional as F

from .errors import ConfigError
from .nets import BuildContext
from .registry import GUIDES, Describable


class Guide(Describable, nn.Module):
    """Base class of guides: ``forward(x, index=None) -> q(z | x)``.

    Shape contract: ``x`` is ``(B, *event_shape)``; the result has batch shape
    ``(B,)`` and event shape ``(D,)``. A subclass declares what it is:

    * ``is_point_estimate``: q is a point mass (no density); the model then
      masks the latent site out of the ELBO (the KL term is dropped) and
      importance sampling must use another proposal;
    * ``is_amortized``: q depends on x through a network, so it exists for
      unseen data; ``False`` for per-datum parameters, which need ``index``
      (the positions in the training set) and are trained by variational EM.
    """

    latent_dim: int
    is_point_estimate: bool = False
    is_amortized: bool = True

    def forward(
        self, x: torch.Tensor, index: torch.Tensor | None = None
    ) -> dist.TorchDistribution:  # pragma: no cover - abstract
        """The variational posterior for the minibatch ``x``."""
        raise NotImplementedError


class _AmortizedGaussian(Guide):
    """Shared parts of the amortized Gaussian guides: a trunk and the μ, log σ² heads.

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
    """

    def __init__(self, trunk: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.trunk = trunk
        self.loc = nn.Linear(trunk.out_features, self.latent_dim)
        self.log_var = nn.Linear(trunk.out_features, self.latent_dim)


@GUIDES.register("mean-field")
class MeanFieldGuide(_AmortizedGaussian):
    r"""Amortized diagonal Normal :math:`q(z|x) = \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x))`.

    A shared trunk ``h = f(x)`` feeds two linear heads, :math:`\mu(x)` and
    :math:`\log\sigma^2(x)`; z is drawn by the reparameterization
    :math:`z = \mu + \sigma \odot \varepsilon`, :math:`\varepsilon \sim \mathcal N(0, I)`
    (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
    """

    @classmethod
    def from_config(cls, ctx: BuildContext) -> MeanFieldGuide:
        """Build from a config section (no options; the trunk is ``[model.encoder]``)."""
        return cls(ctx.encoder_network(), ctx.latent_dim)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """:math:`q(z|x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        return self.diagonal_normal(self.trunk(x))

    def diagonal_normal(self, h: torch.Tensor) -> dist.TorchDistribution:
        """The diagonal Normal of the two heads at trunk features ``h`` of shape ``(B, H)``."""
        return dist.Normal(self.loc(h), torch.exp(0.5 * self.log_var(h))).to_event(1)


@GUIDES.register("low-rank", example={"rank": 2})
class LowRankGuide(_AmortizedGaussian):
    r"""Amortized low-rank-plus-diagonal Normal :math:`q(z|x) = \mathcal N(\mu(x), \Sigma(x))`.

    .. math::

        \Sigma(x) = W(x) W(x)^\top + \mathrm{diag}\,\sigma^2(x),
        \qquad W(x) \in \mathbb R^{D \times r},

    a :class:`~pyro.distributions.LowRankMultivariateNormal`: ``r`` directions of
    correlation between latent dimensions at :math:`O(D r)` parameters per datum,
    sampled as :math:`z = \mu + W \varepsilon_1 + \sigma \odot \varepsilon_2`.
    Reference: Rezende, Mohamed & Wierstra (2014), "Stochastic Backpropagation
    and Approximate Inference in Deep Generative Models" (a rank-one version).

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
        rank: ``r >= 1``, the number of columns of ``W``.
    """

    def __init__(self, trunk: nn.Module, latent_dim: int, rank: int = 2) -> None:
        if rank < 1:
            raise ConfigError(f"model.guide.rank must be >= 1, got {rank}")
        super().__init__(trunk, latent_dim)
        self.rank = int(rank)
        self.factor = nn.Linear(trunk.out_features, self.latent_dim * self.rank)

    @classmethod
    def from_config(cls, ctx: BuildContext, rank: int = 2) -> LowRankGuide:
        """Build from a config section (``rank``; the trunk is ``[model.encoder]``)."""
        return cls(ctx.encoder_network(), ctx.latent_dim, rank)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """:math:`q(z|x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        h = self.trunk(x)
        factor = self.factor(h).unflatten(-1, (self.latent_dim, self.rank))
        return dist.LowRankMultivariateNormal(self.loc(h), factor, torch.exp(self.log_var(h)))


@GUIDES.register("full-rank")
class FullRankGuide(_AmortizedGaussian):
    r"""Amortized full-covariance Normal :math:`q(z|x) = \mathcal N(\mu(x), L(x) L(x)^\top)`.

    :math:`L(x)` is lower triangular with diagonal :math:`\sigma(x) > 0` (a
    Cholesky factor): :math:`L = \mathrm{diag}\,\sigma(x) + \mathrm{tril}_{-1}(A(x))`,
    with the :math:`D(D-1)/2` strictly-lower entries :math:`A(x)` from a linear
    head; :math:`z = \mu + L \varepsilon` and
    :math:`\log\det\Sigma = 2 \sum_d \log\sigma_d`.
    Reference: Kingma & Welling (2019), "An Introduction to Variational
    Autoencoders", sec. 2.5 (full-covariance Gaussian posterior).

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
    """

    def __init__(self, trunk: nn.Module, latent_dim: int) -> None:
        super().__init__(trunk, latent_dim)
        rows, cols = torch.tril_indices(self.latent_dim, self.latent_dim, offset=-1)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.off_diagonal = nn.Linear(trunk.out_features, len(rows))

    @classmethod
    def from_config(cls, ctx: BuildContext) -> FullRankGuide:
        """Build from a config section (no options; the trunk is ``[model.encoder]``)."""
        return cls(ctx.encoder_network(), ctx.latent_dim)

    def scale_tril(self, h: torch.Tensor) -> torch.Tensor:
        """The Cholesky factor :math:`L` ``(B, D, D)`` at trunk features ``h`` ``(B, H)``."""
        lower = h.new_zeros(*h.shape[:-1], self.latent_dim, self.latent_dim)
        lower[..., self.rows, self.cols] = self.off_diagonal(h)
        return lower + torch.diag_embed(torch.exp(0.5 * self.log_var(h)))

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """:math:`q(z|x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        h = self.trunk(x)
        return dist.MultivariateNormal(self.loc(h), scale_tril=self.scale_tril(h))


class _ContextARN(ConditionalAutoRegressiveNN):
    """Pyro's conditional MADE whose inputs and context broadcast against each other.

    The same network and parameters as :class:`pyro.nn.ConditionalAutoRegressiveNN`
    (``param_dims=[1, 1]``, no skip connections), with the first masked layer
    split into its input and context columns, so that ``x`` of shape
    ``(..., 1, D)`` and a context of shape ``(K, C)`` give outputs
    ``(..., K, D)`` without materializing the context for every row.
    """

    def forward(  # type: ignore[override]
        self, x: torch.Tensor, context: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mean, logit_scale)``, each of shape ``broadcast(x, context)[:-1] + (D,)``."""
        first = self.layers[0]
        weight = first.weight * first.mask  # columns: context first, then x (as in Pyro)
        c = self.context_dim
        h = F.linear(x, weight[:, c:]) + F.linear(context, weight[:, :c], first.bias)
        for layer in self.layers[1:]:
            h = layer(self.f(h))
        mean, logit_scale = h.unflatten(-1, (2, self.input_dim)).unbind(-2)
        return mean, logit_scale


class BroadcastTransformedDistribution(dist.TransformedDistribution):
    """A :class:`~pyro.distributions.TransformedDistribution` whose ``log_prob`` broadcasts.

    Autoregressive inverses (Pyro's :meth:`AffineAutoregressive._inverse`)
    need the value at the distribution's full batch shape; a value that only
    broadcasts against it (e.g. ``(..., 1, D)`` against batch ``(K,)``, as in
    a mixture) is expanded first. A value of the full shape is passed on
    unchanged, so the transforms' cache still recognizes their own samples.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        r""":math:`\log q(z)`, shape ``broadcast(value.shape[:-1], batch_shape)``."""
        shape = torch.broadcast_shapes(value.shape, self.batch_shape + self.event_shape)
        if value.shape != shape:
            value = value.expand(shape)
        return super().log_prob(value)


@GUIDES.register("iaf", example={"flows": 2, "hidden": [8]})
class IAFGuide(MeanFieldGuide):
    r"""Mean-field Normal followed by ``flows`` inverse autoregressive flow steps, given x.

    .. math::

        z_0 \sim \mathcal N(\mu(x), \mathrm{diag}\,\sigma^2(x)), \qquad
        z_t = s_t \odot z_{t-1} + (1 - s_t) \odot m_t, \qquad
        [m_t, \mathrm{logit}\,s_t] = \mathrm{MADE}_t(z_{t-1}, h(x)),

        \log q(z_T|x) = \log q(z_0|x) - \sum_{t=1}^{T} \sum_d \log s_{t,d},

    the numerically stable IAF step of Kingma et al. (2016), "Improving
    Variational Inference with Inverse Autoregressive Flow", sec. 4 and Algorithm 1,
    via :class:`pyro.distributions.transforms.ConditionalAffineAutoregressive`
    (``stable=True``). Each MADE is conditioned on the trunk features
    :math:`h(x)`; the variable order is reversed between steps. Sampling and
    scoring q's own samples are parallel; scoring any other z inverts each step
    in ``D`` sequential passes.

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
        flows: ``T >= 1``, the number of IAF steps.
        hidden: Hidden widths of each MADE, each ``>= D``.
    """

    def __init__(
        self,
        trunk: nn.Module,
        latent_dim: int,
        flows: int = 2,
        hidden: Sequence[int] = (128,),
    ) -> None:
        super().__init__(trunk, latent_dim)
        hidden = [int(h) for h in hidden]
        if flows < 1:
            raise ConfigError(f"model.guide.flows must be >= 1, got {flows}")
        if not hidden or min(hidden) < self.latent_dim:
            raise ConfigError(
                f"model.guide.hidden: a MADE needs at least one hidden layer, each as wide as "
                f"latent_dim ({self.latent_dim}), got {hidden}"
            )
        order = torch.arange(self.latent_dim)
        self.flows = nn.ModuleList(
            ConditionalAffineAutoregressive(
                _ContextARN(
                    self.latent_dim,
                    trunk.out_features,
                    hidden,
                    permutation=order if t % 2 == 0 else order.flip(0),
                ),
                stable=True,
            )
            for t in range(int(flows))
        )

    @classmethod
    def from_config(
        cls,
        ctx: BuildContext,
        flows: int = 2,
        hidden: list[int] = (128,),  # type: ignore[assignment]
    ) -> IAFGuide:
        """Build from a config section (``flows``, ``hidden``; the trunk is ``[model.encoder]``)."""
        return cls(ctx.encoder_network(), ctx.latent_dim, flows, hidden)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """:math:`q(z|x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        h = self.trunk(x)
        transforms = [flow.condition(h) for flow in self.flows]
        return BroadcastTransformedDistribution(self.diagonal_normal(h), transforms)


@GUIDES.register("delta")
class DeltaGuide(Guide):
    r"""NOT a VAE: a point estimate :math:`q(z|x) = \delta(z - f(x))`, the plain autoencoder.

    With a point mass the KL term is undefined (:math:`\log q = +\infty` at
    the point), so it is dropped: ``is_point_estimate`` masks the latent site out
    of the ELBO and the loss is the reconstruction alone,
    :math:`-\log p(x \mid z = f(x))`, a deterministic autoencoder. The prior
    plays no part in training, nothing makes the codes of different data
    overlap or fill the prior, and the reported "KL" and "ELBO" are not a
    bound on :math:`\log p(x)`. It exists to show what a VAE degenerates into
    without its KL term (Hinton & Salakhutdinov 2006; Kingma & Welling 2014,
    sec. 2.3, on the regularizer).

    Args:
        trunk: Network ``(..., *event_shape) -> (..., H)`` with attribute ``out_features``.
        latent_dim: ``D``.
    """

    is_point_estimate = True

    def __init__(self, trunk: nn.Module, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.trunk = trunk
        self.loc = nn.Linear(trunk.out_features, self.latent_dim)

    @classmethod
    def from_config(cls, ctx: BuildContext) -> DeltaGuide:
        """Build from a config section (no options; the trunk is ``[model.encoder]``)."""
        return cls(ctx.encoder_network(), ctx.latent_dim)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """The point mass at the code :math:`f(x)`, batch shape ``(B,)``, event shape ``(D,)``."""
        return dist.Delta(self.loc(self.trunk(x))).to_event(1)


@GUIDES.register("local", example={"num_data": 16})
class LocalGuide(Guide):
    r"""Non-amortized: one diagonal Normal :math:`q_i(z)` per training datum.

    :math:`q_i(z) = \mathcal N(\mu_i, \mathrm{diag}\,\sigma_i^2)`: each training datum
    :math:`i` owns its parameters :math:`(\mu_i, \log\sigma_i)`;
    ``forward(x, index)`` returns :math:`q_i` for the positions ``index`` of the
    minibatch in the training set (``x`` is not read). This is the variational
    family of classical variational EM (Neal & Hinton 1998, "A view of the EM
    algorithm that justifies incremental, sparse, and other variants"), used by
    :mod:`pyro_vae.em`, and the non-amortized reference of Cremer, Li &
    Duvenaud (2018), "Inference suboptimality in variational autoencoders".

    Memory grows linearly with the data: :math:`2 N D` parameters (plus
    optimizer state), against a fixed-size encoder for amortized guides. The
    parameters start at the standard Normal (:math:`\mu_i = 0`,
    :math:`\sigma_i = ` ``init_scale``).

    Args:
        num_data: ``N``, the number of training data (from a config: the
            training set's size when not given).
        latent_dim: ``D``.
        init_scale: Initial :math:`\sigma_i` (> 0).
    """

    is_amortized = False

    def __init__(self, num_data: int, latent_dim: int, init_scale: float = 1.0) -> None:
        super().__init__()
        if num_data < 1:
            raise ConfigError(f"model.guide.num_data must be >= 1, got {num_data}")
        if not init_scale > 0:
            raise ConfigError(f"model.guide.init_scale must be > 0, got {init_scale}")
        self.latent_dim = int(latent_dim)
        self.num_data = int(num_data)
        log_scale = torch.tensor(float(init_scale)).log()
        self.loc = nn.Parameter(torch.zeros(self.num_data, self.latent_dim))
        self.log_scale = nn.Parameter(log_scale.expand(self.num_data, self.latent_dim).clone())

    @classmethod
    def from_config(
        cls, ctx: BuildContext, num_data: int | None = None, init_scale: float = 1.0
    ) -> LocalGuide:
        """Build from a config section (``num_data``: default the training set's size)."""
        if num_data is None:
            num_data = ctx.num_data
        if num_data is None:
            raise ConfigError(
                "model.guide.num_data: the 'local' guide needs the number of training data; "
                "set it or build the model from data"
            )
        return cls(num_data, ctx.latent_dim, init_scale)

    def forward(self, x: torch.Tensor, index: torch.Tensor | None = None) -> dist.TorchDistribution:
        """:math:`q_i(z)` for ``i`` in ``index``: batch shape ``(B,)``, event shape ``(D,)``.

        Raises:
            ConfigError: when ``index`` is missing or does not match the minibatch.
        """
        if index is None:
            raise ConfigError(
                "the 'local' guide has one q(z) per training datum and needs index (the "
                "minibatch positions in the training set); it has no q(z|x) for unseen data"
            )
        if index.shape != x.shape[:1]:
            raise ConfigError(
                f"the 'local' guide needs one index per datum: index has shape "
                f"{tuple(index.shape)}, the minibatch {x.shape[0]} data"
            )
        return dist.Normal(self.loc[index], self.log_scale[index].exp()).to_event(1)
