"""Figures: each plot function draws the expected axes and data on a tiny run."""

import dataclasses
import shutil
import subprocess
import sys

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from matplotlib.colors import to_rgba

import pyro_vae
from pyro_vae import plots
from pyro_vae.errors import DataError
from pyro_vae.guides import Guide
from pyro_vae.model import VAE
from pyro_vae.priors import StandardNormalPrior


def tiny_config(latent_dim):
    model = dataclasses.replace(
        pyro_vae.ModelConfig(latent_dim=latent_dim),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [32]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [32]}),
    )
    return pyro_vae.Config(model=model, train=pyro_vae.TrainConfig(epochs=2, batch_size=100))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_run):
    """Two tiny digits runs: D = 2 (manifold, direct scatter; the shared one) and D = 4 (PCA)."""
    assert tiny_run[1].config.model.latent_dim == 2
    root = tmp_path_factory.mktemp("runs")
    result = pyro_vae.fit(tiny_config(4), root / "d4")
    return {2: tiny_run, 4: (root / "d4", result)}


@pytest.fixture(scope="module")
def run2(runs):
    run_dir, result = runs[2]
    vae = pyro_vae.load(run_dir)
    x, labels = result.data.split("test"), result.data.labels["test"]
    return run_dir, vae, pyro_vae.read_metrics(run_dir), x, labels


def fake_evaluation(n, k_max=64, seed=0, gaps=True):
    """Made-up but consistent evaluation files: log p(x) >= IWAE_K >= ELBO, ESS in [1, K]."""
    rng = np.random.RandomState(seed)
    elbo = rng.normal(-30.0, 3.0, n)
    total_gap = np.abs(rng.normal(1.0, 0.5, n))
    log_lik = elbo + total_gap
    ks = [1, 4, 16, k_max]
    iwae = {str(k): float(np.mean(elbo + total_gap * (1 - 1 / np.sqrt(k)))) for k in ks}
    khat = rng.normal(0.4, 0.2, n)
    per_datum = {
        "log_likelihood": log_lik,
        "elbo": elbo,
        "ess": rng.uniform(1, k_max, n),
        "khat": khat,
    }
    if gaps:
        share = rng.uniform(0, 1, n)
        per_datum["approximation_gap"] = total_gap * share
        per_datum["amortization_gap"] = total_gap * (1 - share)
    summary = {
        "split": "test",
        "num_data": n,
        "num_samples": k_max,
        "log_likelihood": float(log_lik.mean()),
        "log_likelihood_stderr": float(log_lik.std(ddof=1) / np.sqrt(n)),
        "elbo": float(elbo.mean()),
        "iwae": iwae,
        "ess_mean": float(per_datum["ess"].mean()),
        "khat_fraction_above_0_7": float(np.mean(khat > 0.7)),
    }
    return summary, per_datum


# --- helpers ------------------------------------------------------------------------


def test_posterior_mean_and_decode_mean_are_the_distribution_means(run2):
    _, vae, _, x, _ = run2
    with torch.no_grad():
        q = vae.posterior(x)
        expected = q.mean
        decoded = vae.likelihood(expected).mean
    means = plots.posterior_mean(vae, x, batch_size=50)  # several batches
    assert torch.allclose(means, expected, atol=1e-6)
    assert torch.allclose(plots.decode_mean(vae, means), decoded, atol=1e-6)


def test_image_grid_puts_each_image_in_its_tile():
    images = torch.rand(6, 5, 4)
    grid = plots.image_grid(images, nrow=3, padding=1)
    assert grid.shape == (3, 2 * (5 + 1) + 1, 3 * (4 + 1) + 1)
    for i in range(6):
        row, col = divmod(i, 3)
        tile = grid[0, 1 + row * 6 : 1 + row * 6 + 5, 1 + col * 5 : 1 + col * 5 + 4]
        assert torch.allclose(tile, images[i])


def test_image_grid_rescales_values_outside_the_unit_interval():
    images = torch.tensor([[[-1.0, 3.0]]])  # one 1x2 image
    grid = plots.image_grid(images, nrow=1, padding=0)
    assert torch.allclose(grid[0, 0], torch.tensor([0.0, 1.0]))


def test_figures_leave_the_global_rng_alone(run2):
    _, vae, _, x, _ = run2
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    plots.plot_prior_samples(vae, 16)
    plots.plot_reconstructions(vae, x)
    assert torch.equal(torch.rand(3), expected)


def test_prior_samples_depend_on_the_seed_only(run2):
    _, vae, _, _, _ = run2
    a, b = plots.sample_prior_images(vae, 5, seed=1), plots.sample_prior_images(vae, 5, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, plots.sample_prior_images(vae, 5, seed=2))
    assert a.shape == (5, 8, 8) and float(a.min()) >= 0 and float(a.max()) <= 1


def test_figure_png_is_a_png(run2):
    png = plots.figure_png(plots.plot_elbo(run2[2]))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


# --- training curves ----------------------------------------------------------------


def line(ax, label):
    (match,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return list(match.get_xdata()), list(match.get_ydata())


def test_plot_elbo_draws_train_and_test_per_epoch(run2):
    history = run2[2]
    fig = plots.plot_elbo(history)
    (ax,) = fig.axes
    epochs = [r["epoch"] for r in history]
    assert line(ax, "train") == (epochs, [r["train_elbo"] for r in history])
    assert line(ax, "test") == (epochs, [r["test_elbo"] for r in history])
    assert ax.get_xlabel() == "epoch" and "ELBO" in ax.get_ylabel()


def test_plot_elbo_terms_draws_reconstruction_and_kl_apart(run2):
    history = run2[2]
    rec_ax, kl_ax = plots.plot_elbo_terms(history).axes
    assert line(rec_ax, "test")[1] == [r["test_reconstruction"] for r in history]
    assert line(kl_ax, "test")[1] == [r["test_kl"] for r in history]
    assert "reconstruction" in rec_ax.get_title() and "KL" in kl_ax.get_title()


def kl_history(epochs, dims, seed=0):
    rng = np.random.RandomState(seed)
    return [{"epoch": e, "test_kl_per_dim": rng.uniform(0, 2, dims).tolist()} for e in epochs]


def test_plot_kl_history_is_a_heatmap_of_epochs_by_dimensions(run2):
    history = run2[2]
    fig = plots.plot_kl_history(history)
    ax, colorbar_ax = fig.axes
    assert ax.get_lines() == []  # no line per dimension: cells
    (mesh,) = ax.collections
    expected = np.array([r["test_kl_per_dim"] for r in history]).T  # (D, E)
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(expected.shape), expected)
    assert ax.get_xlabel() == "epoch" and ax.get_ylabel() == "latent dimension d"
    assert colorbar_ax.get_ylabel() == "KL (nats)"
    assert mesh.norm.vmin == 0.0


def test_plot_kl_history_tells_sixteen_dimensions_apart():
    history = kl_history([1, 2, 4], 16)  # epoch 3 has no record
    ax, colorbar_ax = plots.plot_kl_history(history).axes
    (mesh,) = ax.collections
    corners = mesh.get_coordinates()  # (D + 1, E + 1, 2)
    assert corners.shape == (17, 5, 2)
    centres_x = (corners[0, 1:, 0] + corners[0, :-1, 0]) / 2
    np.testing.assert_allclose(centres_x, [1, 2, 3, 4])  # every cell centred on its epoch
    cells = mesh.get_array().reshape(16, 4)
    assert cells.mask[:, 2].all() and not cells.mask[:, [0, 1, 3]].any()  # epoch 3: blank
    np.testing.assert_allclose(cells[:, 3], history[2]["test_kl_per_dim"])
    centres_y = (corners[1:, 0, 1] + corners[:-1, 0, 1]) / 2
    np.testing.assert_allclose(centres_y, np.arange(16))
    assert [int(t) for t in ax.get_yticks()] == list(range(16))  # every dimension labelled
    assert "D = 16" in ax.get_title() and colorbar_ax.get_ylabel() == "KL (nats)"


def test_curves_need_records():
    with pytest.raises(DataError, match="no epochs"):
        plots.plot_elbo([])
    history = [{"epoch": 1, "train_elbo": -1.0, "test_elbo": -1.0}]
    with pytest.raises(DataError, match="test_kl_per_dim"):
        plots.plot_kl_history(history)


# --- generation ---------------------------------------------------------------------


def grid_shape(ax):
    return ax.images[0].get_array().shape


def test_plot_prior_samples_is_one_grid(run2):
    (ax,) = plots.plot_prior_samples(run2[1], n=64).axes
    assert grid_shape(ax) == (8 * 9 + 1, 8 * 9 + 1, 3)  # 8x8 digits, 1-pixel padding


def test_plot_reconstructions_shows_inputs_above_reconstructions(run2):
    _, vae, _, x, _ = run2
    (ax,) = plots.plot_reconstructions(vae, x, n=6, seed=3).axes
    assert grid_shape(ax) == (2 * 9 + 1, 6 * 9 + 1, 3)
    chosen = x[plots._subset(len(x), 6, 3)]
    shown = torch.as_tensor(np.asarray(ax.images[0].get_array()))[1:9, 1:9, 0]
    assert torch.allclose(shown, chosen[0])  # binary inputs are shown unscaled
    recon = plots.decode_mean(vae, plots.posterior_mean(vae, chosen[:1]))[0]
    shown = torch.as_tensor(np.asarray(ax.images[0].get_array()))[10:18, 1:9, 0]
    assert torch.allclose(shown, recon, atol=1e-6)


def test_plot_interpolations_has_data_at_both_ends(run2):
    _, vae, _, x, _ = run2
    (ax,) = plots.plot_interpolations(vae, x, pairs=3, steps=5, seed=0).axes
    assert grid_shape(ax) == (3 * 9 + 1, 7 * 9 + 1, 3)
    index = plots._subset(len(x), 6, 0)
    grid = torch.as_tensor(np.asarray(ax.images[0].get_array()))[..., 0]
    assert torch.allclose(grid[1:9, 1:9], x[index[0]])
    assert torch.allclose(grid[1:9, 1 + 6 * 9 : 9 + 6 * 9], x[index[3]])


def test_plot_manifold_decodes_a_grid_of_prior_quantiles(run2):
    vae = run2[1]
    (ax,) = plots.plot_manifold(vae, n=5).axes
    assert grid_shape(ax) == (5 * 9 + 1, 5 * 9 + 1, 3)
    # the centre tile is z = median of N(0, I) = 0
    centre = torch.as_tensor(np.asarray(ax.images[0].get_array()))[19:27, 19:27, 0]
    assert torch.allclose(centre, plots.decode_mean(vae, torch.zeros(2)), atol=1e-6)
    assert "z_1" in ax.get_xlabel() and "z_2" in ax.get_ylabel()


def test_plot_manifold_needs_two_latent_dimensions(runs):
    with pytest.raises(DataError, match="latent_dim = 2"):
        plots.plot_manifold(pyro_vae.load(runs[4][0]))


class _FullCovariancePrior(pyro_vae.Prior):
    """N(0, I) as a MultivariateNormal: no per-dimension icdf, so quantiles are empirical."""

    latent_dim = 2

    def forward(self):
        return dist.MultivariateNormal(torch.zeros(2), torch.eye(2))


def test_prior_quantiles_without_an_icdf_match_the_closed_form(run2):
    vae = VAE(_FullCovariancePrior(), run2[1].posterior, run2[1].likelihood)
    u = torch.tensor([0.05, 0.5, 0.95])
    q = plots._prior_quantiles(vae, u, seed=0)
    exact = torch.distributions.Normal(0.0, 1.0).icdf(u)
    # 20,000 draws: s.e. of the p-quantile is sqrt(p(1-p)/n)/phi(q) <= 0.015; allow 5 s.e.
    assert torch.allclose(q, exact.unsqueeze(-1).expand(3, 2), atol=0.075)


def test_image_figures_refuse_non_image_data(run2):
    class _Flat:
        event_shape = (5,)

    for shape in [(5,), (2, 3, 4, 5), (4, 8, 8)]:
        assert not plots.is_image_shape(shape)
    assert plots.is_image_shape((8, 8)) and plots.is_image_shape((3, 8, 8))
    with pytest.raises(DataError, match="not an image"):
        plots.plot_prior_samples(_Flat())


# --- the latent space ---------------------------------------------------------------


def test_latent_scatter_of_a_2d_space_is_coloured_by_label(run2):
    _, vae, _, x, labels = run2
    (ax,) = plots.plot_latent_scatter(vae, x, labels, max_points=100).axes
    (points,) = ax.collections
    offsets = np.asarray(points.get_offsets())
    assert offsets.shape == (100, 2)
    chosen = plots._subset(len(x), 100, 0)
    np.testing.assert_allclose(offsets, plots.posterior_mean(vae, x[chosen]).numpy(), atol=1e-6)
    assert np.array_equal(points.get_array(), labels[chosen].numpy())
    assert len(ax.get_legend().get_texts()) == len(labels[chosen].unique())


def test_latent_scatter_projects_higher_dimensions_with_pca(runs):
    run_dir, result = runs[4]
    vae, x = pyro_vae.load(run_dir), result.data.split("test")
    (ax,) = plots.plot_latent_scatter(vae, x, None).axes
    assert "PC 1" in ax.get_xlabel() and "PCA" in ax.get_title()
    assert ax.get_legend() is None
    offsets = np.asarray(ax.collections[0].get_offsets())
    assert offsets.shape == (len(x), 2)
    # PCA scores are centred and the first component has the larger variance
    assert abs(offsets.mean(0)).max() < 1e-4
    assert offsets[:, 0].var() >= offsets[:, 1].var()


def test_compare_runs_draws_one_panel_per_run(runs, tmp_path):
    a, b = runs[2][0], runs[4][0]
    fig = plots.compare_runs(a, b)
    assert len(fig.axes) == 2
    assert a.name in fig.axes[0].get_title() and b.name in fig.axes[1].get_title()
    assert all(t.get_title().startswith("VAE") for t in fig.axes)
    other = tmp_path / "other"
    shutil.copytree(b, other)
    text = (other / "config.toml").read_text().replace('"digits"', '"binarized-mnist"')
    (other / "config.toml").write_text(text)
    with pytest.raises(DataError, match="different datasets"):
        plots.compare_runs(a, other)


# --- posterior collapse -------------------------------------------------------------


class _HalfActiveGuide(Guide):
    """q(z|x): dimension 0's mean is 10 x the mean pixel, dimension 1's mean is always 0."""

    latent_dim = 2

    def forward(self, x, index=None):
        loc = torch.stack([10 * x.flatten(1).mean(1), torch.zeros(len(x))], -1)
        return dist.Normal(loc, torch.ones_like(loc)).to_event(1)


def test_active_units_count_dimensions_whose_mean_varies(run2):
    _, trained, _, x, _ = run2
    vae = VAE(StandardNormalPrior(2), _HalfActiveGuide(), trained.likelihood)
    units = plots.active_units(vae, x)
    expected = torch.var(10 * x.flatten(1).mean(1))
    assert torch.allclose(units.activity, torch.stack([expected, torch.tensor(0.0)]))
    assert units.count == 1 and units.active.tolist() == [True, False]
    assert plots.active_units(vae, x, threshold=float(expected) + 1).count == 0


def test_mean_kl_per_dim_matches_the_training_record(run2):
    _, vae, history, x, _ = run2
    kl = plots.mean_kl_per_dim(vae, x, batch_size=64)
    assert torch.allclose(kl, torch.tensor(history[-1]["test_kl_per_dim"]), atol=1e-4)
    assert float(kl.sum()) == pytest.approx(history[-1]["test_kl"], abs=1e-4)


def test_plot_kl_per_dim_greys_inactive_dimensions():
    kl, activity = [0.5, 0.001, 2.0], [0.3, 0.0001, 1.5]
    fig = plots.plot_kl_per_dim(kl, activity, threshold=0.01)
    kl_ax, act_ax = fig.axes
    assert [p.get_height() for p in kl_ax.patches] == kl
    assert [p.get_height() for p in act_ax.patches] == pytest.approx(activity)
    grey, blue = to_rgba("0.7"), to_rgba("C0")
    assert [p.get_facecolor() for p in kl_ax.patches] == [blue, grey, blue]
    assert "2 of 3" in act_ax.get_title() and act_ax.get_yscale() == "log"
    assert len(plots.plot_kl_per_dim(kl).axes) == 1


# --- evaluation ---------------------------------------------------------------------


def test_plot_iwae_bound_draws_the_bounds_in_k_order():
    summary, _ = fake_evaluation(50)
    (ax,) = plots.plot_iwae_bound(summary).axes
    xs, ys = line(ax, r"IWAE bound $\mathcal{L}_K$")
    assert xs == [1, 4, 16, 64]
    assert ys == [summary["iwae"][str(k)] for k in xs]
    assert ax.get_xscale() == "log"
    with pytest.raises(DataError, match="IWAE"):
        plots.plot_iwae_bound({"iwae": {}})


def test_plot_iwae_bound_includes_the_k_of_the_estimate():
    summary, _ = fake_evaluation(50, k_max=500)
    summary["iwae"] = {k: v for k, v in summary["iwae"].items() if k != "500"}  # 1, 4, 16
    (ax,) = plots.plot_iwae_bound(summary).axes
    xs, ys = line(ax, r"IWAE bound $\mathcal{L}_K$")
    assert xs == [1, 4, 16, 500]  # the K actually used, from num_samples
    assert ys[-1] == summary["log_likelihood"]  # L_K at K = num_samples is the estimate
    assert "500" in [t.get_text() for t in ax.get_xticklabels()]
    assert plots.iwae_curve(summary) == dict(zip(xs, ys, strict=True))


def test_iwae_curve_adds_nothing_that_is_no_iwae_bound():
    summary, _ = fake_evaluation(50, k_max=64)
    assert list(plots.iwae_curve(summary)) == [1, 4, 16, 64]  # already listed: not twice
    summary["iwae"].pop("64")
    ais = {**summary, "estimator": "ais"}  # an AIS estimate, num_samples = chains
    assert list(plots.iwae_curve(ais)) == [1, 4, 16]
    assert plots.iwae_curve({**summary, "iwae": {}}) == {}


def horizontal_lines(ax):
    """y -> label of every horizontal line on ``ax``."""
    found = {}
    for ln in ax.get_lines():
        ys = np.unique(np.asarray(ln.get_ydata(), dtype=float))
        if len(ys) == 1:
            found[float(ys[0])] = ln.get_label()
    return found


def test_plot_khat_draws_labelled_lines_at_0_5_0_7_and_1():
    khat = np.array([0.1, 0.3, 0.6, 0.8, 1.2, np.nan])
    (ax,) = plots.plot_khat(khat).axes
    lines = horizontal_lines(ax)
    assert set(lines) == {0.5, 0.7, 1.0}
    assert lines[0.5].startswith("0.5:") and "good" in lines[0.5]
    assert lines[0.7].startswith("0.7:") and "unreliable" in lines[0.7]
    assert lines[1.0].startswith("1:") and "infinite" in lines[1.0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert all(label in legend for label in lines.values())
    points = {c.get_label(): np.asarray(c.get_offsets()) for c in ax.collections}
    np.testing.assert_allclose(points["datum"], [[0, 0.1], [1, 0.3], [2, 0.6]])
    np.testing.assert_allclose(points["datum above 0.7"], [[3, 0.8], [4, 1.2]])


def test_plot_khat_reports_the_fraction_above_0_7():
    _, per_datum = fake_evaluation(200)
    khat = per_datum["khat"]
    (ax,) = plots.plot_khat(khat).axes
    assert f"{100 * np.mean(khat > 0.7):.1f}%" in ax.get_title()
    with pytest.raises(DataError, match="undefined"):
        plots.plot_khat(np.full(10, np.nan))


def test_plot_ess_histograms_every_datum():
    _, per_datum = fake_evaluation(120)
    (ax,) = plots.plot_ess(per_datum["ess"], 64).axes
    assert sum(p.get_height() for p in ax.patches) == 120


def test_plot_gaps_one_panel_per_gap():
    _, per_datum = fake_evaluation(80)
    axes = plots.plot_gaps(per_datum).axes
    assert len(axes) == 3
    assert all(sum(p.get_height() for p in ax.patches) == 80 for ax in axes)
    assert "inference gap" in axes[0].get_title()
    _, plain = fake_evaluation(80, gaps=False)
    assert len(plots.plot_gaps(plain).axes) == 1
    with pytest.raises(DataError, match="no gaps"):
        plots.plot_gaps({"ess": np.ones(3)})


def test_plot_gaps_panels_are_titled_and_labelled_in_readable_fonts():
    _, per_datum = fake_evaluation(80)
    axes = plots.plot_gaps(per_datum).axes
    titles = [ax.get_title() for ax in axes]
    assert [t.split("\n")[0] for t in titles] == [
        "inference gap",
        "approximation gap",
        "amortization gap",
    ]
    for ax in axes:
        assert ax.get_ylabel() and ax.get_xlabel()  # every panel, not the first only
        assert ax.xaxis.label.get_size() >= 11 and ax.yaxis.label.get_size() >= 11
        assert ax.title.get_size() >= 11
        assert all(t.get_size() >= 10 for t in ax.get_xticklabels() + ax.get_yticklabels())


# --- headless, no import-time cost ---------------------------------------------------


def test_importing_the_package_and_cli_does_not_import_matplotlib():
    code = (
        "import sys, pyro_vae, pyro_vae.cli; "
        "print([m for m in ('matplotlib', 'arviz', 'torchvision') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_figures_never_open_pyplot_windows(run2):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    plots.plot_khat(fake_evaluation(30)[1]["khat"])
    plots.plot_prior_samples(run2[1], 4)
    assert plt.get_fignums() == before
