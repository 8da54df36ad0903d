r"""The one ELBO evaluator and the one per-datum refinement of q.

Every number that is "an ELBO" in pyro-vae comes from :func:`elbo_terms`:
the epoch metrics (:func:`evaluate_elbo`), variational EM's bound on the
training set, the gap
decomposition and the EM E-step (:func:`refine_step`).

.. math::

    \mathrm{ELBO}(x) = \underbrace{\mathbb E_{q(z|x)}[\log p(x|z)]}_{\text{reconstruction}}
        - \underbrace{\mathrm{KL}(q(z|x) \,\|\, p(z))}_{\text{kl}},

the expectation by reparameterized draws, the KL in closed form where
:func:`torch.distributions.kl_divergence` has one for the pair (q, p) and
otherwise by the same draws, :math:`\log q(z|x) - \log p(z)`.

Reference: Kingma & Welling (2014), "Auto-Encoding Variational Bayes", eq. 10.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyro.distributions as dist
import torch
from torch.distributions import Distribution

from .errors import ConfigError
from .model import VAE, analytic_kl, kl_per_dim


@dataclass
class ELBOTerms:
    """Per-datum ELBO parts, in nats.

    Args:
        reconstruction: :math:`\\mathbb E_q[\\log p(x|z)]`, ``(B,)``.
        kl: :math:`\\mathrm{KL}(q\\|p)`, ``(B,)``.
        kl_per_dim: The closed-form KL of each latent dimension ``(B, D)``
            where q and p factorize over dimensions, else ``None``.
    """

    reconstruction: torch.Tensor
    kl: torch.Tensor
    kl_per_dim: torch.Tensor | None

    @property
    def elbo(self) -> torch.Tensor:
        """``reconstruction - kl``, ``(B,)``."""
        return self.reconstruction - self.kl


def elbo_terms(
    vae: VAE,
    x: torch.Tensor,
    index: torch.Tensor | None = None,
    *,
    q: Distribution | None = None,
    num_particles: int = 1,
) -> ELBOTerms:
    """The ELBO of each datum of ``x`` from ``num_particles`` reparameterized draws of q.

    Args:
        vae: The model.
        x: Data ``(B, *event_shape)``.
        index: Positions of ``x`` in the training set (per-datum guides).
        q: The variational distribution, batch ``(B,)``, event ``(D,)``;
            default the guide's :math:`q(z|x)`.
        num_particles: Draws of z per datum (the expectation is their mean).

    Returns:
        :class:`ELBOTerms`; differentiable (call under ``torch.no_grad()`` to evaluate).
    """
    if q is None:
        q = vae.posterior(x, index)
    p = vae.prior()
    z = q.rsample() if num_particles == 1 else q.rsample((num_particles,))
    reconstruction = vae.likelihood(z).log_prob(x)
    per_dim = kl_per_dim(q, p)  # when q and p factorize: the KL once, per dimension
    kl = per_dim.sum(-1) if per_dim is not None else analytic_kl(q, p)
    if kl is None:
        kl = q.log_prob(z) - p.log_prob(z)
        if num_particles > 1:
            kl = kl.mean(0)
    if num_particles > 1:
        reconstruction = reconstruction.mean(0)
    return ELBOTerms(reconstruction, kl, per_dim)


def _positions(vae: VAE, start: int, batch: torch.Tensor) -> torch.Tensor | None:
    """Training-set positions of a batch, for a guide without q(z|x) for unseen data."""
    if vae.posterior.is_amortized:
        return None
    return torch.arange(start, start + len(batch), device=batch.device)


@torch.no_grad()
def evaluate_elbo(vae: VAE, x: torch.Tensor, batch_size: int = 1024) -> dict[str, Any]:
    """Per-datum mean ELBO, reconstruction and KL of ``x`` (one z draw per datum).

    A per-datum (non-amortized) guide evaluates its own training data:
    ``x[i]`` is taken to be training datum ``i``.

    Returns:
        ``{"elbo", "reconstruction", "kl"}`` in nats per datum, with
        ``elbo = reconstruction - kl``, and ``"kl_per_dim"`` (a list of ``D``
        floats, the mean closed-form KL of each latent dimension) where
        :func:`~pyro_vae.model.kl_per_dim` defines it, else ``None``.
    """
    rec_sum = kl_sum = 0.0
    per_dim: torch.Tensor | None = None
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        terms = elbo_terms(vae, batch, _positions(vae, start, batch))
        rec_sum += float(terms.reconstruction.sum())
        kl_sum += float(terms.kl.sum())
        if terms.kl_per_dim is not None:
            dims = terms.kl_per_dim.sum(0)
            per_dim = dims if per_dim is None else per_dim + dims
    rec_mean, kl_mean = rec_sum / len(x), kl_sum / len(x)
    return {
        "elbo": rec_mean - kl_mean,
        "reconstruction": rec_mean,
        "kl": kl_mean,
        "kl_per_dim": None if per_dim is None else (per_dim / len(x)).tolist(),
    }


# --- the per-datum refinement of q (gap decomposition, EM E-step) ----------------------


class RowAdam:
    """Adam (Kingma & Ba 2015) for per-datum parameters: each row has its own state.

    ``step(index, grads)`` updates only the rows ``index`` and advances only
    their step counts, so a datum's parameters move exactly when the datum is
    in the minibatch (``torch.optim.Adam`` would keep moving every row with
    its momentum).

    Args:
        params: Tensors of shape ``(N, ...)``, updated in place.
        lr: Step size.
        betas: Decay rates of the first and second moment estimates.
        eps: Term added to the denominator.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.params[0].shape[0], device=self.params[0].device)

    @torch.no_grad()
    def step(self, index: torch.Tensor | None, grads: Sequence[torch.Tensor]) -> None:
        """One Adam step on the rows ``index`` (unique; ``None``: every row, in order)."""
        beta1, beta2 = self.betas
        if index is None:  # every row: the same arithmetic without gathering and scattering
            self.steps += 1
            t = self.steps
            for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads, strict=True):
                shape = (-1,) + (1,) * (p.dim() - 1)
                m.copy_(beta1 * m + (1 - beta1) * g)
                v.copy_(beta2 * v + (1 - beta2) * g * g)
                m_hat = m / (1 - beta1 ** t.view(shape))
                v_hat = v / (1 - beta2 ** t.view(shape))
                p -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
            return
        self.steps[index] += 1
        t = self.steps[index]
        for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            m_rows = beta1 * m[index] + (1 - beta1) * g
            v_rows = beta2 * v[index] + (1 - beta2) * g * g
            m[index], v[index] = m_rows, v_rows
            m_hat = m_rows / (1 - beta1 ** t.view(shape))
            v_hat = v_rows / (1 - beta2 ** t.view(shape))
            p[index] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict[str, Any]:
        """The moment estimates and step counts."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (in place, on the parameters' device)."""
        with torch.no_grad():
            for mine, theirs in zip(self.exp_avg, state["exp_avg"], strict=True):
                mine.copy_(theirs)
            for mine, theirs in zip(self.exp_avg_sq, state["exp_avg_sq"], strict=True):
                mine.copy_(theirs)
            self.steps.copy_(state["steps"])


def refine_step(
    vae: VAE,
    x: torch.Tensor,
    index: torch.Tensor | None,
    loc: torch.Tensor,
    log_scale: torch.Tensor,
    optimizer: RowAdam,
    *,
    num_particles: int = 1,
    kl_scale: float = 1.0,
) -> torch.Tensor:
    r"""One Adam step on the diagonal Normals :math:`q_i`, ``i`` in ``index``, the model fixed.

    Maximizes :math:`\sum_i \mathbb E_{q_i}[\log p(x_i|z)] - \beta\,\mathrm{KL}(q_i\|p)`
    (:func:`elbo_terms`) over the rows ``index`` of ``(loc, log_scale)``, the
    model frozen (no gradient reaches its parameters). The per-datum
    optimization of Cremer, Li & Duvenaud (2018) and the E-step of
    variational EM (Neal & Hinton 1998).

    Args:
        vae: The model.
        x: Data ``(B, *event_shape)``; ``x[b]`` belongs to row ``index[b]``.
        index: Rows ``(B,)``, unique; ``None``: every row (``N = B``).
        loc: :math:`\mu`, ``(N, D)``, a leaf that requires grad.
        log_scale: :math:`\log\sigma`, ``(N, D)``, likewise.
        optimizer: A :class:`RowAdam` over ``[loc, log_scale]``.
        num_particles: Draws of z per datum.
        kl_scale: β.

    Returns:
        The per-datum objective before the step, ``(B,)`` (detached).
    """
    with torch.enable_grad():
        rows = (loc, log_scale) if index is None else (loc[index], log_scale[index])
        q = dist.Normal(rows[0], rows[1].exp()).to_event(1)
        terms = elbo_terms(vae, x, q=q, num_particles=num_particles)
        objective = terms.reconstruction - kl_scale * terms.kl
        grads = torch.autograd.grad(-objective.sum(), [loc, log_scale])
    optimizer.step(index, grads if index is None else [g[index] for g in grads])
    return objective.detach()


@dataclass
class Refinement:
    """What :func:`refine_posterior` returns.

    Args:
        loc: :math:`\\mu^*`, ``(B, D)``.
        scale: :math:`\\sigma^*`, ``(B, D)``.
        steps: Optimizer steps taken.
        history: Mean ELBO estimate over the batch at each step (nats per datum).
    """

    loc: torch.Tensor
    scale: torch.Tensor
    steps: int
    history: list[float]

    def distribution(self) -> dist.Independent:
        """The refined posterior :math:`q^* = \\mathcal N(\\mu^*, \\mathrm{diag}\\,\\sigma^{*2})`.

        Returns:
            A diagonal Normal, batch shape ``(B,)``, event shape ``(D,)``.
        """
        return dist.Normal(self.loc, self.scale).to_event(1)


def refine_posterior(
    vae: VAE,
    x: torch.Tensor,
    loc: torch.Tensor,
    scale: torch.Tensor,
    *,
    num_particles: int = 10,
    lr: float = 1e-2,
    max_steps: int = 2000,
    window: int = 50,
    tol: float = 1e-2,
    polish_steps: int | None = None,
) -> Refinement:
    """One diagonal Normal per datum, decoder frozen: :math:`q^*_b = \\arg\\max \\mathrm{ELBO}`.

    Repeats :func:`refine_step` on every datum of the batch. Every ``window``
    steps, the mean ELBO of the last window is compared with the window
    before; the search stops when the gain is below ``tol`` nats per datum, or
    after ``max_steps``. At a constant step the iterates then jitter around
    the optimum (Monte Carlo gradients), which costs about 0.01 to 0.05 nats;
    ``polish_steps`` more steps with twice the draws and the rate decaying
    linearly to zero, whose second half is averaged (Polyak & Juditsky
    1992), bring the mean shortfall against the exact optimum under 0.002
    nats (tested on the linear-Gaussian model, D = 2 and 8, and on a 2-D
    model by Gauss-Hermite quadrature). This is the
    "optimal local posterior" of Cremer et al. (2018), "Inference
    suboptimality in variational autoencoders".

    Args:
        vae: The model; its parameters are not changed.
        x: Data ``(B, *event_shape)``.
        loc: Initial means ``(B, D)`` (e.g. the encoder's).
        scale: Initial standard deviations ``(B, D)``.
        num_particles: Draws of z per datum per step.
        lr: Adam learning rate on ``(loc, log scale)``.
        max_steps: Cap on the steps.
        window: Steps per window of the stopping rule.
        tol: Smallest gain (nats per datum, window mean to window mean) that continues.
        polish_steps: Steps of the decaying, averaged phase (0: keep the last
            iterate); default ``min(1200, max_steps)``.
    """
    if polish_steps is None:
        polish_steps = min(1200, max_steps)
    if max_steps < 1 or window < 1 or num_particles < 1 or polish_steps < 0:
        raise ConfigError(
            "refine_posterior: max_steps, window and num_particles must be >= 1, polish_steps >= 0"
        )
    loc = loc.detach().clone().requires_grad_(True)
    log_scale = scale.detach().log().clone().requires_grad_(True)
    optimizer = RowAdam([loc, log_scale], lr=lr)
    history: list[float] = []
    steps = 0
    for steps in range(1, max_steps + 1):  # noqa: B007  (steps is returned)
        elbo = refine_step(vae, x, None, loc, log_scale, optimizer, num_particles=num_particles)
        history.append(float(elbo.mean()))
        if steps >= 2 * window and steps % window == 0:
            gain = np.mean(history[-window:]) - np.mean(history[-2 * window : -window])
            if gain < tol:
                break
    mean_loc, mean_log_scale = torch.zeros_like(loc), torch.zeros_like(log_scale)
    averaged = 0
    for t in range(polish_steps):
        optimizer.lr = lr * (1 - t / polish_steps)
        elbo = refine_step(vae, x, None, loc, log_scale, optimizer, num_particles=2 * num_particles)
        history.append(float(elbo.mean()))
        if 2 * t >= polish_steps:  # average the second half
            averaged += 1
            mean_loc += (loc.detach() - mean_loc) / averaged
            mean_log_scale += (log_scale.detach() - mean_log_scale) / averaged
    if averaged:
        loc, log_scale = mean_loc, mean_log_scale
    return Refinement(loc.detach(), log_scale.detach().exp(), steps + polish_steps, history)


def fit_local_posterior(vae: VAE, x: torch.Tensor, **options: Any) -> dist.Independent:
    """A diagonal Normal for data that a non-amortized guide has no parameters for.

    Runs :func:`refine_posterior` from :math:`\\mathcal N(0, I)`; ``options`` go to it.
    It serves as an importance sampling proposal, where the last 0.01 nats do not
    matter, so the polishing phase is off unless ``polish_steps`` is given.
    """
    options.setdefault("polish_steps", 0)
    zeros = torch.zeros(x.shape[0], vae.latent_dim, device=x.device, dtype=x.dtype)
    return refine_posterior(vae, x, zeros, torch.ones_like(zeros), **options).distribution()


__all__ = [
    "ELBOTerms",
    "Refinement",
    "RowAdam",
    "elbo_terms",
    "evaluate_elbo",
    "fit_local_posterior",
    "refine_posterior",
    "refine_step",
]
