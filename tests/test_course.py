"""The notebooks' exercise checks: each accepts a right answer and rejects typical wrong ones.

Every check is called with a correct function (torch, and NumPy where the
inputs allow) and at least three wrong answers a student plausibly writes;
the printed verdict must say what is wrong.
"""

import math

import numpy as np
import pytest
import torch

from pyro_vae import course


def verdict(check, fn, capsys):
    """(returned bool, printed line) of ``check(fn)``."""
    ok = check(fn)
    return ok, capsys.readouterr().out.strip()


# --- the reference solutions of the notebooks' exercises (not in the notebooks) ------


def elbo_estimate(x, logits, z, loc, log_var):
    log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="none")
    log_prior = -0.5 * (z**2 + math.log(2 * math.pi))
    log_q = -0.5 * ((z - loc) ** 2 / log_var.exp() + log_var + math.log(2 * math.pi))
    return log_lik.sum(-1) + (log_prior - log_q).sum(-1)


def kl_diagonal(mu_q, sigma_q, mu_p, sigma_p):
    terms = torch.log(sigma_p / sigma_q) + (sigma_q**2 + (mu_q - mu_p) ** 2) / (2 * sigma_p**2)
    return (terms - 0.5).sum(-1)


def beta_optimal_q(beta, w, noise, x):
    return w * x / (w**2 + beta * noise), beta * noise / (w**2 + beta * noise)


def ppca_max_log_likelihood(eigenvalues, latent_dim):
    d = len(eigenvalues)
    noise = eigenvalues[latent_dim:].mean()
    return -0.5 * (
        d * math.log(2 * math.pi)
        + eigenvalues[:latent_dim].log().sum()
        + (d - latent_dim) * noise.log()
        + d
    )


def _not_implemented(*args):
    raise NotImplementedError


def _log_c(lam):
    return torch.log(2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam))


def _optimal_diagonal(weight, bias, sigma, x):
    precision = torch.eye(weight.shape[1], dtype=weight.dtype) + weight.T @ weight / sigma**2
    cov = torch.linalg.inv(precision)
    return (x - bias) @ weight @ cov / sigma**2, 1 / torch.diagonal(precision)


def _posterior_variance(weight, bias, sigma, x):  # the diagonal of the full covariance: wrong
    mean, _ = _optimal_diagonal(weight, bias, sigma, x)
    precision = torch.eye(weight.shape[1], dtype=weight.dtype) + weight.T @ weight / sigma**2
    return mean, torch.diagonal(torch.linalg.inv(precision))


def _mixture(x, weights, means, scales):
    log_n = torch.distributions.Normal(means, scales).log_prob(x[:, None, :]).sum(-1)
    return torch.logsumexp(torch.log(weights) + log_n, dim=-1)


def _mixture_naive(x, weights, means, scales):  # underflows far from the components
    log_n = torch.distributions.Normal(means, scales).log_prob(x[:, None, :]).sum(-1)
    return torch.log((weights * torch.exp(log_n)).sum(-1))


CHECKS = {
    "check_reparameterize": (
        lambda loc, scale, eps: loc + scale * eps,
        [
            lambda loc, scale, eps: loc + eps,  # forgets the scale
            lambda loc, scale, eps: loc + scale**2 * eps,  # variance instead of sd
            lambda loc, scale, eps: (loc + scale * eps).detach(),  # no gradient
            lambda loc, scale, eps: loc.detach() + scale * eps,  # no gradient to loc
            lambda loc, scale, eps: None,
        ],
    ),
    "check_kl_standard_normal": (
        lambda mu, sigma: 0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1),
        [
            lambda mu, sigma: mu**2 + sigma**2 - torch.log(sigma**2) - 1,  # no 1/2
            lambda mu, sigma: 0.5 * (mu**2 + sigma**2 - torch.log(sigma) - 1),  # log sigma
            lambda mu, sigma: 0.5 * (mu**2 + sigma - torch.log(sigma**2) - 1),  # sigma for var
            lambda mu, sigma: (0.5 * (mu**2 + sigma**2 - torch.log(sigma**2) - 1)).sum(),
        ],
    ),
    "check_kl_warmup": (
        lambda beta, w, e: beta if w <= 0 else beta * min(1.0, (e - 1) / w),
        [
            lambda beta, w, e: beta if w <= 0 else beta * min(1.0, e / w),  # off by one
            lambda beta, w, e: beta * min(1.0, (e - 1) / max(w, 1)),  # W = 0 mishandled
            lambda beta, w, e: beta if w <= 0 else min(1.0, (e - 1) / w),  # forgets beta
            lambda beta, w, e: "beta",
        ],
    ),
    "check_continuous_bernoulli_log_normalizer": (
        _log_c,
        [
            lambda lam: torch.zeros_like(lam),  # the Bernoulli "loss" on grey pixels
            lambda lam: 2 * torch.atanh(1 - 2 * lam) / (1 - 2 * lam),  # C, not log C
            lambda lam: torch.log(torch.atanh(1 - 2 * lam) / (1 - 2 * lam)),  # no factor 2
        ],
    ),
    "check_log_mean_exp": (
        lambda log_w: torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]),
        [
            lambda log_w: torch.log(torch.exp(log_w).mean(0)),  # under/overflows
            lambda log_w: log_w.mean(0),  # the ELBO, not log p_hat
            lambda log_w: torch.logsumexp(log_w, 0),  # forgets log K
            lambda log_w: torch.logsumexp(log_w, 1) - math.log(log_w.shape[1]),  # wrong axis
        ],
    ),
    "check_optimal_diagonal": (
        _optimal_diagonal,
        [
            _posterior_variance,  # marginal posterior variances: mean-field is tighter
            lambda w, b, s, x: (_optimal_diagonal(w, b, s, x)[0], torch.ones(w.shape[1])),
            lambda w, b, s, x: ((x - b) @ w / s**2, _optimal_diagonal(w, b, s, x)[1]),
            lambda w, b, s, x: _optimal_diagonal(w, b, s, x)[0],  # not a pair
        ],
    ),
    "check_ppca_noise_variance": (
        lambda eig, k: eig[k:].mean(),
        [
            lambda eig, k: eig.mean(),  # all eigenvalues
            lambda eig, k: eig[k:].sum(),  # a sum, not a mean
            lambda eig, k: eig[k + 1 :].mean(),  # off by one
            lambda eig, k: eig[:k].mean(),  # the kept ones
        ],
    ),
    "check_mixture_log_density": (
        _mixture,
        [
            _mixture_naive,
            lambda x, w, m, s: _mixture(x, torch.full_like(w, 1 / len(w)), m, s),  # no weights
            lambda x, w, m, s: torch.distributions.Normal(m[0], s[0]).log_prob(x).sum(-1),
        ],
    ),
}


CHECKS.update(
    {
        "check_elbo_estimate": (
            elbo_estimate,
            [
                lambda x, f, z, m, lv: (
                    elbo_estimate(x, f, z, m, lv)  # forgets - log q
                    + (-0.5 * ((z - m) ** 2 / lv.exp() + lv + math.log(2 * math.pi))).sum(-1)
                ),
                lambda x, f, z, m, lv: elbo_estimate(x, f, z, m, 2 * lv),  # var used as sd
                lambda *a: -elbo_estimate(*a),  # the loss, not the ELBO
                lambda *a: elbo_estimate(*a).sum(),  # summed over the batch
            ],
        ),
        "check_kl_diagonal_normals": (
            kl_diagonal,
            [
                lambda mq, sq, mp, sp: kl_diagonal(mp, sp, mq, sq),  # KL(p || q)
                lambda mq, sq, mp, sp: kl_diagonal(  # against N(0, I), ignoring p
                    mq, sq, torch.zeros_like(mp), torch.ones_like(sp)
                ),
                lambda mq, sq, mp, sp: kl_diagonal(  # not summed over dimensions
                    mq.unsqueeze(-1), sq.unsqueeze(-1), mp.unsqueeze(-1), sp.unsqueeze(-1)
                ),
                lambda *a: 2 * kl_diagonal(*a),  # no 1/2
            ],
        ),
        "check_beta_optimal_q": (
            beta_optimal_q,
            [
                lambda b, w, s, x: beta_optimal_q(1.0, w, s, x),  # the posterior, whatever beta
                lambda b, w, s, x: (beta_optimal_q(b, w, s, x)[0], b * s / (w**2 + s)),
                lambda b, w, s, x: (w * x / (w**2 + s), beta_optimal_q(b, w, s, x)[1]),
                lambda b, w, s, x: beta_optimal_q(b, w, s, x)[1],  # one number
            ],
        ),
        "check_ppca_max_log_likelihood": (
            ppca_max_log_likelihood,
            [
                lambda e, k: ppca_max_log_likelihood(e, len(e)),  # a full Gaussian
                lambda e, k: (
                    ppca_max_log_likelihood(e, k)  # the noise counted once
                    + 0.5 * (len(e) - k - 1) * e[k:].mean().log()
                ),
                lambda e, k: ppca_max_log_likelihood(e, k) + 0.5 * len(e),  # no trace term
                lambda e, k: ppca_max_log_likelihood(e.flip(0), k),  # smallest as signal
            ],
        ),
    }
)


def test_every_check_function_is_tested():
    defined = {name for name in dir(course) if name.startswith("check_")}
    assert defined == set(CHECKS)
    assert all(len(wrong) >= 3 for _, wrong in CHECKS.values())


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_accepts_the_right_answer(name, capsys):
    right, _ = CHECKS[name]
    assert getattr(course, name)(right) is True
    assert capsys.readouterr().out.startswith("correct:")


@pytest.mark.parametrize(
    ("name", "index"), [(name, i) for name, (_, wrong) in CHECKS.items() for i in range(len(wrong))]
)
def test_check_rejects_a_wrong_answer(name, index, capsys):
    _, wrong = CHECKS[name]
    assert getattr(course, name)(wrong[index]) is False
    line = capsys.readouterr().out
    assert line.startswith("not yet right"), line


@pytest.mark.parametrize("name", sorted(CHECKS))
def test_check_reports_an_unfinished_exercise(name, capsys):
    assert getattr(course, name)(_not_implemented) is False
    assert "not implemented yet" in capsys.readouterr().out


def test_reversed_kl_is_named_as_such(capsys):
    _, line = verdict(
        course.check_kl_diagonal_normals, CHECKS["check_kl_diagonal_normals"][1][0], capsys
    )
    assert "KL(p || q)" in line


def test_a_function_without_return_is_told_so(capsys):
    for check in (course.check_elbo_estimate, course.check_beta_optimal_q, course.check_kl_warmup):
        ok, line = verdict(check, lambda *args: None, capsys)
        assert not ok and "returned None" in line and "forget `return`" in line, line


def test_numpy_and_torch_scalars_are_accepted(capsys):
    warmup = CHECKS["check_kl_warmup"][0]
    for kind in (np.float32, np.float64, lambda v: torch.tensor(v, dtype=torch.float32)):
        answer = lambda b, w, e, kind=kind: kind(warmup(b, w, e))  # noqa: E731
        ok, line = verdict(course.check_kl_warmup, answer, capsys)
        assert ok, line
    ok, line = verdict(
        course.check_beta_optimal_q,
        lambda *a: tuple(np.float32(v) for v in beta_optimal_q(*a)),
        capsys,
    )
    assert ok, line
    numpy_kl = lambda *a: kl_diagonal(*a).numpy()  # noqa: E731
    ok, line = verdict(course.check_kl_diagonal_normals, numpy_kl, capsys)
    assert ok, line


def test_a_missing_beta_is_not_blamed_on_epoch_counting(capsys):
    _, line = verdict(course.check_kl_warmup, CHECKS["check_kl_warmup"][1][2], capsys)
    assert "beta" in line and "epochs count from 1" not in line
    _, line = verdict(course.check_kl_warmup, CHECKS["check_kl_warmup"][1][0], capsys)
    assert "epochs count from 1" in line


def test_a_claim_that_holds_is_printed_and_one_that_fails_raises_naming_it(capsys):
    course.claim(torch.tensor(True), "the guide beats the prior", "-23.1 vs -25.0")
    assert capsys.readouterr().out.strip() == (
        "claim checked: the guide beats the prior (-23.1 vs -25.0)"
    )
    with pytest.raises(course.ClaimFailed, match=r"claim failed: EM is at least as good \(a\)"):
        course.claim(np.bool_(False), "EM is at least as good", "a")
    with pytest.raises(AssertionError):  # a ClaimFailed is an AssertionError
        course.claim(0, "zero is true")
