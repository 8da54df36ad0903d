"""The VAE as a Pyro program, assembled from injected components.

.. math::

    z \\sim p(z), \\qquad x \\mid z \\sim p_\\theta(x \\mid z), \\qquad
    q_\\phi(z \\mid x) \\approx p_\\theta(z \\mid x),

    \\mathrm{ELBO}(x) = \\mathbb E_{q_\\phi(z|x)}[\\log p_\\theta(x|z)]
        - \\mathrm{KL}(q_\\phi(z|x) \\,\\|\\, p(z)) \\le \\log p_\\theta(x).

Reference: Kingma & Welling (2014), "Auto-Encoding Variational Bayes".
"""

from __future__ import annotations

import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.runtime import _PYRO_STACK, effectful
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn
from torch.distributions import kl_divergence

from .config import ComponentConfig, ModelConfig
from .guides import Guide
from .likelihoods import Likelihood
from .priors import Prior
from .registry import GUIDES, LIKELIHOODS, NETWORKS, PRIORS

#: Name of the latent sample site in :meth:`VAE.model` and :meth:`VAE.guide`.
LATENT_SITE = "z"
#: Name of the observed sample site in :meth:`VAE.model`.
OBSERVED_SITE = "x"
#: Name of the plate over data points.
DATA_PLATE = "data"


def _module_param(name: str, parameter: nn.Parameter) -> nn.Parameter:
    # The value of a Pyro ``param`` site, without Pyro's global param store: the
    # module's own parameter, with the ``unconstrained`` weakref that pyro.optim reads.
    parameter.unconstrained = weakref.ref(parameter)  # type: ignore[attr-defined]
    return parameter


_emit_param = effectful(_module_param, type="param")


def _param_capture_active() -> bool:
    """Whether a handler collects ``param`` sites (``SVI.step``'s ``trace(param_only=True)``)."""
    return any(isinstance(m, TraceMessenger) and m.param_only for m in _PYRO_STACK)


class PyroProgram(nn.Module):
    """A Pyro program of a :class:`VAE` (its ``model`` or ``guide``), as an ``nn.Module``.

    Calling it runs the program; its parameters are the VAE's, so
    ``Trace_ELBO()(vae.model, vae.guide)`` is a module that ``torch.optim``
    can drive, and ``pyro.infer.SVI`` with a ``pyro.optim`` optimizer sees
    every parameter (each is announced as a ``param`` site, without the
    global param store, while a handler collects them).
    """

    def __init__(self, vae: VAE, program: str, parts: tuple[str, ...]) -> None:
        super().__init__()
        self.vae = vae
        self.program = program
        self.parts = parts

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run the program with the model's arguments (see :meth:`VAE.run_model`)."""
        if _param_capture_active():
            for part in self.parts:
                for name, parameter in getattr(self.vae, part).named_parameters(prefix=part):
                    _emit_param(name, parameter, name=name)
        return getattr(self.vae, self.program)(*args, **kwargs)


#: Draws averaged by :meth:`VAE.encode` for a posterior with no closed-form mean.
MEAN_DRAWS = 256


class VAE(nn.Module):
    """A variational autoencoder ``VAE(prior, guide, likelihood)``.

    The three components are ``nn.Module`` s that return distributions:

    * ``vae.prior()`` -> :math:`p(z)`, event shape ``(D,)``;
    * ``vae.posterior(x)`` -> :math:`q(z|x)`, batch ``(B,)``, event ``(D,)``
      (the injected guide module);
    * ``vae.likelihood(z)`` -> :math:`p(x|z)`, batch ``z.shape[:-1]``, event
      = one datum's shape.

    Any registered component class (or one of your own subclasses of
    :class:`~pyro_vae.Prior`, :class:`~pyro_vae.Guide` and
    :class:`~pyro_vae.Likelihood`) can be injected; the prior is bound to the
    guide here (the VampPrior mixes the guide's posteriors).

    ``vae.model`` and ``vae.guide`` are the Pyro programs built from them
    (:class:`PyroProgram` modules). Both take ``(x, index=None,
    data_size=None, kl_scale=1.0)``; ``kl_scale`` is β, the weight of the
    latent site (the KL term). A point-estimate guide
    (``is_point_estimate``) masks the latent site out. Parameters live in
    this module only, never in Pyro's global param store, so two VAEs in
    one process never share parameters. Every training loop works:

    * ``torch.optim`` on ``vae.parameters()`` with a Pyro ELBO's
      ``differentiable_loss(vae.model, vae.guide, x)`` (what
      :func:`pyro_vae.fit` does), or on ``Trace_ELBO()(vae.model, vae.guide)``;
    * Pyro's ``SVI(vae.model, vae.guide, pyro.optim.Adam(...), Trace_ELBO())``.

    As a tool (no gradients): ``encode(x)`` ``(B, D)``, ``decode(z)``
    ``(..., *event_shape)``, ``sample(n)`` ``(n, *event_shape)`` and
    ``reconstruct(x)`` (the shape of ``x``).

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
        prior.bind(guide, likelihood.event_shape)
        # plain attributes, not submodules: the programs hold the VAE, not the reverse
        object.__setattr__(self, "_programs", None)

    def _get_programs(self) -> tuple[PyroProgram, PyroProgram]:
        programs = self.__dict__.get("_programs")
        if programs is None or programs[0].vae is not self:
            programs = (
                PyroProgram(self, "run_model", ("prior", "likelihood")),
                PyroProgram(self, "run_guide", ("posterior",)),
            )
            object.__setattr__(self, "_programs", programs)
        return programs

    @property
    def model(self) -> PyroProgram:
        """The generative model as a Pyro program (see :meth:`run_model`)."""
        return self._get_programs()[0]

    @property
    def guide(self) -> PyroProgram:
        """The amortized guide as a Pyro program (see :meth:`run_guide`)."""
        return self._get_programs()[1]

    def __getstate__(self) -> dict[str, Any]:
        # pickling: drop the weakrefs pyro.optim needs (they are made again at the next step)
        for parameter in self.parameters():
            parameter.__dict__.pop("unconstrained", None)
        state = dict(self.__dict__)
        state["_programs"] = None
        return state

    def describe(self, num_data: int | None = None) -> ModelConfig | None:
        """The ``[model]`` config that rebuilds this VAE, or ``None`` if a part cannot say.

        Each component (and the guide's and the likelihood's network) is
        described by its registry from the arguments it was built with
        (:meth:`~pyro_vae.registry.Registry.describe`): a hand-built VAE of
        registered classes saves and loads like a config-built one.

        Args:
            num_data: Left out of a per-datum guide's options when it equals
                the training set's size (the default that a build fills in).
        """
        parts = {}
        for key, registry, module in (
            ("prior", PRIORS, self.prior),
            ("guide", GUIDES, self.posterior),
            ("likelihood", LIKELIHOODS, self.likelihood),
        ):
            described = registry.describe(module)
            if described is None:
                return None
            name, options = described
            options = {k: v for k, v in options.items() if k not in _CONTEXT_OPTIONS}
            if options.get("num_data") is not None and options["num_data"] == num_data:
                del options["num_data"]
            parts[key] = ComponentConfig(name, options)
        for key, module in (("encoder", self.posterior), ("decoder", self.likelihood)):
            network = _network_of(module)
            if network is None:
                continue
            described = NETWORKS.describe(network)
            if described is None:
                return None
            parts[key] = ComponentConfig(*described)
        return ModelConfig(latent_dim=self.latent_dim, **parts)

    def _latent_weight(self, kl_scale: float) -> AbstractContextManager[None]:
        """Scale the latent site by β (mask it out at 0 or for a point-estimate guide)."""
        if self.posterior.is_point_estimate or kl_scale == 0.0:
            return poutine.mask(mask=False)
        if kl_scale == 1.0:
            return nullcontext()
        return poutine.scale(scale=kl_scale)

    # --- the model as a tool: no gradients, stated shapes --------------------------

    @torch.no_grad()
    def encode(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        *,
        sample: bool = False,
        draws: int = MEAN_DRAWS,
    ) -> torch.Tensor:
        """Latent codes of data ``x`` ``(B, *event_shape)``: shape ``(B, D)``.

        The mean of :math:`q(z|x)`, or one draw with ``sample=True``. A family
        with no closed-form mean (a flow such as ``iaf``) gives the average of
        ``draws`` draws.
        """
        q = self.posterior(x, index)
        if sample:
            return q.sample()
        try:
            return q.mean
        except NotImplementedError:
            return q.sample((draws,)).mean(0)

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean :math:`\\mathbb E[x|z]` for codes ``z`` ``(..., D)``.

        Returns:
            Shape ``(..., *event_shape)`` (pixel probabilities for Bernoulli data).
        """
        return self.likelihood(z).mean

    @torch.no_grad()
    def sample(self, num: int) -> torch.Tensor:
        """``num`` data drawn through the prior, :math:`z \\sim p(z)`, :math:`x \\sim p(x|z)`.

        Returns:
            Shape ``(num, *event_shape)``.
        """
        z = self.prior().sample((num,))
        return self.likelihood(z).sample()

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """``decode(encode(x))``: the mean reconstruction, shape ``x.shape``."""
        return self.decode(self.encode(x, index))

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

    def run_model(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        data_size: int | None = None,
        kl_scale: float = 1.0,
    ) -> torch.Tensor:
        """The generative model :math:`p(z)\\,p(x|z)` with ``x`` observed.

        Args:
            x: A minibatch ``(B, *event_shape)``.
            index: Positions of the minibatch in the training set ``(B,)``.
            data_size: ``N``; when given, the data plate is subsampled and log
                densities are scaled by ``N / B`` (an unbiased full-data ELBO).
            kl_scale: β, the weight of the latent site's log densities (1: the ELBO).

        Returns:
            The latent sample z, ``(B, D)`` (more dims with vectorized particles).
        """
        with self._plate(x, index, data_size):
            with self._latent_weight(kl_scale):
                z = pyro.sample(LATENT_SITE, self.prior())
            pyro.sample(OBSERVED_SITE, self.likelihood(z), obs=x)
        return z

    def run_guide(
        self,
        x: torch.Tensor,
        index: torch.Tensor | None = None,
        data_size: int | None = None,
        kl_scale: float = 1.0,
    ) -> torch.Tensor:
        """The guide: ``z ~ q(z|x)``, reparameterized. Same arguments as :meth:`run_model`."""
        with self._plate(x, index, data_size), self._latent_weight(kl_scale):
            return pyro.sample(LATENT_SITE, self.posterior(x, index))


#: Constructor arguments that the build context supplies, not options.
_CONTEXT_OPTIONS = ("latent_dim", "event_shape")


def _network_of(component: nn.Module) -> nn.Module | None:
    """The network a guide or likelihood was built around (a module constructor argument)."""
    arguments = component.__dict__.get("_init_arguments", {})
    return next((v for v in arguments.values() if isinstance(v, nn.Module)), None)


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
