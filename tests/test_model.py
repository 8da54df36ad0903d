"""The Pyro model/guide against closed forms: ELBO, KL, gradients, isolation."""

import math

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

import pyro_vae
from pyro_vae import ComponentConfig, ModelConfig, analytic_kl, build_vae

EVENT = (8, 8)


def small_vae(latent_dim=4, seed=0):
    torch.manual_seed(seed)
    config = ModelConfig(
        latent_dim=latent_dim,
        encoder=ComponentConfig("mlp", {"hidden": [32]}),
        decoder=ComponentConfig("mlp", {"hidden": [32]}),
    )
    return build_vae(config, EVENT)


def binary_batch(batch=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((batch, *EVENT), 0.3), generator=g)


def hand_negative_elbo(vae, x, z, scale=1.0):
    """-[log Bern(x | decoder(z)) - 1/2 sum(mu^2 + s^2 - log s^2 - 1)], written out by hand."""
    h = vae.posterior.trunk(x)
    mu, log_var = vae.posterior.loc(h), vae.posterior.log_var(h)
    logits = vae.likelihood.network(z).reshape(x.shape)
    reconstruction = (x * logits - torch.nn.functional.softplus(logits)).flatten(1).sum(1)
    kl = 0.5 * (mu**2 + log_var.exp() - log_var - 1).sum(1)
    return -scale * (reconstruction - kl).sum()


@pytest.mark.parametrize("data_size", [None, 60])
def test_mean_field_loss_equals_closed_form(data_size):
    vae, x = small_vae(), binary_batch()
    index = torch.arange(len(x)) + 7 if data_size else None
    elbo = TraceMeanField_ELBO(max_plate_nesting=1)
    torch.manual_seed(3)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x, index, data_size)
    torch.manual_seed(3)  # the same noise draw: the loss runs the guide first
    z = poutine.trace(vae.guide).get_trace(x, index, data_size).nodes["z"]["value"]
    scale = data_size / len(x) if data_size else 1.0
    expected = hand_negative_elbo(vae, x, z, scale)
    assert torch.allclose(loss, expected, rtol=1e-5, atol=0)


def test_trace_elbo_agrees_with_mean_field_in_expectation():
    """Monte Carlo KL (Trace_ELBO) and analytic KL have the same mean.

    1500 draws of each, taken as 150 estimates that each average 10 vectorized
    particles. Tolerance: 4 standard errors of the difference of the two means.
    """
    vae, x = small_vae(), binary_batch()
    estimates, particles = 150, 10
    options = {"num_particles": particles, "vectorize_particles": True, "max_plate_nesting": 1}
    with torch.no_grad():
        torch.manual_seed(11)
        trace = torch.stack(
            [
                Trace_ELBO(**options).differentiable_loss(vae.model, vae.guide, x)
                for _ in range(estimates)
            ]
        )
        mean_field = torch.stack(
            [
                TraceMeanField_ELBO(**options).differentiable_loss(vae.model, vae.guide, x)
                for _ in range(estimates)
            ]
        )
    se = math.sqrt(trace.var() / estimates + mean_field.var() / estimates)
    assert abs(float(trace.mean() - mean_field.mean())) < 4 * se
    # the analytic KL removes variance: a sanity check that the comparison is not vacuous
    assert mean_field.var() < trace.var()


def test_analytic_gaussian_kl_matches_formula_and_monte_carlo():
    g = torch.Generator().manual_seed(5)
    loc = torch.randn(3, 4, generator=g)
    scale = torch.rand(3, 4, generator=g) + 0.3
    q = pyro.distributions.Normal(loc, scale).to_event(1)
    p = pyro_vae.priors.StandardNormalPrior(4)()
    kl = analytic_kl(q, p)
    formula = 0.5 * (loc**2 + scale**2 - torch.log(scale**2) - 1).sum(-1)
    torch.testing.assert_close(kl, formula, rtol=1e-6, atol=1e-6)
    n = 200_000
    torch.manual_seed(6)
    z = q.sample((n,))
    samples = q.log_prob(z) - p.log_prob(z)
    mc, se = samples.mean(0), samples.std(0) / math.sqrt(n)
    assert ((mc - kl).abs() < 4 * se).all()


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_gradients_reach_every_encoder_and_decoder_parameter(elbo):
    vae, x = small_vae(), binary_batch()
    objective = pyro_vae.OBJECTIVES.build(elbo, {}, "train")
    objective.differentiable_loss(vae.model, vae.guide, x).backward()
    names = [n for n, _ in vae.named_parameters()]
    assert any(n.startswith("posterior.") for n in names)
    assert any(n.startswith("likelihood.") for n in names)
    for name, p in vae.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_two_vaes_keep_separate_parameters():
    a, b = small_vae(seed=0), small_vae(seed=0)
    before_b = {k: v.clone() for k, v in b.state_dict().items()}
    objective = TraceMeanField_ELBO(max_plate_nesting=1)
    opt = torch.optim.Adam(a.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        objective.differentiable_loss(a.model, a.guide, binary_batch()).backward()
        opt.step()
    # training a moved a, left b untouched, and nothing reached Pyro's global param store
    assert any(not torch.equal(a.state_dict()[k], before_b[k]) for k in before_b)
    assert all(torch.equal(b.state_dict()[k], v) for k, v in before_b.items())
    assert len(pyro.get_param_store()) == 0
    assert not set(map(id, a.parameters())) & set(map(id, b.parameters()))


def test_component_shapes():
    vae, x = small_vae(), binary_batch()
    assert vae.prior().event_shape == (4,)
    q = vae.posterior(x)
    assert q.batch_shape == (6,) and q.event_shape == (4,)
    lik = vae.likelihood(q.rsample())
    assert lik.batch_shape == (6,) and lik.event_shape == EVENT
    terms = pyro_vae.elbo.elbo_terms(vae, x)
    rec, kl = terms.reconstruction, terms.kl
    assert rec.shape == kl.shape == (6,) and terms.kl_per_dim.shape == (6, 4)
    assert (kl >= 0).all()


def test_fused_bernoulli_log_prob_equals_pyro_bernoulli():
    from pyro_vae.likelihoods import IndependentBernoulli

    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 5, 4, 4, generator=g) * 3
    x = torch.bernoulli(torch.full((5, 4, 4), 0.5), generator=g)  # broadcasts over the 3
    fused = IndependentBernoulli(pyro.distributions.Bernoulli(logits=logits), 2)
    plain = pyro.distributions.Bernoulli(logits=logits).to_event(2)
    assert fused.batch_shape == plain.batch_shape == (3, 5)
    torch.testing.assert_close(fused.log_prob(x), plain.log_prob(x), rtol=1e-6, atol=1e-5)
    assert fused.expand((2, 3, 5)).log_prob(x).shape == (2, 3, 5)
    with pytest.raises(ValueError):
        fused.log_prob(x * 0.5)


@pytest.mark.parametrize("guide", ["mean-field", "iaf"])
def test_encode_decode_sample_reconstruct_have_the_documented_shapes(guide):
    import pyro_vae

    model = pyro_vae.ModelConfig(
        latent_dim=3,
        guide=pyro_vae.ComponentConfig(guide),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [8]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [8]}),
    )
    vae = pyro_vae.build_vae(pyro_vae.resolve(pyro_vae.Config(model=model)).model, (4, 5))
    x = torch.bernoulli(torch.full((6, 4, 5), 0.3))
    z = vae.encode(x)
    assert z.shape == (6, 3) and not z.requires_grad
    assert vae.encode(x, sample=True).shape == (6, 3)
    assert vae.decode(z).shape == (6, 4, 5) and vae.decode(torch.zeros(2, 6, 3)).shape == (
        2,
        6,
        4,
        5,
    )
    assert ((vae.decode(z) >= 0) & (vae.decode(z) <= 1)).all()  # Bernoulli: pixel probabilities
    samples = vae.sample(7)
    assert samples.shape == (7, 4, 5) and set(samples.unique().tolist()) <= {0.0, 1.0}
    torch.manual_seed(1)  # iaf: the mean of q is an average of draws
    reconstruction = vae.reconstruct(x)
    torch.manual_seed(1)
    assert reconstruction.shape == x.shape
    assert torch.equal(reconstruction, vae.decode(vae.encode(x)))
    if guide == "mean-field":  # the mean of q(z|x), exactly
        torch.testing.assert_close(z, vae.posterior(x).mean.detach())


def test_exported_encoder_and_decoder_load_without_pyro_vae_and_match(tiny_run, tmp_path):
    import subprocess
    import sys

    from pyro_vae.cli import main

    run_dir, _ = tiny_run
    assert main(["export", str(run_dir), "--out", str(tmp_path / "export")]) == 0
    vae = pyro_vae.load(run_dir)
    x = torch.bernoulli(torch.full((5, *vae.event_shape), 0.3))
    z = torch.randn(7, vae.latent_dim)
    torch.save(
        {"x": x, "z": z, "encoded": vae.encode(x), "decoded": vae.decode(z)}, tmp_path / "io.pt"
    )
    code = (
        "import sys, torch\n"
        f"d = {str(tmp_path)!r}\n"
        "io = torch.load(d + '/io.pt')\n"
        "encoder = torch.jit.load(d + '/export/encoder.pt')\n"
        "decoder = torch.jit.load(d + '/export/decoder.pt')\n"
        "torch.testing.assert_close(encoder(io['x']), io['encoded'], rtol=0, atol=1e-5)\n"
        "torch.testing.assert_close(decoder(io['z']), io['decoded'], rtol=0, atol=1e-5)\n"
        "assert not any(m.startswith(('pyro_vae', 'pyro')) for m in sys.modules)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120, cwd=tmp_path)
