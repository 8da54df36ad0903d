"""Helpers for the course notebooks in ``notebooks/``: the smoke flag and the exercise checks.

The smoke flag: when the environment variable ``PYRO_VAE_SMOKE`` is set (to
anything but ``""``, ``"0"`` or ``"false"``), :func:`smoke` is true and the
notebooks shrink their data, epochs and sample sizes with :func:`pick` so
that each runs in well under a minute (the test suite sets it; see
``notebooks/conftest.py``). Without it they run the full experiments whose
conclusions the figures show.

Each notebook ends with one exercise; its ``check_*`` function here calls
the student's function on fixed inputs, compares the result with a reference
(torch, or this package), prints one line that says whether the answer is
right (and, if not, what is wrong), and returns ``True`` or ``False``. A
check never raises because of the student's code: an exception, a wrong
shape or a wrong value is reported and gives ``False``.

Example:
    >>> from pyro_vae import course
    >>> course.check_reparameterize(lambda loc, scale, eps: loc + scale * eps)
    correct: z = loc + scale * eps, differentiable in loc and scale
    True
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch

#: The environment variable that turns the notebooks' smoke mode on.
SMOKE_ENV = "PYRO_VAE_SMOKE"

#: Set to a true value, it makes ``pytest notebooks`` run the full experiments (no smoke mode).
FULL_ENV = "PYRO_VAE_FULL"

T = TypeVar("T")


def smoke() -> bool:
    """Whether ``PYRO_VAE_SMOKE`` is set to a true value (anything but ``""``, ``0``, ``false``)."""
    return os.environ.get(SMOKE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def pick(full: T, smoke_value: T) -> T:
    """``smoke_value`` under the smoke flag (:func:`smoke`), else ``full``.

    Example:
        >>> epochs = pick(200, 2)  # 2 in the test suite, 200 for the students
    """
    return smoke_value if smoke() else full


class ClaimFailed(AssertionError):
    """A notebook's claim did not hold for the numbers it just computed."""


def claim(holds: Any, statement: str, evidence: str = "") -> None:
    """Demonstrate a claim of the prose: print it as checked, or raise if it does not hold.

    Every claim a notebook makes is followed by a cell that computes the
    numbers and calls ``claim``, so that running the notebook (CI runs them
    in smoke mode) proves the lesson rather than only that the cells run.

    Args:
        holds: Whether the claim holds (a bool, or a one-element tensor or array).
        statement: The claim, as one sentence of the prose.
        evidence: The numbers that decide it, shown either way.

    Raises:
        ClaimFailed: when ``holds`` is false, naming the claim and the evidence.

    Example:
        >>> claim(0.9 > 0.5, "the guide beats the prior", "0.9 vs 0.5")
        claim checked: the guide beats the prior (0.9 vs 0.5)
    """
    suffix = f" ({evidence})" if evidence else ""
    if not bool(holds):
        raise ClaimFailed(f"claim failed: {statement}{suffix}")
    print(f"claim checked: {statement}{suffix}")


# --- the notebooks' images ------------------------------------------------------------

#: The dataset the notebooks prefer: 28x28 images people can read.
MNIST = "binarized-mnist"
#: The fallback that is always there: scikit-learn's bundled 8x8 digits.
DIGITS = "digits"


@dataclass(frozen=True)
class ImageData:
    """The images a notebook trains on, chosen by :func:`image_dataset`.

    Args:
        name: :data:`MNIST` or :data:`DIGITS`.
        note: One line for the notebook to print: which images, how many, and why.
        splits: ``"train"`` and ``"test"`` tensors ``(N, H, W)`` with values in [0, 1],
            ready for ``pyro_vae.fit(vae, splits, config=config)``.
        binarize: The ``data.binarize`` that a Bernoulli model needs: ``"dynamic"``
            for the digits' grey levels, ``"none"`` for MNIST's binary pixels.
        labels: The digit of each image per split, where the data have labels
            (the binarized MNIST files have none).
    """

    name: str
    note: str
    splits: dict[str, torch.Tensor]
    binarize: str
    labels: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def event_shape(self) -> tuple[int, ...]:
        """The shape of one image, ``(H, W)``."""
        return tuple(self.splits["train"].shape[1:])


def image_dataset(train_size: int | None = None, test_size: int | None = None) -> ImageData:
    """Binarized MNIST (28x28) when ``$PYRO_VAE_DATA`` holds it, else the 8x8 digits.

    On 8x8 digits, samples, reconstructions and the 2-D manifold are hard to
    recognize, so the notebooks use the 28x28 binarized MNIST of
    :func:`pyro_vae.data.load_binarized_mnist` when the folder named by
    ``$PYRO_VAE_DATA`` has its files (nothing is downloaded), and otherwise the
    bundled digits, which are always there (CI runs on them). Both splits are
    cut to their first ``train_size`` and ``test_size`` images (both sets come
    shuffled), so that smoke runs stay fast.

    Args:
        train_size: At most this many training images (``None``: all).
        test_size: At most this many test images (``None``: all).

    Returns:
        The images, with a one-line ``note`` that says which were chosen and why.

    Example:
        >>> images = image_dataset(train_size=300, test_size=100)  # doctest: +SKIP
        >>> print(images.note)  # doctest: +SKIP
    """
    from .data import DATA_ENV, load_dataset
    from .errors import DataError

    folder = os.environ.get(DATA_ENV, "").strip()
    dataset, reason = None, f"${DATA_ENV} is not set"
    if folder:
        try:
            dataset = load_dataset(MNIST, folder, download=False)
        except DataError:
            reason = f"${DATA_ENV} ({folder}) has no readable binarized MNIST"
    if dataset is None:
        dataset = load_dataset(DIGITS, download=False)
    cut = {"train": train_size, "test": test_size}
    splits = {s: dataset.splits[s][: cut[s]] for s in cut}
    labels = {s: dataset.labels[s][: cut[s]] for s in cut if s in dataset.labels}
    sizes = ", ".join(f"{len(x)} {s}" for s, x in splits.items())
    height, width = splits["train"].shape[1:]
    if dataset.name == MNIST:
        note = f"binarized MNIST from ${DATA_ENV}, {height}x{width} pixels: {sizes} images"
        return ImageData(MNIST, note, splits, "none", labels)
    note = (
        f"8x8 digits ({sizes} images), small and hard to read: {reason}; point it to a "
        f"folder with binarized_mnist.npz for 28x28 MNIST"
    )
    return ImageData(DIGITS, note, splits, "dynamic", labels)


# --- reporting ------------------------------------------------------------------


class _Wrong(Exception):
    """Raised inside a check when the answer is wrong; the message says why."""


def _run_check(name: str, body: Callable[[], str]) -> bool:
    """Run ``body`` (which returns the success message); print the verdict, return it."""
    try:
        message = body()
    except _Wrong as wrong:
        print(f"not yet right ({name}): {wrong}")
        return False
    except NotImplementedError:
        print(f"not yet right ({name}): not implemented yet -- replace the `raise` with your code")
        return False
    except Exception as error:  # noqa: BLE001 - any error in the student's code is reported
        print(f"not yet right ({name}): your function raised {type(error).__name__}: {error}")
        return False
    print(f"correct: {message}")
    return True


def _returned_none(what: str) -> _Wrong:
    return _Wrong(f"your function returned None for {what}: did you forget `return`?")


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    """``value`` as a tensor: torch tensors, NumPy arrays and scalars, and Python numbers."""
    if value is None:
        raise _returned_none(what)
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (np.ndarray, np.generic, int, float)) and not isinstance(value, bool):
        return torch.as_tensor(np.asarray(value, dtype=np.float64))
    raise _Wrong(
        f"{what} should be a number or an array (torch or NumPy), got {type(value).__name__}"
    )


def _as_float(value: Any, what: str) -> float:
    """``value`` as a Python float: any numeric scalar, or a one-element tensor or array."""
    tensor = _as_tensor(value, what)
    if tensor.numel() != 1:
        raise _Wrong(f"{what} should be one number, got shape {tuple(tensor.shape)}")
    return float(tensor.detach().reshape(()).double())


def _expect_close(
    got: Any, expected: torch.Tensor, what: str, rtol: float = 1e-4, atol: float = 1e-5
) -> torch.Tensor:
    got = _as_tensor(got, what)
    if tuple(got.shape) != tuple(expected.shape):
        raise _Wrong(f"{what} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    got_d, expected_d = got.detach().double(), expected.detach().double()
    if not torch.isfinite(got_d).all():
        raise _Wrong(f"{what} has non-finite values (NaN or inf): check the numerics")
    if not torch.allclose(got_d, expected_d, rtol=rtol, atol=atol):
        err = (got_d - expected_d).abs().max().item()
        raise _Wrong(f"{what} differs from the reference (largest error {err:.3g})")
    return got


# --- 01: the reparameterization trick ---------------------------------------------


def check_reparameterize(fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], Any]) -> bool:
    r"""Check ``fn(loc, scale, eps)``: the draw :math:`z = \mu + \sigma \odot \varepsilon`.

    The value must match, and gradients must flow to ``loc`` and ``scale``:
    :math:`\partial z / \partial \mu = 1`, :math:`\partial z / \partial \sigma = \varepsilon`
    (Kingma & Welling 2014, sec. 2.4).

    Args:
        fn: The student's function; tensors of shape ``(B, D)`` in, ``(B, D)`` out.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """

    def body() -> str:
        generator = torch.Generator().manual_seed(1)
        loc = torch.randn(5, 3, generator=generator, dtype=torch.float64, requires_grad=True)
        scale = torch.rand(5, 3, generator=generator, dtype=torch.float64) + 0.5
        scale.requires_grad_(True)
        eps = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        z = _expect_close(fn(loc, scale, eps), loc + scale * eps, "z")
        if not z.requires_grad:
            raise _Wrong("z carries no gradient: build it from loc and scale, don't detach")
        weights = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        grad_loc, grad_scale = torch.autograd.grad(
            (z * weights).sum(), [loc, scale], allow_unused=True
        )
        if grad_loc is None or grad_scale is None:
            raise _Wrong("z must depend on both loc and scale (a gradient is missing)")
        if not torch.allclose(grad_loc, weights) or not torch.allclose(grad_scale, weights * eps):
            raise _Wrong("the gradients of z are wrong: expected dz/dloc = 1, dz/dscale = eps")
        return "z = loc + scale * eps, differentiable in loc and scale"

    return _run_check("reparameterize", body)


def check_elbo_estimate(fn: Callable[..., Any]) -> bool:
    r"""Check ``fn(x, logits, z, loc, log_var)``: the one-draw Monte Carlo ELBO of each datum.

    For a Bernoulli decoder with logits :math:`f(z)`, the prior
    :math:`\mathcal N(0, I)` and the guide :math:`q(z|x) = \mathcal N(\mu,
    \mathrm{diag}\,e^{\ell})` (``log_var`` :math:`\ell`), one draw :math:`z \sim q` gives

    .. math::

        \widehat{\mathrm{ELBO}}(x) = \log p(x \mid z) + \log p(z) - \log q(z \mid x),

    summed over pixels and latent dimensions. Compared with the same sum from
    :mod:`torch.distributions` (``Bernoulli(logits=...)``, ``Normal``).

    Args:
        fn: The student's function: ``x`` and ``logits`` ``(B, d)``, ``z``,
            ``loc`` and ``log_var`` ``(B, D)``; returns ``(B,)``.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    import torch.distributions as td

    def body() -> str:
        generator = torch.Generator().manual_seed(6)
        x = torch.bernoulli(torch.full((5, 7), 0.3, dtype=torch.float64), generator=generator)
        logits = 2 * torch.randn(5, 7, generator=generator, dtype=torch.float64)
        loc = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        log_var = torch.randn(5, 3, generator=generator, dtype=torch.float64)
        scale = torch.exp(0.5 * log_var)
        z = loc + scale * torch.randn(5, 3, generator=generator, dtype=torch.float64)
        expected = (
            td.Bernoulli(logits=logits).log_prob(x).sum(-1)
            + td.Normal(0.0, 1.0).log_prob(z).sum(-1)
            - td.Normal(loc, scale).log_prob(z).sum(-1)
        )
        _expect_close(fn(x, logits, z, loc, log_var), expected, "the ELBO estimate", rtol=1e-6)
        return "ELBO ~ log p(x|z) + log p(z) - log q(z|x), with sd = exp(log_var / 2)"

    return _run_check("one-draw ELBO", body)


# --- 02: the Gaussian KL ----------------------------------------------------------


def check_kl_standard_normal(fn: Callable[[torch.Tensor, torch.Tensor], Any]) -> bool:
    r"""Check ``fn(mu, sigma)``: :math:`\mathrm{KL}(\mathcal N(\mu, \sigma^2) \| \mathcal N(0, 1))`.

    .. math::

        \mathrm{KL} = \tfrac12 (\mu^2 + \sigma^2 - \log \sigma^2 - 1),

    compared with :func:`torch.distributions.kl_divergence` on a grid of
    :math:`\mu \in [-3, 3]`, :math:`\sigma \in [0.05, 4]`.

    Args:
        fn: The student's function; tensors of one shape in, the same shape out.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """

    def body() -> str:
        mu, sigma = torch.meshgrid(
            torch.linspace(-3, 3, 13, dtype=torch.float64),
            torch.exp(torch.linspace(math.log(0.05), math.log(4.0), 11, dtype=torch.float64)),
            indexing="ij",
        )
        expected = torch.distributions.kl_divergence(
            torch.distributions.Normal(mu, sigma), torch.distributions.Normal(0.0, 1.0)
        )
        got = _expect_close(fn(mu, sigma), expected, "KL")
        if (got < -1e-9).any():
            raise _Wrong("a KL divergence is never negative")
        return "KL(N(mu, sigma^2) || N(0, 1)) = (mu^2 + sigma^2 - log sigma^2 - 1) / 2"

    return _run_check("KL", body)


def check_kl_diagonal_normals(fn: Callable[..., Any]) -> bool:
    r"""Check ``fn(mu_q, sigma_q, mu_p, sigma_p)``: the KL between two diagonal Gaussians.

    .. math::

        \mathrm{KL}(q \,\|\, p) = \sum_d \Big[\log\frac{\sigma_{p,d}}{\sigma_{q,d}}
            + \frac{\sigma_{q,d}^2 + (\mu_{q,d} - \mu_{p,d})^2}{2\sigma_{p,d}^2}
            - \frac12\Big],

    summed over the last dimension (a diagonal Gaussian is one distribution
    over a vector). Compared with :func:`torch.distributions.kl_divergence`
    of two ``Independent(Normal)`` on random parameters, including
    :math:`p \ne \mathcal N(0, I)` and pairs where :math:`\mathrm{KL}(q\|p)`
    and :math:`\mathrm{KL}(p\|q)` differ.

    Args:
        fn: The student's function; four tensors ``(B, D)`` in, ``(B,)`` out.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    import torch.distributions as td

    def body() -> str:
        generator = torch.Generator().manual_seed(7)
        mu_q, mu_p = (2 * torch.randn(6, 4, generator=generator, dtype=torch.float64) for _ in "qp")
        sigma_q, sigma_p = (
            torch.exp(torch.randn(6, 4, generator=generator, dtype=torch.float64)) for _ in "qp"
        )
        expected = td.kl_divergence(
            td.Independent(td.Normal(mu_q, sigma_q), 1), td.Independent(td.Normal(mu_p, sigma_p), 1)
        )
        reverse = td.kl_divergence(
            td.Independent(td.Normal(mu_p, sigma_p), 1), td.Independent(td.Normal(mu_q, sigma_q), 1)
        )
        got = fn(mu_q, sigma_q, mu_p, sigma_p)
        tensor = _as_tensor(got, "KL(q || p)")
        if tensor.shape == reverse.shape and torch.allclose(tensor.double(), reverse, rtol=1e-4):
            raise _Wrong("that is KL(p || q): the expectation is under q, the first argument")
        _expect_close(tensor, expected, "KL(q || p)")
        return "KL(q || p) = sum_d log(s_p / s_q) + (s_q^2 + (m_q - m_p)^2) / (2 s_p^2) - 1/2"

    return _run_check("KL between diagonal Gaussians", body)


# --- 03: KL warm-up ---------------------------------------------------------------


def check_kl_warmup(fn: Callable[[float, int, int], Any]) -> bool:
    r"""Check ``fn(beta, warmup_epochs, epoch)``: the linear KL warm-up schedule.

    .. math::

        \beta_e = \beta \min\bigl(1, (e - 1)/W\bigr), \qquad \beta_e = \beta \text{ if } W = 0,

    for 1-based epochs ``e`` (0 in the first epoch), compared with
    :func:`pyro_vae.objectives.kl_weight`, the schedule the trainer uses.

    Args:
        fn: The student's function; returns a float.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    from .objectives import kl_weight

    def body() -> str:
        for beta in (1.0, 0.5):
            for warmup in (0, 1, 4, 10):
                for epoch in range(1, 16):
                    got = _as_float(fn(beta, warmup, epoch), "the weight")
                    expected = kl_weight(beta, warmup, epoch)
                    if not math.isclose(got, expected, rel_tol=1e-6, abs_tol=1e-7):  # float32 too
                        hint = (
                            "the full weight is beta, not 1"
                            if math.isclose(got, expected / beta, rel_tol=1e-6, abs_tol=1e-7)
                            else "epochs count from 1; the first epoch has weight 0"
                        )
                        raise _Wrong(
                            f"beta={beta}, W={warmup}, epoch {epoch}: got {got:g}, expected "
                            f"{expected:g} ({hint})"
                        )
        return "beta_e = beta * min(1, (e - 1) / W), and beta when W = 0"

    return _run_check("KL warm-up", body)


def check_beta_optimal_q(fn: Callable[..., Any]) -> bool:
    r"""Check ``fn(beta, w, noise_variance, x)``: the q that maximizes the β-weighted ELBO.

    For the one-dimensional linear-Gaussian model :math:`z \sim \mathcal N(0, 1)`,
    :math:`x \mid z \sim \mathcal N(wz, \sigma^2)` and :math:`q = \mathcal N(m, s^2)`,

    .. math::

        \mathcal L_\beta(m, s^2) = -\frac{(x - wm)^2 + w^2 s^2}{2\sigma^2}
            - \frac\beta2\,(m^2 + s^2 - \log s^2 - 1) + \text{const},

    is maximized by :math:`m^* = wx / (w^2 + \beta\sigma^2)` and
    :math:`s^{2*} = \beta\sigma^2 / (w^2 + \beta\sigma^2)`: the exact posterior
    at :math:`\beta = 1`, and a point (:math:`s^2 = 0`) at the autoencoder's
    inverse :math:`x / w` at :math:`\beta = 0`. Checked at several β (0
    included), w, σ² and x against this closed form.

    Args:
        fn: The student's function; numbers in, a pair ``(m, s2)`` out.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """

    def body() -> str:
        for beta in (0.0, 0.1, 0.5, 1.0, 3.0):
            for w, noise, x in ((2.0, 0.5, 1.3), (-0.7, 0.2, -0.4), (1.5, 2.0, 2.5)):
                answer = fn(beta, w, noise, x)
                if answer is None:
                    raise _returned_none("(m, s2)")
                if not (isinstance(answer, tuple | list) and len(answer) == 2):
                    raise _Wrong("return a pair (m, s2): the mean and the variance of q")
                m, s2 = _as_float(answer[0], "m"), _as_float(answer[1], "s2")
                expected_m = w * x / (w * w + beta * noise)
                expected_s2 = beta * noise / (w * w + beta * noise)
                where = f"beta = {beta}, w = {w}, sigma^2 = {noise}, x = {x}"
                if not math.isclose(s2, expected_s2, rel_tol=1e-6, abs_tol=1e-9):
                    raise _Wrong(f"{where}: s2 = {s2:.4g}, expected {expected_s2:.4g}")
                if not math.isclose(m, expected_m, rel_tol=1e-6, abs_tol=1e-9):
                    raise _Wrong(f"{where}: m = {m:.4g}, expected {expected_m:.4g}")
        return "m* = w x / (w^2 + beta sigma^2), s2* = beta sigma^2 / (w^2 + beta sigma^2)"

    return _run_check("beta-optimal q", body)


# --- 04: the continuous Bernoulli ---------------------------------------------------


def check_continuous_bernoulli_log_normalizer(fn: Callable[[torch.Tensor], Any]) -> bool:
    r"""Check ``fn(lam)``: :math:`\log C(\lambda)` of the continuous Bernoulli.

    .. math::

        C(\lambda) = \frac{2\,\mathrm{artanh}(1 - 2\lambda)}{1 - 2\lambda}
        \quad (\lambda \ne \tfrac12), \qquad C(\tfrac12) = 2,

    the constant that makes :math:`C(\lambda)\lambda^x(1-\lambda)^{1-x}` a density
    on [0, 1] (Loaiza-Ganem & Cunningham 2019). Compared with the log density
    of :class:`torch.distributions.ContinuousBernoulli` minus the Bernoulli part,
    at :math:`\lambda` in [0.02, 0.98] away from 1/2 (where the formula is 0/0).

    Args:
        fn: The student's function; a tensor of probabilities in, the same shape out.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """

    def body() -> str:
        lam = torch.cat(
            [
                torch.linspace(0.02, 0.45, 12, dtype=torch.float64),
                torch.linspace(0.55, 0.98, 12, dtype=torch.float64),
            ]
        )
        x = torch.full_like(lam, 0.3)
        cb = torch.distributions.ContinuousBernoulli(probs=lam)
        bernoulli_part = x * torch.log(lam) + (1 - x) * torch.log1p(-lam)
        expected = cb.log_prob(x) - bernoulli_part
        _expect_close(fn(lam), expected, "log C(lambda)", rtol=1e-3, atol=1e-4)
        return "log C(lambda) = log(2 artanh(1 - 2 lambda) / (1 - 2 lambda))"

    return _run_check("continuous Bernoulli normalizer", body)


# --- 05: log-mean-exp -------------------------------------------------------------


def check_log_mean_exp(fn: Callable[[torch.Tensor], Any]) -> bool:
    r"""Check ``fn(log_w)``: :math:`\log \hat p(x) = \log \frac1K \sum_k w_k` per datum, stably.

    ``log_w`` has shape ``(K, B)`` (particles first) and the answer shape
    ``(B,)``. The inputs include log weights near -1000 and +1000, where
    ``log(mean(exp(log_w)))`` under- or overflows: shift by the maximum
    (``torch.logsumexp``). Compared with :func:`pyro_vae.evaluate.log_mean_exp`.

    Args:
        fn: The student's function.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    from .evaluate import log_mean_exp

    def body() -> str:
        generator = torch.Generator().manual_seed(2)
        log_w = 3 * torch.randn(50, 4, generator=generator, dtype=torch.float64)
        log_w = log_w + torch.tensor([0.0, -1000.0, 1000.0, -5.0], dtype=torch.float64)
        _expect_close(fn(log_w), log_mean_exp(log_w, 0), "log p_hat(x)", rtol=1e-6, atol=1e-6)
        return "log p_hat = logsumexp(log_w, 0) - log K, stable at any scale"

    return _run_check("log-mean-exp", body)


# --- 06: the optimal mean-field posterior -------------------------------------------


def check_optimal_diagonal(
    fn: Callable[[torch.Tensor, torch.Tensor, float, torch.Tensor], Any],
) -> bool:
    r"""Check ``fn(W, b, sigma, x)``: the best diagonal Normal of a linear-Gaussian model.

    For :math:`x \mid z \sim \mathcal N(Wz + b, \sigma^2 I)`, :math:`z \sim \mathcal N(0, I)`,
    the diagonal Normal of highest ELBO has the exact posterior mean
    :math:`\Sigma W^\top (x - b)/\sigma^2` and variances :math:`1/\Lambda_{jj}`,
    with :math:`\Lambda = I + W^\top W/\sigma^2` the posterior precision (not
    :math:`\Sigma_{jj} = (\Lambda^{-1})_{jj}`: mean-field underestimates the
    variance). Compared with
    :meth:`pyro_vae.exact.LinearGaussian.optimal_diagonal`.

    Args:
        fn: The student's function: ``W`` ``(d, D)``, ``b`` ``(d,)``, σ a float,
            ``x`` ``(B, d)``; returns ``(mean, variance)``, mean ``(B, D)``,
            variance ``(D,)`` or ``(B, D)``.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    from .exact import LinearGaussian

    def body() -> str:
        generator = torch.Generator().manual_seed(3)
        weight = torch.randn(6, 3, generator=generator, dtype=torch.float64)
        weight[:, 1] += weight[:, 0]  # correlated columns: a non-diagonal posterior
        bias = torch.randn(6, generator=generator, dtype=torch.float64)
        sigma = 0.7
        x = torch.randn(4, 6, generator=generator, dtype=torch.float64)
        q = LinearGaussian(weight, bias, sigma).optimal_diagonal(x)
        answer = fn(weight, bias, sigma, x)
        if answer is None:
            raise _returned_none("(mean, variance)")
        if not (isinstance(answer, tuple | list) and len(answer) == 2):
            raise _Wrong("return a pair (mean, variance)")
        mean, variance = answer
        _expect_close(mean, q.base_dist.loc, "the mean")
        variance = _as_tensor(variance, "the variance")
        if tuple(variance.shape) == (3,):
            variance = variance.expand(4, 3)
        _expect_close(variance, q.base_dist.scale**2, "the variance")
        return "q* has the posterior mean and variances 1 / Lambda_jj"

    return _run_check("optimal diagonal q*", body)


# --- 07: pPCA -----------------------------------------------------------------------


def check_ppca_noise_variance(fn: Callable[[torch.Tensor, int], Any]) -> bool:
    r"""Check ``fn(eigenvalues, latent_dim)``: the maximum-likelihood pPCA noise variance.

    .. math::

        \hat\sigma^2 = \frac{1}{d - D} \sum_{j = D+1}^{d} \lambda_j,

    the mean of the discarded eigenvalues of the data covariance
    (Tipping & Bishop 1999, eq. (8)); ``eigenvalues`` come in decreasing order.

    Args:
        fn: The student's function: a ``(d,)`` tensor and ``D`` in, a number out.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """

    def body() -> str:
        generator = torch.Generator().manual_seed(4)
        for d, latent in ((10, 2), (7, 3), (5, 4)):
            eig = torch.rand(d, generator=generator, dtype=torch.float64).mul(5).sort().values
            eig = eig.flip(0)
            got = _as_float(fn(eig.clone(), latent), "sigma^2")
            expected = float(eig[latent:].mean())
            if not math.isclose(got, expected, rel_tol=1e-6):
                raise _Wrong(
                    f"d = {d}, D = {latent}: got {got:.4g}, expected {expected:.4g} "
                    "(which eigenvalues does the noise explain?)"
                )
        return "sigma^2 is the mean of the d - latent_dim smallest eigenvalues"

    return _run_check("pPCA noise variance", body)


def check_ppca_max_log_likelihood(fn: Callable[[torch.Tensor, int], Any]) -> bool:
    r"""Check ``fn(eigenvalues, latent_dim)``: pPCA's maximized log-likelihood per datum.

    At the maximum-likelihood fit (Tipping & Bishop 1999, eq. (4) with (7)
    and (8)) the model covariance has the data covariance's top ``D``
    eigenvalues and :math:`\hat\sigma^2` (the mean of the other ``d - D``) in
    the remaining directions, so the mean log-likelihood depends on the
    spectrum alone:

    .. math::

        \frac1N \sum_n \log p(x_n) = -\frac12\Big[d \log 2\pi
            + \sum_{j \le D} \log\lambda_j + (d - D)\log\hat\sigma^2 + d\Big].

    Compared with the exact log-likelihood of the fitted model
    (:class:`pyro_vae.exact.LinearGaussian`) on random data sets.

    Args:
        fn: The student's function: eigenvalues ``(d,)`` of the data covariance
            (divided by N), in decreasing order, and ``D``; returns a number.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    from .exact import LinearGaussian

    def body() -> str:
        generator = torch.Generator().manual_seed(8)
        for n, d, latent in ((200, 6, 2), (150, 5, 1), (300, 8, 4)):
            x = torch.randn(n, d, generator=generator, dtype=torch.float64)
            x = x @ torch.randn(d, d, generator=generator, dtype=torch.float64)
            mean = x.mean(0)
            _, s, vt = torch.linalg.svd(x - mean, full_matrices=False)
            eigenvalues = s**2 / n
            noise = eigenvalues[latent:].mean()
            weight = vt[:latent].T * (eigenvalues[:latent] - noise).sqrt()
            expected = LinearGaussian(weight, mean, float(noise.sqrt())).log_likelihood(x).mean()
            got = _as_float(fn(eigenvalues.clone(), latent), "the log-likelihood")
            if not math.isclose(got, float(expected), rel_tol=1e-6, abs_tol=1e-6):
                raise _Wrong(
                    f"d = {d}, D = {latent}: got {got:.5g}, expected {float(expected):.5g} nats"
                )
        return "the maximized pPCA log-likelihood needs only the top D eigenvalues and sigma^2"

    return _run_check("pPCA maximum log-likelihood", body)


# --- 08: a mixture's log density ----------------------------------------------------


def check_mixture_log_density(
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Any],
) -> bool:
    r"""Check ``fn(x, weights, means, scales)``: the log density of a diagonal Gaussian mixture.

    .. math::

        \log p(x) = \log \sum_{k=1}^K \pi_k \prod_j \mathcal N(x_j; m_{kj}, s_{kj}^2),

    with ``x`` ``(B, d)``, ``weights`` ``(K,)`` summing to 1, ``means`` and
    ``scales`` ``(K, d)``; the answer has shape ``(B,)``. Some points lie far
    from every component, where the densities underflow to 0 unless the sum is
    taken in log space (``torch.logsumexp``). Compared with
    :class:`torch.distributions.MixtureSameFamily`.

    Args:
        fn: The student's function.

    Returns:
        Whether the answer is right (a one-line verdict is printed).
    """
    import torch.distributions as td

    def body() -> str:
        generator = torch.Generator().manual_seed(5)
        k, d = 4, 3
        weights = torch.softmax(torch.randn(k, generator=generator, dtype=torch.float64), 0)
        means = 2 * torch.randn(k, d, generator=generator, dtype=torch.float64)
        scales = 0.3 + torch.rand(k, d, generator=generator, dtype=torch.float64)
        x = torch.randn(6, d, generator=generator, dtype=torch.float64)
        x[0] += 60.0  # far from every component: exp(log density) underflows
        mixture = td.MixtureSameFamily(
            td.Categorical(probs=weights), td.Independent(td.Normal(means, scales), 1)
        )
        _expect_close(fn(x, weights, means, scales), mixture.log_prob(x), "log p(x)")
        return "log p(x) = logsumexp_k(log pi_k + log N(x; m_k, diag s_k^2))"

    return _run_check("mixture log density", body)
