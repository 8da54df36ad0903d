"""Likelihood heads and decoder networks, checked against closed forms.

Shapes, gradients and save/load of every registered likelihood and network
are in test_contract.py; here: the densities themselves (normal-learned
against the Normal density and its maximum-likelihood σ, continuous-bernoulli
against its normalizing constant), the support check on bad data, and the
conv network's datum-shape rules.
"""

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.distributions import constraints

import pyro_vae
from pyro_vae import ComponentConfig, ConfigError, DataError, ModelConfig, build_vae
from pyro_vae.likelihoods import ContinuousBernoulliLikelihood, LearnedNormalLikelihood
from pyro_vae.nets import Conv

P = 6  # pixels of a toy datum; with nn.Identity as "decoder", z holds the parameters


# --- normal-learned -----------------------------------------------------------------


def _normal_log_density(x, loc, scale):
    return (
        -((x - loc) ** 2) / (2 * scale**2) - torch.log(scale) - 0.5 * math.log(2 * math.pi)
    ).sum(-1)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_normal_learned_log_prob_is_the_normal_density_with_the_learned_scale(per_pixel):
    lik = LearnedNormalLikelihood(nn.Identity(), (P,), per_pixel=per_pixel, min_scale=0.05)
    with torch.no_grad():  # move σ away from its initial value, differently per pixel
        lik.log_scale_excess.copy_(torch.randn(lik.log_scale_excess.shape))
    scale = 0.05 + torch.exp(lik.log_scale_excess.detach())
    assert scale.shape == ((P,) if per_pixel else ())
    loc, x = torch.randn(4, P), torch.randn(4, P)
    expected = _normal_log_density(x, loc, scale.expand(P))
    torch.testing.assert_close(lik(loc).log_prob(x), expected)
    torch.testing.assert_close(lik.scale, scale)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_normal_learned_scale_is_stationary_at_the_rms_residual(per_pixel):
    """For fixed means, d/dσ Σ log N(x; μ, σ²) = 0 exactly at σ² = mean squared residual."""
    torch.manual_seed(0)
    loc = torch.randn(50, P)
    x = loc + torch.randn(50, P) * torch.linspace(0.2, 2.0, P)
    residual2 = (x - loc) ** 2
    sigma_hat = (residual2.mean(0) if per_pixel else residual2.mean()).sqrt()
    lik = LearnedNormalLikelihood(nn.Identity(), (P,), per_pixel=per_pixel, min_scale=0.0)

    def grad_at(sigma):
        with torch.no_grad():
            lik.log_scale_excess.copy_(torch.log(sigma))
        lik.zero_grad()
        lik(loc).log_prob(x).sum().backward()
        return lik.log_scale_excess.grad.clone()

    torch.testing.assert_close(grad_at(sigma_hat), torch.zeros_like(sigma_hat), atol=1e-3, rtol=0)
    assert (grad_at(2 * sigma_hat) < -1).all()  # too wide: the likelihood wants σ smaller
    assert (grad_at(sigma_hat / 2) > 1).all()


def test_normal_learned_bad_options_are_one_line_config_errors():
    for options in ({"min_scale": -0.1}, {"init_scale": 0.01, "min_scale": 0.1}):
        with pytest.raises(ConfigError, match="model.likelihood") as e:
            LearnedNormalLikelihood(nn.Identity(), (P,), **options)
        assert "\n" not in str(e.value)


# --- continuous-bernoulli -----------------------------------------------------------

LOGITS = torch.tensor([-9.0, -2.5, -0.3, -1e-3, 0.0, 2e-3, 0.7, 3.0, 8.0], dtype=torch.float64)


def test_continuous_bernoulli_normalizes_to_one_on_the_unit_interval():
    """Trapezoid rule on 20001 points; its error is h^2/12 max|f''| < 1e-6 for |logit| <= 9."""
    lik = ContinuousBernoulliLikelihood(nn.Identity(), (len(LOGITS),))
    pixels = lik(LOGITS).base_dist
    grid = torch.linspace(0, 1, 20001, dtype=torch.float64)
    density = pixels.log_prob(grid[:, None].expand(-1, len(LOGITS))).exp()
    mass = torch.trapezoid(density, grid, dim=0)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-5, rtol=0)


def test_continuous_bernoulli_is_bernoulli_cross_entropy_plus_log_normalizer():
    r"""log p(x) = x log λ + (1-x) log(1-λ) + log C(λ), C(λ) = 2 artanh(1-2λ)/(1-2λ)."""
    logits = LOGITS[LOGITS.abs() > 0.1]  # away from λ = 1/2, where C's formula is 0/0
    lik = ContinuousBernoulliLikelihood(nn.Identity(), (len(logits),))
    x = torch.rand(5, len(logits), dtype=torch.float64)
    lam = torch.sigmoid(logits)
    log_c = torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))
    expected = (x * torch.log(lam) + (1 - x) * torch.log1p(-lam) + log_c).sum(-1)
    torch.testing.assert_close(lik(logits.expand(5, -1)).log_prob(x), expected)


WIDE_LOGITS = [-100.0, -30.0, -20.0, -16.0, -5.0, -0.3, -0.05, 0.0, 1e-4, 0.05, 0.3, 5.0, 16.0]
WIDE_LOGITS += [20.0, 30.0, 100.0]


def test_continuous_bernoulli_normalizes_to_one_in_float32_for_logits_up_to_100():
    """The float32 density, integrated in float64 by the trapezoid rule on 400001 points.

    At |l| = 100 the density varies on a scale of 1/100 = 4000 grid steps, so the rule's
    error is below 1e-7; the float32 log density is off by at most a few 1e-6 (below).
    torch's own ContinuousBernoulli has mass 0.797 at l = +-20 in float32.
    """
    logits = torch.tensor(WIDE_LOGITS, dtype=torch.float32)
    lik = ContinuousBernoulliLikelihood(nn.Identity(), (len(logits),))
    pixels = lik(logits).base_dist
    grid = torch.linspace(0, 1, 400001, dtype=torch.float64)
    log_density = pixels.log_prob(grid.float()[:, None].expand(-1, len(logits)))
    mass = torch.trapezoid(log_density.double().exp(), grid, dim=0)
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=1e-4, rtol=0)


def test_continuous_bernoulli_float32_agrees_with_float64_to_1e_4_nats():
    logits = torch.tensor(WIDE_LOGITS, dtype=torch.float64)
    x = torch.linspace(0, 1, 101, dtype=torch.float64)[:, None].expand(-1, len(logits))
    lik = ContinuousBernoulliLikelihood(nn.Identity(), (len(logits),))
    single = lik(logits.float()).base_dist.log_prob(x.float()).double()
    double = lik(logits).base_dist.log_prob(x)
    assert (single - double).abs().max() < 1e-4


def test_continuous_bernoulli_normalizer_gradient_is_finite_and_exact():
    """d log C / dl = 1/l - 1/sinh(l) (0 at l = 0), in float32 for |l| up to 100."""
    from pyro_vae.likelihoods import continuous_bernoulli_log_normalizer

    logits = torch.tensor(WIDE_LOGITS, dtype=torch.float32, requires_grad=True)
    (grad,) = torch.autograd.grad(continuous_bernoulli_log_normalizer(logits).sum(), logits)
    assert torch.isfinite(grad).all()
    l64 = logits.detach().double()
    safe = torch.where(l64 == 0, torch.ones_like(l64), l64)
    expected = torch.where(l64 == 0, torch.zeros_like(l64), 1 / safe - 1 / torch.sinh(safe))
    torch.testing.assert_close(grad.double(), expected, atol=1e-5, rtol=1e-4)


def _npz(tmp_path, array):
    path = tmp_path / "data.npz"
    np.savez(path, train=array, test=array[:4])
    return f"npz:{path}"


def test_continuous_bernoulli_rejects_data_outside_the_unit_interval(tmp_path):
    assert LearnedNormalLikelihood.support is constraints.real
    assert ContinuousBernoulliLikelihood.support is constraints.unit_interval
    rng = np.random.default_rng(0)
    outside = rng.uniform(-0.5, 1.5, size=(20, 3, 3)).astype(np.float32)
    config = pyro_vae.Config().override(
        {"data.name": _npz(tmp_path, outside), "model.likelihood.name": "continuous-bernoulli"}
    )
    with pytest.raises(DataError, match="outside the support") as e:
        pyro_vae.load_data(config)
    assert "\n" not in str(e.value) and "continuous-bernoulli" in str(e.value)
    # the same grayscale data rescaled into [0, 1] fit, and are not binarized
    inside = (outside + 0.5) / 2
    data = pyro_vae.load_data(config.override({"data.name": _npz(tmp_path, inside)}))
    assert data.binarize == "none"
    torch.testing.assert_close(data.train.sort().values, torch.as_tensor(inside).sort().values)


# --- conv network -------------------------------------------------------------------


def test_conv_encodes_and_decodes_28x28_images_with_leading_dims():
    encoder = Conv((1, 28, 28), None, channels=[4], features=10)
    assert encoder(torch.zeros(2, 5, 1, 28, 28)).shape == (2, 5, 10)
    assert encoder.out_features == 10
    # a decoder for two parameters per pixel: channel-first, as Likelihood.decode reshapes
    decoder = Conv((3,), 2 * 784, channels=[4, 8], features=10)
    z = torch.randn(2, 5, 3)
    out = decoder(z)
    assert out.shape == (2, 5, 2 * 784)
    flat = decoder(z.reshape(10, 3)).reshape(2, 5, -1)
    torch.testing.assert_close(out, flat)  # leading dims are batch dims only


@pytest.mark.parametrize(
    "role, event_shape",
    [("encoder", (784,)), ("decoder", (784,)), ("encoder", (1, 40)), ("decoder", (40, 1))],
)
def test_conv_on_another_datum_shape_is_a_one_line_config_error(role, event_shape):
    conv = ComponentConfig("conv", {"channels": [4], "features": 8})
    small = ComponentConfig("mlp", {"hidden": [8]})
    nets = {"encoder": small, "decoder": small, role: conv}
    with pytest.raises(ConfigError, match="conv network") as e:
        build_vae(ModelConfig(latent_dim=3, **nets), event_shape)
    assert "\n" not in str(e.value) and "mlp" in str(e.value)


def test_conv_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="channels"):
        Conv((28, 28), None, channels=[4, 8, 16])
    with pytest.raises(ConfigError, match="features"):
        Conv((28, 28), None, features=0)
    with pytest.raises(ConfigError, match="unknown activation"):
        Conv((28, 28), None, activation="swish")
