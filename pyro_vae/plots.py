"""Figures of a run: training curves, generation, the latent space, collapse, evaluation.

Every ``plot_*`` function returns a :class:`matplotlib.figure.Figure` built
directly (never through ``pyplot``), so nothing here needs a display or
changes matplotlib's global backend: save one with ``fig.savefig("f.png")``
or turn it into PNG bytes with :func:`figure_png`. Random draws (prior
samples, the data shown) come from a fixed ``seed`` inside
``torch.random.fork_rng``, so the global RNG is left alone.

Image figures need image data, a datum of shape ``(H, W)`` or ``(C, H, W)``
with ``C`` in {1, 3}; for other data they raise
:class:`~pyro_vae.errors.DataError`, which :mod:`pyro_vae.report` turns into
a note. Decoded images are the means of :math:`p(x|z)` (Bernoulli
probabilities, Normal locations).

Example:
    >>> from pyro_vae import plots
    >>> fig = plots.plot_elbo(pyro_vae.read_metrics("runs/digits"))  # doctest: +SKIP
    >>> fig.savefig("elbo.png")  # doctest: +SKIP
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter

from .diagnostics import (  # computed there, drawn here; re-exported for plots.X callers
    ACTIVE_UNIT_THRESHOLD,
    posterior_mean,
    seeded,
)
from .diagnostics import ActiveUnits as ActiveUnits
from .diagnostics import active_units as active_units
from .diagnostics import mean_kl_per_dim as mean_kl_per_dim
from .errors import DataError
from .model import VAE

#: k̂ above this marks an importance-sampling estimate as unreliable (Vehtari et al.).
KHAT_THRESHOLD = 0.7


def _legend(ax: Any, **kwargs: Any) -> None:
    """``ax.legend(**kwargs)`` when something on ``ax`` has a label (no matplotlib warning)."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**kwargs)


# --- helpers --------------------------------------------------------------------


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """The PNG bytes of ``fig`` (rendered by Agg, whatever the global backend)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def _figure(width: float, height: float) -> Figure:
    return Figure(figsize=(width, height), layout="constrained")


def is_image_shape(event_shape: Sequence[int]) -> bool:
    """Whether a datum of this shape is an image: ``(H, W)`` or ``(C, H, W)``, C in {1, 3}."""
    shape = tuple(event_shape)
    return len(shape) == 2 or (len(shape) == 3 and shape[0] in (1, 3))


def _require_images(event_shape: Sequence[int]) -> None:
    if not is_image_shape(event_shape):
        raise DataError(
            f"datum shape {tuple(event_shape)} is not an image; image figures need data "
            "of shape (H, W) or (C, H, W) with C = 1 or 3"
        )


def _as_images(x: torch.Tensor) -> torch.Tensor:
    """``(B, H, W)`` or ``(B, C, H, W)`` -> ``(B, C, H, W)``."""
    return x.unsqueeze(1) if x.dim() == 3 else x


def _display_scale(x: torch.Tensor) -> torch.Tensor:
    """Map values to [0, 1] for display: unchanged when already inside, else min-max scaled."""
    lo, hi = min(0.0, float(x.min())), max(1.0, float(x.max()))
    return (x - lo) / (hi - lo)


def image_grid(images: torch.Tensor, nrow: int, padding: int = 1) -> torch.Tensor:
    """Tile images into one ``(3, H', W')`` grid in [0, 1] (:func:`torchvision.utils.make_grid`).

    Args:
        images: ``(B, H, W)`` or ``(B, C, H, W)``; values outside [0, 1] are
            min-max scaled together.
        nrow: Images per row.
        padding: Pixels between images (drawn mid-grey).
    """
    from torchvision.utils import make_grid

    x = _display_scale(_as_images(images.detach().float().cpu()))
    return make_grid(x, nrow=nrow, padding=padding, pad_value=0.5)


def _show_grid(ax: Axes, grid: torch.Tensor) -> None:
    ax.imshow(grid.permute(1, 2, 0).numpy(), vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


@torch.no_grad()
def decode_mean(vae: VAE, z: torch.Tensor) -> torch.Tensor:
    """The decoded images :math:`\\mathbb E_{p(x|z)}[x]`, shape ``z.shape[:-1] + event_shape``."""
    return vae.decode(z)


@torch.no_grad()
def sample_prior_images(vae: VAE, n: int = 64, seed: int = 0) -> torch.Tensor:
    """Decode ``n`` draws :math:`z \\sim p(z)` to the means of :math:`p(x|z)`, ``(n, *event)``."""
    with seeded(seed):
        z = vae.prior().sample((n,))
    return decode_mean(vae, z)


def _subset(n_total: int, n: int, seed: int) -> torch.Tensor:
    """A fixed random choice of ``min(n, n_total)`` indices."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[: min(n, n_total)]


# --- training curves --------------------------------------------------------------


def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
    return [e for e, _ in points], [v for _, v in points]


def _epoch_axis(ax: Axes) -> None:
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _require_history(history: Sequence[Mapping[str, Any]]) -> None:
    if not history:
        raise DataError("no epochs recorded yet (metrics.jsonl is empty or absent)")


def plot_elbo(history: Sequence[Mapping[str, Any]]) -> Figure:
    """Train and test (and validation) ELBO per datum over epochs.

    The train ELBO is the running average over the epoch's minibatches; the
    test ELBO is measured after the epoch (for a per-datum guide, which has no
    q for unseen data, the ELBO of the whole training set is). A train curve well above the test
    curve means overfitting.

    Args:
        history: The per-epoch records of ``metrics.jsonl`` (:func:`~pyro_vae.read_metrics`).

    Returns:
        A figure with one axis: x = epoch, y = ELBO in nats per datum.
    """
    _require_history(history)
    fig = _figure(6, 3.6)
    ax = fig.add_subplot()
    series = (
        ("train_elbo", "train"),
        ("train_set_elbo", "whole training set"),  # runs whose guide is per-datum (EM)
        ("test_elbo", "test"),
        ("valid_elbo", "valid"),
    )
    for key, label in series:
        epochs, values = _series(history, key)
        if values:
            ax.plot(epochs, values, "o-", markersize=3, label=label)
    _epoch_axis(ax)
    ax.set_ylabel("ELBO (nats per datum)")
    ax.set_title("ELBO")
    _legend(ax)
    return fig


def plot_elbo_terms(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The two parts of the test ELBO over epochs, side by side (the tug of war).

    .. math::

        \\mathrm{ELBO} = \\underbrace{\\mathbb E_q[\\log p(x|z)]}_{\\text{reconstruction}}
            - \\underbrace{\\mathrm{KL}(q(z|x)\\,\\|\\,p(z))}_{\\text{KL}}

    Returns:
        A figure with two axes: reconstruction term, KL term (nats per datum).
    """
    _require_history(history)
    fig = _figure(9, 3.4)
    rec_ax, kl_ax = fig.subplots(1, 2)
    for split in ("test", "valid"):
        epochs, values = _series(history, f"{split}_reconstruction")
        if values:
            rec_ax.plot(epochs, values, "o-", markersize=3, label=split)
        epochs, values = _series(history, f"{split}_kl")
        if values:
            kl_ax.plot(epochs, values, "o-", markersize=3, label=split)
    rec_ax.set_title(r"reconstruction $\mathbb{E}_q[\log p(x|z)]$")
    kl_ax.set_title(r"KL$(q(z|x)\,\|\,p(z))$")
    rec_ax.set_ylabel("nats per datum")
    for ax in (rec_ax, kl_ax):
        _epoch_axis(ax)
        _legend(ax)
    return fig


def plot_kl_history(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The test KL of each latent dimension over epochs, as a heatmap.

    Cell ``(e, d)`` is coloured by :math:`\\mathrm{KL}(q(z_d|x)\\,\\|\\,p(z_d))`,
    averaged over the test data after epoch ``e``; the colour scale starts at
    0 and is labelled by a colorbar. Needs ``test_kl_per_dim`` in the records
    (written when the guide and the prior both factorize over dimensions,
    e.g. mean-field with N(0, I)). Rows that stay at the colour of 0 are
    dimensions collapsed to the prior.

    Returns:
        A figure with two axes: the heatmap (x = epoch, y = latent dimension
        ``d``, dimension 0 on top; a ``QuadMesh`` of the ``(D, E)`` values,
        one cell per epoch from the first recorded to the last, blank where an
        epoch has no record) and its colorbar (KL in nats per datum).

    Raises:
        DataError: no record has ``test_kl_per_dim``.
    """
    _require_history(history)
    records = [r for r in history if r.get("test_kl_per_dim") is not None]
    if not records:
        raise DataError(
            "the metrics have no test_kl_per_dim (the guide or prior does not factorize "
            "over latent dimensions, so the KL has no per-dimension closed form)"
        )
    first, last = min(r["epoch"] for r in records), max(r["epoch"] for r in records)
    dims = len(records[0]["test_kl_per_dim"])
    values = np.full((last - first + 1, dims), np.nan)  # (E, D); epochs without a record: NaN
    for r in records:
        values[r["epoch"] - first] = r["test_kl_per_dim"]
    fig = _figure(7, min(8.0, max(3.4, 1.4 + 0.24 * dims)))
    ax = fig.add_subplot()
    mesh = ax.pcolormesh(
        np.arange(first, last + 2) - 0.5,  # one cell per epoch, centred on it
        np.arange(dims + 1) - 0.5,
        np.ma.masked_invalid(values.T),  # a missing epoch is a blank column
        cmap="viridis",
        vmin=0.0,
        vmax=max(float(np.nanmax(values)), 1e-6),
        shading="flat",
    )
    ax.set_ylim(dims - 0.5, -0.5)  # dimension 0 on top, as in a table
    colorbar = fig.colorbar(mesh, ax=ax, pad=0.02)
    colorbar.set_label("KL (nats)", fontsize=11)
    ax.set_xlabel("epoch", fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("latent dimension d", fontsize=11)
    if dims <= 32:
        ax.set_yticks(np.arange(dims))
    else:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(f"Test KL per latent dimension over epochs (D = {dims})")
    return fig


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """The centred mean of ``window`` neighbours (fewer at the ends), same shape ``(N,)``."""
    half = max(window, 1) // 2
    cumulative = np.concatenate([[0.0], np.cumsum(values, dtype=float)])
    i = np.arange(len(values))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(values))
    return (cumulative[hi] - cumulative[lo]) / (hi - lo)


def step_series(history: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, int]:
    """The per-step losses of the records' ``step_losses``: ``(steps (N,), losses (N,), S)``.

    Steps count from 1 over the run, ``S`` steps per epoch (the longest
    record's). An epoch resumed mid-way from a checkpoint of an earlier
    version lacks its first steps; its losses are placed at its end.

    Raises:
        DataError: no record has ``step_losses``.
    """
    records = [r for r in history if r.get("step_losses")]
    if not records:
        raise DataError(
            "the metrics have no step_losses (a run of an earlier pyro-vae version keeps one "
            "value per epoch)"
        )
    per_epoch = max(len(r["step_losses"]) for r in records)
    steps: list[int] = []
    losses: list[float] = []
    for r in records:
        values = r["step_losses"]
        first = r["epoch"] * per_epoch - len(values) + 1
        steps.extend(range(first, first + len(values)))
        losses.extend(values)
    return np.asarray(steps), np.asarray(losses, dtype=float), per_epoch


def plot_step_loss(history: Sequence[Mapping[str, Any]]) -> Figure:
    """The training loss of every step: the raw points under their moving average.

    The loss of a step is the minibatch's negative objective in nats per
    datum (the β-weighted ELBO, or the IWAE bound, as trained), so it falls
    as training improves; its scatter is the gradient noise of the
    minibatches. The top axis marks epochs. A few losses far above the rest
    (typically the first steps, from random weights) are left above the y
    range and counted in a corner, so the rest of the curve stays readable.

    Args:
        history: The per-epoch records of ``metrics.jsonl``, with ``step_losses``.

    Returns:
        A figure with one axis: x = step (top: epoch), y = loss in nats per datum.

    Raises:
        DataError: no record has ``step_losses`` (:func:`step_series`).
    """
    steps, losses, per_epoch = step_series(history)
    window = max(3, 2 * (len(losses) // 100) + 1) if len(losses) >= 10 else 1  # ~2%, centred
    smooth = moving_average(losses, window)
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    dense = len(losses) > 2000  # many dots: smaller and lighter, the line stays on top
    ax.plot(
        steps, losses, ".", markersize=2 if dense else 4, color="C0", alpha=0.25 if dense else 0.5,
        label="loss of each step",
    )  # fmt: skip
    label = f"moving average ({window} steps)" if window > 1 else "loss"
    ax.plot(steps, smooth, "-", color="C1", linewidth=2, label=label)
    lo, hi, cap = float(losses.min()), float(losses.max()), float(np.quantile(losses, 0.98))
    if cap > lo and hi > cap + 0.5 * (cap - lo):  # outliers would squash the curve
        margin = 0.08 * (cap - lo)
        ax.set_ylim(lo - margin, cap + margin)
        above = int(np.sum(losses > cap + margin))
        ax.text(
            0.01, 0.03, f"{above} step{'s' * (above != 1)} above the axis, up to {hi:.1f}",
            transform=ax.transAxes, ha="left", va="bottom", fontsize=9, color="0.3",
        )  # fmt: skip
    ax.set_xlabel("step (minibatch update)", fontsize=11)
    ax.set_ylabel("loss (nats per datum)", fontsize=11)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    top = ax.secondary_xaxis(
        "top", functions=(lambda s: s / per_epoch, lambda e: e * per_epoch)
    )  # fmt: skip
    top.set_xlabel("epoch", fontsize=10)
    top.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title("Training loss per step", fontsize=12)
    ax.grid(alpha=0.3)
    _legend(ax, fontsize=9, loc="upper right", markerscale=2)
    return fig


# --- generation -------------------------------------------------------------------


def plot_prior_samples(vae: VAE, n: int = 64, seed: int = 0) -> Figure:
    """A grid of ``n`` images decoded from :math:`z \\sim p(z)`.

    Returns:
        A figure with one axis holding the image grid.

    Raises:
        DataError: the data are not images.
    """
    _require_images(vae.event_shape)
    nrow = math.ceil(math.sqrt(n))
    grid = image_grid(sample_prior_images(vae, n, seed), nrow=nrow)
    fig = _figure(5, 5 * grid.shape[1] / grid.shape[2] + 0.4)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_title(r"samples: $z \sim p(z)$, decoded to $\mathbb{E}[x|z]$")
    return fig


def plot_samples_over_training(
    snapshots: Sequence[tuple[int, torch.Tensor]], max_rows: int = 12
) -> Figure:
    """Decoded prior samples after each snapshot epoch: one row per epoch, the same z per column.

    Each column decodes one fixed draw :math:`z \\sim p(z)` (the snapshots'
    seed) with the decoder of that row's epoch, so reading a column downwards
    shows one sample taking shape as training goes on. All rows share one
    grey scale.

    Args:
        snapshots: ``[(epoch, images (n, *event_shape)), ...]`` by epoch
            (:func:`pyro_vae.train.read_snapshots`).
        max_rows: Most rows drawn; more snapshots are thinned evenly, keeping
            the first and the last.

    Returns:
        A figure with one axis: the image grid, rows labelled by epoch.

    Raises:
        DataError: no snapshots, or the data are not images.
    """
    if not snapshots:
        raise DataError("no snapshots of prior samples")
    _require_images(snapshots[0][1].shape[1:])
    if len(snapshots) > max_rows:
        keep = np.unique(np.round(np.linspace(0, len(snapshots) - 1, max_rows)).astype(int))
        snapshots = [snapshots[i] for i in keep]
    columns = min(len(images) for _, images in snapshots)
    padding = 1
    grid = image_grid(
        torch.cat([images[:columns] for _, images in snapshots]), nrow=columns, padding=padding
    )
    height = _as_images(snapshots[0][1]).shape[-2]
    width = 6.5
    fig = _figure(width + 1.0, width * grid.shape[1] / grid.shape[2] + 0.7)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    centres = [
        padding + row * (height + padding) + (height - 1) / 2 for row in range(len(snapshots))
    ]
    ax.set_yticks(centres, [f"epoch {epoch}" for epoch, _ in snapshots], fontsize=10)
    ax.tick_params(axis="y", length=0)
    ax.set_xlabel("each column: one fixed draw of z, decoded after that epoch", fontsize=10)
    ax.set_title(r"samples over training: $\mathbb{E}[x|z]$, the same $z \sim p(z)$ per column")
    return fig


def plot_reconstructions(vae: VAE, x: torch.Tensor, n: int = 8, seed: int = 0) -> Figure:
    """Inputs (top row) beside the decoded posterior means (bottom row).

    The reconstruction of :math:`x` is :math:`\\mathbb E_{p(x|z)}[x]` at
    :math:`z = \\mathbb E_{q(z|x)}[z]`.

    Args:
        vae: The model.
        x: Data ``(N, *event_shape)``; ``n`` of them are chosen with ``seed``.
        n: How many inputs to show.
        seed: Seed of the choice.

    Returns:
        A figure with one axis holding a 2-row image grid.
    """
    _require_images(vae.event_shape)
    chosen = x[_subset(len(x), n, seed)]
    recon = decode_mean(vae, posterior_mean(vae, chosen))
    grid = image_grid(torch.cat([chosen, recon]), nrow=len(chosen))
    fig = _figure(1 + 0.9 * len(chosen), 2.4)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_title("reconstructions: inputs (top), decoded posterior means (bottom)")
    return fig


def plot_interpolations(
    vae: VAE, x: torch.Tensor, pairs: int = 5, steps: int = 8, seed: int = 0
) -> Figure:
    """Decoded straight lines in latent space between pairs of data.

    Row ``i`` shows :math:`x_a`, then :math:`\\mathbb E[x|z_t]` for
    :math:`z_t = (1-t)\\,\\mu(x_a) + t\\,\\mu(x_b)`, ``t`` in ``steps`` values
    from 0 to 1, then :math:`x_b`, with :math:`\\mu(x)` the posterior mean.

    Returns:
        A figure with one axis holding a ``pairs x (steps + 2)`` image grid.
    """
    _require_images(vae.event_shape)
    index = _subset(len(x), 2 * pairs, seed)
    pairs = len(index) // 2
    if pairs < 1:
        raise DataError("interpolation needs at least 2 data")
    a, b = x[index[:pairs]], x[index[pairs : 2 * pairs]]
    za, zb = posterior_mean(vae, a), posterior_mean(vae, b)
    t = torch.linspace(0, 1, steps).view(1, steps, 1)
    z = (1 - t) * za.unsqueeze(1) + t * zb.unsqueeze(1)  # (pairs, steps, D)
    decoded = decode_mean(vae, z)  # (pairs, steps, *event)
    rows = torch.cat([a.unsqueeze(1), decoded, b.unsqueeze(1)], dim=1)
    grid = image_grid(rows.flatten(0, 1), nrow=steps + 2)
    fig = _figure(0.7 * (steps + 2) + 0.5, 0.7 * pairs + 0.8)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    ax.set_title("interpolations between posterior means (data at both ends)")
    return fig


def _prior_quantiles(vae: VAE, u: torch.Tensor, seed: int) -> torch.Tensor:
    """Marginal quantiles of the prior at levels ``u`` (n,), shape ``(n, D)``.

    The closed-form inverse CDF of a factorized prior where it exists, else
    empirical quantiles of 20,000 prior draws.
    """
    prior = vae.prior()
    base = getattr(prior, "base_dist", None)
    levels = u.unsqueeze(-1).expand(len(u), vae.latent_dim)
    if base is not None:
        try:
            return base.icdf(levels)
        except (NotImplementedError, AttributeError, ValueError, RuntimeError):
            pass
    with seeded(seed):
        draws = prior.sample((20000,))
    return torch.quantile(draws, u, dim=0)


@torch.no_grad()
def plot_manifold(vae: VAE, n: int = 15, seed: int = 0) -> Figure:
    """The learned 2-D manifold: images decoded on a grid of prior quantiles.

    Column ``j`` uses :math:`z_1 = F_1^{-1}(u_j)` and row ``i`` (top to
    bottom) :math:`z_2 = F_2^{-1}(u_{n-1-i})`, with ``u`` evenly spaced in
    [0.05, 0.95] and :math:`F_d` the prior's marginal CDF (Kingma & Welling
    2014, Fig. 4), so equal areas of the grid carry equal prior mass.

    Returns:
        A figure with one axis holding an ``n x n`` image grid.

    Raises:
        DataError: the latent space is not 2-D, or the data are not images.
    """
    if vae.latent_dim != 2:
        raise DataError(f"the manifold plot needs latent_dim = 2, this model has {vae.latent_dim}")
    _require_images(vae.event_shape)
    u = torch.linspace(0.05, 0.95, n)
    q = _prior_quantiles(vae, u, seed)  # (n, 2)
    z1 = q[:, 0].view(1, n).expand(n, n)
    z2 = q.flip(0)[:, 1].view(n, 1).expand(n, n)
    z = torch.stack([z1, z2], dim=-1).reshape(n * n, 2)
    grid = image_grid(decode_mean(vae, z), nrow=n)
    fig = _figure(6, 6.3)
    ax = fig.add_subplot()
    _show_grid(ax, grid)
    height, width = vae.event_shape[-2:]
    centers_x = [1 + j * (width + 1) + width / 2 for j in (0, n // 2, n - 1)]
    centers_y = [1 + i * (height + 1) + height / 2 for i in (0, n // 2, n - 1)]
    ax.set_xticks(centers_x, [f"{float(q[j, 0]):.2f}" for j in (0, n // 2, n - 1)])
    ax.set_yticks(centers_y, [f"{float(q[n - 1 - i, 1]):.2f}" for i in (0, n // 2, n - 1)])
    ax.set_xlabel(r"$z_1$ (prior quantiles 0.05 to 0.95)")
    ax.set_ylabel(r"$z_2$ (prior quantiles 0.05 to 0.95)")
    ax.set_title("2-D latent manifold")
    return fig


# --- the latent space -------------------------------------------------------------


def _project(z: np.ndarray) -> tuple[np.ndarray, tuple[str, str]]:
    """Two coordinates to draw: z itself when D = 2, else PCA (a jitter axis when D = 1)."""
    if z.shape[1] == 2:
        return z, (r"$z_1$", r"$z_2$")
    if z.shape[1] == 1:
        jitter = np.random.RandomState(0).uniform(-0.5, 0.5, len(z))
        return np.stack([z[:, 0], jitter], 1), (r"$z_1$", "jitter (no meaning)")
    from sklearn.decomposition import PCA

    pca = PCA(n_components=2, random_state=0)
    projected = pca.fit_transform(z)
    r = pca.explained_variance_ratio_
    return projected, (f"PC 1 ({100 * r[0]:.0f}% of variance)", f"PC 2 ({100 * r[1]:.0f}%)")


def _scatter_latent(
    ax: Axes, vae: VAE, x: torch.Tensor, labels: torch.Tensor | None, title: str
) -> None:
    z = posterior_mean(vae, x).cpu().numpy()
    points, (xlabel, ylabel) = _project(z)
    if labels is None:
        ax.scatter(points[:, 0], points[:, 1], s=6, alpha=0.6, color="C0")
    else:
        lab = labels.cpu().numpy()
        classes = np.unique(lab)
        cmap = "tab10" if len(classes) <= 10 else "tab20"
        paths = ax.scatter(points[:, 0], points[:, 1], c=lab, cmap=cmap, s=6, alpha=0.7)
        if len(classes) <= 20:
            handles, names = paths.legend_elements(num=list(classes))
            ax.legend(handles, names, title="label", fontsize=7, loc="best", markerscale=0.8)
    kind = "" if z.shape[1] <= 2 else f" (PCA of D = {z.shape[1]})"
    ax.set_title(title + kind)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)


def plot_latent_scatter(
    vae: VAE,
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    max_points: int = 3000,
    seed: int = 0,
) -> Figure:
    """The posterior means :math:`\\mathbb E_{q(z|x)}[z]` of data, coloured by label.

    Drawn directly when ``D = 2``, else projected on their first two
    principal components (PCA of the means).

    Args:
        vae: The model (with an amortized guide).
        x: Data ``(N, *event_shape)``.
        labels: Labels ``(N,)`` or ``None``.
        max_points: At most this many data, chosen with ``seed``.
        seed: Seed of the choice.

    Returns:
        A figure with one axis.
    """
    index = _subset(len(x), max_points, seed)
    fig = _figure(5.5, 5)
    ax = fig.add_subplot()
    chosen_labels = None if labels is None else labels[index]
    _scatter_latent(ax, vae, x[index], chosen_labels, "posterior means")
    return fig


def model_kind(vae: VAE) -> str:
    """``"AE"`` for a point-estimate guide (KL weight 0), else ``"VAE"``."""
    return "AE" if vae.posterior.is_point_estimate else "VAE"


def plot_latent_comparison(
    models: Mapping[str, VAE],
    x: torch.Tensor,
    labels: torch.Tensor | None = None,
    max_points: int = 3000,
    seed: int = 0,
) -> Figure:
    """The latent spaces of several models on the same data, side by side (e.g. AE vs VAE).

    An autoencoder's codes are unconstrained, so they may spread over any
    scale and leave gaps; a VAE's KL term pulls the posterior means towards
    the prior, giving a compact space without holes that decodes well.

    Args:
        models: Title -> model, trained on data of the same shape.
        x: Data ``(N, *event_shape)``; the same chosen points go to every panel.
        labels: Labels ``(N,)`` or ``None``.
        max_points: At most this many data.
        seed: Seed of the choice.

    Returns:
        A figure with one axis per model.
    """
    if not models:
        raise DataError("plot_latent_comparison needs at least one model")
    index = _subset(len(x), max_points, seed)
    chosen_labels = None if labels is None else labels[index]
    fig = _figure(5 * len(models), 4.8)
    axes = fig.subplots(1, len(models), squeeze=False)[0]
    for ax, (title, vae) in zip(axes, models.items(), strict=True):
        if tuple(vae.event_shape) != tuple(x.shape[1:]):
            raise DataError(
                f"model {title!r} expects data of shape {tuple(vae.event_shape)}, "
                f"got {tuple(x.shape[1:])}"
            )
        _scatter_latent(ax, vae, x[index], chosen_labels, title)
    return fig


def compare_runs(
    run_a: str | os.PathLike[str], run_b: str | os.PathLike[str], split: str = "test"
) -> Figure:
    """:func:`plot_latent_comparison` of two run directories on ``split`` of run A's data.

    Raises:
        DataError: the runs were trained on different datasets or datum shapes.
        CheckpointError: a run directory has no checkpoint.
    """
    from .checkpoint import CONFIG_FILE, load
    from .config import Config
    from .train import load_data

    paths = [Path(run_a), Path(run_b)]
    configs = [Config.load(p / CONFIG_FILE, relative_to_file=False) for p in paths]
    if configs[0].data.name != configs[1].data.name:
        raise DataError(
            f"the runs use different datasets ({configs[0].data.name} vs "
            f"{configs[1].data.name}); compare runs trained on the same data"
        )
    vaes = [load(p) for p in paths]
    data = load_data(configs[0])
    x = data.split(split)
    models = {}
    for path, config, vae in zip(paths, configs, vaes, strict=True):
        title = f"{model_kind(vae)}: {path.name} ({config.model.guide.name} guide)"
        models[title if title not in models else f"{title} [2]"] = vae
    return plot_latent_comparison(models, x, data.labels.get(split))


# --- posterior collapse -----------------------------------------------------------


def plot_kl_per_dim(
    kl: Sequence[float] | torch.Tensor,
    activity: Sequence[float] | torch.Tensor | None = None,
    threshold: float = ACTIVE_UNIT_THRESHOLD,
) -> Figure:
    """KL per latent dimension as bars; with ``activity``, a second panel of :math:`A_d`.

    Args:
        kl: Mean :math:`\\mathrm{KL}(q(z_d|x)\\|p(z_d))` per dimension, ``(D,)``
            (e.g. the last ``test_kl_per_dim``, or :func:`mean_kl_per_dim`).
        activity: :math:`A_d` per dimension (:func:`active_units`), or ``None``.
        threshold: The activity threshold, drawn as a line.

    Returns:
        A figure with one axis (KL), or two (KL, activity on a log scale)
        when ``activity`` is given; bars of inactive dimensions are grey.
    """
    values = np.asarray(kl, dtype=float)
    dims = np.arange(len(values))
    active = None if activity is None else np.asarray(activity, dtype=float) > threshold
    colors = ["C0"] * len(values) if active is None else ["C0" if a else "0.7" for a in active]
    fig = _figure(max(5, 0.3 * len(values) + 2), 3.2 if activity is None else 5.5)
    axes = fig.subplots(1 if activity is None else 2, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].bar(dims, values, color=colors)
    axes[0].set_ylabel("KL (nats per datum)")
    axes[0].set_title(f"KL per latent dimension (total {values.sum():.2f} nats)")
    if activity is not None:
        act = np.asarray(activity, dtype=float)
        axes[1].bar(dims, np.maximum(act, 1e-12), color=colors)
        axes[1].axhline(threshold, color="C3", linestyle="--", label=f"threshold {threshold:g}")
        axes[1].set_yscale("log")
        axes[1].yaxis.set_minor_formatter(NullFormatter())
        axes[1].set_ylabel(r"activity $\mathrm{Cov}_x(\mathbb{E}_q[z_d])$")
        axes[1].set_title(f"active units: {int(active.sum())} of {len(act)} (grey: inactive)")
        _legend(axes[1], fontsize=8)
    axes[-1].set_xlabel("latent dimension d")
    if len(values) <= 32:
        axes[-1].set_xticks(dims)
    for ax in axes:
        ax.grid(alpha=0.3, axis="y")
    return fig


# --- evaluation diagnostics ------------------------------------------------------


def iwae_curve(evaluation: Mapping[str, Any]) -> dict[int, float]:
    """The IWAE bounds :math:`\\mathcal L_K` of an evaluation by K, including the K of its estimate.

    An importance-sampling estimate with ``K = num_samples`` draws,
    :math:`\\log \\hat p(x) = \\log \\frac1K \\sum_k p(x, z_k)/q(z_k|x)` averaged over
    the data, *is* :math:`\\mathcal L_K` at that K. The listed bounds
    (``iwae``; by default 1, 10, 100, 1000, 5000 up to K) may stop short of
    it (K = 500 lists 1, 10, 100), so ``log_likelihood`` is added at
    ``num_samples``. Not for AIS (``estimator: ais``): its estimate is no
    IWAE bound and its ``num_samples`` counts chains.

    Args:
        evaluation: The contents of ``evaluation.json``.

    Returns:
        K -> bound in nats per datum, in increasing K; empty when the
        evaluation lists no bounds.
    """
    bounds = {int(k): float(v) for k, v in (evaluation.get("iwae") or {}).items() if v is not None}
    if not bounds:
        return {}
    k_used, ll = evaluation.get("num_samples"), evaluation.get("log_likelihood")
    is_estimate = evaluation.get("estimator", "is") == "is"
    if is_estimate and isinstance(k_used, int) and ll is not None and k_used not in bounds:
        bounds[k_used] = float(ll)
    return dict(sorted(bounds.items()))


def plot_iwae_bound(evaluation: Mapping[str, Any]) -> Figure:
    """The IWAE bound against the number of importance samples K, up to the K of the estimate.

    .. math::

        \\mathcal L_K(x) = \\mathbb E\\Big[\\log \\frac1K \\sum_{k=1}^K
            \\frac{p(x, z_k)}{q(z_k|x)}\\Big], \\qquad z_k \\sim q(z|x),

    rises with K (:math:`\\mathcal L_1` is the ELBO) towards
    :math:`\\log p(x)` (Burda et al. 2016). A curve still climbing at the
    largest K means the estimate is still short of :math:`\\log p(x)`.

    Args:
        evaluation: The contents of ``evaluation.json``: ``iwae`` (K as a
            string -> bound), and optionally ``log_likelihood`` with
            ``log_likelihood_mc_stderr`` (the band; else ``log_likelihood_stderr``),
            ``elbo``, ``exact_log_likelihood``, ``num_samples`` (the K of
            ``log_likelihood``, added to the curve by :func:`iwae_curve`).

    Returns:
        A figure with one axis: x = K (log scale), y = nats per datum.
    """
    curve = iwae_curve(evaluation)
    if not curve:
        raise DataError("evaluation.json has no IWAE bounds ('iwae' is empty or absent)")
    k_values = list(curve)
    fig = _figure(6, 3.8)
    ax = fig.add_subplot()
    ax.plot(k_values, list(curve.values()), "o-", label=r"IWAE bound $\mathcal{L}_K$")
    ll = evaluation.get("log_likelihood")
    if ll is not None:
        k_max = evaluation.get("num_samples", max(k_values))
        label = rf"$\log \hat p(x)$, K = {k_max}"
        mc_se = evaluation.get("log_likelihood_mc_stderr")
        se = mc_se if mc_se is not None else evaluation.get("log_likelihood_stderr")
        if se:
            kind = "Monte Carlo" if mc_se is not None else "over the data"
            label += rf" ($\pm$ 2 s.e. {kind})"
            ax.axhspan(ll - 2 * se, ll + 2 * se, color="C1", alpha=0.2)
        ax.axhline(ll, color="C1", label=label)
    if evaluation.get("elbo") is not None:
        ax.axhline(evaluation["elbo"], color="C2", linestyle=":", label="ELBO")
    if evaluation.get("exact_log_likelihood") is not None:
        ax.axhline(
            evaluation["exact_log_likelihood"], color="k", linestyle="--", label="exact log p(x)"
        )
    ax.set_xscale("log")
    ax.set_xticks(k_values, [str(k) for k in k_values])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("K (importance samples per datum)")
    ax.set_ylabel("nats per datum")
    ax.set_title("IWAE bound against K")
    _legend(ax, fontsize=8)
    ax.grid(alpha=0.3)
    return fig


#: The reference lines of :func:`plot_khat`: k-hat -> (label, colour, line style).
KHAT_LINES: dict[float, tuple[str, str, str]] = {
    0.5: ("0.5: finite variance below (good)", "C2", "--"),
    KHAT_THRESHOLD: (f"{KHAT_THRESHOLD}: unreliable above", "C1", "-."),
    1.0: ("1: infinite mean above", "C3", ":"),
}


def plot_khat(khat: Sequence[float] | np.ndarray) -> Figure:
    """The Pareto :math:`\\hat k` of each datum's importance weights, with labelled thresholds.

    :math:`\\hat k` is the fitted shape of the generalized Pareto tail of the
    weights :math:`p(x, z_k)/q(z_k|x)`; the weights have finite moments of
    order below :math:`1/k`. Below 0.5 their variance is finite and the
    estimate of :math:`\\log p(x)` converges fast; from 0.5 to 0.7 the
    variance is infinite but the estimate is usable in practice; above 0.7 it
    is unreliable (too few samples to reach its limit); above 1 even the
    weights' mean is infinite (Vehtari et al. 2024, "Pareto Smoothed
    Importance Sampling"). Data above 0.7 are drawn in red.

    Args:
        khat: :math:`\\hat k` per datum (NaN values, where undefined, are left out).

    Returns:
        A figure with one axis: x = datum, y = :math:`\\hat k`, and one labelled
        horizontal line at each of 0.5, 0.7 and 1 (:data:`KHAT_LINES`, in the legend).
    """
    values = np.asarray(khat, dtype=float)
    index = np.flatnonzero(np.isfinite(values))
    values = values[index]
    if values.size == 0:
        raise DataError(
            "k-hat is undefined (no finite values: fewer than 25 importance samples per datum "
            "are too few to fit the Pareto tail)"
        )
    fig = _figure(7.5, 3.8)
    ax = fig.add_subplot()
    bad = values > KHAT_THRESHOLD
    ax.scatter(index[~bad], values[~bad], s=10, color="C0", label="datum")
    if bad.any():
        ax.scatter(index[bad], values[bad], s=14, color="C3", label=f"datum above {KHAT_THRESHOLD}")
    for level, (label, color, style) in KHAT_LINES.items():
        ax.axhline(level, color=color, linestyle=style, linewidth=1.5, label=label)
    above = float(np.mean(bad))
    ax.set_title(rf"Pareto $\hat{{k}}$ per datum: {100 * above:.1f}% above {KHAT_THRESHOLD}")
    ax.set_xlabel("datum", fontsize=11)
    ax.set_ylabel(r"$\hat{k}$", fontsize=11)
    ax.tick_params(labelsize=10)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=False)
    return fig


def plot_ess(ess: Sequence[float] | np.ndarray, num_samples: int | None = None) -> Figure:
    """Histogram of the per-datum effective sample size of the importance weights.

    .. math::

        \\mathrm{ESS}(x) = \\frac{(\\sum_k w_k)^2}{\\sum_k w_k^2}
            \\in [1, K], \\qquad w_k = \\frac{p(x, z_k)}{q(z_k|x)}.

    An ESS near 1 means a single sample carries all the weight: q(z|x) is a
    poor proposal for that datum (Kong 1992; Owen 2013, ch. 9).

    Args:
        ess: ESS per datum.
        num_samples: K, drawn as a line (the largest possible ESS).

    Returns:
        A figure with one axis.
    """
    values = np.asarray(ess, dtype=float)
    if values.size == 0:
        raise DataError("no ESS values to plot")
    fig = _figure(6, 3.4)
    ax = fig.add_subplot()
    ax.hist(values, bins=30, color="C0")
    ax.axvline(values.mean(), color="C1", label=f"mean {values.mean():.1f}")
    if num_samples is not None:
        ax.axvline(num_samples, color="k", linestyle="--", label=f"K = {num_samples}")
    ax.set_xlabel("effective sample size per datum")
    ax.set_ylabel("data")
    ax.set_title("ESS of the importance weights")
    _legend(ax, fontsize=8)
    return fig


#: Per-datum gaps drawn by :func:`plot_gaps`: key -> panel title (name, then formula).
GAPS = {
    "inference_gap": "inference gap\n" r"$\log \hat p(x) - \mathrm{ELBO}_q(x)$",
    "approximation_gap": "approximation gap\n" r"$\log \hat p(x) - \mathrm{ELBO}_{q^*}(x)$",
    "amortization_gap": "amortization gap\n" r"$\mathrm{ELBO}_{q^*}(x) - \mathrm{ELBO}_q(x)$",
}
#: Font sizes (points) of :func:`plot_gaps`: panel titles, axis labels, ticks, legends.
GAP_FONTS = {"title": 12, "label": 11, "ticks": 10, "legend": 10}


def plot_gaps(per_datum: Mapping[str, np.ndarray]) -> Figure:
    """Histograms of per-datum gaps between bounds, one titled panel per gap available.

    The inference gap :math:`\\log \\hat p(x) - \\mathrm{ELBO}(x)` estimates
    :math:`\\mathrm{KL}(q(z|x)\\,\\|\\,p(z|x)) \\ge 0` (single estimates can be
    slightly negative from Monte Carlo noise). When present, it splits into the
    approximation gap :math:`\\log p(x) - \\mathrm{ELBO}_{q^*}(x)` (the best
    member of the guide's family) and the amortization gap
    :math:`\\mathrm{ELBO}_{q^*}(x) - \\mathrm{ELBO}_q(x)` (the encoder's
    shortfall) (Cremer, Li & Duvenaud 2018, "Inference Suboptimality in
    Variational Autoencoders").

    Args:
        per_datum: Arrays ``(N,)`` of ``evaluation_per_datum.npz``: needs
            ``log_likelihood`` (or ``guide_log_likelihood``, the guide-proposal
            estimate, used first when present) and ``elbo``; optional
            ``approximation_gap``, ``amortization_gap``. Non-finite values are
            left out.

    Returns:
        A figure with one axis per gap, each with its title (:data:`GAPS`),
        x and y labels and the mean as a labelled line (:data:`GAP_FONTS`).
    """
    gaps: dict[str, np.ndarray] = {}
    log_lik = per_datum.get("guide_log_likelihood", per_datum.get("log_likelihood"))
    if log_lik is not None and "elbo" in per_datum:
        gaps["inference_gap"] = np.asarray(log_lik, float) - np.asarray(per_datum["elbo"], float)
    for key in ("approximation_gap", "amortization_gap"):
        if key in per_datum:
            gaps[key] = np.asarray(per_datum[key], dtype=float)
    gaps = {k: v[np.isfinite(v)] for k, v in gaps.items() if np.isfinite(v).any()}
    if not gaps:
        raise DataError("the per-datum arrays hold no gaps (need log_likelihood and elbo)")
    fig = _figure(max(5.0, 3.4 * len(gaps)), 3.8)
    axes = fig.subplots(1, len(gaps), squeeze=False)[0]
    for ax, (key, values) in zip(axes, gaps.items(), strict=True):
        ax.hist(values, bins=30, color="C0")
        ax.axvline(values.mean(), color="C1", linewidth=2, label=f"mean {values.mean():.2f}")
        ax.set_title(GAPS[key], fontsize=GAP_FONTS["title"])
        ax.set_xlabel("gap (nats per datum)", fontsize=GAP_FONTS["label"])
        ax.set_ylabel("number of data", fontsize=GAP_FONTS["label"])
        ax.tick_params(labelsize=GAP_FONTS["ticks"])
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5))
        _legend(ax, fontsize=GAP_FONTS["legend"])
    return fig


#: The narrowest PNG grid :func:`save_image_grid` writes by default, in pixels.
MIN_GRID_WIDTH = 256


def save_image_grid(
    images: torch.Tensor, path: str | os.PathLike[str], nrow: int, scale: int | None = None
) -> Path:
    """Write ``images`` ``(B, H, W)`` or ``(B, C, H, W)`` as one PNG grid; returns the path.

    Each pixel becomes a ``scale`` x ``scale`` block (nearest neighbour); by
    default the smallest scale that makes the grid at least
    :data:`MIN_GRID_WIDTH` pixels wide (8 x 8 digits would be a stamp otherwise).
    """
    from torchvision.utils import save_image

    grid = image_grid(images, nrow=nrow, padding=2)
    if scale is None:
        scale = max(1, math.ceil(MIN_GRID_WIDTH / grid.shape[-1]))
    grid = grid.repeat_interleave(scale, -1).repeat_interleave(scale, -2)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, path, format="png")
    return path
