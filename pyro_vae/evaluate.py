"""log p(x) by importance sampling, the IWAE bounds, diagnostics, and the gap decomposition.

The ELBO is a lower bound; the marginal likelihood itself is estimated by
importance sampling with the guide as proposal (Burda, Grosse & Salakhutdinov
2016):

.. math::

    \\log w_k = \\log p(x \\mid z_k) + \\log p(z_k) - \\log q(z_k \\mid x),
    \\quad z_k \\sim q(z \\mid x),

    \\log \\hat p(x) = \\operatorname{logsumexp}_{k=1}^K \\log w_k - \\log K.

:func:`log_importance_weights` computes the per-datum log weights, shape
``[K, B]`` (particles first), vectorized over particles and data, in chunks
of about ``chunk_size`` samples under ``torch.no_grad()``, so memory stays
bounded at any K. (Pyro's ``vectorized_importance_weights`` and
``psis_diagnostic`` sum the log weights over the data plate: one weight per
minibatch, not per datum.)

From the same weights: the IWAE bounds :math:`\\mathcal L_K` (with
:math:`\\mathcal L_1` the ELBO), the effective sample size
:math:`(\\sum_k w_k)^2 / \\sum_k w_k^2`, and the Pareto-smoothed IS shape
:math:`\\hat k` (arviz's PSIS fit, batched; Vehtari et al. 2024), above 0.7 of which the estimate
of that datum is unreliable.

The gap decomposition (Cremer, Li & Duvenaud 2018):

.. math::

    \\underbrace{\\log p(x) - \\mathrm{ELBO}(q_\\phi)}_{\\text{total gap}}
    = \\underbrace{\\log p(x) - \\mathrm{ELBO}(q^*)}_{\\text{approximation gap}}
    + \\underbrace{\\mathrm{ELBO}(q^*) - \\mathrm{ELBO}(q_\\phi)}_{\\text{amortization gap}},

where :math:`q^*` is the best diagonal Normal for each datum alone (decoder
frozen), found by :func:`refine_posterior` from the encoder's output. Since
:math:`\\log p(x) - \\mathrm{ELBO}(q) = \\mathrm{KL}(q \\| p(z|x))`, each gap is
a KL divergence.

References:
    Burda, Grosse & Salakhutdinov (2016), "Importance weighted autoencoders".
    Cremer, Li & Duvenaud (2018), "Inference suboptimality in variational
    autoencoders".
    Vehtari, Simpson, Gelman, Yao & Gabry (2024), "Pareto smoothed importance
    sampling".
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from torch.distributions import Distribution
from tqdm.auto import tqdm

from .data import check_fits
from .elbo import fit_local_posterior, refine_posterior
from .errors import ConfigError, NonFiniteLossError, PyroVAEWarning, UserError
from .exact import linear_gaussian
from .files import atomic_write_bytes, run_lock
from .model import DATA_PLATE, LATENT_SITE, VAE
from .objectives import IWAE_ELBO
from .weights import PROPOSALS, Proposal, proposal_distribution
from .weights import effective_sample_size as effective_sample_size  # re-exported
from .weights import log_likelihood_mc_stderr as log_likelihood_mc_stderr
from .weights import log_mean_exp as log_mean_exp

#: Where the time estimates of long evaluations go (INFO; no handler here: the CLI adds one).
logger = logging.getLogger(__name__)

#: :math:`\\hat k` above which an importance sampling estimate is unreliable.
KHAT_THRESHOLD = 0.7
#: Fewest samples for which arviz can fit the Pareto tail (more than 4 tail draws).
MIN_KHAT_SAMPLES = 25
#: What the two errors of a mean log p(x) are (``evaluation.json`` carries these labels).
ERROR_LABELS = {
    "log_likelihood_stderr": "SE over data: standard deviation of the per-datum log p(x) / sqrt(n)",
    "log_likelihood_mc_stderr": "Monte Carlo SE: the error of the mean from the K draws alone",
}
#: File names written into the run directory by :func:`evaluate_run`.
EVALUATION_FILE = "evaluation.json"
PER_DATUM_FILE = "evaluation_per_datum.npz"


# --- per-datum log weights and what follows from them ---------------------------


def _proposal_guide(r: Distribution) -> Callable[..., torch.Tensor]:
    """A Pyro guide that samples the latent site from ``r`` (batch ``(B,)``) in the data plate."""

    def guide(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        with pyro.plate(DATA_PLATE, x.shape[0], dim=-1):
            return pyro.sample(LATENT_SITE, r)

    return guide


@torch.no_grad()
def log_importance_weights(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int,
    *,
    proposal: Proposal = "guide",
    index: torch.Tensor | None = None,
    chunk_size: int = 4096,
    validate: bool = False,
) -> torch.Tensor:
    """Per-datum importance log weights, shape ``[K, B]``.

    .. math::

        \\log w_{kb} = \\log p(x_b \\mid z_{kb}) + \\log p(z_{kb}) - \\log r(z_{kb} \\mid x_b),
        \\quad z_{kb} \\sim r(z \\mid x_b),

    with the proposal :math:`r` the guide :math:`q(z|x)` (``"guide"``), the
    prior (``"prior"``: then :math:`\\log w = \\log p(x|z)`), or any
    distribution with batch shape ``(B,)`` and event shape ``(D,)``.
    The weights are those of the IWAE objective,
    :meth:`~pyro_vae.objectives.IWAE_ELBO.log_weights` of ``(vae.model, r)``
    (one computation for training and evaluation), ``max(1, chunk_size // B)``
    vectorized particles at a time, so memory is bounded by ``chunk_size``
    decoder outputs whatever ``K`` is.

    The data are checked against the likelihood's support and datum shape
    once, before sampling (:func:`~pyro_vae.data.check_fits`); with
    ``validate=False`` (the default) Pyro and the distributions built inside
    the loop skip re-validating (about 10% of the time, for a 784-400-50
    MLP), and NaN weights raise instead.

    Args:
        vae: The model.
        x: A minibatch ``(B, *event_shape)``.
        num_samples: ``K >= 1``.
        proposal: ``"guide"``, ``"prior"`` or a ``Distribution``.
        index: Positions of ``x`` in the training set, for non-amortized guides.
        chunk_size: About how many ``(particle, datum)`` pairs per decoder call.
        validate: Also validate every chunk's distributions (slower).

    Returns:
        ``log_w`` of shape ``(K, B)``; ``logsumexp(log_w, 0) - log K`` is
        :math:`\\log \\hat p(x)`, unbiased for :math:`p(x)` on the linear scale.

    Example:
        >>> log_w = log_importance_weights(vae, x, 1000)  # doctest: +SKIP
        >>> log_p = torch.logsumexp(log_w, 0) - math.log(1000)  # doctest: +SKIP
    """
    if num_samples < 1:
        raise ConfigError(f"the number of importance samples K must be >= 1, got {num_samples}")
    support = vae.likelihood.support
    check_fits(x, vae.event_shape, support, type(vae.likelihood).__name__, "the data")
    batch = x.shape[0]
    r = proposal_distribution(vae, x, proposal, index)
    out = torch.empty(num_samples, batch, device=x.device, dtype=x.dtype)
    start = 0
    for log_w in _log_weight_chunks(vae, x, num_samples, r, index, chunk_size, validate):
        out[start : start + len(log_w)] = log_w
        start += len(log_w)
    return out


def _log_weight_chunks(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int,
    r: Distribution,
    index: torch.Tensor | None,
    chunk_size: int,
    validate: bool = False,
) -> Iterator[torch.Tensor]:
    """The ``[K, B]`` log weights of :func:`log_importance_weights`, ``[k, B]`` at a time.

    Raises:
        NonFiniteLossError: a chunk holds NaN weights.
    """
    guide = _proposal_guide(r)
    per_chunk = max(1, chunk_size // x.shape[0])
    previous = Distribution._validate_args  # pyro.validation_enabled restores Pyro's flag only
    try:
        with torch.no_grad(), pyro.validation_enabled(validate):
            for start in range(0, num_samples, per_chunk):
                k = min(per_chunk, num_samples - start)
                objective = IWAE_ELBO(
                    num_particles=k, vectorize_particles=k > 1, max_plate_nesting=1
                )
                log_w, _ = objective.log_weights(vae.model, guide, x, index)
                if torch.isnan(log_w).any():
                    raise NonFiniteLossError(
                        "the log importance weights are NaN: the model gives non-finite densities"
                    )
                yield log_w.reshape(k, x.shape[0])
    finally:
        Distribution.set_default_validate_args(previous)


def khat_tail_size(num_samples: int) -> int:
    """How many of the largest of ``K`` weights the Pareto fit of :func:`pareto_khat` reads.

    arviz's PSIS fits the ``M = ceil(min(K/5, 3 sqrt(K)))`` largest weights
    above the ``(M+1)``-th largest, so :math:`\\hat k` depends on the ``M + 1``
    largest only.
    """
    return int(math.ceil(min(num_samples / 5.0, 3 * math.sqrt(num_samples)))) + 1


class WeightStatistics:
    """Per-datum summaries of ``K`` log weights that arrive in chunks, in bounded memory.

    Accumulates, in float64, what :func:`evaluate` reports: :math:`\\log \\hat p(x)`
    (a running log-sum-exp), the ESS (log-sum-exps of :math:`w` and :math:`w^2`),
    the mean log weight (the ELBO for the guide proposal), the IWAE bounds
    :math:`\\mathcal L_{K'}` (disjoint groups of ``K'`` consecutive weights, as
    :func:`iwae_bounds`) and :math:`\\hat k` from the largest
    :func:`khat_tail_size` weights (as :func:`pareto_khat`). Memory is
    ``O(B (len(ks) + 3 sqrt(K)))`` whatever ``K`` is.

    Args:
        num_samples: ``K``, the number of weights that will arrive per datum.
        batch: ``B``.
        ks: The IWAE bounds to compute (each ``<= K``).
        khat: Keep the tail for :math:`\\hat k`.
        device: Where to accumulate (that of the weights).
    """

    def __init__(
        self,
        num_samples: int,
        batch: int,
        ks: Sequence[int] = (),
        khat: bool = True,
        device: torch.device | str = "cpu",
    ) -> None:
        self.num_samples, self.batch, self.seen = num_samples, batch, 0
        zeros = partial(torch.zeros, batch, dtype=torch.float64, device=device)
        self.lse, self.lse2 = zeros() - math.inf, zeros() - math.inf
        self.total = zeros()
        # per IWAE K: [sum of completed group estimates, open group's log-sum-exp, its size]
        self.groups = {int(k): [zeros(), zeros() - math.inf, 0] for k in ks}
        self.tail_size = khat_tail_size(num_samples) if khat else 0
        if num_samples < MIN_KHAT_SAMPLES:
            self.tail_size = 0
        self.tail: list[torch.Tensor] = []
        self.tail_rows = 0

    def update(self, log_w: torch.Tensor) -> None:
        """Add the next ``[k, B]`` log weights."""
        w = log_w.detach().to(self.lse.device, torch.float64)
        self.lse = torch.logaddexp(self.lse, torch.logsumexp(w, 0))
        self.lse2 = torch.logaddexp(self.lse2, torch.logsumexp(2 * w, 0))
        self.total += w.sum(0)
        self.seen += len(w)
        for k, group in self.groups.items():
            self._update_group(k, group, w)
        if self.tail_size:
            self.tail.append(w)
            self.tail_rows += len(w)
            if self.tail_rows >= 2 * self.tail_size:
                self._shrink_tail()

    @staticmethod
    def _update_group(k: int, group: list[Any], w: torch.Tensor) -> None:
        i, n = 0, len(w)
        if group[2]:  # finish the open group
            take = min(k - group[2], n)
            group[1] = torch.logaddexp(group[1], torch.logsumexp(w[:take], 0))
            group[2] += take
            i = take
            if group[2] == k:
                group[0] += group[1] - math.log(k)
                group[1], group[2] = torch.full_like(group[1], -math.inf), 0
        full = (n - i) // k
        if full:
            block = w[i : i + full * k].reshape(full, k, -1)
            group[0] += (torch.logsumexp(block, 1) - math.log(k)).sum(0)
            i += full * k
        if i < n:
            group[1], group[2] = torch.logsumexp(w[i:], 0), n - i

    def _shrink_tail(self) -> None:
        rows = torch.cat(self.tail)
        self.tail = [torch.topk(rows, min(self.tail_size, len(rows)), dim=0).values]
        self.tail_rows = len(self.tail[0])

    def result(self) -> dict[str, torch.Tensor | np.ndarray]:
        """``log_likelihood``, ``ess``, ``mean``, ``iwae_{K}`` and ``khat`` per datum."""
        if self.seen != self.num_samples:
            raise ValueError(f"expected {self.num_samples} weights per datum, got {self.seen}")
        k_total = self.num_samples
        out: dict[str, torch.Tensor | np.ndarray] = {
            "log_likelihood": self.lse - math.log(k_total),
            "ess": torch.exp(2 * self.lse - self.lse2),
            "mean": self.total / k_total,
        }
        for k, group in self.groups.items():
            out[f"iwae_{k}"] = group[0] / (k_total // k)
        if self.tail_size:
            self._shrink_tail()
            out["khat"] = _khat_from_tail(self.tail[0], k_total)
        else:
            out["khat"] = np.full(self.batch, np.nan)
        return out


def _khat_from_tail(tail: torch.Tensor, num_samples: int) -> np.ndarray:
    """PSIS :math:`\\hat k` of each column of ``K`` weights, from their largest ones."""
    return psis_khat(tail.T.double().cpu().numpy(), num_samples)


#: Where arviz's PSIS floors the tail cutoff: the log of the smallest positive float64.
_CUTOFF_MIN = math.log(np.finfo(np.float64).tiny)
#: Rows fitted at once by :func:`psis_khat` (about 20 MB at K = 5000).
_KHAT_ROWS = 256


def psis_khat(log_w: np.ndarray, num_samples: int | None = None) -> np.ndarray:
    """The Pareto shape :math:`\\hat k` of PSIS for each row of log weights, shape ``(B,)``.

    Arviz's ``psislw`` (Vehtari et al. 2024), computed the same way in float64
    and batched over rows. With ``M = ceil(min(K/5, 3 sqrt(K)))``: the
    ``M + 1``-th largest log weight is the cutoff :math:`u`, the ``M`` weights
    above it become :math:`y = w - e^u` (after subtracting the row's maximum), and
    :math:`\\hat k` is the empirical-Bayes estimate of Zhang & Stephens (2009)
    for a generalized Pareto fit to :math:`y`, shrunk towards 0.5 by a weak
    prior: :math:`(M \\hat k + 5) / (M + 10)`. ``inf`` where four or fewer
    weights lie above the cutoff (ties, or weights of zero).

    Args:
        log_w: Log weights ``(B, n)``: all ``K`` of each datum, or only its
            :func:`khat_tail_size` largest (the rest do not change the result).
        num_samples: ``K`` (default ``n``).

    Returns:
        ``(B,)`` float64.
    """
    with np.errstate(all="ignore"):  # weights of zero and failed fits give inf or nan, as in arviz
        return _psis_khat(np.asarray(log_w, dtype=np.float64), num_samples or log_w.shape[1])


def _psis_khat(log_w: np.ndarray, num_samples: int) -> np.ndarray:
    x = np.sort(log_w, axis=1)
    x = x - x[:, -1:]
    size = khat_tail_size(num_samples) - 1  # M: the weights above the cutoff
    cutoff = np.maximum(x[:, -size - 1], _CUTOFF_MIN)
    tail_len = (x > cutoff[:, None]).sum(1)
    khat = np.full(len(x), np.inf)
    regular = tail_len == size  # the usual case: no ties at the cutoff
    if size > 4:
        regular_rows = np.flatnonzero(regular)
        for start in range(0, len(regular_rows), _KHAT_ROWS):  # memory: rows x 44 x M floats
            rows = regular_rows[start : start + _KHAT_ROWS]
            khat[rows] = _gpd_shape(np.exp(x[rows, -size:]) - np.exp(cutoff[rows])[:, None])
    for b in np.flatnonzero(~regular & (tail_len > 4)):  # ties at the cutoff: a shorter tail
        khat[b] = _gpd_shape(np.exp(x[b, -tail_len[b] :])[None] - np.exp(cutoff[b]))[0]
    return khat


def _gpd_shape(y: np.ndarray) -> np.ndarray:
    """Zhang & Stephens' (2009) estimate of the generalized Pareto shape, per row.

    Arviz's ``_gpdfit`` for rows ``y`` ``(B, n)`` of ascending positive draws:
    a grid of ``m = 30 + floor(sqrt(n))`` values of :math:`b = k / \\sigma`,
    each with the profile estimate :math:`k(b) = \\operatorname{mean}\\log(1 - b y)`,
    averaged with weights proportional to its profile likelihood; then the
    weak prior :math:`(n k + 5) / (n + 10)`.
    """
    n = y.shape[1]
    m = 30 + int(n**0.5)
    b = 1 - np.sqrt(m / (np.arange(1, m + 1, dtype=np.float64) - 0.5))
    b = b / (3 * y[:, int(n / 4 + 0.5) - 1 : int(n / 4 + 0.5)]) + 1 / y[:, -1:]  # (B, m)
    k = np.log1p(-b[:, :, None] * y[:, None, :]).mean(axis=2)  # (B, m)
    profile = n * (np.log(-(b / k)) - k - 1)
    weights = 1 / np.exp(profile[:, None, :] - profile[:, :, None]).sum(axis=2)
    kept = weights >= 10 * np.finfo(np.float64).eps  # negligible (or nan) weights are dropped
    total = np.where(kept, weights, 0.0).sum(axis=1)
    # b's posterior mean; 0 where no weight is left (arviz's empty sum: y all zero)
    b_post = np.where(kept, b * weights, 0.0).sum(axis=1) / np.where(total > 0, total, 1.0)
    k_post = np.log1p(-b_post[:, None] * y).mean(axis=1)
    return (n * k_post + 5.0) / (n + 10)


def iwae_bounds(log_w: torch.Tensor, ks: Sequence[int]) -> dict[int, torch.Tensor]:
    """Per-datum estimates of the IWAE bounds :math:`\\mathcal L_K` from one set of weights.

    .. math::

        \\mathcal L_K(x) = \\mathbb E\\Big[\\log \\frac1K \\sum_{k=1}^K w_k\\Big]
        \\le \\mathcal L_{K'}(x) \\le \\log p(x) \\quad (K \\le K'),

    with :math:`\\mathcal L_1` the ELBO (Burda et al. 2016, Theorem 1). The
    ``K_total`` weights are split into ``K_total // K`` disjoint groups of
    ``K``; the group estimates are averaged (unbiased for :math:`\\mathcal L_K`;
    the last ``K_total mod K`` weights are left out).

    Args:
        log_w: Log weights ``(K_total, B)``.
        ks: Bounds to compute, each ``1 <= K <= K_total``.

    Returns:
        ``{K: tensor (B,)}``.
    """
    total = log_w.shape[0]
    out = {}
    for k in ks:
        if not 1 <= k <= total:
            raise ConfigError(f"IWAE K must be in 1..{total} (the number of samples), got {k}")
        groups = total // k
        grouped = log_w[: groups * k].reshape(groups, k, -1)
        out[int(k)] = log_mean_exp(grouped, dim=1).mean(0)
    return out


def pareto_khat(log_w: torch.Tensor) -> np.ndarray:
    """Per-datum Pareto-smoothed importance sampling shape :math:`\\hat k`, shape ``(B,)``.

    Fits a generalized Pareto distribution to the largest weights of each
    datum (:func:`psis_khat`, the computation of ``arviz.psislw``).
    :math:`\\hat k < 0.5`: the variance of the weights is finite; above 0.7 the
    estimate is unreliable (Vehtari et al. 2024). NaN where ``K < 25`` (too
    few draws to fit the tail).

    Args:
        log_w: Log weights ``(K, B)``.
    """
    num_samples, batch = log_w.shape
    if num_samples < MIN_KHAT_SAMPLES:
        return np.full(batch, np.nan)
    return psis_khat(log_w.T.detach().double().cpu().numpy())


# --- how long an evaluation takes ----------------------------------------------

#: Default limit of :func:`evaluate`: a request estimated to take longer is refused.
MAX_SECONDS = 24 * 3600.0


def format_duration(seconds: float) -> str:
    """``"45 s"``, ``"7.5 min"``, ``"3.2 h"`` or ``"4.1 days"``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.3g} days"


def estimate_seconds(
    vae: VAE, x: torch.Tensor, num_samples: int, chunk_size: int, num_data: int
) -> float:
    """Seconds to draw ``num_samples`` importance weights for each of ``num_data`` data.

    Times one chunk of :func:`log_importance_weights` on the batch ``x``
    (prior proposal; the random state is restored, so results do not change)
    and scales it. The refinement of :math:`q^*` for the gaps is not included.
    """
    per_chunk = min(num_samples, max(1, chunk_size // len(x)))
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    r = proposal_distribution(vae, x, "prior", None)
    times = []
    with torch.random.fork_rng(devices=devices):
        for _ in range(2):  # the first call also warms up
            start = time.perf_counter()
            chunks = _log_weight_chunks(vae, x, per_chunk, r, None, chunk_size)
            next(chunks)
            chunks.close()
            if x.device.type == "cuda":
                torch.cuda.synchronize(x.device)
            times.append(time.perf_counter() - start)
    per_weight = min(times) / (per_chunk * len(x))
    return per_weight * num_samples * num_data


# --- q*: per-datum refinement ---------------------------------------------------


def diagonal_normal_parameters(q: Distribution) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loc, scale)`` of a diagonal Normal ``q`` (``Normal(...).to_event(1)``).

    Raises:
        UserError: ``q`` is of another family (the guide cannot be refined).
    """
    if (
        isinstance(q, torch.distributions.Independent)
        and isinstance(q.base_dist, torch.distributions.Normal)
        and q.reinterpreted_batch_ndims == 1
    ):
        return q.base_dist.loc, q.base_dist.scale
    family = type(q).__name__
    if isinstance(q, torch.distributions.Independent):
        family = f"Independent({type(q.base_dist).__name__})"
    raise UserError(
        f"the gap decomposition refines a diagonal Normal q(z|x), but this guide gives "
        f"{family}; use a guide with a diagonal Normal posterior (e.g. mean-field, local)"
    )


# --- the evaluation -------------------------------------------------------------


@dataclass
class Evaluation:
    """The result of :func:`evaluate`.

    Args:
        summary: The numbers written to ``evaluation.json`` (nats per datum).
        per_datum: Arrays of length ``num_data`` written to ``evaluation_per_datum.npz``.
    """

    summary: dict[str, Any]
    per_datum: dict[str, np.ndarray]

    def table(self) -> str:
        """A readable table of the summary."""
        s = self.summary
        how = (
            f"AIS from the {s['proposal']}: {s['ais_steps']} steps, {s['chains']} chains, "
            f"{s['leapfrog_steps']} leapfrog steps, HMC acceptance {s['acceptance_rate']:.2f}"
            if s.get("estimator") == "ais"
            else f"K = {s['num_samples']} importance samples from the {s['proposal']}"
        )
        lines = [
            f"split {s.get('split') or '-'}: {s['num_data']} data, {how}, seed {s['seed']}",
            f"  log p(x)           {s['log_likelihood']:10.3f}  "
            f"± {s['log_likelihood_stderr']:.3f} (SE over data; "
            f"Monte Carlo SE {s['log_likelihood_mc_stderr']:.3f})",
        ]
        if s.get("exact_log_likelihood") is not None:
            lines.append(f"  exact log p(x)     {s['exact_log_likelihood']:10.3f}  (closed form)")
        if s.get("elbo") is not None:
            lines.append(f"  ELBO (guide)       {s['elbo']:10.3f}  ± {s['elbo_stderr']:.3f}")
        for k, value in s["iwae"].items():
            lines.append(f"  L_{k:<16} {value:10.3f}")
        lines.append(f"  ESS                {s['ess_mean']:10.1f}  mean (of {s['num_samples']})")
        if s.get("estimator") == "ais":
            pass
        elif s["khat_fraction_above_0_7"] is None:
            lines.append(f"  k-hat              n/a (needs K >= {MIN_KHAT_SAMPLES})")
        else:
            lines.append(
                f"  k-hat > 0.7        {100 * s['khat_fraction_above_0_7']:9.1f}%  of data "
                f"(unreliable estimates; mean k-hat {s['khat_mean']:.2f})"
            )
        guide = s.get("guide_proposal")
        if guide is not None:
            lines.append(
                f"  guide proposal     {guide['log_likelihood']:10.3f}  log p(x) at the same K, "
                f"ESS {guide['ess_mean']:.1f}, k-hat > 0.7 for "
                f"{100 * (guide['khat_fraction_above_0_7'] or 0):.1f}%"
            )
        if "approximation_gap" in s:
            lines += [
                f"  total gap          {s['total_gap']:10.3f}  log p(x) - ELBO(q)",
                f"  approximation gap  {s['approximation_gap']:10.3f}  log p(x) - ELBO(q*)",
                f"  amortization gap   {s['amortization_gap']:10.3f}  ELBO(q*) - ELBO(q)",
            ]
        return "\n".join(lines)


def _mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
    n = len(values)
    std = float(np.std(values, ddof=1)) if n > 1 else 0.0
    return float(np.mean(values)), std / math.sqrt(n)


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def check_sample_sizes(num_samples: int, iwae_k: Sequence[int]) -> list[int]:
    """Validate ``K`` and the IWAE ``K`` list; returns the sorted unique list.

    Raises:
        ConfigError: ``K < 1``, or an IWAE ``K`` outside ``1..num_samples``.
    """
    if num_samples < 1:
        raise ConfigError(f"the number of importance samples K must be >= 1, got {num_samples}")
    ks = sorted({int(k) for k in iwae_k})
    bad = [k for k in ks if not 1 <= k <= num_samples]
    if bad:
        raise ConfigError(
            f"IWAE K = {bad[0]} is not in 1..{num_samples} (the number of importance samples)"
        )
    return ks


def evaluate(
    vae: VAE,
    x: torch.Tensor,
    *,
    num_samples: int = 5000,
    iwae_k: Sequence[int] | None = None,
    proposal: str = "guide",
    gaps: bool = False,
    index: torch.Tensor | None = None,
    batch_size: int = 100,
    chunk_size: int = 4096,
    seed: int = 0,
    split: str | None = None,
    progress: bool = False,
    refine_options: dict[str, Any] | None = None,
    max_seconds: float | None = MAX_SECONDS,
) -> Evaluation:
    """Importance-sampled :math:`\\log p(x)`, IWAE bounds, ESS, :math:`\\hat k` and gaps, per datum.

    Data are processed ``batch_size`` at a time; for each batch the ``[K, B]``
    log weights of :func:`log_importance_weights` give
    :math:`\\log \\hat p(x) = \\mathcal L_K`, the bounds
    :math:`\\mathcal L_{K'}` for ``K'`` in ``iwae_k``, the ELBO
    (:math:`\\mathcal L_1` of the guide), the ESS and :math:`\\hat k`. With
    ``proposal="prior"`` the guide is run too, at the same K, for a side by
    side comparison. With ``gaps``, :func:`refine_posterior` finds
    :math:`q^*` for each datum and ``ELBO(q*)`` is estimated with K draws.

    A non-amortized guide (``local``) has parameters for training data only:
    pass their positions as ``index``; without ``index`` its proposal is
    fitted per datum by :func:`fit_local_posterior`.

    Args:
        vae: The trained model (put in eval mode by the caller).
        x: Data ``(N, *event_shape)`` on the model's device, inside the likelihood's support.
        num_samples: K.
        iwae_k: The bounds to report (default: ``1, 10, 100, 1000, 5000`` up to K).
        proposal: ``"guide"`` or ``"prior"``.
        gaps: Compute the approximation and amortization gaps.
        index: Positions of ``x`` in the training set (non-amortized guides).
        batch_size: Data per batch.
        chunk_size: Particles x data per decoder call (memory bound).
        seed: Seed of every draw (the result is reproducible given the seed,
            batch size and chunk size).
        split: Name recorded in the summary.
        progress: Show a progress bar on stderr, in importance weights, with the
            time left (the refinement of :math:`q^*` for the gaps counts in it
            through the average rate, so the estimate settles after a batch).
        refine_options: Keyword options of :func:`refine_posterior`.
        max_seconds: Refuse, before sampling, a request estimated
            (:func:`estimate_seconds`) to take longer; ``None``: no limit.

    Returns:
        An :class:`Evaluation`; ``summary`` holds ``log_likelihood`` (mean
        :math:`\\log \\hat p(x)`), ``log_likelihood_stderr`` (standard error
        over the data), ``log_likelihood_mc_stderr`` (Monte Carlo error of the
        mean, :func:`log_likelihood_mc_stderr`), ``elbo``, ``iwae`` (K ->
        bound), ``ess_mean``, ``khat_fraction_above_0_7``, ``num_samples``,
        ``num_data``, ``split`` and, as available, ``exact_log_likelihood``
        and the gaps.

    Raises:
        ConfigError: a bad K, IWAE K, proposal, batch or chunk size, or a request
            estimated to take longer than ``max_seconds``.
        DataError: data that do not fit the model.
        UserError: ``gaps`` with a guide that is not a diagonal Normal, or a
            guide proposal from a point-estimate guide.
    """
    if iwae_k is None:
        iwae_k = [k for k in (1, 10, 100, 1000, 5000) if k <= num_samples]
    ks = _check_inputs(vae, x, num_samples, iwae_k, proposal, gaps, index, batch_size, chunk_size)
    plan = _BatchPlan(
        ks=ks,
        num_samples=num_samples,
        proposal=proposal,
        gaps=gaps,
        local=not vae.posterior.is_amortized and index is None,
        chunk_size=chunk_size,
        refine_options=dict(refine_options or {}),
        exact=linear_gaussian(vae),
    )
    passes = 1 + (plan.proposal == "prior" and not vae.posterior.is_point_estimate) + plan.gaps
    seconds = estimate_seconds(vae, x[:batch_size], num_samples, chunk_size, len(x) * passes)
    if max_seconds is not None and seconds > max_seconds:
        rate = len(x) * passes * num_samples / seconds
        k_max = int(max_seconds * rate / (len(x) * passes))
        raise ConfigError(
            f"evaluating {len(x)} data with K = {num_samples} would take about "
            f"{format_duration(seconds)} ({rate:.3g} weights per second measured here); "
            f"the limit is {format_duration(max_seconds)}: valid K up to {k_max} for "
            f"{len(x)} data, or fewer data"
        )
    if seconds > 10:
        logger.info(
            "evaluating %d data with K = %d%s: about %s%s",
            len(x),
            num_samples,
            " and the gaps" if gaps else "",
            format_duration(seconds),
            " plus the refinement of q*" if gaps else "",
        )
    parts: dict[str, list[np.ndarray]] = {}
    start_time = time.perf_counter()
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        tqdm(
            total=len(x) * passes * num_samples,
            disable=not progress,
            desc="log p(x)",
            unit="weight",
            unit_scale=True,
            smoothing=0,  # the average rate: it counts the refinement of q* between chunks
            dynamic_ncols=True,
        ) as bar,
    ):
        torch.manual_seed(seed)
        plan.on_chunk = bar.update
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            ib = None if index is None else index[start : start + batch_size]
            for key, value in _evaluate_batch(vae, xb, ib, plan).items():
                if isinstance(value, torch.Tensor):
                    value = value.detach().double().cpu().numpy()
                parts.setdefault(key, []).append(np.asarray(value, dtype=np.float64))
    per_datum = {key: np.concatenate(values) for key, values in parts.items()}
    summary = _summarize(per_datum, ks, num_samples, proposal, seed, split)
    summary["seconds"] = time.perf_counter() - start_time
    return Evaluation(summary, per_datum)


def _check_inputs(
    vae: VAE,
    x: torch.Tensor,
    num_samples: int,
    iwae_k: Sequence[int],
    proposal: str,
    gaps: bool,
    index: torch.Tensor | None,
    batch_size: int,
    chunk_size: int,
) -> list[int]:
    """Refuse bad input before any sampling; returns the checked IWAE K's."""
    ks = check_sample_sizes(num_samples, iwae_k)
    if proposal not in PROPOSALS:
        raise ConfigError(f"unknown proposal {proposal!r}; valid: {', '.join(PROPOSALS)}")
    for name, value in (("batch_size", batch_size), ("chunk_size", chunk_size)):
        if value < 1:
            raise ConfigError(f"{name} must be >= 1, got {value}")
    if len(x) == 0:
        raise ConfigError("no data to evaluate")
    likelihood_name = type(vae.likelihood).__name__
    check_fits(x, vae.event_shape, vae.likelihood.support, likelihood_name, "evaluation data")
    if vae.posterior.is_point_estimate and (proposal == "guide" or gaps):
        raise UserError(
            "the guide is a point estimate (no density): it can be neither an importance "
            "sampling proposal nor refined for the gaps; use --proposal prior without --gaps"
        )
    if index is not None and index.shape != x.shape[:1]:
        raise ConfigError(f"index must have shape ({len(x)},), got {tuple(index.shape)}")
    if gaps and (vae.posterior.is_amortized or index is not None):
        with torch.no_grad():  # can this guide's q be refined?
            diagonal_normal_parameters(vae.posterior(x[:1], None if index is None else index[:1]))
    return ks


@dataclass
class _BatchPlan:
    """What :func:`_evaluate_batch` computes for every batch."""

    ks: list[int]
    num_samples: int
    proposal: str
    gaps: bool
    local: bool
    chunk_size: int
    refine_options: dict[str, Any]
    exact: Any
    #: Called with the number of (particle, datum) weights of each chunk drawn.
    on_chunk: Callable[[int], None] = lambda n: None


def _statistics(
    vae: VAE,
    xb: torch.Tensor,
    proposal: Proposal,
    ks: Sequence[int],
    plan: _BatchPlan,
    khat: bool = True,
) -> dict[str, torch.Tensor | np.ndarray]:
    """:class:`WeightStatistics` of ``K`` importance weights of ``xb`` under ``proposal``."""
    r = proposal_distribution(vae, xb, proposal, None)
    stats = WeightStatistics(plan.num_samples, len(xb), ks, khat=khat, device=xb.device)
    for log_w in _log_weight_chunks(vae, xb, plan.num_samples, r, None, plan.chunk_size):
        stats.update(log_w)
        plan.on_chunk(log_w.numel())
    return stats.result()


def _evaluate_batch(
    vae: VAE, xb: torch.Tensor, ib: torch.Tensor | None, plan: _BatchPlan
) -> dict[str, torch.Tensor | np.ndarray]:
    """Every per-datum quantity of one batch (see :func:`evaluate`)."""
    out: dict[str, torch.Tensor | np.ndarray] = {}
    k_total = plan.num_samples
    guide_q: Distribution | None = None
    if not vae.posterior.is_point_estimate:
        if plan.local:
            guide_q = fit_local_posterior(vae, xb, **plan.refine_options)
        else:
            with torch.no_grad():
                guide_q = vae.posterior(xb, ib)
    main = guide_q if plan.proposal == "guide" else "prior"
    stats = _statistics(vae, xb, main, plan.ks, plan)
    out["log_likelihood"] = log_lik = stats["log_likelihood"]
    out["log_likelihood_mc_stderr"] = log_likelihood_mc_stderr(stats["ess"], k_total)
    out["ess"] = stats["ess"]
    out["khat"] = stats["khat"]
    for k in plan.ks:
        out[f"iwae_{k}"] = stats[f"iwae_{k}"]
    guide_log_lik = log_lik
    if guide_q is not None:
        guide_stats = stats
        if plan.proposal == "prior":
            guide_stats = _statistics(vae, xb, guide_q, [], plan)
            out["guide_log_likelihood"] = guide_log_lik = guide_stats["log_likelihood"]
            out["guide_ess"] = guide_stats["ess"]
            out["guide_khat"] = guide_stats["khat"]
        out["elbo"] = guide_stats["mean"]
    if plan.gaps:
        assert guide_q is not None
        loc, scale = diagonal_normal_parameters(guide_q)
        refined = refine_posterior(vae, xb, loc, scale, **plan.refine_options)
        refined_elbo = _statistics(vae, xb, refined.distribution(), [], plan, khat=False)["mean"]
        out["refined_elbo"] = refined_elbo
        out["approximation_gap"] = guide_log_lik - refined_elbo
        out["amortization_gap"] = refined_elbo - out["elbo"]
        out["refine_steps"] = np.full(len(xb), refined.steps)
    if plan.exact is not None:
        out["exact_log_likelihood"] = plan.exact.log_likelihood(xb)
    return out


def _khat_summary(khat: np.ndarray) -> tuple[float | None, float | None, float | None]:
    """Fraction above 0.7, mean and max of the finite k-hat (None when k-hat is undefined)."""
    if np.isnan(khat).all():
        return None, None, None
    above = float(np.mean(khat > KHAT_THRESHOLD))
    finite = khat[np.isfinite(khat)]
    if len(finite) == 0:
        return above, None, None
    return above, float(np.mean(finite)), float(np.max(finite))


def _summarize(
    per_datum: dict[str, np.ndarray],
    ks: list[int],
    num_samples: int,
    proposal: str,
    seed: int,
    split: str | None,
) -> dict[str, Any]:
    log_lik, log_lik_stderr = _mean_and_stderr(per_datum["log_likelihood"])
    n = len(per_datum["log_likelihood"])
    fraction, khat_mean, khat_max = _khat_summary(per_datum["khat"])
    summary: dict[str, Any] = {
        "split": split,
        "num_data": n,
        "num_samples": num_samples,
        "proposal": proposal,
        "seed": seed,
        "log_likelihood": log_lik,
        "log_likelihood_stderr": log_lik_stderr,
        "log_likelihood_mc_stderr": float(
            np.sqrt(np.sum(per_datum["log_likelihood_mc_stderr"] ** 2)) / n
        ),
        "errors": dict(ERROR_LABELS),
        "elbo": None,
        "elbo_stderr": None,
        "iwae": {str(k): float(np.mean(per_datum[f"iwae_{k}"])) for k in ks},
        "ess_mean": float(np.mean(per_datum["ess"])),
        "ess_min": float(np.min(per_datum["ess"])),
        "khat_fraction_above_0_7": fraction,
        "khat_mean": khat_mean,
        "khat_max": khat_max,
    }
    if "elbo" in per_datum:
        summary["elbo"], summary["elbo_stderr"] = _mean_and_stderr(per_datum["elbo"])
    if "guide_log_likelihood" in per_datum:
        guide_fraction, _, _ = _khat_summary(per_datum["guide_khat"])
        summary["guide_proposal"] = {
            "log_likelihood": float(np.mean(per_datum["guide_log_likelihood"])),
            "ess_mean": float(np.mean(per_datum["guide_ess"])),
            "khat_fraction_above_0_7": guide_fraction,
        }
    if "approximation_gap" in per_datum:
        guide_log_lik = per_datum.get("guide_log_likelihood", per_datum["log_likelihood"])
        summary["total_gap"] = float(np.mean(guide_log_lik - per_datum["elbo"]))
        summary["approximation_gap"] = float(np.mean(per_datum["approximation_gap"]))
        summary["amortization_gap"] = float(np.mean(per_datum["amortization_gap"]))
        summary["refined_elbo"] = float(np.mean(per_datum["refined_elbo"]))
        summary["refine_steps_mean"] = float(np.mean(per_datum["refine_steps"]))
    if "exact_log_likelihood" in per_datum:
        summary["exact_log_likelihood"] = float(np.mean(per_datum["exact_log_likelihood"]))
    return summary


# --- run directories and the command line ----------------------------------------


def evaluate_run(
    run_dir: str | Path,
    *,
    split: str = "test",
    num_samples: int | None = None,
    iwae_k: Sequence[int] | None = None,
    proposal: str = "guide",
    gaps: bool = False,
    max_data: int | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    write: bool = True,
    max_seconds: float | None = MAX_SECONDS,
    estimator: str = "is",
    ais_steps: int = 500,
    chains: int = 16,
    checkpoint: str = "last",
) -> Evaluation:
    """Evaluate the model of a run directory on one split of its own data.

    The data are those the run trained against (:func:`pyro_vae.train.load_data`:
    evaluation splits binarized with the run's fixed seed). Unset options come
    from the run's ``[eval]`` config section; an unset ``iwae_k`` keeps the
    configured K up to ``num_samples``. With ``write``, the summary goes to
    ``RUN_DIR/evaluation.json`` and the per-datum arrays to
    ``RUN_DIR/evaluation_per_datum.npz``.

    Args:
        run_dir: A run directory (``config.toml`` + ``checkpoint.pt``).
        split: ``test``, ``valid`` or ``train`` (as the dataset has them).
        num_samples: K.
        iwae_k: The IWAE bounds to report.
        proposal: ``guide`` or ``prior``.
        gaps: Also the approximation and amortization gaps.
        max_data: Evaluate the first N data of the split, in order.
        batch_size: Data per batch.
        chunk_size: Particles x data per decoder call.
        seed: Seed of the draws.
        device: Where to run.
        progress: Show a progress bar.
        write: Write the two files.
        max_seconds: Refuse a request estimated to take longer (see :func:`evaluate`).
        estimator: ``is`` (importance sampling, :func:`evaluate`) or ``ais``
            (:func:`evaluate_ais`, started from ``proposal``).
        ais_steps: AIS: the number of annealing steps T.
        chains: AIS: chains per datum.
        checkpoint: ``last`` (``checkpoint.pt``) or ``best`` (``best.pt``, the best
            validation ELBO); the summary names it and its epoch.

    Raises:
        CheckpointError: no run or checkpoint in ``run_dir``.
        DataError: a split the dataset lacks, or data that do not fit the model.
        ConfigError, UserError: as :func:`evaluate`.
    """
    from .checkpoint import load_run
    from .train import resolve_device

    if estimator not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {estimator!r}; valid: {', '.join(ESTIMATORS)}")
    if estimator == "ais" and gaps:
        raise ConfigError("the gaps are measured by importance sampling: drop --gaps with ais")
    ais = {"steps": ais_steps, "chains": chains} if estimator == "ais" else None
    run_dir = Path(run_dir)
    vae, state = load_run(run_dir, str(resolve_device(device)), checkpoint)  # before the lock
    with run_lock(run_dir) if write else nullcontext():  # one writer: not while it trains
        return _evaluate_run(
            vae, run_dir, split, num_samples, iwae_k, proposal, gaps, max_data,
            batch_size, chunk_size, seed, progress, write, max_seconds, state.get("data_sha256"),
            ais, {"checkpoint": checkpoint, "checkpoint_epoch": state.get("epoch")},
        )  # fmt: skip


def _evaluate_run(
    vae: VAE,
    run_dir: Path,
    split: str,
    num_samples: int | None,
    iwae_k: Sequence[int] | None,
    proposal: str,
    gaps: bool,
    max_data: int | None,
    batch_size: int | None,
    chunk_size: int | None,
    seed: int | None,
    progress: bool,
    write: bool,
    max_seconds: float | None,
    data_sha256: str | None,
    ais: dict[str, int] | None,
    origin: dict[str, Any],
) -> Evaluation:
    from .build import resolve
    from .checkpoint import CONFIG_FILE
    from .config import Config
    from .data import fingerprint
    from .errors import DataError
    from .train import load_data

    config = resolve(Config.load(run_dir / CONFIG_FILE, relative_to_file=False))
    cfg = config.eval
    num_samples = cfg.num_samples if num_samples is None else num_samples
    if iwae_k is None:
        iwae_k = [k for k in cfg.iwae_k if k <= num_samples] or [1]
    check_sample_sizes(num_samples, iwae_k)
    if max_data is not None and max_data < 1:
        raise ConfigError(f"max_data must be >= 1, got {max_data}")
    data = load_data(config)
    x = data.split(split)
    if tuple(x.shape[1:]) != vae.event_shape:
        raise DataError(
            f"{data.name} {split}: a datum has shape {tuple(x.shape[1:])} but the trained "
            f"model expects {vae.event_shape}"
        )
    if data_sha256 and data.fingerprint != data_sha256:
        warnings.warn(
            f"the data of {run_dir} ({data.name}) changed since it was trained (SHA-256 "
            f"{data.fingerprint[:12]}..., was {data_sha256[:12]}...); these numbers are for the "
            "data as they are now",
            PyroVAEWarning,
            stacklevel=2,
        )
    if max_data is not None:
        x = x[:max_data]
    x = x.to(next(vae.parameters()).device)  # not prior().mean: flows have none
    index = None
    if split == "train" and not vae.posterior.is_amortized:
        index = torch.arange(len(x), device=x.device)
    common = dict(
        batch_size=cfg.batch_size if batch_size is None else batch_size,
        chunk_size=cfg.chunk_size if chunk_size is None else chunk_size,
        seed=cfg.seed if seed is None else seed,
        split=split,
        progress=progress,
        max_seconds=max_seconds,
        index=index,
    )
    if ais is not None:
        result = evaluate_ais(vae, x, start=proposal, **ais, **common)  # type: ignore[arg-type]
    else:
        result = evaluate(
            vae, x, num_samples=num_samples, iwae_k=iwae_k, proposal=proposal, gaps=gaps,
            **common,  # type: ignore[arg-type]
        )  # fmt: skip
    result.summary["run_dir"] = str(run_dir)
    result.summary.update(origin)
    result.summary["data_sha256"] = fingerprint({split: x})  # the points evaluated
    if write:
        summary = _json_safe(result.summary)
        text = json.dumps(summary, indent=2) + "\n"
        atomic_write_bytes(run_dir / EVALUATION_FILE, text.encode())
        buffer = io.BytesIO()
        np.savez(buffer, **result.per_datum)
        atomic_write_bytes(run_dir / PER_DATUM_FILE, buffer.getvalue())
    return result


def _json_safe(value: Any) -> Any:
    """NaN and infinities as ``null`` (strict JSON)."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float):
        return _finite_or_none(value)
    return value


# --- paired comparisons of runs --------------------------------------------------

COMPARISON_FILE = "comparison.json"


@dataclass
class Comparison:
    """What :func:`compare_runs` returns.

    Args:
        evaluations: One :class:`Evaluation` per run, on the same data points.
        summary: The numbers written to ``comparison.json``: ``runs`` (each
            run's mean log p(x), SE over data, Monte Carlo SE) and ``pairs``
            (each difference with its paired SE and Monte Carlo SE).
    """

    evaluations: list[Evaluation]
    summary: dict[str, Any]

    def table(self) -> str:
        """A readable table: each run, then each pairwise difference."""
        s = self.summary
        lines = [
            f"split {s['split']}: the same {s['num_data']} data for every run, "
            f"K = {s['num_samples']} importance samples"
        ]
        for i, run in enumerate(s["runs"]):
            lines.append(
                f"  [{i}] {run['log_likelihood']:10.3f}  ± {run['se_over_data']:.3f} (SE over "
                f"data; Monte Carlo SE {run['monte_carlo_se']:.3f})  {run['run_dir']}"
            )
        for pair in s["pairs"]:
            lines.append(
                f"  [{pair['a']}] - [{pair['b']}] {pair['difference']:8.3f}  "
                f"± {pair['paired_se']:.3f} (paired SE; Monte Carlo SE "
                f"{pair['monte_carlo_se']:.3f}; separate SEs would give "
                f"± {pair['separate_se']:.3f})"
            )
        return "\n".join(lines)


def paired_difference(
    a: Evaluation | dict[str, np.ndarray], b: Evaluation | dict[str, np.ndarray]
) -> dict[str, float]:
    """Mean difference of per-datum log p(x) of two models on the same data, and its errors.

    With :math:`d_i = \\log \\hat p_A(x_i) - \\log \\hat p_B(x_i)`, the paired SE
    is :math:`\\mathrm{sd}(d) / \\sqrt n`: the spread of the data cancels from
    both models, so it is smaller than :math:`\\sqrt{\\mathrm{SE}_A^2 + \\mathrm{SE}_B^2}`
    (``separate_se``) when the models agree on which data are hard. The Monte
    Carlo SE combines the two runs' independent draws:
    :math:`\\sqrt{\\sum_i (s_{A,i}^2 + s_{B,i}^2)} / n`.
    """
    per_a = a.per_datum if isinstance(a, Evaluation) else a
    per_b = b.per_datum if isinstance(b, Evaluation) else b
    la, lb = per_a["log_likelihood"], per_b["log_likelihood"]
    if la.shape != lb.shape:
        raise ConfigError(f"paired comparison of {len(la)} and {len(lb)} data: not the same data")
    n = len(la)
    difference, paired_se = _mean_and_stderr(la - lb)
    mc = np.sqrt(np.sum(per_a["log_likelihood_mc_stderr"] ** 2))
    mc_b = np.sqrt(np.sum(per_b["log_likelihood_mc_stderr"] ** 2))
    return {
        "difference": difference,
        "paired_se": paired_se,
        "monte_carlo_se": float(math.hypot(mc, mc_b) / n),
        "separate_se": math.hypot(_mean_and_stderr(la)[1], _mean_and_stderr(lb)[1]),
    }


def compare_runs(
    run_dirs: Sequence[str | Path],
    *,
    split: str = "test",
    num_samples: int | None = None,
    max_data: int | None = None,
    batch_size: int | None = None,
    chunk_size: int | None = None,
    seed: int | None = None,
    device: str = "cpu",
    progress: bool = False,
    max_seconds: float | None = MAX_SECONDS,
) -> Comparison:
    """Evaluate runs on the same data points and compare them in pairs (:func:`paired_difference`).

    Each run is evaluated by :func:`evaluate_run` (nothing is written into the
    runs); the evaluated points must be the same for all (same dataset, split
    and ``max_data``; checked by their SHA-256). With ``progress``, a bar over
    the runs (with the time left for all of them) above each run's own bar,
    on stderr.

    Raises:
        ConfigError: fewer than two runs, or runs whose evaluation data differ.
    """
    if len(run_dirs) < 2:
        raise ConfigError("compare needs at least two runs")
    options = dict(
        split=split, num_samples=num_samples, max_data=max_data, batch_size=batch_size,
        chunk_size=chunk_size, seed=seed, device=device, progress=progress,
        max_seconds=max_seconds, write=False,
    )  # fmt: skip
    evaluations = []
    with tqdm(
        total=len(run_dirs),
        disable=not progress,
        desc="compare",
        unit="run",
        smoothing=0,
        dynamic_ncols=True,
    ) as bar:
        for run in run_dirs:
            evaluations.append(evaluate_run(run, **options))  # type: ignore[arg-type]
            bar.update()
    first = evaluations[0].summary
    for run, evaluation in zip(run_dirs[1:], evaluations[1:], strict=True):
        if evaluation.summary["data_sha256"] != first["data_sha256"]:
            raise ConfigError(
                f"{run} and {run_dirs[0]} are evaluated on different data ({split} split, "
                f"{evaluation.summary['num_data']} and {first['num_data']} points); a paired "
                "comparison needs runs on the same dataset"
            )
    runs = [
        {
            "run_dir": str(run),
            "log_likelihood": e.summary["log_likelihood"],
            "se_over_data": e.summary["log_likelihood_stderr"],
            "monte_carlo_se": e.summary["log_likelihood_mc_stderr"],
        }
        for run, e in zip(run_dirs, evaluations, strict=True)
    ]
    pairs = [
        {"a": i, "b": j, **paired_difference(evaluations[i], evaluations[j])}
        for i in range(len(evaluations))
        for j in range(i + 1, len(evaluations))
    ]
    summary = {
        "split": split,
        "num_data": first["num_data"],
        "num_samples": first["num_samples"],
        "seed": first["seed"],
        "data_sha256": first["data_sha256"],
        "runs": runs,
        "pairs": pairs,
        "errors": {
            "se_over_data": ERROR_LABELS["log_likelihood_stderr"],
            "monte_carlo_se": ERROR_LABELS["log_likelihood_mc_stderr"],
            "paired_se": "paired SE: standard deviation of the per-datum differences / sqrt(n)",
            "separate_se": "sqrt(SE_A^2 + SE_B^2): what treating the runs as independent gives",
        },
    }
    return Comparison(evaluations, summary)


def write_comparison(comparison: Comparison, out_dir: str | Path) -> Path:
    """Write ``out_dir/comparison.json`` atomically; returns its path."""
    path = Path(out_dir) / COMPARISON_FILE
    text = json.dumps(_json_safe(comparison.summary), indent=2) + "\n"
    atomic_write_bytes(path, text.encode())
    return path


# --- annealed importance sampling and bidirectional Monte Carlo ------------------

#: Estimators of :math:`\\log p(x)` by name (``pyro-vae evaluate --estimator``).
ESTIMATORS = ("is", "ais")
#: Where :func:`bdmc_run` writes its sandwich.
BDMC_FILE = "bdmc.json"
#: Cost of one AIS transition per chain and datum in decoder passes: each of
#: ``L`` leapfrog steps is a forward and a backward pass (about 3 forward ones).
_PASSES_PER_LEAPFROG = 3


def _ais_seconds(
    vae: VAE, x: torch.Tensor, steps: int, chains: int, leapfrog: int, chunk_size: int, n: int
) -> float:
    """:func:`estimate_seconds` for AIS: a decoder pass per chain, step and leapfrog step."""
    from .ais import PILOT_CHAINS

    passes = steps * (chains + PILOT_CHAINS) * (1 + _PASSES_PER_LEAPFROG * leapfrog)
    vectorized = max(1, min(chains + PILOT_CHAINS, chunk_size // len(x)))  # as AIS runs them
    return estimate_seconds(vae, x, vectorized, chunk_size, n) / vectorized * passes


def evaluate_ais(
    vae: VAE,
    x: torch.Tensor,
    *,
    steps: int = 500,
    chains: int = 16,
    start: str = "guide",
    leapfrog_steps: int = 10,
    batch_size: int = 100,
    chunk_size: int = 4096,
    seed: int = 0,
    split: str | None = None,
    progress: bool = False,
    max_seconds: float | None = MAX_SECONDS,
    index: torch.Tensor | None = None,
) -> Evaluation:
    """:math:`\\log p(x)` per datum by AIS (:func:`pyro_vae.ais.ais_log_likelihood`), in batches.

    The summary has what :func:`evaluate` reports for ``log p(x)`` -- the mean,
    the SE over data and the Monte Carlo SE (from the chains' weights) -- with
    ``"estimator": "ais"``, the steps, chains and the mean HMC acceptance rate.
    With ``progress``, a bar on stderr over every AIS step of every batch
    (pilot runs included, :func:`pyro_vae.ais.chain_steps`), with the time left.
    """
    from .ais import ais_log_likelihood, chain_steps

    if len(x) == 0:
        raise ConfigError("no data to evaluate")
    for name, value in (("steps", steps), ("chains", chains), ("batch_size", batch_size)):
        if value < 1:
            raise ConfigError(f"AIS {name} must be >= 1, got {value}")
    check_fits(x, vae.event_shape, vae.likelihood.support, type(vae.likelihood).__name__, "data")
    seconds = _ais_seconds(vae, x[:batch_size], steps, chains, leapfrog_steps, chunk_size, len(x))
    if max_seconds is not None and seconds > max_seconds:
        raise ConfigError(
            f"AIS on {len(x)} data with {steps} steps and {chains} chains would take about "
            f"{format_duration(seconds)}; the limit is {format_duration(max_seconds)}: fewer "
            "steps, chains or data"
        )
    if seconds > 10:
        logger.info("AIS on %d data: about %s", len(x), format_duration(seconds))
    start_time = time.perf_counter()
    parts: dict[str, list[np.ndarray]] = {}
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=devices),
        tqdm(
            total=chain_steps(len(x), steps, chains),
            disable=not progress,
            desc="AIS",
            unit="chain-step",
            unit_scale=True,
            smoothing=0,
            dynamic_ncols=True,
        ) as bar,
    ):
        torch.manual_seed(seed)
        for begin in range(0, len(x), batch_size):
            xb = x[begin : begin + batch_size]
            ib = None if index is None else index[begin : begin + batch_size]
            r = ais_log_likelihood(
                vae, xb, steps=steps, chains=chains, start=start,
                leapfrog_steps=leapfrog_steps, index=ib, on_step=bar.update,
            )  # fmt: skip
            for key, value in (
                ("log_likelihood", r.log_likelihood),
                ("log_likelihood_mc_stderr", r.mc_stderr),
                ("ess", r.ess),
                ("acceptance_rate", r.acceptance_rate),
            ):
                parts.setdefault(key, []).append(value.double().cpu().numpy())
    per_datum = {key: np.concatenate(values) for key, values in parts.items()}
    log_lik, se = _mean_and_stderr(per_datum["log_likelihood"])
    n = len(x)
    summary: dict[str, Any] = {
        "estimator": "ais",
        "split": split,
        "num_data": n,
        "num_samples": chains,
        "ais_steps": steps,
        "chains": chains,
        "leapfrog_steps": leapfrog_steps,
        "proposal": start,
        "seed": seed,
        "log_likelihood": log_lik,
        "log_likelihood_stderr": se,
        "log_likelihood_mc_stderr": float(
            np.sqrt(np.sum(per_datum["log_likelihood_mc_stderr"] ** 2)) / n
        ),
        "acceptance_rate": float(np.nanmean(per_datum["acceptance_rate"])),
        "elbo": None,
        "iwae": {},
        "ess_mean": float(np.mean(per_datum["ess"])),
        "ess_min": float(np.min(per_datum["ess"])),
        "khat_fraction_above_0_7": None,
        "khat_mean": None,
        "khat_max": None,
        "errors": dict(ERROR_LABELS),
        "seconds": time.perf_counter() - start_time,
    }
    exact = linear_gaussian(vae)
    if exact is not None:
        summary["exact_log_likelihood"] = float(exact.log_likelihood(x).mean())
    return Evaluation(summary, per_datum)


def bdmc_run(
    run_dir: str | Path,
    num_data: int,
    *,
    steps: int = 500,
    chains: int = 16,
    num_samples: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    progress: bool = False,
    write: bool = True,
) -> dict[str, Any]:
    """Bidirectional Monte Carlo on data simulated from a run's model; writes ``RUN_DIR/bdmc.json``.

    Forward AIS from the prior (a stochastic lower bound of :math:`\\log p(x)`) and
    reverse AIS from the exact posterior sample (an upper bound) sandwich each
    simulated datum's :math:`\\log p(x)` (:func:`pyro_vae.ais.bdmc`; Grosse,
    Ghahramani & Adams 2015). On the same data, the importance sampling
    estimate with ``K = num_samples`` guide samples and the ELBO are placed
    against the sandwich: how far below the truth the IS number sits on data
    like the model's own, measured. With ``progress``, a bar on stderr for
    both AIS directions, then one for the importance sampling.

    Returns:
        The summary written to ``bdmc.json``: ``lower``, ``upper``, ``gap`` (means
        with Monte Carlo SEs), ``is_log_likelihood``, ``elbo``,
        ``is_below_lower`` (IS mean minus the lower bound), the settings.
    """
    from .ais import bdmc
    from .checkpoint import load, read_run_config
    from .train import resolve_device

    if num_data < 1:
        raise ConfigError(f"--bdmc N: N must be >= 1, got {num_data}")
    run_dir = Path(run_dir)
    vae = load(run_dir, device=str(resolve_device(device)))
    k = read_run_config(run_dir).eval.num_samples if num_samples is None else num_samples
    with run_lock(run_dir) if write else nullcontext(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        start_time = time.perf_counter()
        result = bdmc(vae, num_data, steps=steps, chains=chains, progress=progress)
        if vae.posterior.is_point_estimate:
            is_est = None
        else:
            is_est = evaluate(
                vae, result.x, num_samples=k, iwae_k=[1], seed=seed, max_seconds=None,
                progress=progress,
            )  # fmt: skip
        n = num_data
        lower, lower_se = mean_se_pair(result.lower, result.lower_stderr)
        upper, upper_se = mean_se_pair(result.upper, result.upper_stderr)
        summary: dict[str, Any] = {
            "run_dir": str(run_dir),
            "num_data": n,
            "ais_steps": steps,
            "chains": chains,
            "seed": seed,
            "lower": lower,
            "lower_mc_stderr": lower_se,
            "upper": upper,
            "upper_mc_stderr": upper_se,
            "gap": upper - lower,
            "num_samples": k,
            "is_log_likelihood": None if is_est is None else is_est.summary["log_likelihood"],
            "elbo": None if is_est is None else is_est.summary["elbo"],
            "seconds": time.perf_counter() - start_time,
        }
        if is_est is not None:
            summary["is_minus_lower"] = summary["is_log_likelihood"] - lower
            summary["elbo_minus_lower"] = summary["elbo"] - lower
        if write:
            text = json.dumps(_json_safe(summary), indent=2) + "\n"
            atomic_write_bytes(run_dir / BDMC_FILE, text.encode())
    return summary


def mean_se_pair(values: torch.Tensor, stderr: torch.Tensor) -> tuple[float, float]:
    """The mean of per-datum estimates and the Monte Carlo SE of that mean."""
    return float(values.double().mean()), float(stderr.double().pow(2).sum().sqrt() / len(values))
