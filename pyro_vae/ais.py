"""log p(x) by annealed importance sampling (AIS), and its sandwich by bidirectional Monte Carlo.

AIS (Neal 2001) moves samples from a normalized start distribution
:math:`r(z)` (the encoder's :math:`q(z|x)`, or the prior :math:`p(z)`) to the
posterior through the geometric path of unnormalized densities

.. math::

    f_t(z) = r(z)^{1-\\beta_t}\\,\\big[p(x \\mid z)\\,p(z)\\big]^{\\beta_t},
    \\qquad 0 = \\beta_0 < \\beta_1 < \\dots < \\beta_T = 1,

with :math:`Z_0 = 1` and :math:`Z_T = p(x)`. From :math:`z_0 \\sim r`, a
transition :math:`\\mathcal T_t` that leaves :math:`f_t` invariant
(here: Hamiltonian Monte Carlo) is applied after each step, and

.. math::

    \\log w = \\sum_{t=1}^T \\big[\\log f_t(z_{t-1}) - \\log f_{t-1}(z_{t-1})\\big]
            = \\sum_{t=1}^T (\\beta_t - \\beta_{t-1})
              \\big[\\log p(x \\mid z_{t-1}) + \\log p(z_{t-1}) - \\log r(z_{t-1})\\big],

    \\mathbb E[w] = p(x), \\qquad
    \\log \\hat p(x) = \\operatorname{logsumexp}_{c=1}^C \\log w_c - \\log C,

so that :math:`\\mathbb E[\\log \\hat p(x)] \\le \\log p(x)` (Jensen): a
stochastic lower bound, tight as :math:`T \\to \\infty`. With ``T = 1`` it is
plain importance sampling with proposal :math:`r`.

Bidirectional Monte Carlo (Grosse, Ghahramani & Adams 2015) simulates
:math:`z^* \\sim p(z)`, :math:`x \\sim p(x|z^*)`, so that :math:`z^*` is an exact
posterior sample of :math:`x`, and runs AIS backwards from it; its weights
estimate :math:`1/p(x)` without bias, which gives a stochastic *upper* bound
(:func:`bdmc`). The gap between the two bounds bounds the error of either.

References:
    Neal (2001), "Annealed importance sampling".
    Grosse, Ghahramani & Adams (2015), "Sandwiching the marginal likelihood
    using bidirectional Monte Carlo".
    Wu, Burda, Salakhutdinov & Grosse (2017), "On the quantitative analysis of
    decoder-based generative models".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.ops.integrator import potential_grad, velocity_verlet
from torch.distributions import Distribution

from .data import check_fits
from .errors import ConfigError, UserError
from .model import LATENT_SITE, VAE

#: Start distributions of the annealing path by name: the guide :math:`q(z|x)` or the prior.
STARTS = ("guide", "prior")
#: Annealing schedules by name (see :func:`annealing_schedule`).
SCHEDULES = ("sigmoid", "linear")
#: Steepness :math:`\\delta` of the sigmoid schedule (Wu et al. 2017 use 4).
SIGMOID_RADIUS = 4.0

_Parts = tuple[torch.Tensor, torch.Tensor]


def annealing_schedule(
    steps: int, kind: str = "sigmoid", *, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """The inverse temperatures :math:`\\beta_0 = 0 < \\dots < \\beta_T = 1`, shape ``(T + 1,)``.

    * ``"sigmoid"`` (Grosse et al. 2015; Wu et al. 2017): more steps near both
      ends, where the distributions change fastest,

      .. math::

          \\tilde\\beta_t = \\sigma\\big(\\delta\\,(2t/T - 1)\\big), \\quad
          \\beta_t = \\frac{\\tilde\\beta_t - \\tilde\\beta_0}{\\tilde\\beta_T - \\tilde\\beta_0},
          \\quad \\delta = 4;

    * ``"linear"``: :math:`\\beta_t = t / T`.

    Args:
        steps: ``T >= 1``, the number of annealing steps (weight increments).
        kind: ``"sigmoid"`` or ``"linear"``.
        dtype: Of the result.
    """
    if steps < 1:
        raise ConfigError(f"the number of annealing steps T must be >= 1, got {steps}")
    t = torch.arange(steps + 1, dtype=torch.float64) / steps
    if kind == "linear":
        betas = t
    elif kind == "sigmoid":
        s = torch.sigmoid(SIGMOID_RADIUS * (2 * t - 1))
        betas = (s - s[0]) / (s[-1] - s[0])
    else:
        raise ConfigError(f"unknown annealing schedule {kind!r}; valid: {', '.join(SCHEDULES)}")
    betas[0], betas[-1] = 0.0, 1.0  # exactly, whatever the rounding
    return betas.to(dtype)


def _start_distribution(
    vae: VAE, x: torch.Tensor, start: str, index: torch.Tensor | None
) -> Distribution:
    """The normalized start ``r(z)``, batch shape ``(B,)``, event shape ``(D,)``."""
    if start == "prior":
        return vae.prior().expand((x.shape[0],))
    if start != "guide":
        raise ConfigError(f"unknown AIS start {start!r}; valid: {', '.join(STARTS)}")
    if vae.posterior.is_point_estimate:
        raise UserError(
            "the guide is a point estimate (no density): AIS needs a start distribution "
            "with a density; use start='prior'"
        )
    return vae.posterior(x, index)


def _check_settings(
    steps: int, chains: int, leapfrog_steps: int, step_size: float, target_accept: float
) -> None:
    for name, value in (("steps", steps), ("chains", chains), ("leapfrog_steps", leapfrog_steps)):
        if int(value) != value or value < 1:
            raise ConfigError(f"{name} must be an integer >= 1, got {value}")
    if not step_size > 0:
        raise ConfigError(f"step_size must be > 0, got {step_size}")
    if not 0 < target_accept < 1:
        raise ConfigError(f"target_accept must be in (0, 1), got {target_accept}")


def _identity_kinetic_grad(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:math:`\\nabla_p K` of :math:`K(p) = \\lVert p\\rVert^2/2` (unit mass matrix)."""
    return r


def _anneal(
    log_parts: Callable[[torch.Tensor], _Parts],
    z: torch.Tensor,
    betas: torch.Tensor,
    step_size: torch.Tensor,
    *,
    leapfrog_steps: int,
    target_accept: float,
    adapt: bool,
    adapt_rate: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AIS run along ``betas`` from ``z`` (``(C, B, D)``, distributed as ``f_{betas[0]}``).

    ``log_parts(z)`` returns :math:`(\\log r(z), \\log p(x, z))`, each ``(C, B)``.
    ``betas`` may decrease (reverse AIS). After each weight increment but the
    last, one HMC transition leaving :math:`f_{\\beta_t}` invariant: a fresh
    momentum :math:`p \\sim \\mathcal N(0, I)`, ``leapfrog_steps`` steps of
    Pyro's velocity Verlet on the potential :math:`U_t = -\\log f_t` (summed
    over chains and data, which leaves each element's gradient its own), and a
    Metropolis test per (chain, datum).

    ``step_size`` is ``(B,)`` (the first step size, adapted when ``adapt``) or
    ``(T - 1, B)`` (a fixed schedule).

    Returns:
        ``(log_w (C, B) float64, z (C, B, D), accepted (T - 1, C, B) bool,
        step_sizes (T - 1, B))``.
    """
    chains, batch = z.shape[:2]
    steps = len(betas) - 1
    fixed = step_size.dim() == 2
    eps = step_size if not fixed else None
    log_w = torch.zeros(chains, batch, dtype=torch.float64, device=z.device)
    accepted = torch.zeros(max(steps - 1, 0), chains, batch, dtype=torch.bool, device=z.device)
    used = torch.zeros(max(steps - 1, 0), batch, dtype=z.dtype, device=z.device)
    log_r, log_joint = log_parts(z)
    for t in range(1, steps + 1):
        log_w += (betas[t] - betas[t - 1]).item() * (log_joint - log_r).double()
        if t == steps:  # the last transition would move z, not the weights
            break
        beta = betas[t].item()
        stash: dict[str, _Parts] = {}

        def potential(zs: dict[str, torch.Tensor], beta: float = beta) -> torch.Tensor:
            parts = log_parts(zs[LATENT_SITE])
            stash["parts"] = (parts[0].detach(), parts[1].detach())
            return -((1 - beta) * parts[0] + beta * parts[1]).sum()

        eps_t = step_size[t - 1] if fixed else eps
        used[t - 1] = eps_t
        momentum = torch.randn_like(z)
        with torch.enable_grad():
            grads, _ = potential_grad(potential, {LATENT_SITE: z})
            z_new, p_new, _, _ = velocity_verlet(
                {LATENT_SITE: z},
                {LATENT_SITE: momentum},
                potential,
                _identity_kinetic_grad,
                eps_t.unsqueeze(-1),
                leapfrog_steps,
                z_grads=grads,
            )
        z_new, p_new = z_new[LATENT_SITE], p_new[LATENT_SITE]
        log_r_new, log_joint_new = stash["parts"]
        energy = -((1 - beta) * log_r + beta * log_joint) + 0.5 * momentum.pow(2).sum(-1)
        energy_new = -((1 - beta) * log_r_new + beta * log_joint_new) + 0.5 * p_new.pow(2).sum(-1)
        # NaN or infinite energies compare False: rejected
        accept = torch.rand_like(energy).log() < energy - energy_new
        accepted[t - 1] = accept
        z = torch.where(accept.unsqueeze(-1), z_new, z)
        log_r = torch.where(accept, log_r_new, log_r)
        log_joint = torch.where(accept, log_joint_new, log_joint)
        if adapt and not fixed:
            rate = accept.to(z.dtype).mean(0)
            eps = torch.where(rate > target_accept, eps * (1 + adapt_rate), eps * (1 - adapt_rate))
    return log_w, z, accepted, used


def _log_mean_exp(log_w: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def _ess_and_stderr(log_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Kish's ESS of ``C`` chain weights and the delta-method SE :math:`\\sqrt{1/\\mathrm{ESS} - 1/C}`.

    The same formulas as :func:`pyro_vae.evaluate.effective_sample_size` and
    :func:`pyro_vae.evaluate.log_likelihood_mc_stderr` (Owen 2013, Sec. 9.3).
    """
    ess = torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0))
    return ess, (1.0 / ess - 1.0 / log_w.shape[0]).clamp(min=0).sqrt()


@dataclass
class AISResult:
    """The result of :func:`ais_log_likelihood`; tensors are per datum (float64 where noted).

    Args:
        log_likelihood: :math:`\\log \\hat p(x)`, ``(B,)`` float64.
        log_weights: :math:`\\log w`, ``(C, B)`` float64.
        mc_stderr: Delta-method Monte Carlo SE of ``log_likelihood`` from the
            chains' ESS, :math:`\\sqrt{1/\\mathrm{ESS} - 1/C}`, ``(B,)``.
        ess: Kish's effective sample size of the ``C`` weights, ``(B,)``.
        acceptance_rate: HMC acceptance rate over chains and transitions,
            ``(B,)`` (NaN when ``T = 1``: no transitions).
        step_sizes: The leapfrog step size of each transition, ``(T - 1, B)``.
        samples: The chains' last states, ``(C, B, D)``: weighted by
            ``log_weights``, approximate posterior samples.
        steps, chains, start, schedule, leapfrog_steps, target_accept, adapt: The settings.
    """

    log_likelihood: torch.Tensor
    log_weights: torch.Tensor
    mc_stderr: torch.Tensor
    ess: torch.Tensor
    acceptance_rate: torch.Tensor
    step_sizes: torch.Tensor
    samples: torch.Tensor
    steps: int
    chains: int
    start: str
    schedule: str
    leapfrog_steps: int
    target_accept: float
    adapt: bool


@torch.no_grad()
def ais_log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    *,
    steps: int = 500,
    chains: int = 16,
    start: str = "guide",
    schedule: str = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float | torch.Tensor = 0.1,
    target_accept: float = 0.65,
    adapt: bool = True,
    adapt_rate: float = 0.02,
    index: torch.Tensor | None = None,
) -> AISResult:
    """Per-datum :math:`\\log \\hat p(x)` by annealed importance sampling with HMC transitions.

    .. math::

        \\log f_t(z) = (1 - \\beta_t) \\log r(z) + \\beta_t \\big[\\log p(x|z) + \\log p(z)\\big],

        \\log w_{cb} = \\sum_{t=1}^T (\\beta_t - \\beta_{t-1})
            \\big[\\log p(x_b|z^{(c)}_{t-1}) + \\log p(z^{(c)}_{t-1}) - \\log r(z^{(c)}_{t-1})\\big],

        \\log \\hat p(x_b) = \\operatorname{logsumexp}_c \\log w_{cb} - \\log C,

    with :math:`z_0 \\sim r`, the start distribution (the guide :math:`q(z|x)` or
    the prior :math:`p(z)`; with the prior, :math:`\\log f_t = \\log p(z) + \\beta_t
    \\log p(x|z)`), :math:`\\beta` from :func:`annealing_schedule`, and
    :math:`z_t` one HMC transition from :math:`z_{t-1}` that leaves
    :math:`f_t` invariant, for :math:`t = 1, \\dots, T-1` (the weights never
    read :math:`z_T`). :math:`\\mathbb E[w] = p(x)` (Neal 2001), so the estimate
    is unbiased on the linear scale and a stochastic lower bound in log.
    ``T = 1`` is importance sampling with proposal :math:`r`: then
    :math:`\\log w = \\log p(x|z) + \\log p(z) - \\log r(z)` exactly.

    HMC: unit mass matrix, a fresh momentum per transition, ``leapfrog_steps``
    steps of Pyro's ``velocity_verlet`` vectorized over ``(C, B)`` (the
    potential summed over chains and data: elements do not interact, so each
    gets its own gradient), and a Metropolis test per (chain, datum).

    Step size: one per datum, shared by its ``C`` chains. With ``adapt``, after
    each transition it is multiplied by ``1 + adapt_rate`` if the datum's
    acceptance rate over the chains exceeded ``target_accept``, by
    ``1 - adapt_rate`` otherwise (Wu et al. 2017, target 0.65). The step size
    of transition ``t`` depends on the past acceptances only, the common
    practice of Wu et al. 2017; strictly, Neal's unbiasedness argument needs
    transitions chosen in advance, and this small bias can be removed by
    passing a previous run's ``step_sizes`` back as ``step_size`` with
    ``adapt=False`` (a fixed schedule: then the estimate is exactly AIS).

    Draws come from torch's global random number generator: seed it with
    ``torch.manual_seed`` for reproducible numbers. Gradients are taken with
    respect to ``z`` only, inside ``torch.enable_grad()``; everything else
    runs under ``torch.no_grad()``.

    Args:
        vae: The model (call ``vae.eval()`` first if its networks use dropout
            or batch norm).
        x: Data ``(B, *event_shape)``.
        steps: ``T``, the number of intermediate distributions (weight increments).
        chains: ``C``, independent AIS chains per datum.
        start: ``"guide"`` (:math:`q(z|x)`) or ``"prior"``.
        schedule: ``"sigmoid"`` or ``"linear"`` (:func:`annealing_schedule`).
        leapfrog_steps: ``L``, leapfrog steps per HMC transition.
        step_size: The first leapfrog step size (a float or a ``(B,)`` tensor),
            or a fixed schedule ``(T - 1, B)``.
        target_accept: The acceptance rate the adaptation aims at.
        adapt: Adapt the step size (ignored for a ``(T - 1, B)`` schedule).
        adapt_rate: Relative change of the step size per transition.
        index: Positions of ``x`` in the training set, for non-amortized guides.

    Returns:
        An :class:`AISResult`.

    Example:
        >>> torch.manual_seed(0)  # doctest: +SKIP
        >>> result = ais_log_likelihood(vae, x, steps=1000, chains=16)  # doctest: +SKIP
        >>> result.log_likelihood.mean(), result.mc_stderr.max()  # doctest: +SKIP

    References:
        Neal (2001), "Annealed importance sampling".
        Wu, Burda, Salakhutdinov & Grosse (2017), "On the quantitative analysis
        of decoder-based generative models", Sec. 4.
    """
    _check_settings(
        steps, chains, leapfrog_steps, float(torch.as_tensor(step_size).min()), target_accept
    )
    check_fits(x, vae.event_shape, vae.likelihood.support, type(vae.likelihood).__name__, "x")
    r = _start_distribution(vae, x, start, index)
    betas = annealing_schedule(steps, schedule)
    z0 = r.sample((chains,))
    return _run(vae, x, r, start == "prior", z0, betas, step_size, start, schedule,
                leapfrog_steps, target_accept, adapt, adapt_rate)  # fmt: skip


def _log_parts_fn(
    vae: VAE, x: torch.Tensor, r: Distribution, start_is_prior: bool
) -> Callable[[torch.Tensor], _Parts]:
    """``z (C, B, D) -> (log r(z), log p(x|z) + log p(z))``, each ``(C, B)``."""
    prior = vae.prior()

    def log_parts(z: torch.Tensor) -> _Parts:
        log_prior = prior.log_prob(z)
        log_joint = vae.likelihood(z).log_prob(x) + log_prior
        return (log_prior if start_is_prior else r.log_prob(z)), log_joint

    return log_parts


def _run(
    vae: VAE,
    x: torch.Tensor,
    r: Distribution,
    start_is_prior: bool,
    z0: torch.Tensor,
    betas: torch.Tensor,
    step_size: float | torch.Tensor,
    start: str,
    schedule: str,
    leapfrog_steps: int,
    target_accept: float,
    adapt: bool,
    adapt_rate: float,
) -> AISResult:
    chains, batch = z0.shape[:2]
    steps = len(betas) - 1
    eps = torch.as_tensor(step_size, dtype=z0.dtype, device=z0.device)
    if eps.dim() == 2:
        if tuple(eps.shape) != (steps - 1, batch):
            raise ConfigError(
                f"a step-size schedule must have shape ({steps - 1}, {batch}) "
                f"(T - 1, B), got {tuple(eps.shape)}"
            )
    else:
        eps = eps.expand(batch).clone()
    log_w, z, accepted, used = _anneal(
        _log_parts_fn(vae, x, r, start_is_prior),
        z0,
        betas,
        eps,
        leapfrog_steps=leapfrog_steps,
        target_accept=target_accept,
        adapt=adapt,
        adapt_rate=adapt_rate,
    )
    ess, stderr = _ess_and_stderr(log_w)
    if len(accepted):
        rate = accepted.double().mean((0, 1))
    else:
        rate = torch.full((batch,), math.nan, dtype=torch.float64, device=z.device)
    return AISResult(
        log_likelihood=_log_mean_exp(log_w),
        log_weights=log_w,
        mc_stderr=stderr,
        ess=ess,
        acceptance_rate=rate,
        step_sizes=used,
        samples=z,
        steps=steps,
        chains=chains,
        start=start,
        schedule=schedule,
        leapfrog_steps=leapfrog_steps,
        target_accept=target_accept,
        adapt=adapt and eps.dim() == 1,
    )


@dataclass
class BDMCResult:
    """The result of :func:`bdmc`; per-datum tensors ``(N,)`` in float64.

    Args:
        lower: Forward AIS :math:`\\log \\hat p(x)`, a stochastic lower bound.
        upper: Reverse AIS :math:`-\\log \\widehat{1/p(x)}`, a stochastic upper bound.
        gap: ``upper - lower``.
        lower_stderr, upper_stderr: Delta-method Monte Carlo SEs of each, from
            the ESS of the chain weights.
        x: The simulated data ``(N, *event_shape)``.
        z: The latents they were drawn from, ``(N, D)``: exact posterior samples.
        forward: The forward run.
        reverse_log_weights: The reverse chains' log weights ``(C, N)``, each
            an unbiased estimate of :math:`1/p(x)` on the linear scale.
        reverse_acceptance_rate: HMC acceptance rate of the reverse chains.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    gap: torch.Tensor
    lower_stderr: torch.Tensor
    upper_stderr: torch.Tensor
    x: torch.Tensor
    z: torch.Tensor
    forward: AISResult
    reverse_log_weights: torch.Tensor
    reverse_acceptance_rate: torch.Tensor

    @property
    def mean_lower(self) -> float:
        """The lower bound averaged over the data."""
        return float(self.lower.mean())

    @property
    def mean_upper(self) -> float:
        """The upper bound averaged over the data."""
        return float(self.upper.mean())

    @property
    def mean_gap(self) -> float:
        """The gap averaged over the data: a bound on the mean error of either estimate."""
        return float(self.gap.mean())


@torch.no_grad()
def bdmc(
    vae: VAE,
    num_data: int,
    *,
    steps: int = 500,
    chains: int = 16,
    start: str = "prior",
    schedule: str = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float = 0.1,
    target_accept: float = 0.65,
    adapt: bool = True,
    adapt_rate: float = 0.02,
) -> BDMCResult:
    """Sandwich :math:`\\log p(x)` of simulated data between forward and reverse AIS.

    Simulate :math:`z^*_n \\sim p(z)`, :math:`x_n \\sim p(x|z^*_n)`; then
    :math:`z^*_n` is an exact sample of :math:`p(z|x_n) = f_T / Z_T`.

    * Forward AIS (:func:`ais_log_likelihood`, from :math:`r` to the posterior):
      :math:`\\mathbb E[w] = p(x)`, so :math:`\\mathbb E[\\text{lower}] \\le \\log p(x)`.
    * Reverse AIS: the same path walked from :math:`\\beta_T = 1` down to
      :math:`\\beta_0 = 0`, all ``C`` chains starting at :math:`z^*`,
      transitions leaving :math:`f_{t-1}` invariant after each increment:

      .. math::

          \\log w^{\\mathrm{rev}} = \\sum_{t=T}^{1}
              \\big[\\log f_{t-1}(z_t) - \\log f_t(z_t)\\big],
          \\qquad \\mathbb E\\big[w^{\\mathrm{rev}}\\big] = Z_0 / Z_T = 1 / p(x),

          \\text{upper} = -\\log \\frac1C \\sum_{c=1}^C w^{\\mathrm{rev}}_c,
          \\qquad \\mathbb E[\\text{upper}] \\ge \\log p(x)

      (Jensen on :math:`-\\log`; Grosse et al. 2015, Sec. 4). Written with
      the forward-direction sum :math:`\\log \\tilde w = -\\log w^{\\mathrm{rev}}`,
      it is :math:`-\\log \\frac1C \\sum_c \\exp(-\\log \\tilde w_c)`, a
      harmonic mean (Wu et al. 2017, Sec. 4.1).

    The reverse chains use the forward run's step sizes, in reverse order and
    without adaptation: a schedule fixed before they start, so their weights
    are exactly those of AIS and the upper bound holds in expectation. The
    gap ``upper - lower`` bounds, in expectation, the error of either
    estimate on data from the model (not on real data, whose posterior
    samples are unknown).

    Args:
        vae: The model.
        num_data: ``N``, the number of simulated data.
        steps, chains, start, schedule, leapfrog_steps, step_size,
            target_accept, adapt, adapt_rate: As in :func:`ais_log_likelihood`
            (``start`` is also where the reverse chains end; default the prior,
            as in Wu et al. 2017).

    Returns:
        A :class:`BDMCResult`.

    References:
        Grosse, Ghahramani & Adams (2015), "Sandwiching the marginal likelihood
        using bidirectional Monte Carlo".
        Wu, Burda, Salakhutdinov & Grosse (2017), "On the quantitative analysis
        of decoder-based generative models".
    """
    if int(num_data) != num_data or num_data < 1:
        raise ConfigError(f"num_data must be an integer >= 1, got {num_data}")
    _check_settings(steps, chains, leapfrog_steps, step_size, target_accept)
    z_star = vae.prior().sample((num_data,))
    x = vae.likelihood(z_star).sample()
    forward = ais_log_likelihood(
        vae,
        x,
        steps=steps,
        chains=chains,
        start=start,
        schedule=schedule,
        leapfrog_steps=leapfrog_steps,
        step_size=step_size,
        target_accept=target_accept,
        adapt=adapt,
        adapt_rate=adapt_rate,
    )
    r = _start_distribution(vae, x, start, None)
    betas = annealing_schedule(steps, schedule).flip(0)
    z0 = z_star.expand(chains, *z_star.shape).clone()
    reverse = _run(vae, x, r, start == "prior", z0, betas, forward.step_sizes.flip(0),
                   start, schedule, leapfrog_steps, target_accept, False, adapt_rate)  # fmt: skip
    upper = -_log_mean_exp(reverse.log_weights)
    return BDMCResult(
        lower=forward.log_likelihood,
        upper=upper,
        gap=upper - forward.log_likelihood,
        lower_stderr=forward.mc_stderr,
        upper_stderr=reverse.mc_stderr,
        x=x,
        z=z_star,
        forward=forward,
        reverse_log_weights=reverse.log_weights,
        reverse_acceptance_rate=reverse.acceptance_rate,
    )
