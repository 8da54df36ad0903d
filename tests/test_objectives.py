"""Objectives: trace, meanfield (with its Monte Carlo fallback), iwae, β warm-up, free bits.

Each estimator is compared with a hand-written formula evaluated on the same
noise draw (same seed: Pyro's guide draws ``q.rsample()``, or
``q.rsample((K,))`` with vectorized particles, from the same RNG state), in
value and in gradient. The IWAE bound is also checked against the exact
log-likelihood of a linear-Gaussian model, with Monte Carlo tolerances.
"""

import dataclasses
import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import RenyiELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

import pyro_vae
from pyro_vae import GUIDES, PRIORS, ComponentConfig, ConfigError, ModelConfig, build_vae
from pyro_vae.model import VAE, analytic_kl, kl_per_dim
from pyro_vae.objectives import (
    IWAE_ELBO,
    KL_ESTIMATORS,
    FreeBits_ELBO,
    MeanField_ELBO,
    iwae_elbo,
    kl_estimator,
    kl_weight,
    mean_field_elbo,
    trace_elbo,
)
from pyro_vae.priors import Prior

EVENT = (5,)
D = 3
B = 4
N = 20  # data_size: the plate is subsampled, scaled by N / B
INDEX = torch.arange(B) + 2
SMALL = {
    "encoder": ComponentConfig("mlp", {"hidden": [8]}),
    "decoder": ComponentConfig("mlp", {"hidden": [8]}),
}


def normal_vae(seed=0, **changes):
    torch.manual_seed(seed)
    model = ModelConfig(latent_dim=D, likelihood=ComponentConfig("normal", {"scale": 0.5}), **SMALL)
    return build_vae(dataclasses.replace(model, **changes), EVENT)


def data(seed=1):
    return torch.randn(B, *EVENT, generator=torch.Generator().manual_seed(seed))


def loss_of(objective, vae, x, seed=7, subsample=True, beta=1.0):
    """The objective's loss with β passed to the model and guide as ``kl_scale``."""
    torch.manual_seed(seed)
    args = (x, INDEX, N, beta) if subsample else (x, None, None, beta)
    return objective.differentiable_loss(vae.model, vae.guide, *args)


def draw(vae, x, seed=7, particles=None):
    """The z that Pyro's guide draws after torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    q = vae.posterior(x, INDEX)
    return q, (q.rsample() if particles is None else q.rsample((particles,)))


def grads(vae, loss):
    vae.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in vae.named_parameters() if p.grad is not None}


def assert_same_value_and_gradient(vae, loss, expected):
    torch.testing.assert_close(loss, expected)
    got, want = grads(vae, loss), grads(vae, expected)
    assert got.keys() == want.keys() and got
    for name in got:
        torch.testing.assert_close(got[name], want[name], msg=name)


class MixturePrior(Prior):
    """A two-component Gaussian mixture: no closed-form KL against a Normal guide."""

    def __init__(self, latent_dim):
        super().__init__()
        self.latent_dim = latent_dim
        self.locs = torch.nn.Parameter(torch.tensor([[-1.0], [1.0]]).repeat(1, latent_dim))

    def forward(self):
        components = dist.Normal(self.locs, torch.ones_like(self.locs)).to_event(1)
        return dist.MixtureSameFamily(dist.Categorical(logits=torch.zeros(2)), components)


def mixture_vae():
    vae = normal_vae()
    return VAE(MixturePrior(D), vae.posterior, vae.likelihood)


# --- trace and meanfield ------------------------------------------------------------


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_trace_is_the_one_sample_elbo_with_the_kl_weighted_by_beta(beta):
    vae, x = normal_vae(), data()
    q, z = draw(vae, x)
    log_ratio = vae.prior().log_prob(z) - q.log_prob(z)
    expected = -(N / B) * (vae.likelihood(z).log_prob(x) + beta * log_ratio).sum()
    assert_same_value_and_gradient(vae, loss_of(trace_elbo(1), vae, x, beta=beta), expected)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_meanfield_uses_the_analytic_kl_weighted_by_beta(beta):
    vae, x = normal_vae(), data()
    q, z = draw(vae, x)
    kl = kl_divergence(q, vae.prior().expand((B,)))
    expected = -(N / B) * (vae.likelihood(z).log_prob(x) - beta * kl).sum()
    objective = mean_field_elbo(1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback warning for Normal against Normal
        loss = loss_of(objective, vae, x, beta=beta)
    assert_same_value_and_gradient(vae, loss, expected)
    assert objective.kl_fallback == ()
    assert kl_estimator(objective) == "analytic"


def test_meanfield_without_a_closed_form_warns_once_and_falls_back_to_monte_carlo():
    vae, x = mixture_vae(), data()
    assert analytic_kl(vae.posterior(x), vae.prior()) is None
    objective = mean_field_elbo(1)
    assert kl_estimator(objective) == "analytic"  # not known before the first evaluation
    with pytest.warns(UserWarning, match="Monte Carlo") as record:
        first = loss_of(objective, vae, x)
        loss_of(objective, vae, x, seed=8)
    ours = [w for w in record if "meanfield" in str(w.message)]
    assert len(ours) == 1 and "\n" not in str(ours[0].message)
    assert objective.kl_fallback == ("z",)
    assert kl_estimator(objective) == "monte-carlo (fallback)"
    # Pyro's fallback is the Monte Carlo KL, the same estimate as Trace_ELBO on the same draw
    assert_same_value_and_gradient(vae, first, loss_of(trace_elbo(1), vae, x))


@pytest.mark.parametrize("case", ["analytic", "analytic, 3 particles", "fallback", "free bits"])
def test_analytic_kl_objectives_skip_only_the_latent_densities_they_never_read(case):
    """With validation off (the trainer's hot loop) the traces omit log p(z) and log q(z|x)
    where the KL is closed-form; value and gradient equal Pyro's path (validation on)."""
    vae = mixture_vae() if case == "fallback" else normal_vae()
    x = data()
    if case == "free bits":
        objective = mean_field_elbo(1, free_bits=float(mean_kl_per_dim(vae, x).median()))
    else:
        objective = mean_field_elbo(3 if "3" in case else 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the fallback's one warning
        expected = loss_of(objective, vae, x, beta=0.3)  # Pyro's path (validation is on)
        with pyro.validation_enabled(False):
            loss = loss_of(objective, vae, x, beta=0.3)
            model_trace, guide_trace = objective._get_trace(
                vae.model, vae.guide, (x, INDEX, N, 0.3), {}
            )
    assert_same_value_and_gradient(vae, loss, expected)
    skipped = case != "fallback"
    assert ("log_prob" not in model_trace.nodes["z"]) is skipped
    assert ("score_parts" not in guide_trace.nodes["z"]) is skipped
    assert "log_prob" in model_trace.nodes["x"]


def test_kl_estimator_of_each_objective():
    assert kl_estimator(trace_elbo(1)) == "monte-carlo"
    assert kl_estimator(mean_field_elbo(1)) == "analytic"
    assert kl_estimator(mean_field_elbo(1, free_bits=0.5)) == "analytic"
    assert kl_estimator(iwae_elbo(3)) == "importance-weighted"
    assert {kl_estimator(o) for o in (trace_elbo(1), iwae_elbo(2))} <= set(KL_ESTIMATORS)
    assert isinstance(mean_field_elbo(2), MeanField_ELBO)
    assert isinstance(mean_field_elbo(2, free_bits=0.1), FreeBits_ELBO)


# --- iwae ---------------------------------------------------------------------------


@pytest.mark.parametrize("subsample", [False, True])
def test_iwae_with_one_particle_equals_trace_elbo(subsample):
    vae, x = normal_vae(), data()
    loss = loss_of(iwae_elbo(1), vae, x, subsample=subsample)
    expected = loss_of(Trace_ELBO(max_plate_nesting=1), vae, x, subsample=subsample)
    assert_same_value_and_gradient(vae, loss, expected)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_iwae_is_the_log_mean_importance_weight_scaled_after_the_mean(beta):
    r"""-(N/B) Σ_i log (1/K) Σ_k exp(log p(x_i|z_k) + β(log p(z_k) - log q(z_k|x_i)))."""
    K = 6
    vae, x = normal_vae(), data()
    q, z = draw(vae, x, particles=K)
    log_w = vae.likelihood(z).log_prob(x) + beta * (vae.prior().log_prob(z) - q.log_prob(z))
    assert log_w.shape == (K, B)
    expected = -(N / B) * (torch.logsumexp(log_w, 0) - math.log(K)).sum()
    assert_same_value_and_gradient(vae, loss_of(iwae_elbo(K), vae, x, beta=beta), expected)


def test_iwae_equals_pyro_renyi_elbo_without_subsampling():
    """Pyro's RenyiELBO(α=0).loss is right when the plate is not subsampled."""
    vae, x = normal_vae(), data()
    renyi = RenyiELBO(alpha=0, num_particles=5, vectorize_particles=True, max_plate_nesting=1)
    torch.manual_seed(7)
    expected = renyi.loss(vae.model, vae.guide, x)
    ours = loss_of(iwae_elbo(5), vae, x, subsample=False)
    assert float(ours.detach()) == pytest.approx(expected, rel=1e-6)
    assert isinstance(iwae_elbo(5), RenyiELBO) and isinstance(iwae_elbo(5), IWAE_ELBO)


def linear_gaussian_vae():
    """z ~ N(0, I), x | z ~ N(Wz + b, σ² I): log p(x) = log N(x; b, WWᵀ + σ²I)."""
    torch.manual_seed(3)
    model = ModelConfig(
        latent_dim=2,
        likelihood=ComponentConfig("normal", {"scale": 0.4}),
        encoder=ComponentConfig("mlp", {"hidden": [8]}),
        decoder=ComponentConfig("mlp", {"hidden": []}),  # a single linear layer
    )
    return build_vae(model, (4,))


def test_iwae_bound_increases_with_k_toward_the_exact_log_likelihood():
    """E[L_1] = ELBO (closed form) <= E[L_10] <= E[L_100] <= log p(x) (Burda et al. 2016).

    Each E[L_K] is the mean of M independent estimates (IWAE_ELBO.log_weights, whose
    log-mean-exp is the loss, as tested above); tolerances are 4 standard
    errors (sample standard deviation / sqrt(M)), so a correct estimator fails
    with probability < 1e-4 per comparison; the seed is fixed.
    """
    vae = linear_gaussian_vae()
    layer = vae.likelihood.network.layers[0]
    W, b, sigma = layer.weight.detach(), layer.bias.detach(), vae.likelihood.scale
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(0)) * 2
    with torch.no_grad():
        marginal = dist.MultivariateNormal(b, W @ W.T + sigma**2 * torch.eye(4))
        log_px = marginal.log_prob(x).sum()
        q = vae.posterior(x)
        mu, s = q.base_dist.loc, q.base_dist.scale
        expected_rec = (
            -4 * torch.log(sigma)
            - 2 * math.log(2 * math.pi)
            - (((x - mu @ W.T - b) ** 2).sum(-1) + (s**2 @ (W**2).T).sum(-1)) / (2 * sigma**2)
        )
        elbo = (expected_rec - analytic_kl(q, vae.prior())).sum()

        torch.manual_seed(11)
        M = 100  # independent replicates of the data set, drawn in one batch
        replicated = x.repeat(M, 1)
        means, ses = {}, {}
        for K in (1, 10, 100):
            log_w, scale = iwae_elbo(K).log_weights(vae.model, vae.guide, replicated)
            assert log_w.shape == (K, M * len(x)) and scale == 1.0
            bound = torch.logsumexp(log_w, 0) - math.log(K)  # L_K per datum
            draws = bound.reshape(M, len(x)).sum(1)  # M estimates of sum_i L_K(x_i)
            means[K], ses[K] = float(draws.mean()), float(draws.std() / math.sqrt(M))

    def gap_se(a, c):
        return math.hypot(ses[a], ses[c])

    assert abs(means[1] - float(elbo)) < 4 * ses[1]
    assert means[10] > means[1] + 4 * gap_se(1, 10)
    assert means[100] > means[10] + 4 * gap_se(10, 100)
    assert means[100] < float(log_px) + 4 * ses[100]
    assert float(elbo) < float(log_px)


# --- free bits ----------------------------------------------------------------------


def free_bits_by_hand(vae, x, lam, particles=None, beta=1.0):
    """-(N/B)[Σ_i mean_k log p(x_i|z_ik)] + β N Σ_d max(λ, mean_i KL_id), same draw."""
    q, z = draw(vae, x, particles=particles)
    rec = vae.likelihood(z).log_prob(x)
    rec = rec.mean(0) if particles else rec
    kl_id = kl_divergence(q.base_dist, vae.prior().base_dist)  # (B, D)
    clamped = torch.clamp(kl_id.mean(0), min=lam).sum()
    return -((N / B) * rec.sum() - beta * N * clamped)


def mean_kl_per_dim(vae, x):
    with torch.no_grad():
        return kl_per_dim(vae.posterior(x, INDEX), vae.prior()).mean(0)


@pytest.mark.parametrize("particles", [None, 3])
@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_free_bits_is_the_clamped_per_dimension_kl(particles, beta):
    vae, x = normal_vae(), data()
    kl_d = mean_kl_per_dim(vae, x)
    lam = float(kl_d.median())  # clamps some dimensions and not others
    assert (kl_d < lam).any() and (kl_d > lam).any()
    K = particles or 1
    objective = mean_field_elbo(K, free_bits=lam)
    expected = free_bits_by_hand(vae, x, lam, particles, beta)
    assert_same_value_and_gradient(vae, loss_of(objective, vae, x, beta=beta), expected)


def test_free_bits_limits():
    vae, x = normal_vae(), data()
    kl_d = mean_kl_per_dim(vae, x)
    # λ = 0: exactly Pyro's TraceMeanField_ELBO
    zero = FreeBits_ELBO(0.0, max_plate_nesting=1)
    expected = loss_of(TraceMeanField_ELBO(max_plate_nesting=1), vae, x)
    assert_same_value_and_gradient(vae, loss_of(zero, vae, x), expected)
    # λ above every KL_d: the KL term is the constant N D λ, and no gradient flows through it
    lam = float(kl_d.max()) + 1.0
    high = loss_of(mean_field_elbo(1, free_bits=lam), vae, x)
    q, z = draw(vae, x)
    rec = (N / B) * vae.likelihood(z).log_prob(x).sum()
    torch.testing.assert_close(high, -(rec - N * D * lam))
    grad = grads(vae, high)
    assert torch.count_nonzero(grad["posterior.loc.weight"]) > 0  # via the reconstruction only
    # a dimension below the floor gets no KL gradient: scale heads see only reconstruction
    torch.testing.assert_close(grad, grads(vae, -rec))


def test_free_bits_without_a_per_dimension_kl_is_a_one_line_config_error():
    vae, x = mixture_vae(), data()
    with pytest.raises(ConfigError, match="free_bits") as e:
        loss_of(mean_field_elbo(1, free_bits=0.1), vae, x)
    assert "\n" not in str(e.value) and "MixtureSameFamily" in str(e.value)


def registered_cases():
    return [("prior", n) for n in PRIORS.names()] + [("guide", n) for n in GUIDES.names()]


@pytest.mark.parametrize("case", registered_cases(), ids=lambda c: f"{c[0]}-{c[1]}")
def test_every_registered_prior_and_guide_with_meanfield_and_free_bits(case):
    """meanfield falls back (and says so) exactly where no closed-form KL exists;
    free bits works exactly where the KL factorizes per dimension, else ConfigError."""
    kind, name = case
    registry = PRIORS if kind == "prior" else GUIDES
    component = ComponentConfig(name, registry.example(name))
    vae, x = normal_vae(**{kind: component}), data()
    q, p = vae.posterior(x, INDEX), vae.prior()
    no_closed_form = analytic_kl(q, p) is None
    objective = mean_field_elbo(1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loss = loss_of(objective, vae, x)
    assert torch.isfinite(loss)
    ours = [w for w in record if "elbo 'meanfield'" in str(w.message)]
    assert len(ours) == int(no_closed_form)
    assert kl_estimator(objective) == ("monte-carlo (fallback)" if no_closed_form else "analytic")

    free_bits = mean_field_elbo(1, free_bits=0.05)
    if kl_per_dim(q, p) is None:
        with pytest.raises(ConfigError, match="free_bits"):
            loss_of(free_bits, vae, x)
    else:
        assert torch.isfinite(loss_of(free_bits, vae, x))


def test_free_bits_applies_to_meanfield_only():
    config = pyro_vae.Config()
    for elbo in ("trace", "iwae"):
        bad = config.override({"train.elbo": elbo, "train.free_bits": 0.5})
        with pytest.raises(ConfigError, match="free_bits .* meanfield") as e:
            pyro_vae.resolve(bad)
        assert "\n" not in str(e.value)
    assert pyro_vae.resolve(config.override({"train.free_bits": 0.5})).train.free_bits == 0.5
    with pytest.raises(ConfigError, match="free_bits"):
        config.override({"train.free_bits": -0.1})


# --- β warm-up and what a run records -----------------------------------------------


def test_kl_weight_warms_up_linearly():
    assert [kl_weight(2.0, 4, e) for e in range(1, 8)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert [kl_weight(0.5, 0, e) for e in (1, 2, 50)] == [0.5, 0.5, 0.5]
    assert kl_weight(1.0, 1, 1) == 0.0 and kl_weight(1.0, 1, 2) == 1.0


def test_kl_warmup_start_gives_the_first_epoch_weight_and_the_vampprior_schedule():
    # s = 1/W is min(1, e/W), the VampPrior paper's code; exactly, epoch by epoch
    assert [kl_weight(1.0, 100, e, 0.01) for e in range(1, 150)] == [
        min(1.0, e / 100) for e in range(1, 150)
    ]
    assert [kl_weight(2.0, 4, e, 0.5) for e in range(1, 6)] == [1.0, 1.5, 2.0, 2.0, 2.0]
    assert kl_weight(1.0, 0, 1, 0.5) == 1.0  # no warm-up: start has nothing to do
    assert [kl_weight(2.0, 4, e, 0.0) for e in range(1, 4)] == [
        kl_weight(2.0, 4, e) for e in (1, 2, 3)
    ]


def tiny_npz(tmp_path, shape=(4, 4), n=40):
    rng = np.random.default_rng(0)
    path = tmp_path / "tiny.npz"
    np.savez(path, train=(rng.random((n, *shape)) < 0.3).astype(np.float32))
    return f"npz:{path}"


def tiny_config(tmp_path, **train):
    return pyro_vae.Config(
        data=pyro_vae.DataConfig(name=tiny_npz(tmp_path)),
        model=ModelConfig(latent_dim=2, **SMALL),
        train=pyro_vae.TrainConfig(batch_size=16, **train),
    )


def test_fit_records_beta_and_the_kl_estimator(tmp_path):
    config = tiny_config(tmp_path, epochs=4, beta=0.5, kl_warmup_epochs=2)
    result = pyro_vae.fit(config, tmp_path / "run")
    betas = [r["beta"] for r in result.history]
    assert betas == [kl_weight(0.5, 2, e) for e in (1, 2, 3, 4)] == [0.0, 0.25, 0.5, 0.5]
    assert {r["kl_estimator"] for r in result.history} == {"analytic"}
    assert pyro_vae.read_metrics(tmp_path / "run") == result.history
    assert not hasattr(result.vae, "kl_scale")  # β is an argument of the model, not a field
    started = pyro_vae.fit(
        tiny_config(tmp_path, epochs=3, beta=0.5, kl_warmup_epochs=2, kl_warmup_start=0.5)
    )
    assert [r["beta"] for r in started.history] == [0.25, 0.5, 0.5]
    for r in result.history:  # the test ELBO is the plain ELBO whatever β was
        assert r["test_elbo"] == pytest.approx(r["test_reconstruction"] - r["test_kl"])


def test_fit_records_the_meanfield_fallback(tmp_path):
    """Uses a registered prior or guide without a closed-form KL (skips if none is)."""
    x = data()
    for kind, name in registered_cases():
        registry = PRIORS if kind == "prior" else GUIDES
        component = ComponentConfig(name, registry.example(name))
        vae = normal_vae(**{kind: component})
        q = vae.posterior(x, INDEX)
        if analytic_kl(q, vae.prior()) is None:
            break
    else:
        pytest.skip("no registered prior or guide lacks a closed-form KL")
    config = tiny_config(tmp_path, epochs=2, elbo="meanfield")
    config = dataclasses.replace(
        config, model=dataclasses.replace(config.model, **{kind: component})
    )
    with pytest.warns(UserWarning, match="Monte Carlo"):
        result = pyro_vae.fit(config)
    assert [r["kl_estimator"] for r in result.history] == ["monte-carlo (fallback)"] * 2
