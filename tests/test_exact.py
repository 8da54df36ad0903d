"""The closed forms of pyro_vae.exact, checked against each other and against brute force.

The linear-Gaussian formulas are derived independently of the model code, so
each test compares two routes to the same number: the closed-form marginal
against quadrature of the model's own densities, the closed-form posterior
against Bayes' rule, the closed-form ELBO against a Monte Carlo average, and
log p(x) - ELBO(q) against a directly computed KL(q || p(z|x)).
"""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_vae import DATASETS, ComponentConfig, ModelConfig, build_vae, load_dataset
from pyro_vae.exact import (
    PPCA_DIM,
    PPCA_SIZES,
    LinearGaussian,
    linear_gaussian,
    log_likelihood_quadrature,
)

D, LATENT, SIGMA = 6, 2, 0.7


def linear_vae(data_dim=D, latent_dim=LATENT, sigma=SIGMA, seed=0, hidden=()):
    """A linear-Gaussian VAE (decoder = one nn.Linear) with random W, b; float64."""
    model = ModelConfig(
        latent_dim=latent_dim,
        likelihood=ComponentConfig("normal", {"scale": sigma}),
        decoder=ComponentConfig("mlp", {"hidden": list(hidden), "activation": "tanh"}),
        encoder=ComponentConfig("mlp", {"hidden": [8]}),
    )
    torch.manual_seed(seed)
    vae = build_vae(model, (data_dim,)).double()
    if not hidden:
        layer = vae.likelihood.network.layers[0]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(data_dim, latent_dim, generator=g, dtype=torch.float64))
            layer.bias.copy_(torch.randn(data_dim, generator=g, dtype=torch.float64))
    return vae.eval()


def sample_data(vae, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, vae.latent_dim, generator=g, dtype=torch.float64)
        mean = vae.likelihood(z).mean
        return mean + float(vae.likelihood.scale) * torch.randn(mean.shape, generator=g).double()


def random_diagonal_q(n, latent_dim=LATENT, seed=2):
    g = torch.Generator().manual_seed(seed)
    loc = torch.randn(n, latent_dim, generator=g, dtype=torch.float64)
    scale = 0.2 + torch.rand(n, latent_dim, generator=g, dtype=torch.float64)
    return dist.Normal(loc, scale).to_event(1)


def test_linear_gaussian_is_recognized_and_nothing_else():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    assert isinstance(lg, LinearGaussian)
    layer = vae.likelihood.network.layers[0]
    assert torch.equal(lg.weight, layer.weight)
    assert torch.equal(lg.bias, layer.bias)
    assert lg.noise_scale == pytest.approx(SIGMA)
    assert linear_gaussian(linear_vae(hidden=[4])) is None  # a nonlinear decoder
    bernoulli = build_vae(
        ModelConfig(latent_dim=2, decoder=ComponentConfig("mlp", {"hidden": []})), (D,)
    )
    assert linear_gaussian(bernoulli) is None  # not a Normal likelihood


def test_closed_form_log_likelihood_equals_quadrature():
    # independent route: midpoint quadrature of p(x|z) p(z) from the model's own densities
    vae = linear_vae()
    x = sample_data(vae, 20)
    exact = linear_gaussian(vae).log_likelihood(x)
    quadrature = log_likelihood_quadrature(vae, x, num_points=301, bound=7.0)
    torch.testing.assert_close(quadrature, exact, rtol=0, atol=1e-6)


def test_quadrature_needs_a_2d_latent():
    from pyro_vae import ConfigError

    with pytest.raises(ConfigError, match="2-D latent"):
        log_likelihood_quadrature(linear_vae(latent_dim=3), torch.zeros(1, D))


def test_posterior_is_bayes_rule():
    # log p(z|x) = log p(x|z) + log p(z) - log p(x) at arbitrary z
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 10)
    z = torch.randn(10, LATENT, dtype=torch.float64)
    with torch.no_grad():
        bayes = vae.likelihood(z).log_prob(x) + vae.prior().log_prob(z) - lg.log_likelihood(x)
    torch.testing.assert_close(lg.posterior(x).log_prob(z), bayes, rtol=0, atol=1e-9)


def test_closed_form_elbo_matches_monte_carlo():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 8)
    q = random_diagonal_q(8)
    torch.manual_seed(3)
    s = 20000
    with torch.no_grad():
        z = q.sample((s,))
        log_w = vae.likelihood(z).log_prob(x) + vae.prior().log_prob(z) - q.log_prob(z)
    mc, stderr = log_w.mean(0), log_w.std(0) / math.sqrt(s)
    # Monte Carlo tolerance: 4 standard errors of the mean of s iid terms, per datum
    assert ((mc - lg.elbo(x, q)).abs() <= 4 * stderr).all()


@pytest.mark.parametrize("family", ["diagonal", "full"])
def test_log_likelihood_minus_elbo_is_kl_to_posterior(family):
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 12)
    q = random_diagonal_q(12)
    if family == "full":
        g = torch.Generator().manual_seed(4)
        a = torch.randn(12, LATENT, LATENT, generator=g, dtype=torch.float64)
        q = dist.MultivariateNormal(q.mean, covariance_matrix=a @ a.mT + 0.1 * torch.eye(LATENT))
    kl = lg.kl_to_posterior(x, q)
    torch.testing.assert_close(lg.log_likelihood(x) - lg.elbo(x, q), kl, rtol=0, atol=1e-9)
    assert (kl > 0).all()
    # and the gap closes at the exact posterior
    torch.testing.assert_close(lg.elbo(x, lg.posterior(x)), lg.log_likelihood(x), rtol=0, atol=1e-9)


def test_optimal_diagonal_maximizes_the_elbo():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 5)
    best = lg.optimal_diagonal(x)
    top = lg.elbo(x, best)
    assert (top <= lg.log_likelihood(x)).all()
    loc, scale = best.base_dist.loc, best.base_dist.scale
    for j in range(LATENT):
        for dloc, dscale in ((0.05, 1.0), (-0.05, 1.0), (0.0, 1.1), (0.0, 0.9)):
            loc2, scale2 = loc.clone(), scale.clone()
            loc2[:, j] += dloc
            scale2[:, j] *= dscale
            assert (lg.elbo(x, dist.Normal(loc2, scale2).to_event(1)) < top).all()


def test_nonlinear_quadrature_converges_in_the_grid():
    # the midpoint rule on a smooth (tanh) decoder: a finer grid and a larger box
    # change nothing visible
    vae = linear_vae(hidden=[16])
    x = sample_data(vae, 6)
    coarse = log_likelihood_quadrature(vae, x, num_points=201, bound=6.0)
    fine = log_likelihood_quadrature(vae, x, num_points=401, bound=8.0)
    torch.testing.assert_close(coarse, fine, rtol=0, atol=1e-6)


def test_ppca_dataset_is_fixed_and_registered():
    assert "ppca" in DATASETS.names()
    a, b = load_dataset("ppca"), load_dataset("ppca")
    assert set(a.splits) == set(PPCA_SIZES)
    for split, n in PPCA_SIZES.items():
        assert a.splits[split].shape == (n, PPCA_DIM)
        assert a.splits[split].dtype == torch.float32
        assert torch.equal(a.splits[split], b.splits[split])
    # a rank-2 signal plus unit noise: the covariance has 2 eigenvalues well above 1
    # and the other 8 near the noise variance 1 (sampling error ~ sqrt(2/2000) relative)
    x = a.splits["train"].double()
    eig = torch.linalg.eigvalsh(torch.cov(x.T))
    assert (eig[-2:] > 5).all()
    assert ((eig[:-2] - 1).abs() < 0.25).all()
