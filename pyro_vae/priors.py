"""Priors p(z).

Shape contract: ``prior()`` returns a distribution with ``batch_shape == ()``
and ``event_shape == (D,)``; the model's data plate broadcasts it over the
minibatch. Every prior has a density (``log_prob``) for any real z of shape
``(..., D)``; only the standard and learned Normals have a closed-form KL
against a diagonal-Normal guide, so the others are trained with a Monte Carlo
KL term.

:class:`pyro_vae.model.VAE` calls :meth:`Prior.bind` with its guide
once both are built; the VampPrior uses it (its components are the guide's
posteriors at learned pseudo-inputs), the other priors ignore it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineAutoregressive, SplineAutoregressive
from pyro.nn import AutoRegressiveNN
from torch import nn

from .errors import ConfigError
from .guides import Guide
from .registry import GUIDES, PRIORS, Describable


class Prior(Describable, nn.Module):
    r"""Base class of priors: ``forward() -> p(z)`` with batch shape ``()``, event shape ``(D,)``.

    A subclass declares ``is_standard_normal`` when p(z) is exactly
    :math:`\mathcal N(0, I)` (the closed forms of :mod:`pyro_vae.exact` need it).
    """

    latent_dim: int
    is_standard_normal: bool = False

    def forward(self) -> dist.TorchDistribution:  # pragma: no cover - abstract
        """The prior distribution p(z)."""
        raise NotImplementedError

    @classmethod
    def check_guide(cls, guide: type[Guide]) -> None:
        """Raise :class:`ConfigError` if this prior cannot be paired with guides of class ``guide``.

        Called by :func:`pyro_vae.build.resolve` before any data are loaded.
        Every guide is valid for the priors that do not use the guide.
        """

    def bind(self, guide: Guide, event_shape: tuple[int, ...]) -> None:
        """Receive the VAE's guide and the shape of one datum (called once by ``VAE(...)``).

        Priors that do not depend on the guide ignore this.
        """


class DiagonalNormalMixture(dist.MixtureSameFamily):
    r"""A mixture of ``K`` diagonal Normals whose ``log_prob`` is two matrix products.

    The density is that of :class:`~pyro.distributions.MixtureSameFamily`,

    .. math::

        \log p(z) = \operatorname{logsumexp}_k \Big[\log\pi_k
            - \tfrac12 \sum_d \frac{(z_d - m_{kd})^2}{s_{kd}^2}
            - \sum_d \log s_{kd} - \tfrac D2 \log 2\pi\Big],

    but the quadratic form is expanded as
    :math:`z^2 \cdot s_k^{-2} - 2\, z \cdot (m_k s_k^{-2}) + \lVert m_k / s_k\rVert^2`,
    so ``N`` points cost two ``(N, D) @ (D, K)`` products instead of an
    ``(N, K, D)`` broadcast: about 10x faster for the VampPrior's ``K = 500``
    in ``D = 40`` (the cost of its importance-sampled log-likelihood). The
    products run in float64 whatever the input dtype, so the expansion's
    cancellation costs nothing (the result agrees with the broadcast to
    float64 round-off; the broadcast in float32 is off by about 1e-5).

    Construction and shapes are those of ``MixtureSameFamily`` with a
    ``Categorical`` of batch shape ``()`` and components ``Normal(loc, scale)
    .to_event(1)`` of batch shape ``(K,)`` and event shape ``(D,)``; build it
    with :func:`diagonal_normal_mixture`. After ``expand`` (as Pyro's plates
    do) the fast path still applies, since the expanded parameters are views
    of the ``(K, D)`` ones; any other layout falls back to the broadcast.
    """

    def sample(self, sample_shape: torch.Size = torch.Size()) -> torch.Tensor:  # noqa: B008
        """Draws ``sample_shape + batch_shape + (D,)``: a component k ~ π, then z ~ N(m_k, s_k²).

        ``MixtureSameFamily.sample`` draws from every component and keeps one,
        ``K`` times the work (500x for the VampPrior); this draws the chosen
        component's Normal only, the same distribution.
        """
        normal = self.component_distribution.base_dist
        loc, scale = _unexpanded(normal.loc, 2), _unexpanded(normal.scale, 2)
        if loc is None or scale is None:
            return super().sample(sample_shape)
        with torch.no_grad():
            k = self.mixture_distribution.sample(sample_shape)  # sample + batch shape
            return torch.normal(loc[k], scale[k])

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p(value)`` for ``value`` of shape ``(..., D)``: shape ``broadcast(..., batch)``."""
        normal = self.component_distribution.base_dist
        logits = self.mixture_distribution.logits
        loc, scale = _unexpanded(normal.loc, 2), _unexpanded(normal.scale, 2)
        logits = _unexpanded(logits, 1)
        if loc is None or scale is None or logits is None:
            return super().log_prob(value)
        if self._validate_args:
            self._validate_sample(value)
        work = torch.promote_types(value.dtype, torch.float64)
        z, loc, scale = value.to(work), loc.to(work), scale.to(work)
        precision = scale.pow(-2)  # (K, D)
        quadratic = torch.matmul(z * z, precision.T) - 2 * torch.matmul(z, (loc * precision).T)
        quadratic = quadratic + (loc * loc * precision).sum(-1)  # (..., K)
        log_normal = (
            -0.5 * quadratic - scale.log().sum(-1) - 0.5 * loc.shape[-1] * math.log(2 * math.pi)
        )
        log_weights = torch.log_softmax(logits.to(work), -1)
        log_p = torch.logsumexp(log_normal + log_weights, -1).to(value.dtype)
        return log_p.expand(torch.broadcast_shapes(log_p.shape, self.batch_shape))


def _unexpanded(tensor: torch.Tensor, core: int) -> torch.Tensor | None:
    """The ``core``-dimensional tensor that ``tensor`` is an ``expand`` of, else ``None``."""
    lead = tensor.dim() - core
    if lead < 0 or any(tensor.stride(i) != 0 for i in range(lead) if tensor.shape[i] > 1):
        return None
    return tensor[(0,) * lead] if lead else tensor


def diagonal_normal_mixture(
    logits: torch.Tensor, components: dist.TorchDistribution
) -> dist.MixtureSameFamily:
    """``MixtureSameFamily(Categorical(logits), components)``, fast for diagonal Normals.

    Args:
        logits: Mixture logits ``(K,)``.
        components: Batch shape ``(K,)``, event shape ``(D,)``.

    Returns:
        A :class:`DiagonalNormalMixture` when ``components`` is ``Normal(loc, scale)
        .to_event(1)`` with ``(K, D)`` parameters, else a plain ``MixtureSameFamily``.
    """
    weights = dist.Categorical(logits=logits)
    if (
        isinstance(components, dist.Independent)
        and type(components.base_dist) in (dist.Normal, torch.distributions.Normal)
        and components.reinterpreted_batch_ndims == 1
        and components.base_dist.loc.dim() == 2
    ):
        return DiagonalNormalMixture(weights, components)
    return dist.MixtureSameFamily(weights, components)


@PRIORS.register("standard-normal")
class StandardNormalPrior(Prior):
    r"""The standard Normal prior :math:`p(z) = \mathcal N(z; 0, I_D)`.

    Args:
        latent_dim: ``D``.

    Example:
        >>> StandardNormalPrior(2)().event_shape
        torch.Size([2])
    """

    is_standard_normal = True

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


@PRIORS.register("learned-normal")
class LearnedNormalPrior(Prior):
    r"""A diagonal Normal with learned loc and scale, :math:`\mathcal N(z; m, \mathrm{diag}\,s^2)`.

    :math:`\log p(z) = -\sum_d \big[\tfrac12 ((z_d - m_d)/s_d)^2 + \log s_d
    + \tfrac12 \log 2\pi\big]`, with :math:`s = \exp(\log s)`; it starts at
    :math:`\mathcal N(0, I)`. The KL against a diagonal-Normal guide stays in
    closed form. (With a decoder whose first layer is affine, this prior adds
    no modelling power over :math:`\mathcal N(0, I)`: an affine reparameterization
    of z absorbs it; it is a baseline for the richer priors.)

    Args:
        latent_dim: ``D``.

    Example:
        >>> LearnedNormalPrior(2)().log_prob(torch.zeros(2)).shape
        torch.Size([])
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        self.loc = nn.Parameter(torch.zeros(self.latent_dim))
        self.log_scale = nn.Parameter(torch.zeros(self.latent_dim))

    @classmethod
    def from_config(cls, latent_dim: int) -> LearnedNormalPrior:
        """Build from a config section (no options)."""
        return cls(latent_dim)

    def forward(self) -> dist.TorchDistribution:
        """:math:`\\mathcal N(m, \\mathrm{diag}\\,s^2)`, event shape ``(D,)``."""
        return dist.Normal(self.loc, self.log_scale.exp()).to_event(1)


@PRIORS.register("mixture", example={"components": 3})
class MixturePrior(Prior):
    r"""A learned mixture of ``K`` diagonal Gaussians.

    .. math::

        p(z) = \sum_{k=1}^K \pi_k\, \mathcal N(z; m_k, \mathrm{diag}\,s_k^2), \qquad
        \pi = \mathrm{softmax}(a),

    as a :class:`~pyro.distributions.MixtureSameFamily`; ``log_prob`` is the
    log-sum-exp over components. The means start at independent
    :math:`\mathcal N(0, I)` draws, the scales at 1 and the weights uniform.
    There is no closed-form KL against the guide (Monte Carlo instead).
    Reference: Dilokthanakul et al. (2016), "Deep Unsupervised Clustering with
    Gaussian Mixture Variational Autoencoders"; Tomczak & Welling (2018).

    Args:
        latent_dim: ``D``.
        components: ``K >= 1``.
    """

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__()
        if components < 1:
            raise ConfigError(f"model.prior.components must be >= 1, got {components}")
        self.latent_dim, self.components = int(latent_dim), int(components)
        self.logits = nn.Parameter(torch.zeros(self.components))
        self.locs = nn.Parameter(torch.randn(self.components, self.latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(self.components, self.latent_dim))

    @classmethod
    def from_config(cls, latent_dim: int, components: int = 10) -> MixturePrior:
        """Build from a config section (``components``)."""
        return cls(latent_dim, components)

    def forward(self) -> dist.TorchDistribution:
        """The mixture, batch shape ``()``, event shape ``(D,)``."""
        return diagonal_normal_mixture(
            self.logits, dist.Normal(self.locs, self.log_scales.exp()).to_event(1)
        )


@PRIORS.register("vamp", example={"pseudo_inputs": 3})
class VampPrior(Prior):
    r"""The VampPrior: the guide's posteriors at ``K`` learned pseudo-inputs, mixed uniformly.

    .. math::

        p(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k), \qquad
        \log p(z) = \operatorname{logsumexp}_k \log q_\phi(z|u_k) - \log K,

    where :math:`u_k` are learned points in data space and :math:`q_\phi` is
    the VAE's own encoder (Tomczak & Welling 2018, "VAE with a VampPrior").
    The encoder is shared, not copied: the prior keeps a plain
    reference to the guide (given by :meth:`bind`), so the encoder's
    parameters belong to ``vae.posterior`` alone and this module's state holds
    only the pseudo-inputs ``(K, *event_shape)``. They start uniform on [0, 1]
    (the range of image data) and are unconstrained after that.

    Cost: one encoder pass over the ``K`` pseudo-inputs per call, and ``K``
    guide densities per z; with a flow guide (``iaf``) each density inverts the
    flow (``D`` sequential network passes), so keep ``K`` moderate there.

    Args:
        latent_dim: ``D``.
        pseudo_inputs: ``K >= 1``; 500 as in the paper's MNIST experiments.
    """

    def __init__(self, latent_dim: int, pseudo_inputs: int = 500) -> None:
        super().__init__()
        if pseudo_inputs < 1:
            raise ConfigError(f"model.prior.pseudo_inputs must be >= 1, got {pseudo_inputs}")
        self.latent_dim = int(latent_dim)
        self.num_pseudo_inputs = int(pseudo_inputs)
        self.register_parameter("pseudo_inputs", None)  # (K, *event_shape), made by bind
        self._guide: Guide | None = None

    @classmethod
    def from_config(cls, latent_dim: int, pseudo_inputs: int = 500) -> VampPrior:
        """Build from a config section (``pseudo_inputs``, default 500)."""
        return cls(latent_dim, pseudo_inputs)

    @classmethod
    def check_guide(cls, guide: type[Guide]) -> None:
        """The guide must be amortized (``q(z|u)`` at any input) and have a density.

        Raises:
            ConfigError: for a non-amortized or point-estimate guide; lists the valid ones.
        """
        if not guide.is_amortized or guide.is_point_estimate:
            valid = [
                name
                for name in GUIDES.names()
                if GUIDES.get(name).is_amortized and not GUIDES.get(name).is_point_estimate
            ]
            name = next((n for n in GUIDES.names() if GUIDES.get(n) is guide), guide.__name__)
            raise ConfigError(
                f"the vamp prior mixes the guide's q(z|u) over pseudo-inputs u, so it needs an "
                f"amortized guide with a density, not {name!r}; valid guides: {', '.join(valid)}"
            )

    def bind(self, guide: Guide, event_shape: tuple[int, ...]) -> None:
        """Use ``guide`` as :math:`q_\\phi`; create pseudo-inputs of shape ``(K, *event_shape)``."""
        self.check_guide(type(guide))
        if self._guide is guide and self.pseudo_inputs is not None:
            return  # already bound to this guide (the same prior in a second VAE(...) call)
        # object.__setattr__: a reference, not a submodule (no duplicate parameters or state).
        object.__setattr__(self, "_guide", guide)
        self.pseudo_inputs = nn.Parameter(torch.rand(self.num_pseudo_inputs, *event_shape))

    def extra_repr(self) -> str:
        """``K`` and the shared encoder."""
        return f"pseudo_inputs={self.num_pseudo_inputs}, encoder=the guide's (shared)"

    def forward(self) -> dist.TorchDistribution:
        """The uniform mixture of :math:`q(z|u_k)`, batch shape ``()``, event shape ``(D,)``.

        Raises:
            RuntimeError: if no guide was bound (build the VAE with ``build_vae``).
        """
        if self._guide is None or self.pseudo_inputs is None:
            raise RuntimeError("the vamp prior has no guide; pass it to VAE(prior, guide, ...)")
        components = self._guide(self.pseudo_inputs)
        return diagonal_normal_mixture(
            self.pseudo_inputs.new_zeros(self.num_pseudo_inputs), components
        )


def _affine(dim: int, hidden: list[int], permutation: torch.Tensor) -> nn.Module:
    arn = AutoRegressiveNN(dim, hidden, param_dims=[1, 1], permutation=permutation)
    return AffineAutoregressive(arn)


def _spline(dim: int, hidden: list[int], permutation: torch.Tensor, bins: int = 8) -> nn.Module:
    arn = AutoRegressiveNN(
        dim, hidden, param_dims=[bins, bins, bins - 1, bins], permutation=permutation
    )
    return SplineAutoregressive(dim, arn, count_bins=bins, bound=3.0, order="linear")


#: Autoregressive transforms of the flow prior, by name.
FLOW_TRANSFORMS: dict[str, Callable[[int, list[int], torch.Tensor], nn.Module]] = {
    "affine": _affine,
    "spline": _spline,
}


@PRIORS.register("flow", example={"flows": 2, "hidden": [8]})
class FlowPrior(Prior):
    r"""A normalizing flow on :math:`\mathcal N(0, I)`: :math:`z = f^{-1}(\varepsilon)`.

    .. math::

        f = f_T \circ \dots \circ f_1, \qquad
        \log p(z) = \log \mathcal N(f(z); 0, I) + \sum_{t=1}^T \log\left|\det
        \frac{\partial f_t}{\partial z_{t-1}}\right|,

    each :math:`f_t` a Pyro autoregressive transform in the density direction,
    so that ``log_prob`` (the ELBO's use of a prior) is one parallel pass per
    step and sampling inverts each step in ``D`` sequential passes: the masked
    autoregressive flow (Papamakarios, Pavlakou & Murray 2017, "Masked
    Autoregressive Flow for Density Estimation"). ``affine`` steps are
    :math:`f_t(z)_d = (z_d - \mu_d(z_{<d})) e^{-\alpha_d(z_{<d})}`
    (:class:`~pyro.distributions.transforms.AffineAutoregressive`); ``spline``
    steps are monotone rational-quadratic splines on [-3, 3], identity outside
    (:class:`~pyro.distributions.transforms.SplineAutoregressive`, Durkan et al.
    2019, "Neural Spline Flows"). The variable order is reversed between steps.
    Used as a VAE prior: Chen et al. (2017), "Variational Lossy Autoencoder".

    Args:
        latent_dim: ``D``.
        flows: ``T >= 1``, the number of steps.
        hidden: Hidden widths of each step's MADE, each ``>= D``.
        transform: ``affine`` or ``spline``.
    """

    def __init__(
        self,
        latent_dim: int,
        flows: int = 2,
        hidden: Sequence[int] = (64,),
        transform: str = "affine",
    ) -> None:
        super().__init__()
        self.latent_dim = int(latent_dim)
        hidden = [int(h) for h in hidden]
        if flows < 1:
            raise ConfigError(f"model.prior.flows must be >= 1, got {flows}")
        if not hidden or min(hidden) < self.latent_dim:
            raise ConfigError(
                f"model.prior.hidden: a MADE needs at least one hidden layer, each as wide as "
                f"latent_dim ({self.latent_dim}), got {hidden}"
            )
        if transform not in FLOW_TRANSFORMS:
            raise ConfigError(
                f"model.prior.transform: unknown transform {transform!r}; "
                f"valid: {', '.join(FLOW_TRANSFORMS)}"
            )
        self.transform = transform
        order = torch.arange(self.latent_dim)
        make = FLOW_TRANSFORMS[transform]
        self.flows = nn.ModuleList(
            make(self.latent_dim, hidden, order if t % 2 == 0 else order.flip(0))
            for t in range(int(flows))
        )
        self.register_buffer("loc", torch.zeros(self.latent_dim))
        self.register_buffer("scale", torch.ones(self.latent_dim))

    @classmethod
    def from_config(
        cls,
        latent_dim: int,
        flows: int = 2,
        hidden: list[int] = (64,),  # type: ignore[assignment]
        transform: str = "affine",
    ) -> FlowPrior:
        """Build from a config section (``flows``, ``hidden``, ``transform``)."""
        return cls(latent_dim, flows, hidden, transform)

    def forward(self) -> dist.TorchDistribution:
        """:math:`p(z)`, batch shape ``()``, event shape ``(D,)``."""
        base = dist.Normal(self.loc, self.scale).to_event(1)
        # sampling applies f_T^{-1} first; log_prob applies f_1 first (reversed list)
        return dist.TransformedDistribution(base, [flow.inv for flow in reversed(self.flows)])
