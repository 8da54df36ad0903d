"""Variational EM: the row-wise optimizer, the E- and M-steps against closed forms, the run.

On a linear-Gaussian model the E-step has a known fixed point (the optimal
diagonal Normal of each datum, pyro_vae.exact.LinearGaussian.optimal_diagonal)
and the ELBO of any Gaussian q has a closed form, so both steps are checked
against exact numbers rather than against another estimate.
"""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from test_exact import linear_vae, sample_data

import pyro_vae
from pyro_vae import VAE, Config, ConfigError
from pyro_vae.build import build_objective
from pyro_vae.cli import main
from pyro_vae.elbo import RowAdam
from pyro_vae.em import AMORTIZED_DIR, VariationalEMStep, fit_em
from pyro_vae.evaluate import evaluate_run
from pyro_vae.exact import linear_gaussian
from pyro_vae.guides import LocalGuide

FIXTURES = Path(__file__).parent / "fixtures"


def test_row_adam_is_adam_on_the_rows_it_steps_and_leaves_the_others():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(6, 3, generator=g)
    ours, reference = start.clone(), start.clone().requires_grad_(True)
    row_adam = RowAdam([ours], lr=0.1)
    adam = torch.optim.Adam([reference], lr=0.1)
    rows = torch.tensor([4, 1, 2])
    for _ in range(5):
        grad = torch.randn(6, 3, generator=g)
        row_adam.step(rows, [grad[rows]])
        masked = torch.zeros_like(grad)
        masked[rows] = grad[rows]
        reference.grad = masked
        adam.step()
    # on the stepped rows: Adam's update exactly; elsewhere: untouched
    torch.testing.assert_close(ours[rows], reference.detach()[rows])
    others = torch.tensor([0, 3, 5])
    torch.testing.assert_close(ours[others], start[others], rtol=0, atol=0)
    assert row_adam.steps.tolist() == [0, 5, 5, 0, 5, 0]


def em_on_linear_model(n=32, local_lr=0.05, lr=1e-2, num_particles=16):
    base = linear_vae()
    x = sample_data(base, n)
    guide = LocalGuide(num_data=n, latent_dim=base.latent_dim).double()
    vae = VAE(base.prior, guide, base.likelihood)
    # meanfield: closed-form KL; several particles for gradients of low variance
    objective = build_objective(Config().override({"train.num_particles": num_particles}))
    em = VariationalEMStep(vae, objective, lr=lr, local_lr=local_lr, num_particles=num_particles)
    return vae, x, em


def test_e_step_reaches_the_optimal_diagonal_posterior_with_the_decoder_fixed():
    vae, x, em = em_on_linear_model()
    lg = linear_gaussian(vae)
    decoder = [p.detach().clone() for p in vae.likelihood.parameters()]
    index = torch.arange(len(x))
    torch.manual_seed(0)
    for lr in (0.05, 0.01, 0.002):  # a decreasing step size damps the stochastic jitter
        em.local_optimizer.lr, em.e_steps = lr, 100
        em.e_step(x, index)
    best = lg.optimal_diagonal(x)
    q = vae.posterior(x, index)
    # stochastic steps: near the fixed point (the ELBO is flat there: the last check
    # is the one that matters)
    torch.testing.assert_close(q.base_dist.loc, best.base_dist.loc, rtol=0, atol=0.05)
    torch.testing.assert_close(q.base_dist.scale, best.base_dist.scale, rtol=0.1, atol=0)
    assert (lg.elbo(x, best) - lg.elbo(x, q)).mean() < 0.01
    for before, after in zip(decoder, vae.likelihood.parameters(), strict=True):
        assert torch.equal(before, after)  # theta fixed in the E-step


def test_m_step_raises_the_exact_elbo_with_q_fixed():
    vae, x, em = em_on_linear_model(lr=2e-2)
    index = torch.arange(len(x))
    torch.manual_seed(1)
    em.e_steps = 60
    em.e_step(x, index)
    local = [p.detach().clone() for p in em.local]
    with torch.no_grad():
        q = vae.posterior(x, index)
    before = float(linear_gaussian(vae).elbo(x, q).sum())
    for _ in range(60):
        em.m_step(x, index, len(x))
    after = float(linear_gaussian(vae).elbo(x, q).sum())
    assert after > before + 1.0  # the exact ELBO of the same q rose (noise < 0.1 nats)
    for a, b in zip(local, em.local, strict=True):
        assert torch.equal(a, b)  # q fixed in the M-step


def test_variational_em_needs_a_local_guide_of_the_right_size():
    base = linear_vae()
    objective = build_objective(Config())
    with pytest.raises(ConfigError, match="local"):
        VariationalEMStep(base, objective, lr=1e-3)
    vae = VAE(base.prior, LocalGuide(num_data=5, latent_dim=2).double(), base.likelihood)
    x = torch.zeros(3, *vae.event_shape, dtype=torch.float64)
    with pytest.raises(ConfigError, match="5 parameter sets"):
        VariationalEMStep(vae, objective, lr=1e-3).step(x, torch.arange(3), 10, 1.0)


PPCA = {
    "data.name": "ppca",
    "model.likelihood.name": "normal",
    "model.latent_dim": 2,
    "model.decoder.hidden": [],
    "model.encoder.hidden": [16],
    "train.batch_size": 250,
    "train.lr": 1e-2,
    "train.epochs": 3,
}


@pytest.fixture(scope="module")
def em_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("em") / "run"
    result = fit_em(Config().override(PPCA), out, e_steps=3)
    return out, result


def test_fit_em_records_both_bounds_and_writes_two_loadable_runs(em_run):
    out, result = em_run
    records = result.history
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for r in records:
        for key in ("em_train_elbo", "amortized_train_elbo", "em_gradient_steps", "em_seconds"):
            assert key in r
    # the EM run's own metrics file is the trainer's, one record per epoch
    own = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert own == result.em_history
    assert [r["train_set_elbo"] for r in own] == [r["em_train_elbo"] for r in records]
    # the same budget of minibatches: 8 per epoch; EM spends e_steps + 1 gradients on each
    assert records[-1]["amortized_gradient_steps"] == 3 * 8
    assert records[-1]["em_gradient_steps"] == 3 * 8 * (3 + 1)
    # both methods improve the ELBO through training
    assert records[-1]["em_train_elbo"] > records[0]["em_train_elbo"]
    assert records[-1]["amortized_train_elbo"] > records[0]["amortized_train_elbo"]
    em_vae = pyro_vae.load(out)
    assert isinstance(em_vae.posterior, LocalGuide) and em_vae.posterior.num_data == 2000
    assert Config.load(out / "config.toml").train.method == "variational-em"
    amortized = pyro_vae.load(out / AMORTIZED_DIR)
    assert amortized.posterior.is_amortized
    assert Config.load(out / AMORTIZED_DIR / "config.toml").train.method == "svi"
    # both started from the same decoder: the fitted ones differ, the shapes agree
    for a, b in zip(em_vae.likelihood.parameters(), amortized.likelihood.parameters(), strict=True):
        assert a.shape == b.shape


def test_em_run_evaluates_on_training_data_and_on_unseen_data(em_run):
    out, _ = em_run
    seen = evaluate_run(out, split="train", num_samples=50, max_data=10, write=False).summary
    unseen = evaluate_run(out, split="test", num_samples=50, max_data=10, write=False).summary
    for s in (seen, unseen):
        # on the same draws mean log w <= log mean w (Jensen): no slack at all; and IS is
        # a stochastic lower bound of the exact log p(x) (here far below it: K = 50 from a
        # q fitted in 3 epochs, heavy-tailed weights)
        assert s["elbo"] <= s["log_likelihood"]
        assert s["log_likelihood"] <= s["exact_log_likelihood"] + 3 * s["log_likelihood_mc_stderr"]


EM_SMALL = {**PPCA, "train.epochs": 2, "train.batch_size": 500, "model.encoder.hidden": [8]}


def em_config(**overrides):
    return Config().override({**EM_SMALL, "train.method": "variational-em", **overrides})


def test_em_honours_beta_and_warmup():
    plain = pyro_vae.fit(em_config())
    weighted = pyro_vae.fit(em_config(**{"train.beta": 0.1, "train.kl_warmup_epochs": 2}))
    assert [r["beta"] for r in plain.history] == [1.0, 1.0]
    assert [r["beta"] for r in weighted.history] == [0.0, 0.05]
    assert weighted.config.train.beta == 0.1
    # a smaller KL weight lets q stray further from the prior (0.1.0 trained both alike)
    assert weighted.history[-1]["train_set_kl"] > plain.history[-1]["train_set_kl"]
    assert weighted.history[0]["train_elbo"] != plain.history[0]["train_elbo"]
    a, b = plain.vae.state_dict(), weighted.vae.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_em_refuses_what_it_cannot_honour():
    with pytest.raises(ConfigError, match="free_bits does not apply to method 'variational-em'"):
        pyro_vae.fit(em_config(**{"train.free_bits": 0.5}))
    with pytest.raises(ConfigError, match="train.elbo = 'iwae' does not apply"):
        pyro_vae.fit(em_config(**{"train.elbo": "iwae"}))
    with pytest.raises(ConfigError, match="train.e_steps = 3 does not apply to method 'svi'"):
        pyro_vae.fit(Config().override({**EM_SMALL, "train.e_steps": 3}))


def test_em_resumes_after_ctrl_c_exactly_like_an_uninterrupted_run(tmp_path):
    config = em_config(**{"train.epochs": 3})
    whole = pyro_vae.fit(config, tmp_path / "whole")

    def interrupt(epoch, step, loss):
        if (epoch, step) == (2, 2):
            raise KeyboardInterrupt

    with pytest.raises(pyro_vae.TrainingInterrupted):
        pyro_vae.fit(config, tmp_path / "cut", on_step=interrupt)
    resumed = pyro_vae.resume(tmp_path / "cut")
    a, b = whole.vae.state_dict(), resumed.vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip


def test_cli_trains_by_variational_em_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--dataset", "ppca", "--likelihood", "normal", "--latent-dim", "2"]
    args += ["--set", "model.decoder.hidden=[]", "--set", "model.encoder.hidden=[8]"]
    args += ["--epochs", "1", "--batch-size", "500", "--method", "variational-em"]
    assert main([*args, "--out", str(out)]) == 0
    assert "variational EM" in capsys.readouterr().out
    assert (out / "checkpoint.pt").exists() and (out / AMORTIZED_DIR / "checkpoint.pt").exists()
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2
    assert main([*args[:-2], "--method", "gibbs", "--out", str(tmp_path / "x")]) == 2
    assert "unknown training method 'gibbs'" in capsys.readouterr().err


def test_a_variational_em_run_of_version_0_1_loads_evaluates_and_explains_why_not_resume(
    tmp_path, capsys
):
    run = tmp_path / "old-em"
    shutil.copytree(FIXTURES / "v0.1-em", run)
    vae = pyro_vae.load(run)
    assert isinstance(vae.posterior, LocalGuide)
    summary = evaluate_run(run, split="test", num_samples=20, max_data=5, write=False).summary
    assert math.isfinite(summary["log_likelihood"])
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot be resumed" in err and len(err.strip().splitlines()) == 1


def test_row_adam_on_every_row_equals_row_adam_on_an_index_of_every_row():
    g = torch.Generator().manual_seed(1)
    start = torch.randn(5, 3, generator=g)
    a, b = start.clone(), start.clone()
    all_rows, by_index = RowAdam([a], lr=0.1), RowAdam([b], lr=0.1)
    for _ in range(4):
        grad = torch.randn(5, 3, generator=g)
        all_rows.step(None, [grad])
        by_index.step(torch.arange(5), [grad])
    torch.testing.assert_close(a, b, rtol=0, atol=0)
