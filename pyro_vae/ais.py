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
plain importance sampling with proposal :math:`r`. The transitions must be
fixed before the chains run (or depend on independent randomness only):
HMC step sizes are tuned on separate pilot chains (:func:`ais_log_likelihood`).

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pyro
import torch
from pyro.ops.integrator import potential_grad, velocity_verlet
from torch.distributions import Distribution
from tqdm.auto import tqdm

from .data import check_fits
from .errors import ConfigError
from .model import LATENT_SITE, VAE
from .weights import (
    effective_sample_size,
    log_likelihood_mc_stderr,
    log_mean_exp,
    proposal_distribution,
)

#: Start distributions of the annealing path by name: the guide :math:`q(z|x)` or the prior.
STARTS = ("guide", "prior")
#: Annealing schedules by name (see :func:`annealing_schedule`).
SCHEDULES = ("sigmoid", "linear")
#: Default number of pilot chains per datum that tune the step sizes.
PILOT_CHAINS = 4
#: Steepness :math:`\\delta` of the sigmoid schedule (Wu et al. 2017 use 4).
SIGMOID_RADIUS = 4.0

_Parts = tuple[torch.Tensor, torch.Tensor]
#: ``on_step(n)``: called after each annealing step with the ``n`` (chain, datum) pairs it moved.
StepCallback = Callable[[int], None]


def chain_steps(
    num_data: int, steps: int, chains: int, *, pilot_chains: int = PILOT_CHAINS, tuned: bool = True
) -> int:
    """The work of :func:`ais_log_likelihood` in (chain, datum, annealing step) triples.

    ``T B (C + P)`` with a pilot run of ``P`` chains (``tuned``), else ``T B C``:
    the total its ``on_step`` callback receives, and the unit of its progress bar.

    Args:
        num_data: ``B``.
        steps: ``T``.
        chains: ``C``.
        pilot_chains: ``P``.
        tuned: Whether the step sizes are tuned by a pilot run (``adapt`` with
            a number ``step_size`` and ``T > 1``).
    """
    return steps * num_data * (chains + (pilot_chains if tuned and steps > 1 else 0))


@contextmanager
def _progress(
    progress: bool, total: int, on_step: StepCallback | None, desc: str
) -> Iterator[StepCallback]:
    """A callback that advances a tqdm bar on stderr (when ``progress``) and ``on_step``."""
    with tqdm(
        total=total,
        disable=not progress,
        desc=desc,
        unit="chain-step",
        unit_scale=True,
        smoothing=0,  # the pilot's and main run's rates differ: the average over both
        dynamic_ncols=True,
    ) as bar:

        def advance(n: int) -> None:
            bar.update(n)
            if on_step is not None:
                on_step(n)

        yield advance


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
    if int(steps) != steps or steps < 1:
        raise ConfigError(f"the number of annealing steps T must be an integer >= 1, got {steps}")
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


@dataclass(frozen=True)
class _HMC:
    """HMC and step-size tuning settings (see :func:`ais_log_likelihood`)."""

    leapfrog_steps: int
    target_accept: float
    adapt_rate: float
    jitter: float
    pilot_chains: int

    def check(self, steps: int, chains: int, step_size: float | torch.Tensor) -> None:
        for name, value in (
            ("steps", steps),
            ("chains", chains),
            ("leapfrog_steps", self.leapfrog_steps),
            ("pilot_chains", self.pilot_chains),
        ):
            if int(value) != value or value < 1:
                raise ConfigError(f"{name} must be an integer >= 1, got {value}")
        eps = torch.as_tensor(step_size)
        if eps.numel() and not float(eps.min()) > 0:
            raise ConfigError(f"step_size must be > 0, got {float(eps.min())}")
        if not 0 < self.target_accept < 1:
            raise ConfigError(f"target_accept must be in (0, 1), got {self.target_accept}")
        if not 0 <= self.adapt_rate < 1:
            raise ConfigError(f"adapt_rate must be in [0, 1), got {self.adapt_rate}")
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"jitter must be in [0, 1), got {self.jitter}")


def _identity_kinetic_grad(r: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:math:`\\nabla_p K` of :math:`K(p) = \\lVert p\\rVert^2/2` (unit mass matrix)."""
    return r


def _log_parts_fn(
    vae: VAE, x: torch.Tensor, r: Distribution, start: str
) -> Callable[[torch.Tensor], _Parts]:
    """``z (C, B, D) -> (log r(z), log p(x|z) + log p(z))``, each ``(C, B)``."""
    prior = vae.prior()

    def log_parts(z: torch.Tensor) -> _Parts:
        log_prior = prior.log_prob(z)
        log_joint = vae.likelihood(z).log_prob(x) + log_prior
        return (log_prior if start == "prior" else r.log_prob(z)), log_joint

    return log_parts


def _anneal(
    log_parts: Callable[[torch.Tensor], _Parts],
    z: torch.Tensor,
    betas: torch.Tensor,
    step_size: torch.Tensor,
    hmc: _HMC,
    *,
    adapt: bool,
    on_step: StepCallback | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One AIS run along ``betas`` from ``z`` (``(C, B, D)``, distributed as ``f_{betas[0]}``).

    ``log_parts(z)`` returns :math:`(\\log r(z), \\log p(x, z))`, each ``(C, B)``.
    ``betas`` may decrease (reverse AIS). After each weight increment but the
    last, one HMC transition leaving :math:`f_{\\beta_t}` invariant: a fresh
    momentum :math:`p \\sim \\mathcal N(0, I)`, ``leapfrog_steps`` steps of
    Pyro's velocity Verlet on the potential :math:`U_t = -\\log f_t` (summed
    over chains and data, which leaves each element's gradient its own), and a
    Metropolis test per (chain, datum).

    ``step_size``: ``(T - 1, B)``, one per transition and datum; with
    ``adapt`` only its first row is read and the rest is adapted online from
    the acceptances (the pilot run). ``on_step(C * B)`` is called after each
    of the ``T`` steps.

    Returns:
        ``(log_w (C, B) float64, z (C, B, D), accepted (T - 1, C, B) bool,
        step_sizes (T - 1, B))``.
    """
    chains, batch = z.shape[:2]
    steps = len(betas) - 1
    used = step_size.clone()
    log_w = torch.zeros(chains, batch, dtype=torch.float64, device=z.device)
    accepted = torch.zeros(steps - 1, chains, batch, dtype=torch.bool, device=z.device)
    log_r, log_joint = log_parts(z)
    stash: dict[str, _Parts] = {}  # what the potential last computed, per element
    for t in range(1, steps + 1):
        log_w += (betas[t] - betas[t - 1]).item() * (log_joint - log_r).double()
        if t == steps:  # a last transition would move z, not the weights
            if on_step is not None:
                on_step(chains * batch)
            break
        beta = betas[t].item()

        def potential(zs: dict[str, torch.Tensor], beta: float = beta) -> torch.Tensor:
            parts = log_parts(zs[LATENT_SITE])
            stash["parts"] = (parts[0].detach(), parts[1].detach())
            return -((1 - beta) * parts[0] + beta * parts[1]).sum()

        eps = used[t - 1].expand(chains, batch).unsqueeze(-1)
        if hmc.jitter:  # drawn independently of z: the transition still leaves f_t invariant
            eps = eps * (1 + hmc.jitter * (2 * torch.rand_like(eps) - 1))
        momentum = torch.randn_like(z)
        with torch.enable_grad():
            grads, _ = potential_grad(potential, {LATENT_SITE: z})
            z_new, p_new, _, _ = velocity_verlet(
                {LATENT_SITE: z},
                {LATENT_SITE: momentum},
                potential,
                _identity_kinetic_grad,
                eps,
                hmc.leapfrog_steps,
                z_grads=grads,
            )
        z_new, p_new = z_new[LATENT_SITE], p_new[LATENT_SITE]
        log_r_new, log_joint_new = stash["parts"]
        energy = -((1 - beta) * log_r + beta * log_joint) + 0.5 * momentum.pow(2).sum(-1)
        energy_new = -((1 - beta) * log_r_new + beta * log_joint_new) + 0.5 * p_new.pow(2).sum(-1)
        # Metropolis: accept with probability min(1, exp(-dH)); NaN energies never
        log_alpha = torch.nan_to_num(energy - energy_new, nan=-math.inf).clamp(max=0)
        accept = torch.rand_like(log_alpha).log() < log_alpha
        accepted[t - 1] = accept
        z = torch.where(accept.unsqueeze(-1), z_new, z)
        log_r = torch.where(accept, log_r_new, log_r)
        log_joint = torch.where(accept, log_joint_new, log_joint)
        if adapt and t < steps - 1:
            up = accept.to(used.dtype).mean(0) > hmc.target_accept
            used[t] = used[t - 1] * torch.where(up, 1 + hmc.adapt_rate, 1 - hmc.adapt_rate)
        if on_step is not None:
            on_step(chains * batch)
    return log_w, z, accepted, used


@contextmanager
def _no_validation() -> Iterator[None]:
    """Distributions skip argument validation inside; Pyro's and torch's flags are restored."""
    previous = Distribution._validate_args  # pyro.validation_enabled restores Pyro's flag only
    try:
        with pyro.validation_enabled(False):
            yield
    finally:
        Distribution.set_default_validate_args(previous)


@dataclass
class AISResult:
    """The result of :func:`ais_log_likelihood`; per-datum tensors, float64 where noted.

    Args:
        log_likelihood: :math:`\\log \\hat p(x)`, ``(B,)`` float64.
        log_weights: :math:`\\log w`, ``(C, B)`` float64.
        mc_stderr: Delta-method Monte Carlo SE of ``log_likelihood`` from the
            chains' ESS, :math:`\\sqrt{1/\\mathrm{ESS} - 1/C}`, ``(B,)`` float64
            (valid: the ``C`` chains are independent given the step sizes).
        ess: Kish's effective sample size of the ``C`` weights, ``(B,)`` float64.
        acceptance_rate: HMC acceptance rate over chains and transitions,
            ``(B,)`` float64 (NaN when ``T = 1``: no transitions).
        step_sizes: The leapfrog step size of each transition and datum,
            ``(T - 1, B)``, before the jitter; pass it back as ``step_size``
            to rerun without a pilot.
        samples: The chains' last states :math:`z_{T-1}`, ``(C, B, D)``;
            weighted by ``log_weights``, approximate posterior samples.
        steps: ``T``.
        chains: ``C``.
        start: ``"guide"`` or ``"prior"``.
        schedule: ``"sigmoid"`` or ``"linear"``.
        leapfrog_steps: ``L``.
        jitter: The relative step-size jitter.
        tuned: Whether ``step_sizes`` were tuned by a pilot run.
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
    jitter: float
    tuned: bool


def _step_size_schedule(
    step_size: float | torch.Tensor, steps: int, batch: int, like: torch.Tensor
) -> tuple[torch.Tensor, bool]:
    """``(schedule (T - 1, B), given)``: a number fills it; a tensor must broadcast to it."""
    eps = torch.as_tensor(step_size, dtype=like.dtype, device=like.device)
    if eps.dim() == 0:
        return eps.expand(steps - 1, batch).clone(), False
    if eps.dim() == 2:
        try:
            return eps.expand(steps - 1, batch).clone(), True
        except RuntimeError:
            pass
    raise ConfigError(
        f"step_size must be a number or a schedule of shape (T - 1, B) = ({steps - 1}, {batch}), "
        f"got shape {tuple(eps.shape)}"
    )


def _run(
    log_parts: Callable[[torch.Tensor], _Parts],
    z0: torch.Tensor,
    betas: torch.Tensor,
    step_sizes: torch.Tensor,
    hmc: _HMC,
    *,
    start: str,
    schedule: str,
    tuned: bool,
    on_step: StepCallback | None = None,
) -> AISResult:
    """The main AIS run from ``z0`` ``(C, B, D)`` with a fixed step-size schedule."""
    chains, batch = z0.shape[:2]
    steps = len(betas) - 1
    log_w, z, accepted, used = _anneal(
        log_parts, z0, betas, step_sizes, hmc, adapt=False, on_step=on_step
    )
    ess = effective_sample_size(log_w)
    stderr = log_likelihood_mc_stderr(ess, log_w.shape[0])
    rate = accepted.double().mean((0, 1)) if steps > 1 else torch.full_like(ess, math.nan)
    return AISResult(
        log_likelihood=log_mean_exp(log_w),
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
        leapfrog_steps=hmc.leapfrog_steps,
        jitter=hmc.jitter,
        tuned=tuned,
    )


@torch.no_grad()
def ais_log_likelihood(
    vae: VAE,
    x: torch.Tensor,
    *,
    steps: int = 1000,
    chains: int = 16,
    start: str = "guide",
    schedule: str = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float | torch.Tensor = 0.1,
    adapt: bool = True,
    target_accept: float = 0.65,
    adapt_rate: float = 0.02,
    pilot_chains: int = PILOT_CHAINS,
    jitter: float = 0.2,
    index: torch.Tensor | None = None,
    progress: bool = False,
    on_step: StepCallback | None = None,
) -> AISResult:
    """Per-datum :math:`\\log \\hat p(x)` by annealed importance sampling with HMC transitions.

    .. math::

        \\log f_t(z) = (1 - \\beta_t) \\log r(z) + \\beta_t \\big[\\log p(x|z) + \\log p(z)\\big],

        \\log w_{cb} = \\sum_{t=1}^T (\\beta_t - \\beta_{t-1}) \\big[\\log p(x_b|z^{(c)}_{t-1})
            + \\log p(z^{(c)}_{t-1}) - \\log r(z^{(c)}_{t-1})\\big],

        \\log \\hat p(x_b) = \\operatorname{logsumexp}_{c=1}^C \\log w_{cb} - \\log C,

    with :math:`z_0 \\sim r`, the start distribution (the guide :math:`q(z|x)`
    or the prior :math:`p(z)`; with the prior, :math:`\\log f_t = \\log p(z) +
    \\beta_t \\log p(x|z)`), :math:`\\beta` from :func:`annealing_schedule`, and
    :math:`z_t` one HMC transition from :math:`z_{t-1}` that leaves
    :math:`f_t` invariant, for :math:`t = 1, \\dots, T-1` (the weights never
    read :math:`z_T`, so it is not drawn). :math:`\\mathbb E[w] = p(x)` (Neal
    2001): the estimate is unbiased on the linear scale and a stochastic lower
    bound in log. ``T = 1`` is importance sampling with proposal :math:`r`:
    :math:`\\log w = \\log p(x|z) + \\log p(z) - \\log r(z)`, the weights of
    :func:`pyro_vae.evaluate.log_importance_weights` (the same draws for the
    same seed).

    HMC: unit mass matrix, a fresh momentum per transition, ``leapfrog_steps``
    steps of Pyro's ``velocity_verlet`` vectorized over ``(C, B)`` (the
    potential summed over chains and data: elements do not interact, so each
    gets its own gradient), and a Metropolis test per (chain, datum). Each
    (chain, datum, transition) multiplies the step size by a factor uniform in
    ``[1 - jitter, 1 + jitter]``, drawn independently of the state: the
    transition stays valid and avoids the near-periodic trajectories of a
    fixed step size (Neal 2011, "MCMC using Hamiltonian dynamics", Sec. 5.4.2.2).

    Step sizes, one per transition and datum (shared by its chains), tuned
    so that AIS stays exact. With ``adapt`` (and a number ``step_size``), a
    pilot run of ``pilot_chains`` chains per datum walks the same path first,
    starting from ``step_size`` and multiplying it after each transition by
    ``1 + adapt_rate`` if the datum's pilot acceptance rate exceeded
    ``target_accept``, by ``1 - adapt_rate`` otherwise (the rule of Wu et al.
    2017, Sec. 4: target 0.65, rate 0.02). Its weights are discarded; the
    ``C`` chains then run with its step sizes fixed. Adapting the chains' own
    step sizes from their own acceptances, as Wu et al. do, makes each
    transition depend on the chain's past, outside Neal's proof of
    :math:`\\mathbb E[w] = p(x)`, and couples the chains of a datum (their
    Monte Carlo SE is then understated); with the pilot, given the schedule,
    the chains are independent AIS runs with fixed transitions. The pilot
    costs about ``pilot_chains / C`` of the main run in arithmetic; pass a
    previous result's ``step_sizes`` as ``step_size`` to skip it.

    Draws come from torch's global random number generator (the main chains'
    starting points first, then the pilot): seed it with ``torch.manual_seed``
    for reproducible numbers. Gradients are taken with respect to ``z`` only,
    inside ``torch.enable_grad()``; all else runs under ``torch.no_grad()``.
    The data are checked against the likelihood's support once
    (:func:`~pyro_vae.data.check_fits`); distributions built inside the loop
    skip re-validation.

    Args:
        vae: The model (in ``eval()`` mode if its networks use dropout or
            batch norm).
        x: Data ``(B, *event_shape)``.
        steps: ``T``, the number of annealing steps (weight increments); the
            cost is about ``(T - 1) (L + 1)`` decoder gradients of ``C B``
            points (plus the pilot's).
        chains: ``C``, independent AIS chains per datum.
        start: ``"guide"`` (:math:`q(z|x)`) or ``"prior"``.
        schedule: ``"sigmoid"`` or ``"linear"`` (:func:`annealing_schedule`).
        leapfrog_steps: ``L``, leapfrog steps per HMC transition.
        step_size: A number (the pilot's first step size, or the constant one
            without ``adapt``), or a schedule ``(T - 1, B)`` used as it is.
        adapt: Tune the step sizes with a pilot run (for a number ``step_size``).
        target_accept: The pilot's target acceptance rate.
        adapt_rate: The pilot's relative change of the step size per transition.
        pilot_chains: Pilot chains per datum.
        jitter: Relative half-width of the random step-size factor (0: none).
        index: Positions of ``x`` in the training set, for non-amortized guides.
        progress: Show a progress bar on stderr, in (chain, datum, step)
            triples (:func:`chain_steps`), with the time left.
        on_step: Called after each annealing step (pilot and main run) with
            the number of (chain, datum) pairs it moved; the calls add up to
            :func:`chain_steps`.

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
    hmc = _HMC(leapfrog_steps, target_accept, adapt_rate, jitter, pilot_chains)
    hmc.check(steps, chains, step_size)
    check_fits(x, vae.event_shape, vae.likelihood.support, type(vae.likelihood).__name__, "x")
    betas = annealing_schedule(steps, schedule)
    with _no_validation():
        r = proposal_distribution(vae, x, start, index)
        log_parts = _log_parts_fn(vae, x, r, start)
        z0 = r.sample((chains,))
        step_sizes, given = _step_size_schedule(step_size, steps, len(x), z0)
        tuned = adapt and not given and steps > 1
        total = chain_steps(len(x), steps, chains, pilot_chains=pilot_chains, tuned=tuned)
        with _progress(progress, total, on_step, "AIS") as advance:
            if tuned:
                pilot = r.sample((pilot_chains,))
                step_sizes = _anneal(
                    log_parts, pilot, betas, step_sizes, hmc, adapt=True, on_step=advance
                )[3]
            return _run(log_parts, z0, betas, step_sizes, hmc, start=start, schedule=schedule,
                        tuned=tuned, on_step=advance)  # fmt: skip


@dataclass
class BDMCResult:
    """The result of :func:`bdmc`; per-datum tensors ``(N,)`` in float64.

    Args:
        lower: Forward AIS :math:`\\log \\hat p(x)`, a stochastic lower bound.
        upper: Reverse AIS :math:`-\\log \\frac1C \\sum_c w^{\\mathrm{rev}}_c`,
            a stochastic upper bound.
        gap: ``upper - lower``.
        lower_stderr: Delta-method Monte Carlo SE of ``lower``.
        upper_stderr: Delta-method Monte Carlo SE of ``upper`` (from the ESS
            of the reverse weights).
        x: The simulated data ``(N, *event_shape)``.
        z: The latents they were drawn from, ``(N, D)``: exact posterior samples.
        forward: The forward run.
        reverse: The reverse run: its ``log_weights`` ``(C, N)`` are
            :math:`\\log w^{\\mathrm{rev}}`, each unbiased for :math:`1/p(x)` on
            the linear scale, and its ``log_likelihood`` is ``-upper``.
    """

    lower: torch.Tensor
    upper: torch.Tensor
    gap: torch.Tensor
    lower_stderr: torch.Tensor
    upper_stderr: torch.Tensor
    x: torch.Tensor
    z: torch.Tensor
    forward: AISResult
    reverse: AISResult

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
        """The gap averaged over the data: in expectation, a bound on the mean error of either."""
        return float(self.gap.mean())


@torch.no_grad()
def bdmc(
    vae: VAE,
    num_data: int,
    *,
    steps: int = 1000,
    chains: int = 16,
    start: str = "prior",
    schedule: str = "sigmoid",
    leapfrog_steps: int = 10,
    step_size: float | torch.Tensor = 0.1,
    adapt: bool = True,
    target_accept: float = 0.65,
    adapt_rate: float = 0.02,
    pilot_chains: int = PILOT_CHAINS,
    jitter: float = 0.2,
    progress: bool = False,
) -> BDMCResult:
    """Sandwich :math:`\\log p(x)` of simulated data between forward and reverse AIS.

    Simulate :math:`z^*_n \\sim p(z)`, :math:`x_n \\sim p(x|z^*_n)`
    (``vae.likelihood(z).sample()``); then :math:`z^*_n` is an exact sample of
    :math:`p(z|x_n) = f_T / Z_T`.

    * Forward AIS (:func:`ais_log_likelihood` from :math:`r`, the prior by
      default): :math:`\\mathbb E[w] = p(x)`, so
      :math:`\\mathbb E[\\text{lower}] \\le \\log p(x)` (Jensen).
    * Reverse AIS: the same path walked from :math:`\\beta_T = 1` down to
      :math:`\\beta_0 = 0`, all ``C`` chains starting at :math:`z^*_n`, with
      an HMC transition leaving :math:`f_{t-1}` invariant after each
      increment but the last. It is forward AIS from the normalized
      :math:`f_T / p(x)` to :math:`f_0 = r` (:math:`Z_0 = 1`), so

      .. math::

          \\log w^{\\mathrm{rev}} = \\sum_{t=T}^{1}
              \\big[\\log f_{t-1}(z_t) - \\log f_t(z_t)\\big],
          \\qquad \\mathbb E\\big[w^{\\mathrm{rev}}\\big] = \\frac{Z_0}{Z_T} = \\frac{1}{p(x)},

          \\text{upper} = -\\log \\frac1C \\sum_{c=1}^C w^{\\mathrm{rev}}_c,
          \\qquad \\mathbb E[\\text{upper}] \\ge -\\log \\mathbb E\\big[w^{\\mathrm{rev}}\\big]
          = \\log p(x)

      (Jensen on the convex :math:`-\\log`; Grosse, Ghahramani & Adams 2015,
      Sec. 3-4; Wu et al. 2017, Sec. 4.1). With :math:`\\log \\tilde w =
      -\\log w^{\\mathrm{rev}}`, the sum written in the forward direction, it is
      :math:`-\\log \\frac1C \\sum_c \\exp(-\\log \\tilde w_c)`.

    Both directions use the same step-size schedule (the reverse one in
    reverse order), tuned by the forward run's pilot: fixed before either
    main run starts, so both are exact AIS. The gap ``upper - lower`` bounds,
    in expectation, the error of either estimate on data simulated from the
    model (not on real data, whose exact posterior samples are unknown: there
    it says how many steps suffice).

    Args:
        vae: The model.
        num_data: ``N``, the number of simulated data.
        steps: ``T``, as in :func:`ais_log_likelihood`, for both directions.
        chains: ``C`` per datum and direction.
        start: ``"prior"`` (as in Wu et al. 2017) or ``"guide"``: where the
            forward chains start and the reverse chains end.
        schedule: As in :func:`ais_log_likelihood`.
        leapfrog_steps: As in :func:`ais_log_likelihood`.
        step_size: As in :func:`ais_log_likelihood`.
        adapt: As in :func:`ais_log_likelihood`.
        target_accept: As in :func:`ais_log_likelihood`.
        adapt_rate: As in :func:`ais_log_likelihood`.
        pilot_chains: As in :func:`ais_log_likelihood`.
        jitter: As in :func:`ais_log_likelihood`.
        progress: Show one progress bar on stderr over both directions, with
            the time left.

    Returns:
        A :class:`BDMCResult`.

    References:
        Grosse, Ghahramani & Adams (2015), "Sandwiching the marginal likelihood
        using bidirectional Monte Carlo".
        Wu, Burda, Salakhutdinov & Grosse (2017), "On the quantitative analysis
        of decoder-based generative models".
        Neal (2001), "Annealed importance sampling".
    """
    if int(num_data) != num_data or num_data < 1:
        raise ConfigError(f"num_data must be an integer >= 1, got {num_data}")
    hmc = _HMC(leapfrog_steps, target_accept, adapt_rate, jitter, pilot_chains)
    hmc.check(steps, chains, step_size)
    with _no_validation():
        z_star = vae.prior().sample((num_data,))
        x = vae.likelihood(z_star).sample()
    tuned = adapt and torch.as_tensor(step_size).dim() == 0  # as ais_log_likelihood
    total = chain_steps(num_data, steps, chains, pilot_chains=pilot_chains, tuned=tuned)
    total += chain_steps(num_data, steps, chains, tuned=False)  # the reverse run
    with _progress(progress, total, None, "BDMC") as advance:
        forward = ais_log_likelihood(
            vae, x, steps=steps, chains=chains, start=start, schedule=schedule,
            leapfrog_steps=leapfrog_steps, step_size=step_size, adapt=adapt,
            target_accept=target_accept, adapt_rate=adapt_rate, pilot_chains=pilot_chains,
            jitter=jitter, on_step=advance,
        )  # fmt: skip
        betas = annealing_schedule(steps, schedule).flip(0)
        with _no_validation():
            r = proposal_distribution(vae, x, start, None)
            z0 = z_star.expand(chains, *z_star.shape).clone()
            reverse = _run(_log_parts_fn(vae, x, r, start), z0, betas,
                           forward.step_sizes.flip(0), hmc, start=start, schedule=schedule,
                           tuned=forward.tuned, on_step=advance)  # fmt: skip
    upper = -reverse.log_likelihood
    return BDMCResult(
        lower=forward.log_likelihood,
        upper=upper,
        gap=upper - forward.log_likelihood,
        lower_stderr=forward.mc_stderr,
        upper_stderr=reverse.mc_stderr,
        x=x,
        z=z_star,
        forward=forward,
        reverse=reverse,
    )
