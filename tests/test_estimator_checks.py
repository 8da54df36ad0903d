"""Checks aimed at bugs that once survived the suite (issue "Honest numbers, part 2", §7).

Each test fails on the injected bug it names: E-step rows, RowAdam's per-row
bias correction, the summary Monte Carlo SE, the /sqrt(n) of the SE over
data, the k-hat threshold, the optimal diagonal's variances; and the paired
comparison of two runs.
"""

import math

import numpy as np
import pytest
import torch
from test_em import em_on_linear_model
from test_exact import linear_vae, sample_data

from pyro_vae.cli import main
from pyro_vae.elbo import RowAdam
from pyro_vae.evaluate import _khat_summary, _summarize, paired_difference
from pyro_vae.exact import linear_gaussian


def test_the_e_step_moves_the_minibatch_rows_and_only_them():
    vae, x, em = em_on_linear_model(n=32)
    before = [p.detach().clone() for p in em.local]
    index = torch.tensor([5, 17, 30, 11])  # not rows 0..B-1
    torch.manual_seed(0)
    em.e_step(x[index], index)
    moved = (em.local[0].detach() != before[0]).any(-1)
    assert moved.nonzero().flatten().tolist() == sorted(index.tolist())
    assert em.local_optimizer.steps[index].tolist() == [em.e_steps] * len(index)


def test_row_adam_corrects_the_bias_with_each_rows_own_step_count():
    g = torch.Generator().manual_seed(0)
    start = torch.randn(3, 2, generator=g)
    ours = start.clone()
    row_adam = RowAdam([ours], lr=0.1)
    references = [start[i].clone().requires_grad_(True) for i in range(3)]
    adams = [torch.optim.Adam([r], lr=0.1) for r in references]
    schedule = [[0, 1, 2], [0], [0], [1, 2], [0, 2]]  # rows stepped unevenly
    for rows in schedule:
        grad = torch.randn(3, 2, generator=g)
        row_adam.step(torch.tensor(rows), [grad[rows]])
        for i in rows:
            references[i].grad = grad[i].clone()
            adams[i].step()
    for i in range(3):
        torch.testing.assert_close(ours[i], references[i].detach())


def test_the_summary_errors_are_the_errors_of_a_mean():
    rng = np.random.default_rng(0)
    n = 400
    per = {
        "log_likelihood": rng.normal(-90, 5, n),
        "log_likelihood_mc_stderr": rng.uniform(0.1, 0.3, n),
        "ess": rng.uniform(1, 100, n),
        "khat": rng.uniform(0, 1, n),
        "iwae_1": rng.normal(-95, 5, n),
    }
    s = _summarize(per, [1], 100, "guide", 0, "test")
    # SE over data: sd / sqrt(n); Monte Carlo SE of the mean: sqrt(sum of squares) / n
    assert s["log_likelihood_stderr"] == pytest.approx(np.std(per["log_likelihood"], ddof=1) / 20)
    expected_mc = math.sqrt(np.sum(per["log_likelihood_mc_stderr"] ** 2)) / n
    assert s["log_likelihood_mc_stderr"] == pytest.approx(expected_mc)
    assert s["khat_fraction_above_0_7"] == pytest.approx(np.mean(per["khat"] > 0.7))


def test_khat_fraction_counts_above_0_7():
    above, _, _ = _khat_summary(np.array([0.5, 0.69, 0.71, 0.9, 1.2]))
    assert above == pytest.approx(3 / 5)


def test_the_optimal_diagonal_is_a_stationary_point_of_the_elbo():
    """Gradient zero at q* (1/sqrt(Lambda_jj) variances), with a strongly correlated posterior."""
    vae = linear_vae(latent_dim=3)
    layer = vae.likelihood.network.layers[0]
    with torch.no_grad():
        layer.weight[:, 1] = 0.9 * layer.weight[:, 0] + 0.4 * layer.weight[:, 1]
    lg = linear_gaussian(vae)
    x = sample_data(vae, 5)
    best = lg.optimal_diagonal(x)
    loc = best.base_dist.loc.clone().requires_grad_(True)
    log_scale = best.base_dist.scale.log().clone().requires_grad_(True)
    q = torch.distributions.Independent(torch.distributions.Normal(loc, log_scale.exp()), 1)
    grads = torch.autograd.grad(lg.elbo(x, q).sum(), [loc, log_scale])
    for g in grads:
        torch.testing.assert_close(g, torch.zeros_like(g), rtol=0, atol=1e-8)


def test_paired_difference_by_hand():
    rng = np.random.default_rng(1)
    hard = rng.normal(0, 5, 300)  # the data's own difficulty, shared by both models
    a = {
        "log_likelihood": hard + rng.normal(0, 0.5, 300),
        "log_likelihood_mc_stderr": np.full(300, 0.2),
    }
    b = {
        "log_likelihood": hard - 1 + rng.normal(0, 0.5, 300),
        "log_likelihood_mc_stderr": np.full(300, 0.1),
    }
    p = paired_difference(a, b)
    d = a["log_likelihood"] - b["log_likelihood"]
    assert p["difference"] == pytest.approx(d.mean())
    assert p["paired_se"] == pytest.approx(d.std(ddof=1) / math.sqrt(300))
    assert p["monte_carlo_se"] == pytest.approx(math.sqrt(300 * (0.04 + 0.01)) / 300)
    assert p["paired_se"] < p["separate_se"] / 5  # the shared difficulty cancels


def test_compare_two_runs_on_the_same_data(tiny_run, tmp_path, capsys):
    import json
    import shutil

    other = tmp_path / "copy"
    shutil.copytree(tiny_run[0], other)
    argv = ["compare", str(tiny_run[0]), str(other), "--num-samples", "30", "--max-data", "20"]
    assert main([*argv, "--out", str(tmp_path), "--quiet"]) == 0
    result = json.loads((tmp_path / "comparison.json").read_text())
    pair = result["pairs"][0]
    # the same model and seed on the same points: the same numbers, a zero difference
    assert pair["difference"] == 0 and pair["paired_se"] == 0
    assert result["runs"][0]["log_likelihood"] == result["runs"][1]["log_likelihood"]
    assert "paired SE" in result["errors"]["paired_se"]
    capsys.readouterr()
    assert main(["compare", str(tiny_run[0]), "--num-samples", "5"]) == 2
    assert "at least two" in capsys.readouterr().err
