r"""Training objectives: Pyro's own ELBO estimators, chosen by name.

* ``trace`` -- :class:`pyro.infer.Trace_ELBO`: the KL term by Monte Carlo,
  :math:`\log q(z|x) - \log p(z)` at the sampled z.
* ``meanfield`` -- :class:`MeanField_ELBO`, Pyro's
  :class:`~pyro.infer.TraceMeanField_ELBO`: the KL term in closed form where
  one is registered for the pair (q, p). Where none is (VampPrior, mixture
  and flow priors, IAF and delta guides), Pyro silently estimates it by
  Monte Carlo; this subclass says so once (a ``UserWarning``) and records it
  in :attr:`MeanField_ELBO.kl_fallback`, which the trainer writes to every
  epoch record as ``"kl_estimator": "monte-carlo (fallback)"``. With
  ``free_bits > 0`` the objective is :class:`FreeBits_ELBO`.
* ``iwae`` -- :class:`IWAE_ELBO`, Pyro's :class:`~pyro.infer.RenyiELBO` with
  :math:`\alpha = 0`: the importance weighted bound with ``num_particles``
  = K vectorized samples (Burda et al. 2016).

The KL weight β (with linear warm-up, :func:`kl_weight`) is not an objective
option: the trainer sets ``vae.kl_scale``, which the model applies to the
latent site, so every objective weights the KL term (or, for ``iwae``,
:math:`\log p(z) - \log q(z|x)` inside each weight) by it.

Every objective returns the loss (a negative bound, summed over the
minibatch and scaled to the full data set) from ``differentiable_loss``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.infer import ELBO, RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from pyro.infer.util import (
    check_fully_reparametrized,
    get_dependent_plate_dims,
    is_validation_enabled,
    torch_sum,
)
from pyro.poutine import Trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import prune_subsample_sites
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence

from .errors import ConfigError, PyroVAEWarning
from .model import kl_per_dim
from .registry import OBJECTIVES

#: Values of the ``kl_estimator`` key of an epoch record (see :func:`kl_estimator`).
KL_ESTIMATORS = ("analytic", "monte-carlo", "monte-carlo (fallback)", "importance-weighted")


def _particles(num_particles: int) -> dict[str, object]:
    return {
        "num_particles": num_particles,
        "vectorize_particles": num_particles > 1,
        "max_plate_nesting": 1,
    }


def _latent_sites(model_trace: Trace, guide_trace: Trace) -> list[tuple[str, dict, dict]]:
    """``(name, model_site, guide_site)`` for every latent sample site."""
    return [
        (name, site, guide_trace.nodes[name])
        for name, site in model_trace.nodes.items()
        if site["type"] == "sample" and not site["is_observed"] and name in guide_trace.nodes
    ]


class MeanField_ELBO(TraceMeanField_ELBO):
    r"""Pyro's :class:`~pyro.infer.TraceMeanField_ELBO`, reporting when the KL is not analytic.

    .. math::

        \mathcal L(x) = \mathbb E_{q(z|x)}[\log p(x|z)] - \mathrm{KL}(q(z|x)\,\|\,p(z)),

    the KL in closed form when :func:`torch.distributions.kl_divergence` has
    one for the pair of distributions at the latent site, else Pyro's own
    fallback, the one-sample estimate :math:`\log q(z|x) - \log p(z)`. On the
    first evaluation this subclass tries the closed form at every latent
    site; where it is missing it warns once and lists the sites in
    :attr:`kl_fallback`. The estimate itself is Pyro's, unchanged.

    Attributes:
        kl_fallback: ``None`` before the first evaluation, then the names of
            the latent sites whose KL is estimated by Monte Carlo (empty
            when every KL is analytic).
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.kl_fallback: tuple[str, ...] | None = None

    def _differentiable_loss_particle(
        self, model_trace: Trace, guide_trace: Trace
    ) -> tuple[Any, torch.Tensor]:
        if self.kl_fallback is None:
            self.kl_fallback = tuple(
                name
                for name, model_site, guide_site in _latent_sites(model_trace, guide_trace)
                if not _has_analytic_kl(guide_site["fn"], model_site["fn"])
            )
            if self.kl_fallback:
                q = _describe(guide_trace.nodes[self.kl_fallback[0]]["fn"])
                p = _describe(model_trace.nodes[self.kl_fallback[0]]["fn"])
                warnings.warn(
                    f"elbo 'meanfield': no closed-form KL({q} || {p}) at latent site(s) "
                    f"{', '.join(self.kl_fallback)}; the KL term is estimated by Monte Carlo "
                    "(as with elbo 'trace')",
                    PyroVAEWarning,
                    stacklevel=3,
                )
        return super()._differentiable_loss_particle(model_trace, guide_trace)

    def _get_trace(
        self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        r"""Pyro's traces; after the first evaluation, without unread latent densities.

        The first evaluation takes Pyro's path unchanged (it finds
        :attr:`kl_fallback`); later ones skip :math:`\log p(z)` and
        :math:`\log q(z|x)` at sites with a closed-form KL (:func:`_traces_for_kl`).
        """
        if self.kl_fallback is not None:
            traces = _traces_for_kl(model, guide, args, kwargs, self.kl_fallback)
            if traces is not None:
                return traces
        return super()._get_trace(model, guide, args, kwargs)


def _traces_for_kl(
    model: Callable[..., Any],
    guide: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    monte_carlo: tuple[str, ...],
) -> tuple[Trace, Trace] | None:
    r"""Pyro's ``get_importance_trace`` without the densities an analytic-KL loss never reads.

    The same guide trace and replayed model trace as
    :func:`pyro.infer.enum.get_importance_trace` (flat graph, subsample sites
    pruned), but ``log_prob`` only at the model's observed sites and at the
    latent sites in ``monte_carlo`` (those whose KL is estimated by sampling),
    and the guide's score parts only when some site needs them. At a latent
    site with a closed-form KL, :math:`\log p(z)` and :math:`\log q(z|x)`
    are computed and then discarded by Pyro's path: about 0.6 ms of a 16 ms
    step of the 784-400-50 network at batch 128 (``benchmarks/overhead.py``).

    Returns ``None`` where Pyro's own path must run instead: with validation
    on (its model/guide match and shape checks live there) and for a
    :class:`~pyro.poutine.messenger.Messenger` guide.
    """
    if is_validation_enabled() or isinstance(poutine.unwrap(guide), Messenger):
        return None
    guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
    guide_trace = prune_subsample_sites(guide_trace)
    model_trace = prune_subsample_sites(model_trace)
    model_trace.compute_log_prob(lambda name, site: site["is_observed"] or name in monte_carlo)
    auxiliary = any(
        site["type"] == "sample" and name not in model_trace.nodes
        for name, site in guide_trace.nodes.items()
    )
    if monte_carlo or auxiliary:
        guide_trace.compute_score_parts()
    return model_trace, guide_trace


def _check_reparametrized(site: dict) -> None:
    """Pyro's ``check_fully_reparametrized``, also at a site whose score parts were skipped."""
    if "score_parts" in site:
        check_fully_reparametrized(site)
    elif not site["fn"].has_rsample:
        raise NotImplementedError("All distributions in the guide must be fully reparameterized.")


def _has_analytic_kl(
    q: torch.distributions.Distribution, p: torch.distributions.Distribution
) -> bool:
    try:
        kl_divergence(q, p)
    except NotImplementedError:
        return False
    return True


class FreeBits_ELBO(TraceMeanField_ELBO):
    r"""The ELBO with a per-dimension KL floor λ ("free bits", Kingma et al. 2016).

    .. math::

        \mathcal L_\lambda = \sum_{i=1}^{B} \mathbb E_{q(z_i|x_i)}[\log p(x_i|z_i)]
            - B \sum_{d=1}^{D} \max\Bigl(\lambda,\;
              \frac1B \sum_{i=1}^{B} \mathrm{KL}\bigl(q(z_{id}|x_i)\,\|\,p(z_d)\bigr)\Bigr),

    the KL of each latent dimension averaged over the minibatch before it is
    clamped, so a dimension whose average KL is below λ nats gets no gradient
    pushing it further toward the prior. Both terms take the latent and
    observed sites' scales (the data plate's :math:`N/B`, the KL weight β).
    Only :meth:`_differentiable_loss_particle` differs from Pyro's
    :class:`~pyro.infer.TraceMeanField_ELBO`; λ = 0 gives its loss exactly.

    The closed-form KL per dimension needs a guide and a prior that factorize
    over dimensions (:func:`pyro_vae.model.kl_per_dim`, e.g. mean-field
    against a standard Normal); for any other pair the first evaluation
    raises a :class:`~pyro_vae.errors.ConfigError`.

    References:
        Kingma et al. (2016), "Improved variational inference with inverse
        autoregressive flow", NeurIPS, appendix C.8.

    Args:
        free_bits: λ, in nats per latent dimension (>= 0).
        **kwargs: Passed to :class:`~pyro.infer.TraceMeanField_ELBO`.
    """

    def __init__(self, free_bits: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not free_bits >= 0:
            raise ConfigError(f"train.free_bits must be >= 0, got {free_bits}")
        self.free_bits = float(free_bits)

    def _get_trace(
        self, model: Callable[..., Any], guide: Callable[..., Any], args: tuple, kwargs: dict
    ) -> tuple[Trace, Trace]:
        """Pyro's traces without latent densities: the loss reads none (:func:`_traces_for_kl`)."""
        traces = _traces_for_kl(model, guide, args, kwargs, ())
        return traces if traces is not None else super()._get_trace(model, guide, args, kwargs)

    def _differentiable_loss_particle(
        self, model_trace: Trace, guide_trace: Trace
    ) -> tuple[Any, torch.Tensor]:
        elbo = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample" and site["is_observed"]:
                elbo = elbo + site["log_prob_sum"]
        for _, model_site, guide_site in _latent_sites(model_trace, guide_trace):
            _check_reparametrized(guide_site)
            q, p = guide_site["fn"], model_site["fn"]
            per_dim = kl_per_dim(q, p)  # batch_shape + (D,)
            if per_dim is None:
                raise ConfigError(
                    f"train.free_bits needs a closed-form KL per latent dimension, which "
                    f"q = {_describe(q)} against p = {_describe(p)} lacks; use a factorized "
                    "guide and prior (e.g. mean-field with standard-normal) or free_bits = 0"
                )
            mask = guide_site["mask"]
            if isinstance(mask, torch.Tensor):
                raise NotImplementedError("free bits with a per-datum mask at a latent site")
            mean_kl = per_dim.reshape(-1, per_dim.shape[-1]).mean(0)
            clamped = torch.clamp(mean_kl, min=self.free_bits).sum() * per_dim[..., 0].numel()
            elbo = elbo - scale_and_mask(clamped, guide_site["scale"], mask)
        elbo = torch.as_tensor(elbo)
        return -elbo.detach(), -elbo


def _describe(d: torch.distributions.Distribution) -> str:
    """``Independent(Normal)``-style name of a distribution, for messages."""
    if isinstance(d, torch.distributions.Independent):
        return f"Independent({_describe(d.base_dist)})"
    if isinstance(d, torch.distributions.MixtureSameFamily):  # its fast subclasses too
        return "MixtureSameFamily"
    return type(d).__name__


class IWAE_ELBO(RenyiELBO):
    r"""The importance weighted bound (Burda et al. 2016): Pyro's ``RenyiELBO`` at α = 0.

    .. math::

        \mathcal L_K(x) = \mathbb E\Bigl[\log \frac1K \sum_{k=1}^K
            \frac{p(x, z_k)}{q(z_k|x)}\Bigr], \qquad z_k \sim q(z|x)\ \text{i.i.d.},

    :math:`\mathrm{ELBO} = \mathcal L_1 \le \mathcal L_K \le \mathcal L_{K+1} \le \log p(x)`.
    For general α it is the Rényi bound
    :math:`\frac1{1-\alpha} \log \frac1K \sum_k w_k^{1-\alpha}` (Li & Turner 2016).

    Two things differ from :class:`~pyro.infer.RenyiELBO`, which has only
    ``loss`` and ``loss_and_grads``: :meth:`differentiable_loss` returns a
    tensor that ``torch.optim`` can drive, and the data plate's subsampling
    scale :math:`N/B` multiplies each datum's bound *after* the log-mean-exp
    over particles (``RenyiELBO`` puts it inside the weights, which biases
    the bound when :math:`N \ne B`). Other site scales (the KL weight β)
    stay inside the weights. With gradients enabled the guide must be fully
    reparameterized; the gradient is then the exact gradient of the estimate.
    :meth:`log_weights` is also what :func:`pyro_vae.evaluate.log_importance_weights`
    computes, under ``torch.no_grad()`` with any proposal as the guide.

    References:
        Burda, Grosse & Salakhutdinov (2016), "Importance weighted
        autoencoders", ICLR. Li & Turner (2016), "Rényi divergence
        variational inference", NeurIPS.

    Args:
        alpha: The order α (≠ 1); 0 gives the IWAE bound.
        **kwargs: Passed to :class:`~pyro.infer.RenyiELBO` (``num_particles``,
            ``vectorize_particles``, ``max_plate_nesting``).
    """

    def __init__(self, alpha: float = 0.0, **kwargs: Any) -> None:
        super().__init__(alpha=alpha, **kwargs)

    def log_weights(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, float]:
        """Per-datum log importance weights and the data plate's subsampling scale.

        Returns:
            ``(log_w, s)``: ``log_w[k, i] = log p(x_i, z_ki) - log q(z_ki|x_i)``
            of shape ``(K, B)`` with unscaled log densities (site scales other
            than subsampling kept), and :math:`s = N/B`.
        """
        particles = []
        scales: set[float] = set()
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            sum_dims = get_dependent_plate_dims(model_trace.nodes.values())
            log_w: Any = 0.0
            for trace, sign in ((model_trace, 1.0), (guide_trace, -1.0)):
                for site in trace.nodes.values():
                    if site["type"] != "sample":
                        continue
                    if sign < 0 and torch.is_grad_enabled():
                        check_fully_reparametrized(site)
                    subsample = _subsample_scale(site)
                    scales.add(subsample)
                    log_p = scale_and_mask(
                        site["unscaled_log_prob"], site["scale"] / subsample, site["mask"]
                    )
                    log_w = log_w + sign * torch_sum(log_p, sum_dims)
            particles.append(torch.as_tensor(log_w))
        if len(scales) > 1:
            raise ValueError(f"sites of one model have different subsampling scales {scales}")
        vectorized = self.vectorize_particles and self.num_particles > 1
        log_w = particles[0] if vectorized else torch.stack(particles)
        return log_w, scales.pop() if scales else 1.0

    def differentiable_loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        r"""The negative bound :math:`-s \sum_i \mathcal L_K(x_i)` as a differentiable tensor."""
        log_w, scale = self.log_weights(model, guide, *args, **kwargs)
        log_mean = torch.logsumexp((1.0 - self.alpha) * log_w, dim=0) - math.log(self.num_particles)
        loss = -scale * log_mean.sum() / (1.0 - self.alpha)
        warn_if_nan(loss, "loss")
        return loss

    def loss(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float:
        """The negative bound as a float (see :meth:`differentiable_loss`)."""
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(
        self, model: Callable[..., Any], guide: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> float:
        """The negative bound as a float, after ``backward()`` of :meth:`differentiable_loss`."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())


def _subsample_scale(site: dict) -> float:
    """:math:`\\prod N/B` over the subsampled plates of a site."""
    scale = 1.0
    for frame in site["cond_indep_stack"]:
        if frame.full_size is not None and frame.full_size != frame.size:
            scale *= frame.full_size / frame.size
    return scale


@OBJECTIVES.register("trace")
def trace_elbo(num_particles: int = 1) -> ELBO:
    """``Trace_ELBO`` (Monte Carlo KL) with vectorized particles."""
    return Trace_ELBO(**_particles(num_particles))


@OBJECTIVES.register("meanfield")
def mean_field_elbo(num_particles: int = 1, free_bits: float = 0.0) -> ELBO:
    """:class:`MeanField_ELBO` (analytic KL), or :class:`FreeBits_ELBO` when ``free_bits > 0``."""
    if free_bits < 0:
        raise ConfigError(f"train.free_bits must be >= 0, got {free_bits}")
    if free_bits > 0:
        return FreeBits_ELBO(free_bits, **_particles(num_particles))
    return MeanField_ELBO(**_particles(num_particles))


@OBJECTIVES.register("iwae")
def iwae_elbo(num_particles: int = 1) -> ELBO:
    """:class:`IWAE_ELBO`: the importance weighted bound with K = ``num_particles``, vectorized."""
    return IWAE_ELBO(alpha=0.0, **_particles(num_particles))


def kl_estimator(objective: ELBO) -> str:
    """How ``objective`` estimates the KL term, one of :data:`KL_ESTIMATORS`.

    ``"monte-carlo (fallback)"`` marks a ``meanfield`` objective that found no
    closed-form KL at its first evaluation; before that it reads ``"analytic"``.
    """
    if isinstance(objective, RenyiELBO):
        return "importance-weighted"
    if isinstance(objective, MeanField_ELBO) and objective.kl_fallback:
        return "monte-carlo (fallback)"
    if isinstance(objective, TraceMeanField_ELBO):
        return "analytic"
    return "monte-carlo"


def kl_weight(beta: float, warmup_epochs: int, epoch: int, start: float = 0.0) -> float:
    r"""The KL weight of ``epoch`` (1-based): β with a linear warm-up.

    .. math::

        \beta_e = \beta \cdot \min\bigl(1, s + (e - 1) / W\bigr),

    :math:`s\beta` in the first epoch (``start`` :math:`s`, 0 by default), rising
    by :math:`\beta / W` an epoch to β; :math:`W = 0` means β throughout
    (Bowman et al. 2016, "Generating sentences from a continuous space";
    Sønderby et al. 2016, "Ladder variational autoencoders"). :math:`s = 1/W`
    is the schedule :math:`\beta_e = \beta \min(1, e / W)` of the VampPrior
    paper's code (Tomczak & Welling 2018), whose first epoch already weighs the
    KL: with :math:`s = 0` nothing bounds the guide's variances in epoch 1.
    """
    if warmup_epochs <= 0:
        return float(beta)
    return float(beta) * min(1.0, (start * warmup_epochs + epoch - 1) / warmup_epochs)
