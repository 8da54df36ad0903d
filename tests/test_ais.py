"""Annealed importance sampling and BDMC, checked against exact log p(x).

Ground truths come from pyro_vae.exact: the linear-Gaussian closed forms and
2-D quadrature. Statistical tolerances are 3 Monte Carlo standard errors of a
mean over data, each datum's SE the delta-method SE the estimators report
(the chains of a datum are independent given the pilot-tuned step sizes, so
that SE is valid); every draw is seeded. Settings are small (L = 5 leapfrog
steps, T <= 200) to keep the file fast; the step size still comes from the
pilot run, as by default.
"""

import math

import pyro
import pytest
import torch
from test_evaluate import mc_mean_stderr, shifted_diagonal, with_guide
from test_exact import linear_vae, sample_data
from torch.distributions import Distribution

from pyro_vae import ComponentConfig, ConfigError, ModelConfig, UserError, build_vae
from pyro_vae.ais import SCHEDULES, ais_log_likelihood, annealing_schedule, bdmc
from pyro_vae.evaluate import log_importance_weights
from pyro_vae.exact import linear_gaussian, log_likelihood_quadrature

#: Settings shared by the accuracy tests: few leapfrog steps, a pilot-tuned step size.
FAST = {"leapfrog_steps": 5, "step_size": 0.3}


def bernoulli_vae(data_dim=32, hidden=16, gain=3.0, seed=0):
    """A 2-D latent, tanh-MLP decoder, Bernoulli likelihood; decoder weights scaled by ``gain``.

    The gain makes the posterior of a 32-pixel datum narrow and non-Gaussian:
    importance sampling from the prior is then off by up to ~1.7 nats.
    """
    model = ModelConfig(
        latent_dim=2,
        decoder=ComponentConfig("mlp", {"hidden": [hidden], "activation": "tanh"}),
        encoder=ComponentConfig("mlp", {"hidden": [8]}),
    )
    torch.manual_seed(seed)
    vae = build_vae(model, (data_dim,)).double()
    with torch.no_grad():
        for parameter in vae.likelihood.parameters():
            parameter.mul_(gain)
    return vae.eval()


def quadrature(vae, x):
    # the grid resolves these posteriors: 151 and 401 points agree to 1e-10
    return log_likelihood_quadrature(vae, x, num_points=201, bound=6.0)


def gap_se(run):
    """Monte Carlo SE of a BDMC run's mean gap (independent forward and reverse chains)."""
    return math.hypot(mc_mean_stderr(run.lower_stderr), mc_mean_stderr(run.upper_stderr))


def simulate(vae, n, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        z = torch.randn(n, vae.latent_dim, generator=g, dtype=torch.float64)
        return torch.bernoulli(vae.likelihood(z).base_dist.probs, generator=g)


# --- the path and the degenerate cases ------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULES)
def test_annealing_schedule_goes_from_0_to_1(kind):
    betas = annealing_schedule(50, kind)
    assert betas.shape == (51,) and betas[0] == 0 and betas[-1] == 1
    assert (betas.diff() > 0).all()
    torch.testing.assert_close(betas + betas.flip(0), torch.ones(51, dtype=torch.float64))
    if kind == "sigmoid":  # smaller steps at both ends than in the middle
        assert betas.diff()[0] < betas.diff()[25] / 5
    assert annealing_schedule(1, kind).tolist() == [0.0, 1.0]


@pytest.mark.parametrize("start", ["prior", "guide"])
def test_one_step_is_importance_sampling_with_the_same_draws(start):
    vae = linear_vae()
    x = sample_data(vae, 5)
    torch.manual_seed(3)
    result = ais_log_likelihood(vae, x, steps=1, chains=7, start=start)
    torch.manual_seed(3)
    log_w = log_importance_weights(vae, x, 7, proposal=start)
    torch.testing.assert_close(result.log_weights, log_w, rtol=0, atol=1e-12)
    assert result.step_sizes.shape == (0, 5) and result.acceptance_rate.isnan().all()
    if start == "prior":  # log w = log p(x|z), z ~ p(z): nothing else enters the weight
        torch.manual_seed(3)
        z = vae.prior().sample((7, 5))
        with torch.no_grad():
            log_lik = vae.likelihood(z).log_prob(x)
        torch.testing.assert_close(result.log_weights, log_lik, rtol=0, atol=1e-12)


def test_exact_posterior_start_gives_log_likelihood_in_every_chain():
    # r = p(z|x): every f_t = p(z|x) p(x)^beta_t, so each increment is
    # (beta_t - beta_{t-1}) log p(x) wherever the chains are, and log w = log p(x)
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 10)
    torch.manual_seed(0)
    result = ais_log_likelihood(with_guide(vae, lg.posterior), x, steps=20, chains=8, **FAST)
    assert result.acceptance_rate.min() > 0.3  # the chains do move
    exact = lg.log_likelihood(x)
    torch.testing.assert_close(result.log_weights, exact.expand(8, -1), rtol=0, atol=1e-9)
    assert result.mc_stderr.max() < 1e-6


# --- accuracy against exact answers ------------------------------------------------


@pytest.mark.parametrize("start", ["guide", "prior"])
def test_ais_agrees_with_the_exact_linear_gaussian_log_likelihood(start):
    vae = linear_vae()
    lg = linear_gaussian(vae)
    x = sample_data(vae, 20)
    exact = lg.log_likelihood(x)
    if start == "guide":  # an encoder one posterior sd off and 1.5 times too wide
        vae = with_guide(vae, shifted_diagonal(lg, shift=1.0, inflate=1.5))
    steps = 100 if start == "guide" else 200
    torch.manual_seed(0)
    result = ais_log_likelihood(vae, x, steps=steps, chains=64, start=start, **FAST)
    assert result.log_likelihood.shape == (20,) and result.log_weights.shape == (64, 20)
    assert result.tuned and result.step_sizes.shape == (steps - 1, 20)
    assert abs(float(result.acceptance_rate.mean()) - 0.65) < 0.05  # the pilot hit the target
    error = result.log_likelihood - exact
    assert abs(float(error.mean())) <= 3 * mc_mean_stderr(result.mc_stderr)
    torch.manual_seed(0)
    plain = ais_log_likelihood(vae, x, steps=1, chains=64, start=start)  # importance sampling
    plain_error = float((plain.log_likelihood - exact).abs().mean())
    assert float(error.abs().mean()) < plain_error / 2  # annealing helps
    if start == "guide":
        assert float(error.abs().mean()) < 0.05


def test_bdmc_sandwiches_the_exact_linear_gaussian_log_likelihood():
    vae = linear_vae()
    lg = linear_gaussian(vae)
    runs = {}
    for steps in (5, 100):
        torch.manual_seed(0)
        runs[steps] = run = bdmc(vae, 20, steps=steps, chains=32, **FAST)
        assert run.x.shape == (20, 6) and run.z.shape == (20, 2)
        assert run.reverse.log_weights.shape == (32, 20)
        torch.testing.assert_close(run.reverse.step_sizes, run.forward.step_sizes.flip(0))
        exact = float(lg.log_likelihood(run.x).mean())
        assert run.mean_lower <= exact + 3 * mc_mean_stderr(run.lower_stderr)
        assert run.mean_upper >= exact - 3 * mc_mean_stderr(run.upper_stderr)
    short, long = runs[5], runs[100]
    torch.testing.assert_close(short.x, long.x)  # the same simulated data
    assert short.mean_gap > 3 * gap_se(short)  # a real sandwich, not noise
    assert long.mean_gap < short.mean_gap / 3
    assert abs(long.mean_gap) <= 3 * gap_se(long)  # closed, within Monte Carlo error


def test_ais_agrees_with_quadrature_for_a_nonlinear_bernoulli_decoder():
    vae = bernoulli_vae()
    x = simulate(vae, 10, seed=1)
    exact = quadrature(vae, x)
    torch.manual_seed(0)
    result = ais_log_likelihood(vae, x, steps=100, chains=64, start="prior", **FAST)
    error = result.log_likelihood - exact
    assert abs(float(error.mean())) <= 3 * mc_mean_stderr(result.mc_stderr)
    torch.manual_seed(0)
    plain = ais_log_likelihood(vae, x, steps=1, chains=64, start="prior")
    assert float(error.abs().mean()) < float((plain.log_likelihood - exact).abs().mean()) / 2


def test_bdmc_sandwiches_quadrature_for_a_nonlinear_bernoulli_decoder():
    vae = bernoulli_vae()
    runs = {}
    for steps in (5, 100):
        torch.manual_seed(0)
        runs[steps] = bdmc(vae, 20, steps=steps, chains=32, **FAST)
    short, long = runs[5], runs[100]
    torch.testing.assert_close(short.x, long.x)
    exact = float(quadrature(vae, long.x).mean())
    for run in (short, long):
        assert run.mean_lower <= exact + 3 * mc_mean_stderr(run.lower_stderr)
        assert run.mean_upper >= exact - 3 * mc_mean_stderr(run.upper_stderr)
    assert short.mean_gap > 3 * gap_se(short)
    assert long.mean_gap < short.mean_gap / 3
    assert abs(long.mean_gap) <= 3 * gap_se(long)


# --- settings and errors ------------------------------------------------------------


def test_a_returned_schedule_reruns_without_a_pilot_and_bad_settings_are_refused():
    vae = linear_vae()
    x = sample_data(vae, 3)
    first = ais_log_likelihood(vae, x, steps=10, chains=4, start="prior")
    again = ais_log_likelihood(
        vae, x, steps=10, chains=4, start="prior", step_size=first.step_sizes
    )
    assert first.tuned and not again.tuned
    torch.testing.assert_close(again.step_sizes, first.step_sizes)
    fixed = ais_log_likelihood(vae, x, steps=10, chains=4, adapt=False, step_size=0.2)
    assert not fixed.tuned and (fixed.step_sizes == 0.2).all()
    for bad in (
        {"start": "posterior"},
        {"steps": 0},
        {"chains": 0},
        {"step_size": -0.1},
        {"schedule": "cosine"},
        {"step_size": torch.ones(3, 3)},
        {"target_accept": 1.0},
    ):
        with pytest.raises(ConfigError):
            ais_log_likelihood(vae, x, **bad)
    with pytest.raises(ConfigError):
        bdmc(vae, 0)
    point = with_guide(vae, lambda x: None, is_point_estimate=True)
    with pytest.raises(UserError, match="point estimate"):
        ais_log_likelihood(point, x)


@pytest.mark.parametrize("default", [True, False])
def test_validation_defaults_are_left_alone(default):
    vae = linear_vae()
    x = sample_data(vae, 3)
    previous = Distribution._validate_args
    Distribution.set_default_validate_args(default)
    try:
        ais_log_likelihood(vae, x, steps=3, chains=2)
        assert Distribution._validate_args is default
        assert pyro.infer.util.is_validation_enabled()  # the conftest turned it on
    finally:
        Distribution.set_default_validate_args(previous)


# --- the command line: evaluate --estimator ais, evaluate --bdmc, the report ----------


def test_cli_ais_matches_the_exact_log_likelihood_of_a_linear_run(ppca_run, capsys):
    import json

    from pyro_vae.cli import main

    run = ppca_run
    argv = ["evaluate", str(run), "--estimator", "ais", "--ais-steps", "100", "--chains", "8"]
    assert main([*argv, "--max-data", "30", "--quiet"]) == 0
    s = json.loads((run / "evaluation.json").read_text())
    assert s["estimator"] == "ais" and s["ais_steps"] == 100 and s["chains"] == 8
    # the mean over the same 30 data: AIS against the closed form, within 3 Monte Carlo SE
    assert abs(s["log_likelihood"] - s["exact_log_likelihood"]) <= 3 * s["log_likelihood_mc_stderr"]
    assert 0.3 < s["acceptance_rate"] <= 1
    capsys.readouterr()
    assert main(["evaluate", str(run), "--estimator", "ais", "--gaps"]) == 2
    assert "gaps" in capsys.readouterr().err


def test_cli_bdmc_writes_the_sandwich_and_the_report_shows_it(ppca_run, capsys):
    import json

    from pyro_vae.cli import main
    from pyro_vae.report import _bdmc_section, _load_run

    run = ppca_run
    argv = ["evaluate", str(run), "--bdmc", "5", "--ais-steps", "20", "--chains", "4"]
    assert main([*argv, "--num-samples", "100"]) == 0
    assert "upper bound (reverse AIS)" in capsys.readouterr().out
    s = json.loads((run / "bdmc.json").read_text())
    se = math.hypot(s["upper_mc_stderr"], s["lower_mc_stderr"])
    assert s["num_data"] == 5 and s["num_samples"] == 100
    assert s["gap"] == pytest.approx(s["upper"] - s["lower"]) and s["gap"] >= -3 * se
    assert s["is_minus_lower"] == pytest.approx(s["is_log_likelihood"] - s["lower"])
    assert s["elbo"] < s["is_log_likelihood"]  # 2 epochs: the encoder's KL gap is clear
    section = "".join(_bdmc_section(_load_run(run)).parts)  # the report's section
    assert "upper bound (reverse AIS)" in section and "against the lower bound" in section
