"""Importance sampling, IWAE bounds, diagnostics and gaps, checked against exact answers.

Ground truths come from pyro_vae.exact: the linear-Gaussian closed forms and
2-D quadrature. Statistical tolerances are multiples of Monte Carlo standard
errors computed from the same draws (each test says which); every draw is
seeded. Test proposals are chosen with importance weights of finite variance
(a proposal covariance above half the posterior's), where those standard
errors are valid.
"""

import json
import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from test_exact import linear_vae, sample_data

from pyro_vae import GUIDES, VAE, ConfigError, DataError, UserError
from pyro_vae.cli import main
from pyro_vae.evaluate import (
    EVALUATION_FILE,
    PER_DATUM_FILE,
    effective_sample_size,
    evaluate,
    iwae_bounds,
    khat_tail_size,
    log_importance_weights,
    log_likelihood_mc_stderr,
    log_mean_exp,
    pareto_khat,
    psis_khat,
    refine_posterior,
)
from pyro_vae.exact import linear_gaussian, log_likelihood_quadrature
from pyro_vae.guides import Guide, LocalGuide


class FunctionGuide(Guide):
    """A test guide: q(z|x) = make(x), any distribution with batch (B,) and event (D,)."""

    def __init__(self, make, latent_dim, is_point_estimate=False):
        super().__init__()
        self.make = make
        self.latent_dim = latent_dim
        self.is_point_estimate = is_point_estimate

    def forward(self, x, index=None):
        return self.make(x)


def with_guide(vae, make, **kwargs):
    return VAE(vae.prior, FunctionGuide(make, vae.latent_dim, **kwargs), vae.likelihood).eval()


def inflated_posterior(lg, factor=1.5):
    """q = N(posterior mean, factor * posterior covariance): weights bounded for factor > 1."""

    def make(x):
        post = lg.posterior(x)
        return dist.MultivariateNormal(post.mean, covariance_matrix=factor * post.covariance_matrix)

    return make


def shifted_diagonal(lg, shift=0.3, inflate=1.3):
    """A diagonal q with the wrong mean and variances, still with finite-variance weights."""

    def make(x):
        post = lg.posterior(x)
        sd = torch.diagonal(post.covariance_matrix, dim1=-2, dim2=-1).sqrt()
        return dist.Normal(post.mean + shift * sd, inflate * sd).to_event(1)

    return make


def mc_mean_stderr(per_datum_stderr):
    """Standard error of a mean over data of independent per-datum estimates."""
    return float(np.sqrt(np.sum(np.asarray(per_datum_stderr) ** 2)) / len(per_datum_stderr))


# --- exactness ------------------------------------------------------------------


def test_exact_posterior_proposal_gives_log_likelihood_with_zero_variance():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 30)
    log_w = log_importance_weights(vae, x, 64, proposal=lg.posterior(x))
    assert log_w.shape == (64, 30)
    exact = lg.log_likelihood(x)
    # w = p(x, z) / p(z|x) = p(x) for every z: each weight is log p(x) up to rounding
    torch.testing.assert_close(log_w, exact.expand(64, -1), rtol=0, atol=1e-9)
    assert log_w.std(0).max() < 1e-10
    result = evaluate(with_guide(vae, lg.posterior), x, num_samples=64, iwae_k=[1, 8, 64])
    per = result.per_datum
    np.testing.assert_allclose(per["log_likelihood"], exact.numpy(), atol=1e-9)
    np.testing.assert_allclose(per["elbo"], exact.numpy(), atol=1e-9)
    np.testing.assert_allclose(per["ess"], 64, rtol=1e-9)
    assert result.summary["log_likelihood_mc_stderr"] < 1e-6


def test_importance_sampling_is_within_3_standard_errors_of_the_exact_log_likelihood():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 200)
    result = evaluate(with_guide(vae, inflated_posterior(lg)), x, num_samples=1000, seed=0)
    s, per = result.summary, result.per_datum
    assert s["exact_log_likelihood"] == pytest.approx(float(lg.log_likelihood(x).mean()))
    # mean over data: Monte Carlo standard error of the mean (delta method, from the ESS)
    assert abs(s["log_likelihood"] - s["exact_log_likelihood"]) <= 3 * s["log_likelihood_mc_stderr"]
    # per datum: at 3 standard errors about 0.3% should miss; allow 5%
    z = (
        np.abs(per["log_likelihood"] - per["exact_log_likelihood"])
        / per["log_likelihood_mc_stderr"]
    )
    assert np.mean(z <= 3) >= 0.95
    # bounded weights: PSIS flags nothing
    assert s["khat_fraction_above_0_7"] == 0.0
    assert s["num_data"] == 200 and s["num_samples"] == 1000


def test_monte_carlo_stderr_matches_the_spread_of_replicates():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 8)
    replicates, k = 60, 40
    torch.manual_seed(1)
    log_w = log_importance_weights(vae, x, replicates * k, proposal=shifted_diagonal(lg)(x))
    groups = log_w.reshape(replicates, k, -1)
    estimates = log_mean_exp(groups, dim=1)  # (R, B)
    predicted = (
        torch.stack([log_likelihood_mc_stderr(effective_sample_size(g), k) for g in groups])
        .pow(2)
        .mean(0)
    )
    # pooled over 8 data with 59 degrees of freedom each, the variance ratio has a
    # relative standard deviation of about sqrt(2 / (8 * 59)) = 6.5%; allow 4 of them
    ratio = float(estimates.var(0).sum() / predicted.sum())
    assert 0.74 < ratio < 1.26


def test_iwae_bounds_are_ordered_and_l1_is_the_elbo():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 100)
    make = shifted_diagonal(lg, shift=0.5, inflate=1.5)
    torch.manual_seed(2)
    log_w = log_importance_weights(vae, x, 1000, proposal=make(x))
    bounds = iwae_bounds(log_w, [1, 10, 100, 1000])
    exact_ll = lg.log_likelihood(x)
    # L_1 estimates the ELBO of q: standard error of the mean of 1000 x 100 log weights
    elbo_se = float(log_w.var(0).sum().sqrt() / (100 * math.sqrt(1000)))
    assert abs(float(bounds[1].mean() - lg.elbo(x, make(x)).mean())) <= 3 * elbo_se
    # disjoint groups: each bound is below the next per datum (Jensen), so also on average
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        assert (bounds[small] <= bounds[large] + 1e-12).all()
        assert bounds[small].mean() < bounds[large].mean()
    # and below log p(x), which L_K approaches
    ll_se = mc_mean_stderr(log_likelihood_mc_stderr(effective_sample_size(log_w), 1000))
    assert float(bounds[1000].mean() - exact_ll.mean()) <= 3 * ll_se
    gap_1 = float(exact_ll.mean() - bounds[1].mean())
    gap_1000 = float(exact_ll.mean() - bounds[1000].mean())
    assert gap_1 > 0.1 and abs(gap_1000) < gap_1 / 20
    # log p(x) - ELBO(q) = KL(q || p(z|x)): the estimated gap against the closed form
    kl = lg.kl_to_posterior(x, make(x)).mean()
    assert abs(gap_1 - float(kl)) <= 3 * (elbo_se + ll_se)


def test_nonlinear_decoder_agrees_with_quadrature():
    vae = linear_vae(data_dim=5, sigma=0.5, hidden=[16], seed=3)
    x = sample_data(vae, 20, seed=4)
    exact = log_likelihood_quadrature(vae, x, num_points=301, bound=7.0)

    def wide(x):  # heavier tails than the prior: bounded weights
        zeros = torch.zeros(len(x), 2, dtype=x.dtype)
        return dist.Normal(zeros, 1.5 * torch.ones_like(zeros)).to_event(1)

    for model, proposal in ((vae, "prior"), (with_guide(vae, wide), "guide")):
        result = evaluate(model, x, num_samples=4000, proposal=proposal, seed=5)
        s = result.summary
        assert s["ess_min"] > 30  # the check below is informative
        se = s["log_likelihood_mc_stderr"]
        assert abs(s["log_likelihood"] - float(exact.mean())) <= 3 * se, proposal


def test_prior_proposal_side_by_side_with_the_guide():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 50)
    result = evaluate(
        with_guide(vae, inflated_posterior(lg)), x, num_samples=1000, proposal="prior", seed=0
    )
    s, per = result.summary, result.per_datum
    assert s["proposal"] == "prior"
    guide = s["guide_proposal"]
    # the prior wastes most draws where p(z|x) is small
    assert s["ess_mean"] < guide["ess_mean"] / 5
    # both estimates are valid; the prior's weights are bounded by max p(x|z)
    exact = s["exact_log_likelihood"]
    assert abs(s["log_likelihood"] - exact) <= 3 * s["log_likelihood_mc_stderr"]
    guide_se = mc_mean_stderr(log_likelihood_mc_stderr(torch.as_tensor(per["guide_ess"]), 1000))
    assert abs(guide["log_likelihood"] - exact) <= 3 * guide_se
    # the ELBO reported is the guide's (not the prior proposal's L_1)
    elbo_se = float(np.std(per["elbo"]) / math.sqrt(50))
    assert s["elbo"] > s["iwae"]["1"] + 3 * elbo_se


def test_pareto_khat_separates_light_and_heavy_tailed_weights():
    # target N(0, 1), proposal N(0, s^2): for s < 1 the weights have a Pareto tail of
    # shape k = 1 - s^2 (0.91 at s = 0.3: infinite variance); for s > 1 they are bounded
    g = torch.Generator().manual_seed(0)
    target = torch.distributions.Normal(0.0, 1.0)
    khat = {}
    for name, scale in (("narrow", 0.3), ("wide", 2.0)):
        proposal = torch.distributions.Normal(0.0, scale)
        z = scale * torch.randn(2000, 50, generator=g, dtype=torch.float64)
        khat[name] = pareto_khat(target.log_prob(z) - proposal.log_prob(z))
        assert khat[name].shape == (50,)
    # each k-hat from 2000 draws scatters by about 0.15 around 0.91
    assert np.mean(khat["narrow"]) > 0.75 and np.mean(khat["narrow"] > 0.7) > 0.6
    assert np.all(khat["wide"] < 0.5)
    assert np.isnan(pareto_khat(torch.zeros(10, 3))).all()  # too few draws for a tail fit


def _arviz_khat(log_w):
    import warnings

    import arviz

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, khat = arviz.psislw(log_w.copy(), normalize=False)
    return np.asarray(khat).reshape(len(log_w))


def test_psis_khat_is_arviz_psislw_batched():
    """pyro_vae's batched k-hat against arviz.psislw, the reference it ports."""
    rng = np.random.default_rng(0)
    for k in (25, 26, 101, 1000, 5000):
        for scale in (0.1, 3.0, 50.0):
            log_w = rng.standard_normal((20, k)) * scale + rng.standard_normal((20, 1)) * 100
            want = _arviz_khat(log_w)
            np.testing.assert_allclose(psis_khat(log_w), want, rtol=0, atol=1e-12)
            tail = np.sort(log_w, axis=1)[:, -khat_tail_size(k) :]  # what evaluate keeps
            np.testing.assert_allclose(psis_khat(tail, k), want, rtol=0, atol=1e-12)
    many = rng.standard_normal((600, 100)) * 2  # more rows than one batch of the fit
    np.testing.assert_allclose(psis_khat(many), _arviz_khat(many), rtol=0, atol=1e-12)
    edge = rng.standard_normal((7, 200))
    edge[0] = 0.0  # all weights equal: no tail
    edge[1, -50:] = 3.0  # ties across the cutoff
    edge[2, :190] = -np.inf  # nearly all weights zero
    edge[3] = -np.inf  # all weights zero
    edge[4] = np.round(edge[4], 1)  # ties everywhere: shorter tails
    edge[5] = np.linspace(0.0, 1.0, 200) * 1e-300  # equal weights to machine precision
    edge[6] = rng.standard_cauchy(200) * 20
    np.testing.assert_allclose(psis_khat(edge), _arviz_khat(edge), rtol=0, atol=1e-12)


# --- gaps -----------------------------------------------------------------------


def test_refinement_reaches_the_optimal_diagonal_normal():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 20)
    q = shifted_diagonal(lg, shift=1.0, inflate=2.0)(x)
    torch.manual_seed(0)
    refined = refine_posterior(vae, x, q.base_dist.loc, q.base_dist.scale)
    best = lg.optimal_diagonal(x)
    assert refined.steps < 2000 + 1200  # stopped by the tolerance, not the cap
    # stochastic optimization: within a few hundredths of a posterior sd of the optimum
    torch.testing.assert_close(refined.loc, best.base_dist.loc, rtol=0, atol=0.05)
    torch.testing.assert_close(refined.scale, best.base_dist.scale, rtol=0.05, atol=0)
    elbo_gap = lg.elbo(x, best) - lg.elbo(x, refined.distribution())
    assert (elbo_gap >= 0).all() and elbo_gap.mean() < 0.002


def test_the_refined_q_star_falls_short_of_the_exact_optimum_by_under_0_002_nats_in_8d():
    """Linear-Gaussian model: ELBO(q) = log p(x) - KL(q || p(z|x)) in closed form (2-D: above)."""
    vae = linear_vae(latent_dim=8)
    lg = linear_gaussian(vae)
    x = sample_data(vae, 10)
    q = shifted_diagonal(lg, shift=1.0, inflate=2.0)(x)
    torch.manual_seed(0)
    refined = refine_posterior(vae, x, q.base_dist.loc, q.base_dist.scale)
    shortfall = lg.elbo(x, lg.optimal_diagonal(x)) - lg.elbo(x, refined.distribution())
    assert shortfall.min() >= 0 and shortfall.mean() <= 0.002


def _gauss_hermite_elbo(vae, x, loc, log_scale, points=40):
    """ELBO of diagonal Normals (B, 2) by a tensor Gauss-Hermite rule: deterministic, smooth."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(points)
    weights = weights / weights.sum()
    n = torch.as_tensor(np.stack(np.meshgrid(nodes, nodes, indexing="ij"), -1).reshape(-1, 2))
    w = torch.as_tensor(np.outer(weights, weights).reshape(-1))
    z = loc.unsqueeze(0) + log_scale.exp().unsqueeze(0) * n.unsqueeze(1)  # (P, B, 2)
    log_joint = vae.likelihood(z).log_prob(x) + vae.prior().log_prob(z)
    entropy = (log_scale + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)
    return (w.unsqueeze(1) * log_joint).sum(0) + entropy


def test_the_refined_q_star_reaches_the_quadrature_optimum_of_a_2d_model():
    """A tanh decoder (no closed form): the exact optimum by L-BFGS on a quadrature ELBO."""
    vae = linear_vae(hidden=[16])
    x = sample_data(vae, 10)
    with torch.no_grad():
        q = vae.posterior(x)
    loc = q.base_dist.loc.detach().clone().requires_grad_(True)
    log_scale = q.base_dist.scale.detach().log().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS(
        [loc, log_scale], max_iter=500, tolerance_grad=1e-12, line_search_fn="strong_wolfe"
    )

    def closure():
        optimizer.zero_grad()
        loss = -_gauss_hermite_elbo(vae, x, loc, log_scale).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.manual_seed(0)
    refined = refine_posterior(vae, x, q.base_dist.loc, q.base_dist.scale)
    with torch.no_grad():
        best = _gauss_hermite_elbo(vae, x, loc, log_scale)
        ours = _gauss_hermite_elbo(vae, x, refined.loc, refined.scale.log())
    shortfall = best - ours
    assert shortfall.min() >= -1e-9 and shortfall.mean() <= 0.002


def test_gap_decomposition_against_closed_forms():
    vae = linear_vae()
    layer = vae.likelihood.network.layers[0]
    with torch.no_grad():  # correlated columns of W: a correlated posterior, so that the
        layer.weight[:, 1] = 0.8 * layer.weight[:, 0] + 0.6 * layer.weight[:, 1]  # best
    lg = linear_gaussian(vae)  # diagonal q* leaves a clear approximation gap
    x = sample_data(vae, 50)
    make = shifted_diagonal(lg, shift=0.5, inflate=1.3)
    k = 2000
    result = evaluate(with_guide(vae, make), x, num_samples=k, gaps=True, seed=0)
    s, per = result.summary, result.per_datum
    # the three gaps add up per datum, by construction
    np.testing.assert_allclose(
        per["approximation_gap"] + per["amortization_gap"],
        per["log_likelihood"] - per["elbo"],
        atol=1e-9,
    )
    exact_ll = lg.log_likelihood(x)
    best = lg.optimal_diagonal(x)
    exact_approximation = float((exact_ll - lg.elbo(x, best)).mean())  # KL(q* || p(z|x))
    exact_amortization = float((lg.elbo(x, best) - lg.elbo(x, make(x))).mean())
    assert exact_approximation > 0.3 and exact_amortization > 1.0
    # Monte Carlo standard errors of the K-draw ELBO means of q and q*, from the spread
    # of their log weights (fresh draws of the same distributions)
    torch.manual_seed(1)

    def elbo_se(q):
        log_w = log_importance_weights(vae, x, k, proposal=q)
        return float(log_w.var(0).sum().sqrt() / (len(x) * math.sqrt(k)))

    se_q, se_best = elbo_se(make(x)), elbo_se(best)
    ll_se = s["log_likelihood_mc_stderr"]
    # plus 0.02 nats for the refinement's distance to the optimum (test above: < 0.01)
    assert abs(s["approximation_gap"] - exact_approximation) <= 3 * (ll_se + se_best) + 0.02
    assert abs(s["amortization_gap"] - exact_amortization) <= 3 * (se_q + se_best) + 0.02
    exact_total = exact_approximation + exact_amortization
    assert abs(s["total_gap"] - exact_total) <= 3 * (ll_se + se_q)


# --- local guides, bad input, reproducibility -----------------------------------


def test_local_guide_uses_index_on_training_data_and_fits_unseen_data():
    base = linear_vae()
    lg = linear_gaussian(base)
    x = sample_data(base, 40)
    guide = LocalGuide(num_data=40, latent_dim=2).double()
    q = inflated_posterior(lg)(x)
    with torch.no_grad():  # q_i = the optimal diagonal Normal of datum i, widened
        best = lg.optimal_diagonal(x)
        guide.loc.copy_(best.base_dist.loc)
        guide.log_scale.copy_(best.base_dist.scale.log() + math.log(1.5))
    vae = VAE(base.prior, guide, base.likelihood).eval()
    index = torch.arange(40)
    seen = evaluate(vae, x, num_samples=1000, index=index, seed=0).summary
    assert (
        abs(seen["log_likelihood"] - seen["exact_log_likelihood"])
        <= 3 * seen["log_likelihood_mc_stderr"]
    )
    # the rows are used in order: reversed data with reversed index give the same numbers
    flipped = evaluate(vae, x.flip(0), num_samples=1000, index=index.flip(0), seed=0)
    assert flipped.summary["elbo"] == pytest.approx(seen["elbo"], abs=0.1)
    with pytest.raises(ConfigError, match="needs index"):
        vae.posterior(x)
    # unseen data: q is fitted per datum (the E-step) and reaches the optimal diagonal ELBO
    unseen = evaluate(vae, x, num_samples=1000, seed=0).summary
    assert abs(unseen["elbo"] - float(lg.elbo(x, best).mean())) < 0.05
    del q


def test_bad_input_is_a_one_line_user_error():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 5)
    with pytest.raises(ConfigError, match="K must be >= 1"):
        evaluate(vae, x, num_samples=0)
    with pytest.raises(ConfigError, match="not in 1..10"):
        evaluate(vae, x, num_samples=10, iwae_k=[1, 100])
    with pytest.raises(ConfigError, match="unknown proposal"):
        evaluate(vae, x, num_samples=10, proposal="posterior")
    with pytest.raises(DataError, match="shape"):
        evaluate(vae, torch.zeros(3, 4, dtype=torch.float64), num_samples=10)
    full = with_guide(vae, lg.posterior)  # a full-covariance q cannot be refined
    with pytest.raises(UserError, match="diagonal Normal"):
        evaluate(full, x, num_samples=10, gaps=True)
    point = with_guide(vae, shifted_diagonal(lg), is_point_estimate=True)
    with pytest.raises(UserError, match="point estimate"):
        evaluate(point, x, num_samples=10)
    for error in (ConfigError, DataError, UserError):
        assert issubclass(error, UserError)


@pytest.mark.parametrize("default", [True, False])
def test_weights_leave_the_validation_default_alone_and_reject_nan(default):
    from torch.distributions import Distribution

    from pyro_vae import NonFiniteLossError

    vae = linear_vae()
    x = sample_data(vae, 4)
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(default)
    try:
        log_importance_weights(vae, x, 8)
        assert Distribution._validate_args is default
        with torch.no_grad():
            vae.likelihood.network.layers[0].bias[0] = float("nan")
        with pytest.raises(NonFiniteLossError, match="NaN"):
            log_importance_weights(vae, x, 8)
        assert Distribution._validate_args is default
    finally:
        Distribution.set_default_validate_args(previous)


def test_evaluation_weights_are_the_iwae_objectives_weights():
    """One log-weight computation: evaluation and the IWAE objective give the same [K, B]."""
    from pyro_vae.objectives import IWAE_ELBO

    vae = linear_vae()
    x = sample_data(vae, 6)
    torch.manual_seed(3)
    ours = log_importance_weights(vae, x, 9, chunk_size=10_000)
    torch.manual_seed(3)
    with torch.no_grad():
        objective = IWAE_ELBO(num_particles=9, vectorize_particles=True, max_plate_nesting=1)
        theirs, scale = objective.log_weights(vae.model, vae.guide, x)
    assert scale == 1.0 and ours.shape == theirs.shape == (9, 6)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    # and by hand: log p(x|z) + log p(z) - log q(z|x) at the same draws
    torch.manual_seed(3)
    q = vae.posterior(x)
    z = q.sample((9,))
    by_hand = vae.likelihood(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    torch.testing.assert_close(ours, by_hand)


def test_same_seed_same_numbers_and_chunking_does_not_change_the_shapes():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 30)
    model = with_guide(vae, shifted_diagonal(lg))
    a = evaluate(model, x, num_samples=100, seed=3, batch_size=7, chunk_size=50)
    b = evaluate(model, x, num_samples=100, seed=3, batch_size=7, chunk_size=50)
    c = evaluate(model, x, num_samples=100, seed=4, batch_size=7, chunk_size=50)
    for key in ("log_likelihood", "elbo", "ess", "khat"):
        np.testing.assert_array_equal(a.per_datum[key], b.per_datum[key])
    assert not np.array_equal(a.per_datum["log_likelihood"], c.per_datum["log_likelihood"])
    for chunk in (1, 7, 10_000):
        assert log_importance_weights(model, x, 13, chunk_size=chunk).shape == (13, 30)


def test_chunking_leaves_the_distribution_of_the_estimate_unchanged():
    """One particle per decoder call against all at once: the same estimator, other draws."""
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 30)
    model = with_guide(vae, shifted_diagonal(lg, shift=0.5, inflate=1.5))
    exact = lg.log_likelihood(x).numpy()
    for chunk in (30, 100_000):  # 1 particle of 30 data per call; all 400 particles at once
        result = evaluate(model, x, num_samples=400, seed=chunk, chunk_size=chunk)
        per = result.per_datum
        se = mc_mean_stderr(per["log_likelihood_mc_stderr"])
        assert abs(per["log_likelihood"].mean() - exact.mean()) <= 3 * se


# --- the command line -----------------------------------------------------------


def train_ppca(out, *extra):
    args = ["train", "--dataset", "ppca", "--likelihood", "normal", "--latent-dim", "2"]
    args += ["--set", "model.decoder.hidden=[]", "--set", "model.encoder.hidden=[16]"]
    args += ["--epochs", "2", "--batch-size", "250", "--out", str(out), "--quiet", *extra]
    assert main(args) == 0


def test_cli_evaluate_reports_exact_log_likelihood_and_writes_files(ppca_run, capsys):
    args = ["evaluate", str(ppca_run), "--num-samples", "200", "--iwae-k", "1,10,100"]
    assert main([*args, "--max-data", "20", "--gaps"]) == 0
    out = capsys.readouterr().out
    assert "log p(x)" in out and "exact log p(x)" in out and "amortization gap" in out
    summary = json.loads((ppca_run / EVALUATION_FILE).read_text())
    for key in (
        "log_likelihood",
        "log_likelihood_stderr",
        "elbo",
        "iwae",
        "ess_mean",
        "khat_fraction_above_0_7",
        "num_samples",
        "num_data",
        "split",
        "approximation_gap",
        "amortization_gap",
        "exact_log_likelihood",
    ):
        assert key in summary, key
    assert summary["num_data"] == 20 and summary["num_samples"] == 200
    assert summary["split"] == "test" and set(summary["iwae"]) == {"1", "10", "100"}
    # values, not just keys: IS near the closed form, L_1 the ELBO, the bounds in order,
    # the gaps adding up
    exact, mc_se = summary["exact_log_likelihood"], summary["log_likelihood_mc_stderr"]
    assert abs(summary["log_likelihood"] - exact) <= 3 * mc_se
    assert summary["iwae"]["1"] == pytest.approx(summary["elbo"], abs=1e-9)
    iwae = [summary["iwae"][k] for k in ("1", "10", "100")]
    assert iwae == sorted(iwae) and iwae[-1] <= summary["log_likelihood"] + 1e-9
    total = summary["approximation_gap"] + summary["amortization_gap"]
    assert summary["total_gap"] == pytest.approx(total, abs=1e-9)
    with np.load(ppca_run / PER_DATUM_FILE) as f:
        per = {k: f[k] for k in f.files}
    for key in ("log_likelihood", "elbo", "ess", "khat", "approximation_gap", "amortization_gap"):
        assert per[key].shape == (20,), key
    # --max-data takes the first N of the split, in order
    import pyro_vae
    from pyro_vae.train import load_data

    vae = pyro_vae.load(ppca_run)
    config = pyro_vae.Config.load(ppca_run / "config.toml")
    first = load_data(config).split("test")[:20]
    np.testing.assert_allclose(
        per["exact_log_likelihood"], linear_gaussian(vae).log_likelihood(first).numpy()
    )
    assert summary["exact_log_likelihood"] == pytest.approx(
        float(per["exact_log_likelihood"].mean())
    )


def test_cli_evaluate_is_reproducible_given_the_seed(ppca_run):
    args = ["evaluate", str(ppca_run), "--num-samples", "50", "--max-data", "20", "--quiet"]
    runs = []
    for seed in ("1", "1", "2"):
        assert main([*args, "--seed", seed]) == 0
        summary = json.loads((ppca_run / EVALUATION_FILE).read_text())
        summary.pop("seconds")
        runs.append(summary)
    assert runs[0] == runs[1]
    assert runs[0]["log_likelihood"] != runs[2]["log_likelihood"]
    assert runs[0]["iwae"] == {"1": runs[0]["elbo"], "10": runs[0]["iwae"]["10"]}


@pytest.mark.parametrize(
    "extra",
    [
        ["--num-samples", "0"],
        ["--split", "valid"],
        ["--iwae-k", "1,x"],
        ["--iwae-k", "1,500", "--num-samples", "100"],
        ["--max-data", "0"],
    ],
    ids=["K0", "split", "iwae-k-syntax", "iwae-k-too-big", "max-data"],
)
def test_cli_bad_arguments_exit_2_with_one_line(ppca_run, capsys, extra):
    assert main(["evaluate", str(ppca_run), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pyro-vae evaluate: error:") and "\n" not in err


def test_cli_run_directory_without_checkpoint(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main(["evaluate", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("error:" in line for line in err)


@pytest.mark.skipif("full-rank" not in GUIDES.names(), reason="no full-rank guide registered")
def test_cli_gaps_on_a_guide_that_cannot_be_refined(tmp_path, capsys):
    train_ppca(tmp_path / "full", "--guide", "full-rank")
    capsys.readouterr()  # the training's own note
    args = ["evaluate", str(tmp_path / "full"), "--num-samples", "20", "--gaps"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "diagonal Normal" in err and "\n" not in err


def test_cli_data_that_no_longer_fit_the_model(tmp_path, capsys):
    g = np.random.default_rng(0)
    path = tmp_path / "data.npz"
    np.savez(path, train=g.normal(size=(60, 4)), test=g.normal(size=(20, 4)))
    args = ["train", "--dataset", f"npz:{path}", "--likelihood", "normal", "--latent-dim", "2"]
    args += ["--set", "model.encoder.hidden=[8]", "--set", "model.decoder.hidden=[8]"]
    assert main([*args, "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"]) == 0
    np.savez(path, train=g.normal(size=(60, 5)), test=g.normal(size=(20, 5)))
    assert main(["evaluate", str(tmp_path / "run"), "--num-samples", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert "shape" in err and "\n" not in err


@pytest.mark.parametrize("prior", ["flow", "vamp"])
def test_evaluate_run_works_for_priors_without_a_closed_form_mean(prior, tmp_path):
    """Regression: evaluate_run once read the device from ``prior().mean``."""
    import pyro_vae
    from pyro_vae.evaluate import evaluate_run

    options = {"vamp": {"pseudo_inputs": 5}}.get(prior, {})
    config = pyro_vae.Config().override(
        {
            "model.prior.name": prior,
            **{f"model.prior.{k}": v for k, v in options.items()},
            "model.latent_dim": 2,
            "model.encoder.hidden": [16],
            "model.decoder.hidden": [16],
            "train.epochs": 1,
        }
    )
    pyro_vae.fit(config, tmp_path / "run")
    result = evaluate_run(tmp_path / "run", num_samples=30, iwae_k=[1, 30], max_data=20)
    s = result.summary
    assert math.isfinite(s["log_likelihood"]) and s["num_data"] == 20
    assert (tmp_path / "run" / "evaluation.json").exists()
