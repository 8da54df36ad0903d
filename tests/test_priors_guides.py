"""Priors and guides against hand computations, plus config checks and short training runs.

The shape/gradient/save-load/device contract of every registered prior and
guide is in test_contract.py; here each component's numbers are checked
against an independent computation (closed forms, finite-difference
Jacobians, quadrature, Monte Carlo with tolerances from its standard error).
"""

import math
from pathlib import Path

import pyro.distributions as dist
import pytest
import torch
from pyro.infer import Trace_ELBO

import pyro_vae
from pyro_vae import GUIDES, PRIORS, ComponentConfig, Config, ConfigError, ModelConfig
from pyro_vae.build import build_vae, resolve
from pyro_vae.cli import main
from pyro_vae.guides import DeltaGuide, FullRankGuide, IAFGuide, LowRankGuide
from pyro_vae.nets import MLP
from pyro_vae.priors import (
    DiagonalNormalMixture,
    FlowPrior,
    LearnedNormalPrior,
    MixturePrior,
    diagonal_normal_mixture,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
LOG_2PI = math.log(2 * math.pi)


def randomize(module, std=0.5, seed=0):
    """Move every parameter away from its initialization, reproducibly."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(std * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def hand_log_normal(z, loc, scale):
    """sum_d log N(z_d; loc_d, scale_d^2), written out."""
    return (-0.5 * ((z - loc) / scale) ** 2 - torch.log(scale) - 0.5 * LOG_2PI).sum(-1)


def hand_log_mvn(z, loc, cov):
    """log N(z; loc, cov) from the Cholesky factor of cov (float64)."""
    d = z.shape[-1]
    chol = torch.linalg.cholesky(cov)
    diff = (z - loc).unsqueeze(-1)
    sol = torch.linalg.solve_triangular(chol, diff, upper=False).squeeze(-1)
    logdet = 2 * torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
    return -0.5 * (sol**2).sum(-1) - 0.5 * logdet - 0.5 * d * LOG_2PI


def trunk(in_features=5, hidden=8):
    return MLP((in_features,), None, hidden=[hidden], activation="tanh")


# --- priors ---------------------------------------------------------------------


def test_learned_normal_log_prob_is_the_diagonal_gaussian_density():
    prior = randomize(LearnedNormalPrior(3))
    z = torch.randn(4, 3)
    expected = hand_log_normal(z, prior.loc, prior.log_scale.exp())
    torch.testing.assert_close(prior().log_prob(z), expected)
    # it starts at N(0, I): the KL to a diagonal Normal guide stays analytic
    fresh = LearnedNormalPrior(3)()
    torch.testing.assert_close(fresh.log_prob(z), hand_log_normal(z, 0.0, torch.ones(3)))


def test_mixture_log_prob_is_the_log_sum_exp_over_components():
    prior = randomize(MixturePrior(2, components=3))
    z = torch.randn(6, 2)
    log_weights = torch.log_softmax(prior.logits, 0)
    per_component = torch.stack(
        [
            hand_log_normal(z, prior.locs[k], prior.log_scales[k].exp())
            for k in range(prior.components)
        ],
        dim=-1,
    )
    expected = torch.log(torch.exp(per_component + log_weights).sum(-1))
    torch.testing.assert_close(prior().log_prob(z), expected)


def broadcast_mixture(logits, loc, scale):
    """The reference: Pyro's MixtureSameFamily, an (N, K, D) broadcast."""
    return dist.MixtureSameFamily(
        dist.Categorical(logits=logits), dist.Normal(loc, scale).to_event(1)
    )


@pytest.mark.parametrize("expand", [(), (5,), (3, 5)])
@pytest.mark.parametrize("value_shape", [(), (5,), (3, 5), (2, 3, 5)])
def test_matrix_product_mixture_density_and_gradients_equal_the_broadcast(expand, value_shape):
    g = torch.Generator().manual_seed(1)
    K, D = 7, 3
    params = [
        torch.randn(K, generator=g, dtype=torch.float64),
        torch.randn(K, D, generator=g, dtype=torch.float64),
        torch.rand(K, D, generator=g, dtype=torch.float64) + 0.05,
    ]
    z = 2 * torch.randn(*value_shape, D, generator=g, dtype=torch.float64)
    results = []
    for build in (
        broadcast_mixture,
        lambda a, b, c: diagonal_normal_mixture(a, dist.Normal(b, c).to_event(1)),
    ):
        leaves = [p.clone().requires_grad_() for p in params] + [z.clone().requires_grad_()]
        mixture = build(*leaves[:3])
        if expand:  # as Pyro's plates do
            mixture = mixture.expand(torch.Size(expand))
        log_p = mixture.log_prob(leaves[3])
        grads = torch.autograd.grad(log_p.sum(), leaves)
        results.append((type(mixture), log_p, grads))
    (slow_type, slow, slow_grads), (fast_type, fast, fast_grads) = results
    assert fast_type is DiagonalNormalMixture and slow_type is not DiagonalNormalMixture
    assert fast.shape == slow.shape
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    for a, b in zip(fast_grads, slow_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_matrix_product_mixture_keeps_float32_inputs_exact_where_the_expansion_cancels():
    # narrow components far from 0: z^2/s^2 and 2 z m/s^2 are ~1e5 and cancel;
    # in float32 the expansion would lose ~1e-2 nats, the float64 products nothing
    g = torch.Generator().manual_seed(2)
    K, D = 50, 40
    loc = 3 + 0.1 * torch.randn(K, D, generator=g, dtype=torch.float64)
    scale = 0.01 + 0.01 * torch.rand(K, D, generator=g, dtype=torch.float64)
    logits = torch.zeros(K, dtype=torch.float64)
    z = loc[:10] + scale[:10] * torch.randn(10, D, generator=g, dtype=torch.float64)
    fast = diagonal_normal_mixture(
        logits.float(), dist.Normal(loc.float(), scale.float()).to_event(1)
    ).log_prob(z.float())
    assert fast.dtype == torch.float32
    # float32 rounding of the inputs and of the output only (|log p| ~ 150)
    input_rounding = broadcast_mixture(logits, loc.float().double(), scale.float().double())
    reference = input_rounding.log_prob(z.float().double())
    torch.testing.assert_close(fast.double(), reference, rtol=0, atol=5e-5)


@pytest.mark.parametrize("expand", [(), (4,)])
def test_matrix_product_mixture_samples_the_mixture(expand):
    # one component per draw: well separated components, so each draw names its own;
    # the frequencies, means, variances and cross moments against the closed forms,
    # each within 4 Monte Carlo standard errors (fixed seed)
    logits = torch.tensor([0.0, 1.0, -0.5])
    loc = torch.tensor([[-10.0, 1.0], [0.0, -2.0], [10.0, 3.0]])
    scale = torch.tensor([[0.5, 1.0], [1.5, 0.3], [1.0, 2.0]])
    mixture = diagonal_normal_mixture(logits, dist.Normal(loc, scale).to_event(1))
    if expand:
        mixture = mixture.expand(torch.Size(expand))
    assert type(mixture) is DiagonalNormalMixture
    torch.manual_seed(3)
    n = 40_000
    z = mixture.sample((n,))
    assert z.shape == (n, *expand, 2) and not z.requires_grad
    z = z.reshape(-1, 2).double()
    pi = torch.softmax(logits.double(), 0)
    loc, scale = loc.double(), scale.double()
    which = (z[:, :1] - loc[:, 0]).abs().argmin(1)  # the component a draw came from
    stats = {
        "frequency": (torch.nn.functional.one_hot(which, 3).double(), pi),
        "mean": (z, pi @ loc),
        "second moment": (z * z, pi @ (scale**2 + loc**2)),
        "cross moment": (z[:, :1] * z[:, 1:], pi @ (loc[:, :1] * loc[:, 1:])),
    }
    for name, (values, truth) in stats.items():
        se = values.std(0) / math.sqrt(len(values))
        assert ((values.mean(0) - truth).abs() <= 4 * se).all(), (name, values.mean(0), truth)


def test_other_components_fall_back_to_the_broadcast():
    loc = torch.randn(4, 3)
    full = dist.MultivariateNormal(loc, scale_tril=torch.eye(3).expand(4, 3, 3))
    assert type(diagonal_normal_mixture(torch.zeros(4), full)) is dist.MixtureSameFamily
    vae = small_model(("vamp", {"pseudo_inputs": 4}), ("full-rank", {}))
    assert type(vae.prior()) is dist.MixtureSameFamily
    assert type(small_model(("vamp", {"pseudo_inputs": 4}), ("mean-field", {})).prior()) is (
        DiagonalNormalMixture
    )


def small_model(prior, guide, latent_dim=3, event=(6,)):
    small = {
        "encoder": ComponentConfig("mlp", {"hidden": [8]}),
        "decoder": ComponentConfig("mlp", {"hidden": [8]}),
    }
    config = ModelConfig(
        latent_dim=latent_dim,
        prior=ComponentConfig(*prior),
        guide=ComponentConfig(*guide),
        **small,
    )
    return randomize(build_vae(config, event), std=0.3)


@pytest.mark.parametrize("guide", [("mean-field", {}), ("iaf", {"hidden": [8]})])
def test_vamp_log_density_is_the_mean_of_the_guide_densities_at_the_pseudo_inputs(guide):
    vae = small_model(("vamp", {"pseudo_inputs": 4}), guide)
    z = torch.randn(2, 5, 3)  # extra leading dims, as with particles
    with torch.no_grad():
        got = vae.prior().log_prob(z)
        # log p(z) = log (1/K) sum_k q(z | u_k), each q(z|u_k) built on its own
        per_k = []
        for u in vae.prior.pseudo_inputs:
            if guide[0] == "mean-field":  # the Normal density written out
                h = vae.posterior.trunk(u)
                loc = vae.posterior.loc(h)
                scale = torch.exp(0.5 * vae.posterior.log_var(h))
                per_k.append(hand_log_normal(z, loc, scale))
            else:  # the IAF density for this one pseudo-input (checked by the Jacobian test)
                q_k = vae.posterior(u.unsqueeze(0))  # batch (1,)
                per_k.append(q_k.log_prob(z.unsqueeze(-2)).squeeze(-1))
        per_k = torch.stack(per_k, -1)
        expected = torch.log(torch.exp(per_k).mean(-1))
    assert got.shape == (2, 5)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_vamp_shares_the_encoder_without_copying_it():
    vae = small_model(("vamp", {"pseudo_inputs": 4}), ("mean-field", {}))
    prior_keys = [k for k in vae.state_dict() if k.startswith("prior.")]
    assert prior_keys == ["prior.pseudo_inputs"]
    assert vae.prior.pseudo_inputs.shape == (4, 6)
    guide_params = sum(p.numel() for p in vae.posterior.parameters())
    other = sum(p.numel() for p in vae.likelihood.parameters()) + 4 * 6
    assert sum(p.numel() for p in vae.parameters()) == guide_params + other
    # the prior's density is differentiable in the encoder (it is q(z|u))
    vae.prior().log_prob(torch.randn(3)).backward()
    assert vae.posterior.loc.weight.grad.abs().sum() > 0
    assert vae.prior.pseudo_inputs.grad.abs().sum() > 0


def riemann(log_density, dim, half_width, h):
    """Midpoint rule of exp(log_density) on the cube [-half_width, half_width]^dim, spacing h."""
    centers = torch.arange(-half_width + h / 2, half_width, h)
    grid = torch.cartesian_prod(*[centers] * dim).reshape(-1, dim)
    with torch.no_grad():
        log_p = log_density(grid).double()
    return float(torch.exp(log_p).sum() * h**dim), grid, log_p


@pytest.mark.filterwarnings("ignore:ConditionalAutoRegressiveNN input_dim = 1")
@pytest.mark.parametrize(
    ("transform", "dim", "h", "std"), [("affine", 2, 0.05, 0.1), ("spline", 1, 0.001, 0.3)]
)
def test_flow_prior_is_a_normalized_density_that_sampling_follows(transform, dim, h, std):
    prior = randomize(FlowPrior(dim, flows=2, hidden=[8], transform=transform), std=std)
    p = prior()
    coarse, _, _ = riemann(p.log_prob, dim, 10.0, 2 * h)
    total, grid, log_p = riemann(p.log_prob, dim, 10.0, h)
    # Tolerance: (1) the midpoint rule's error is O(h^2); Richardson's estimate of the
    # fine grid's error, |coarse - total| / 3, is checked to be < 1e-4; (2) the mass
    # outside the box: no sample of 20000 falls outside, so by the rule of three it is
    # < 3 / 20000 = 1.5e-4 (95%). 1e-3 is above their sum with room to spare.
    torch.manual_seed(1)
    with torch.no_grad():
        samples = p.sample((20000,))
    assert (samples.abs() < 10).all()
    assert abs(coarse - total) / 3 < 1e-4
    assert abs(total - 1) < 1e-3
    # the flow is not the identity: the density differs from N(0, I) on the grid
    standard = hand_log_normal(grid, 0.0, torch.ones(dim)).double()
    in_bulk = standard > -6
    assert (log_p - standard)[in_bulk].abs().max() > 0.5
    # samples follow the density: the sample mean matches the quadrature mean
    # within 5 standard errors (sample std / sqrt(n))
    mean = (torch.exp(log_p).unsqueeze(-1) * grid.double()).sum(0) * h**dim
    stderr = samples.double().std(0) / math.sqrt(len(samples))
    assert ((samples.double().mean(0) - mean).abs() < 5 * stderr).all()


def test_flow_prior_density_direction_matches_a_hand_made_single_affine_step():
    """One affine MAF step: eps = (z - mu(z_<d)) exp(-a(z_<d)), log p = log N(eps) - sum a."""
    prior = randomize(FlowPrior(3, flows=1, hidden=[6]), std=0.3)
    step = prior.flows[0]
    z = torch.randn(4, 3)
    mean, log_scale = step.arn(z)
    eps = step(z)
    # Pyro's AffineAutoregressive forward: y = exp(log_scale) * x + mean, i.e. z -> eps here
    torch.testing.assert_close(eps, torch.exp(log_scale) * z + mean)
    expected = hand_log_normal(eps, 0.0, torch.ones(3)) + log_scale.sum(-1)
    torch.testing.assert_close(prior().log_prob(z), expected)


# --- guides ---------------------------------------------------------------------


def mc_covariance_check(q, cov, n=40000):
    """Sample covariance of q's rsample vs cov, within 5 Monte Carlo standard errors.

    The standard error of the sample covariance of (z_i, z_j) is about
    sqrt((S_ii S_jj + S_ij^2) / n) for Gaussian z.
    """
    torch.manual_seed(1)
    z = q.rsample((n,)).squeeze(1).double()
    sample_cov = torch.cov(z.T)
    var = torch.diagonal(cov)
    stderr = torch.sqrt((var[:, None] * var[None, :] + cov**2) / n)
    assert ((sample_cov - cov).abs() < 5 * stderr).all()


def test_low_rank_guide_has_the_covariance_w_w_t_plus_diag():
    guide = randomize(LowRankGuide(trunk(), 3, rank=2), std=0.3)
    x = torch.randn(1, 5)
    q = guide(x)
    h = guide.trunk(x)
    w = guide.factor(h).reshape(1, 3, 2)
    cov = w @ w.transpose(-1, -2) + torch.diag_embed(torch.exp(guide.log_var(h)))
    torch.testing.assert_close(q.loc, guide.loc(h))
    torch.testing.assert_close(q.covariance_matrix, cov)
    z = torch.randn(7, 1, 3)
    expected = hand_log_mvn(z.double(), q.loc.double(), cov.double())
    torch.testing.assert_close(q.log_prob(z).double(), expected, rtol=1e-5, atol=1e-5)
    mc_covariance_check(q, cov[0].detach().double())


def test_full_rank_guide_has_a_cholesky_factor_and_its_covariance():
    guide = randomize(FullRankGuide(trunk(), 3), std=0.3)
    x = torch.randn(1, 5)
    q = guide(x)
    h = guide.trunk(x)
    scale = torch.exp(0.5 * guide.log_var(h))[0]
    a, b, c = guide.off_diagonal(h)[0]  # rows/cols of tril_indices(3, 3, -1): (1,0),(2,0),(2,1)
    chol = torch.stack(
        [
            torch.stack([scale[0], torch.zeros(()), torch.zeros(())]),
            torch.stack([a, scale[1], torch.zeros(())]),
            torch.stack([b, c, scale[2]]),
        ]
    )
    torch.testing.assert_close(q.scale_tril[0], chol)
    cov = chol @ chol.T
    torch.testing.assert_close(q.covariance_matrix[0], cov)
    assert (cov - torch.diag(torch.diagonal(cov))).abs().max() > 0.05  # really correlated
    z = torch.randn(7, 1, 3)
    expected = hand_log_mvn(z.double(), q.loc.double(), cov.double())
    torch.testing.assert_close(q.log_prob(z).double(), expected, rtol=1e-5, atol=1e-5)
    mc_covariance_check(q, cov.detach().double())


def finite_difference_jacobian(f, x, eps=1e-6):
    """Central differences, column by column (float64)."""
    cols = []
    for i in range(x.shape[-1]):
        step = torch.zeros_like(x)
        step[..., i] = eps
        cols.append((f(x + step) - f(x - step)) / (2 * eps))
    return torch.stack(cols, -1)


def test_iaf_log_prob_is_base_log_prob_minus_log_det_of_a_numerical_jacobian():
    torch.set_default_dtype(torch.float64)
    try:
        guide = randomize(IAFGuide(trunk(), 3, flows=2, hidden=[6]), std=0.5).eval()
        x = torch.randn(1, 5)
        with torch.no_grad():
            q = guide(x)
            base = guide.diagonal_normal(guide.trunk(x))
            transforms = q.transforms

            def flow(e):
                for t in transforms:
                    e = t(e.clone())
                return e

            eps = base.sample()  # (1, 3)
            z = flow(eps)
            jac = finite_difference_jacobian(flow, eps)[0]  # (3, 3)
            expected = base.log_prob(eps) - torch.linalg.slogdet(jac).logabsdet
            # the flow is not volume-preserving, and the Jacobian is triangular up to a
            # permutation (autoregressive), so this is a real check of the log-det
            assert torch.linalg.slogdet(jac).logabsdet.abs() > 0.05
            fresh = z.clone()  # not q's own sample: forces the D-step inverse
            torch.testing.assert_close(q.log_prob(fresh), expected, rtol=1e-6, atol=1e-6)
            # and q's own samples (cached inverse) score the same way
            own = q.rsample()
            eps_own = transforms[0].inv(transforms[1].inv(own.clone()))
            jac_own = finite_difference_jacobian(flow, eps_own)[0]
            expected_own = base.log_prob(eps_own) - torch.linalg.slogdet(jac_own).logabsdet
            torch.testing.assert_close(q.log_prob(own), expected_own, rtol=1e-6, atol=1e-6)
            # conditioned on x: the same base point goes elsewhere under another datum
            other = guide(torch.randn(1, 5))
            moved = eps
            for t in other.transforms:
                moved = t(moved)
            assert (moved - z).abs().max() > 1e-3
    finally:
        torch.set_default_dtype(torch.float32)


def test_delta_guide_is_a_plain_autoencoder_with_the_kl_term_dropped():
    assert "NOT a VAE" in DeltaGuide.__doc__
    assert DeltaGuide.is_point_estimate and DeltaGuide.is_amortized
    vae = small_model(("standard-normal", {}), ("delta", {}))
    x = torch.bernoulli(torch.full((4, 6), 0.5))
    code = vae.posterior.loc(vae.posterior.trunk(x))
    q = vae.posterior(x)
    torch.testing.assert_close(q.rsample(), code)
    loss = Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, x, torch.arange(4), 20
    )
    reconstruction = vae.likelihood(code).log_prob(x).sum() * 20 / 4
    torch.testing.assert_close(loss, -reconstruction)  # no log p(z), no log q(z|x)
    # the same with a learned prior: the prior takes no part in the loss
    vae.prior = randomize(LearnedNormalPrior(3))
    loss2 = Trace_ELBO(max_plate_nesting=1).differentiable_loss(
        vae.model, vae.guide, x, torch.arange(4), 20
    )
    torch.testing.assert_close(loss2, loss)


# --- bad input ------------------------------------------------------------------


def config_with(prior=None, guide=None):
    model = ModelConfig(
        latent_dim=4,
        prior=ComponentConfig(*(prior or ("standard-normal", {}))),
        guide=ComponentConfig(*(guide or ("mean-field", {}))),
    )
    return Config(model=model)


@pytest.mark.parametrize(
    ("prior", "guide", "message"),
    [
        (("vamp", {"pseudo_inputs": 0.5}), None, "model.prior.pseudo_inputs: expected int"),
        (("vamp", {"pseudo_inputs": 3}), ("delta", {}), "needs an amortized guide with a density"),
        (("mixture", {"components": "3"}), None, "model.prior.components: expected int"),
        (("flow", {"depth": 2}), None, "unknown key 'depth' for prior 'flow'"),
        (None, ("low-rank", {"rank": 1.5}), "model.guide.rank: expected int"),
        (("gaussian", {}), None, "unknown prior 'gaussian'; valid names: standard-normal"),
        (None, ("iaf", {"hidden": 64}), "model.guide.hidden: expected a list"),
    ],
)
def test_bad_components_are_rejected_before_any_data_are_read(prior, guide, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as info:
        resolve(config_with(prior, guide))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("prior", "guide", "message"),
    [
        (("flow", {"transform": "planar"}), None, "unknown transform 'planar'; valid: affine"),
        (("flow", {"hidden": [2]}), None, "each as wide as latent_dim"),
        (("mixture", {"components": 0}), None, "components must be >= 1"),
        (None, ("iaf", {"flows": 0}), "flows must be >= 1"),
        (None, ("low-rank", {"rank": 0}), "rank must be >= 1"),
    ],
)
def test_bad_values_are_rejected_when_building(prior, guide, message):
    config = resolve(config_with(prior, guide))
    with pytest.raises(ConfigError, match=message):
        build_vae(config.model, (6,))


def test_cli_trains_vamp_with_500_pseudo_inputs_by_default(tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["train", "--prior", "vamp", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    assert Config.load(out / "config.toml").model.prior.options == {"pseudo_inputs": 500}
    assert pyro_vae.load(out).prior.pseudo_inputs.shape == (500, 8, 8)
    capsys.readouterr()  # the training's note on the Monte Carlo KL
    code = main(["train", "--prior", "vamp", "--set", "model.prior.pseudo_inputs=0", "--epochs",
                 "1", "--out", str(tmp_path / "bad")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "pseudo_inputs must be >= 1" in err


# --- config files ---------------------------------------------------------------


def config_files(kind):
    return sorted(CONFIGS.glob(f"{kind}-*.toml"))


def test_there_is_a_config_file_for_every_prior_and_guide():
    for kind, registry in (("prior", PRIORS), ("guide", GUIDES)):
        names = {path.stem.removeprefix(f"{kind}-") for path in config_files(kind)}
        assert names >= set(registry.names()) - {"local"}, kind


@pytest.mark.parametrize(
    "path", config_files("prior") + config_files("guide"), ids=lambda p: p.stem
)
def test_config_files_resolve_and_build(path):
    config = resolve(Config.load(path))
    kind, _, name = path.stem.partition("-")
    assert getattr(config.model, kind).name == name
    vae = build_vae(config.model, (784,))
    assert vae.prior().event_shape == (config.model.latent_dim,)


def test_prior_files_differ_only_in_the_prior_section():
    """Switching the prior is an edit of [model.prior] only."""
    docs = {p.stem: Config.load(p).to_dict() for p in config_files("prior")}
    reference = docs.pop("prior-standard-normal")
    del reference["model"]["prior"]
    for stem, doc in docs.items():
        del doc["model"]["prior"]
        assert doc == reference, stem


# --- every prior x {mean-field, iaf} trains on digits ------------------------------


@pytest.fixture
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is many times faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def digits_config(prior, guide):
    model = ModelConfig(
        latent_dim=4,
        prior=ComponentConfig(*prior),
        guide=ComponentConfig(*guide),
        encoder=ComponentConfig("mlp", {"hidden": [32]}),
        decoder=ComponentConfig("mlp", {"hidden": [32]}),
    )
    train = pyro_vae.TrainConfig(epochs=1, batch_size=100, lr=1e-2)
    return Config(model=model, train=train)


PRIOR_CASES = [
    ("standard-normal", {}),
    ("learned-normal", {}),
    ("mixture", {"components": 3}),
    ("vamp", {"pseudo_inputs": 5}),
    ("flow", {"flows": 2, "hidden": [16]}),
]
GUIDE_CASES = [("mean-field", {}), ("iaf", {"flows": 1, "hidden": [16]})]


@pytest.mark.filterwarnings("ignore:elbo 'meanfield'")
@pytest.mark.parametrize("guide", GUIDE_CASES, ids=lambda g: g[0])
@pytest.mark.parametrize("prior", PRIOR_CASES, ids=lambda p: p[0])
def test_every_prior_with_mean_field_and_iaf_trains_and_scores_for_importance_sampling(
    prior, guide, one_thread
):
    config = digits_config(prior, guide)
    untrained = build_vae(resolve(config).model, (8, 8)).eval()
    result = pyro_vae.fit(config)
    x = result.data.split("test")
    torch.manual_seed(3)
    before = pyro_vae.evaluate_elbo(untrained, x)["elbo"]
    after = pyro_vae.evaluate_elbo(result.vae, x)["elbo"]
    # 15 Adam steps move the 297-image test ELBO by tens of nats, far more than its
    # one-sample Monte Carlo noise (a few tenths of a nat per mean)
    assert math.isfinite(after) and after > before + 5
    # what importance sampling needs: log q(z|x) and log p(z) at z ~ q, shape (S, B)
    vae = result.vae
    with torch.no_grad():
        q = vae.posterior(x[:7])
        z = q.sample((3,))
        log_q, log_p = q.log_prob(z), vae.prior().log_prob(z)
        log_q_fresh = q.log_prob(z.clone())  # also without the flow's cache
    assert log_q.shape == log_p.shape == (3, 7)
    assert torch.isfinite(log_q).all() and torch.isfinite(log_p).all()
    torch.testing.assert_close(log_q_fresh, log_q, rtol=1e-4, atol=1e-4)


def test_the_iaf_made_computes_what_pyros_conditional_made_computes():
    """The split first layer of _ContextARN is an optimization, not a different network."""
    from pyro.nn import ConditionalAutoRegressiveNN

    from pyro_vae.guides import _ContextARN

    arn = randomize(_ContextARN(3, 4, [8], permutation=torch.tensor([2, 0, 1])), std=0.3)
    x, context = torch.randn(5, 3), torch.randn(5, 4)
    mean, logit_scale = arn(x, context)
    reference = ConditionalAutoRegressiveNN.forward(arn, x, context)
    torch.testing.assert_close(mean, reference[0])
    torch.testing.assert_close(logit_scale, reference[1])
    # broadcasting: x (B, 1, D) against a context (K, C) gives (B, K, D)
    wide = arn(x.unsqueeze(1), context[:2])[0]
    assert wide.shape == (5, 2, 3)
    torch.testing.assert_close(wide[:, 1], arn(x, context[1].expand(5, 4))[0])
