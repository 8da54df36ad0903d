"""Variational EM with one q per datum, and amortized SVI beside it on the same budget.

Variational EM (Neal & Hinton 1998) maximizes the same ELBO as a VAE,

.. math::

    \\mathcal L(\\theta, \\{\\lambda_i\\}) = \\sum_{i=1}^N
        \\mathbb E_{q_{\\lambda_i}(z)}[\\log p_\\theta(x_i \\mid z)]
        - \\mathrm{KL}(q_{\\lambda_i}(z) \\,\\|\\, p(z)),

but with a separate :math:`q_{\\lambda_i} = \\mathcal N(\\mu_i,
\\mathrm{diag}\\,\\sigma_i^2)` for every training datum (the ``local`` guide)
instead of an encoder :math:`q_\\phi(z|x)`. On each minibatch:

* **E-step** -- ``e_steps`` Adam steps on the local parameters
  :math:`\\lambda_i` of the minibatch, :math:`\\theta` fixed;
* **M-step** -- one Adam step on the model parameters :math:`\\theta`
  (decoder and prior), :math:`q` fixed.

Beside it, :func:`fit_em` trains the amortized VAE (encoder and decoder
jointly, one SVI step per minibatch) from the same initial decoder, on the
same minibatches in the same order (the same data, the same number of epochs
and of :math:`\\theta` updates), and records both ELBOs on the full training
set after every epoch, with the seconds and gradient evaluations each method
spent, so the two views can be compared in one plot.

Memory: the local guide holds :math:`2ND` parameters and this module's
optimizer two moment estimates for each (:math:`6ND` floats in all, plus
:math:`N` step counts), growing linearly with the data size :math:`N`; an
encoder's size does not depend on :math:`N`. At :math:`D = 50`, 1500 digits
take 1.8 MB and 50 000 MNIST images 60 MB. Meant for small data.

References:
    Neal & Hinton (1998), "A view of the EM algorithm that justifies
    incremental, sparse, and other variants".
    Hoffman, Blei, Wang & Paisley (2013), "Stochastic variational inference".
    Cremer, Li & Duvenaud (2018), "Inference suboptimality in variational
    autoencoders".
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .build import build_objective, build_vae, resolve
from .checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    load_checkpoint,
    save_checkpoint,
    write_metrics,
)
from .config import ComponentConfig, Config
from .data import PreparedData
from .errors import ConfigError, NonFiniteLossError
from .guides import LocalGuide
from .model import VAE
from .registry import GUIDES
from .train import evaluate_elbo, load_data, resolve_device

#: Sub-directory of an EM run that holds the amortized comparison run.
AMORTIZED_DIR = "amortized"
#: Marks checkpoints written by :func:`fit_em` (they cannot be resumed).
WRITTEN_BY = "pyro_vae.em.fit_em"


class RowAdam:
    """Adam (Kingma & Ba 2015) for per-datum parameters: each row has its own state.

    ``step(index, grads)`` updates only the rows ``index`` and advances only
    their step counts, so a datum's parameters move exactly when the datum is
    in the minibatch (``torch.optim.Adam`` would keep moving every row with
    its momentum).

    Args:
        params: Tensors of shape ``(N, ...)``, updated in place.
        lr: Step size.
        betas: Decay rates of the first and second moment estimates.
        eps: Term added to the denominator.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
    ) -> None:
        self.params = list(params)
        self.lr, self.betas, self.eps = lr, betas, eps
        self.exp_avg = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p) for p in self.params]
        self.steps = torch.zeros(self.params[0].shape[0], device=self.params[0].device)

    @torch.no_grad()
    def step(self, index: torch.Tensor, grads: Sequence[torch.Tensor]) -> None:
        """One Adam step on the rows ``index`` (unique) with their gradients ``grads[j][b]``."""
        beta1, beta2 = self.betas
        self.steps[index] += 1
        t = self.steps[index]
        for p, m, v, g in zip(self.params, self.exp_avg, self.exp_avg_sq, grads, strict=True):
            shape = (-1,) + (1,) * (p.dim() - 1)
            m_rows = beta1 * m[index] + (1 - beta1) * g
            v_rows = beta2 * v[index] + (1 - beta2) * g * g
            m[index], v[index] = m_rows, v_rows
            m_hat = m_rows / (1 - beta1 ** t.view(shape))
            v_hat = v_rows / (1 - beta2 ** t.view(shape))
            p[index] -= self.lr * m_hat / (v_hat.sqrt() + self.eps)

    def state_dict(self) -> dict[str, Any]:
        """The moment estimates and step counts."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq, "steps": self.steps}


class VariationalEM:
    """E-steps and M-steps for a VAE whose guide is ``local``.

    The loss of a minibatch is the objective's
    ``differentiable_loss(vae.model, vae.guide, x, index, N)`` (a Pyro ELBO,
    data plate scaled to ``N``); each step differentiates it with respect to
    one group of parameters only.

    Args:
        vae: A VAE with a :class:`~pyro_vae.guides.LocalGuide`.
        objective: A Pyro ELBO (``differentiable_loss``).
        lr: Adam learning rate of :math:`\\theta` (decoder and prior).
        local_lr: Adam learning rate of the local parameters.
        data_size: ``N``.
    """

    def __init__(
        self, vae: VAE, objective: Any, lr: float, local_lr: float, data_size: int
    ) -> None:
        if not isinstance(vae.posterior, LocalGuide):
            raise ConfigError("variational EM needs the 'local' guide (one q per datum)")
        if vae.posterior.num_data != data_size:
            raise ConfigError(
                f"the local guide has {vae.posterior.num_data} parameter sets "
                f"but there are {data_size} training data"
            )
        self.vae = vae
        self.objective = objective
        self.data_size = data_size
        self.local = [vae.posterior.loc, vae.posterior.log_scale]
        local_ids = {id(p) for p in self.local}
        self.theta = [p for p in vae.parameters() if id(p) not in local_ids]
        self.optimizer = torch.optim.Adam(self.theta, lr=lr)
        self.local_optimizer = RowAdam(self.local, lr=local_lr)

    def loss(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """:math:`-\\tfrac NB \\sum_b \\widehat{\\mathrm{ELBO}}_b`, the minibatch loss."""
        return self.objective.differentiable_loss(
            self.vae.model, self.vae.guide, x, index, self.data_size
        )

    def e_step(self, x: torch.Tensor, index: torch.Tensor, steps: int = 1) -> float:
        """``steps`` updates of :math:`\\lambda_i`, ``i`` in ``index``, with :math:`\\theta` fixed.

        Returns:
            The loss before the last update.
        """
        value = math.nan
        for _ in range(steps):
            loss = self.loss(x, index)
            value = _finite(loss)
            grads = torch.autograd.grad(loss, self.local)
            self.local_optimizer.step(index, [g[index] for g in grads])
        return value

    def m_step(self, x: torch.Tensor, index: torch.Tensor) -> float:
        """One update of :math:`\\theta` with the :math:`q_i` fixed; returns the loss."""
        loss = self.loss(x, index)
        value = _finite(loss)
        grads = torch.autograd.grad(loss, self.theta, allow_unused=True)
        for p, g in zip(self.theta, grads, strict=True):
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return value


def _finite(loss: torch.Tensor) -> float:
    value = loss.detach().item()
    if not math.isfinite(value):
        raise NonFiniteLossError(f"the loss became {value}; training stopped")
    return value


@torch.no_grad()
def train_elbo(vae: VAE, x: torch.Tensor, batch_size: int = 1024) -> float:
    """Mean ELBO over the training data ``x`` (nats per datum), one z draw per datum.

    Uses :meth:`~pyro_vae.model.VAE.elbo_terms` (the KL in closed form where
    registered). Non-amortized guides get the positions ``0..N-1`` as index.
    """
    total = 0.0
    local = not vae.posterior.amortized
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        index = torch.arange(start, start + len(batch), device=x.device) if local else None
        reconstruction, kl = vae.elbo_terms(batch, index)
        total += float((reconstruction - kl).sum())
    return total / len(x)


@dataclass
class EMResult:
    """What :func:`fit_em` returns.

    Args:
        vae: The model trained by variational EM (``local`` guide), in eval mode.
        config: Its resolved config.
        history: One record per epoch (as in ``metrics.jsonl``).
        data: The prepared data.
        amortized: The amortized VAE trained beside it (``None`` without ``compare``).
        amortized_config: Its config.
        amortized_history: Its records in :func:`pyro_vae.train.fit`'s format.
    """

    vae: VAE
    config: Config
    history: list[dict[str, Any]]
    data: PreparedData
    amortized: VAE | None = None
    amortized_config: Config | None = None
    amortized_history: list[dict[str, Any]] | None = None

    def summary(self) -> str:
        """One line: both training-set ELBOs at the first and the last epoch."""
        if not self.history:
            return "no epochs run"
        first, last = self.history[0], self.history[-1]
        line = (
            f"train ELBO, variational EM: {first['em_train_elbo']:.2f} (epoch {first['epoch']}) "
            f"-> {last['em_train_elbo']:.2f} (epoch {last['epoch']})"
        )
        if "amortized_train_elbo" in last:
            line += (
                f"; amortized SVI: {first['amortized_train_elbo']:.2f} -> "
                f"{last['amortized_train_elbo']:.2f} nats per datum"
            )
        return line


def _amortized_guide(config: Config) -> ComponentConfig:
    """The run's guide if amortized, else ``mean-field``."""
    guide = config.model.guide
    if getattr(GUIDES.get(guide.name), "amortized", True):
        return guide
    return ComponentConfig("mean-field")


def fit_em(
    config: Config,
    out_dir: str | Path | None = None,
    *,
    e_steps: int = 5,
    local_lr: float = 0.05,
    compare: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> EMResult:
    """Train by variational EM (and, with ``compare``, amortized SVI beside it).

    The EM model is ``config``'s model with the guide replaced by
    ``local`` (``num_data`` = the training set size). The amortized model
    keeps ``config``'s guide (``mean-field`` if that is ``local``) and starts
    from the same decoder and prior parameters. Both see the same minibatches
    in the same order (``train.seed``, ``train.batch_size``,
    ``train.epochs``); per minibatch EM takes ``e_steps`` local steps and one
    :math:`\\theta` step, SVI one joint step.

    A local :math:`q_i` belongs to one fixed datum, so data that would be
    binarized afresh at every batch (``binarize = "dynamic"``) are binarized
    once instead (``static``, with ``data.binarize_seed``), for both methods.

    ``metrics.jsonl`` holds one record per epoch: ``epoch``, ``train_elbo``
    (EM's running minibatch ELBO), ``em_train_elbo`` and
    ``amortized_train_elbo`` (both models' ELBO on the whole training set,
    same estimator), ``amortized_test_elbo`` (where a test split exists),
    ``em_seconds``/``amortized_seconds`` and
    ``em_gradient_steps``/``amortized_gradient_steps`` (cumulative).

    Args:
        config: The run config (``train.method`` is set to ``variational-em``).
        out_dir: Run directory: ``config.toml``, ``checkpoint.pt`` and
            ``metrics.jsonl`` of the EM model, and ``amortized/`` with the
            amortized run (its own ``config.toml``, ``checkpoint.pt``,
            ``metrics.jsonl``); both load with :func:`pyro_vae.load` and
            evaluate with ``pyro-vae evaluate``. ``None``: in memory only.
        e_steps: Local (E-step) updates per minibatch.
        local_lr: Adam learning rate of the local parameters.
        compare: Also train the amortized model.
        progress: Show a progress bar.
        log: Called with one line per epoch.

    Raises:
        ConfigError, DataError: bad input, before training starts.
        NonFiniteLossError: a loss became NaN or infinite.
    """
    if e_steps < 1:
        raise ConfigError(f"e_steps must be >= 1, got {e_steps}")
    if not local_lr > 0:
        raise ConfigError(f"local_lr must be > 0, got {local_lr}")
    out = Path(out_dir) if out_dir is not None else None
    if out is not None and (out / CHECKPOINT_FILE).exists():
        raise ConfigError(f"{out} already holds a run; use another --out directory")
    cfg = resolve(config)
    device = resolve_device(cfg.train.device)
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(cfg.train.seed)
        return _fit_em(cfg, out, device, e_steps, local_lr, compare, progress, log)


def _fit_em(
    cfg: Config,
    out: Path | None,
    device: torch.device,
    e_steps: int,
    local_lr: float,
    compare: bool,
    progress: bool,
    log: Callable[[str], None] | None,
) -> EMResult:
    data = load_data(cfg)
    if data.dynamic:
        # a local q_i belongs to one fixed datum: binarize once (the same data for both methods)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, binarize="static"))
        data = load_data(cfg)
    n = len(data.train)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, binarize=data.binarize))
    local_guide = ComponentConfig("local", {"num_data": n})
    em_cfg = resolve(
        dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, guide=local_guide),
            train=dataclasses.replace(cfg.train, method="variational-em"),
        )
    )
    svi_cfg = resolve(
        dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, guide=_amortized_guide(cfg)),
            train=dataclasses.replace(cfg.train, method="svi"),
        )
    )
    em_vae = build_vae(em_cfg.model, data.event_shape).to(device)
    em = VariationalEM(em_vae, build_objective(em_cfg), cfg.train.lr, local_lr, n)
    svi_vae = svi_optimizer = svi_objective = None
    if compare:
        svi_vae = build_vae(svi_cfg.model, data.event_shape).to(device)
        svi_vae.likelihood.load_state_dict(em_vae.likelihood.state_dict())
        svi_vae.prior.load_state_dict(em_vae.prior.state_dict())
        svi_optimizer = torch.optim.Adam(svi_vae.parameters(), lr=cfg.train.lr)
        svi_objective = build_objective(svi_cfg)
    if out is not None:
        em_cfg.save(out / CONFIG_FILE)
        if compare:
            svi_cfg.save(out / AMORTIZED_DIR / CONFIG_FILE)

    generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
    train = data.train.to(device)
    train_eval = data.splits["train"].to(device)
    test = data.splits["test"].to(device) if "test" in data.splits else None
    batch = cfg.train.batch_size
    steps_per_epoch = math.ceil(n / batch)
    history: list[dict[str, Any]] = []
    svi_history: list[dict[str, Any]] = []
    em_seconds = svi_seconds = 0.0
    em_steps = svi_steps = 0
    bar = tqdm(
        total=cfg.train.epochs * steps_per_epoch,
        disable=not progress,
        unit="step",
        dynamic_ncols=True,
    )
    write = bar.write if progress else log
    try:
        for epoch in range(1, cfg.train.epochs + 1):
            em_vae.train()
            if svi_vae is not None:
                svi_vae.train()
            perm = torch.randperm(n, generator=generator, device=device)
            em_sum = svi_sum = 0.0
            svi_epoch_seconds = 0.0
            for step in range(steps_per_epoch):
                index = perm[step * batch : (step + 1) * batch]
                x = train[index]
                if data.dynamic:
                    x = torch.bernoulli(x, generator=generator)
                start = time.perf_counter()
                em.e_step(x, index, e_steps)
                value = em.m_step(x, index)
                em_seconds += time.perf_counter() - start
                em_steps += e_steps + 1
                em_sum -= value * len(index) / n
                if svi_vae is not None:
                    assert svi_optimizer is not None and svi_objective is not None
                    start = time.perf_counter()
                    loss = svi_objective.differentiable_loss(
                        svi_vae.model, svi_vae.guide, x, index, n
                    )
                    svi_value = _finite(loss)
                    svi_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    svi_optimizer.step()
                    elapsed = time.perf_counter() - start
                    svi_seconds += elapsed
                    svi_epoch_seconds += elapsed
                    svi_steps += 1
                    svi_sum -= svi_value * len(index) / n
                bar.update(1)
                bar.set_postfix(epoch=epoch, elbo=f"{-value / n:.2f}", refresh=False)
            em_vae.eval()
            record: dict[str, Any] = {
                "epoch": epoch,
                "train_elbo": em_sum / n,
                "em_train_elbo": train_elbo(em_vae, train_eval),
                "em_seconds": em_seconds,
                "em_gradient_steps": em_steps,
            }
            if svi_vae is not None:
                svi_vae.eval()
                record["amortized_train_elbo"] = train_elbo(svi_vae, train_eval)
                svi_record: dict[str, Any] = {"epoch": epoch, "train_elbo": svi_sum / n}
                if test is not None:
                    terms = evaluate_elbo(svi_vae, test)
                    record["amortized_test_elbo"] = terms["elbo"]
                    svi_record.update(
                        test_elbo=terms["elbo"],
                        test_reconstruction=terms["reconstruction"],
                        test_kl=terms["kl"],
                    )
                svi_record["seconds"] = svi_epoch_seconds
                svi_history.append(svi_record)
                record["amortized_seconds"] = svi_seconds
                record["amortized_gradient_steps"] = svi_steps
            history.append(record)
            if out is not None:
                _save(out, em_cfg, em_vae, data, epoch, history, em.local_optimizer.state_dict())
                if svi_vae is not None:
                    _save(out / AMORTIZED_DIR, svi_cfg, svi_vae, data, epoch, svi_history, None)
            if write is not None:
                write(_format_epoch(record))
    finally:
        bar.close()
    return EMResult(
        em_vae.eval(),
        em_cfg,
        history,
        data,
        None if svi_vae is None else svi_vae.eval(),
        svi_cfg if compare else None,
        svi_history if compare else None,
    )


def _save(
    out: Path,
    cfg: Config,
    vae: VAE,
    data: PreparedData,
    epoch: int,
    history: list[dict[str, Any]],
    local_state: dict[str, Any] | None,
) -> None:
    state = {
        "config": cfg.to_dict(),
        "event_shape": list(data.event_shape),
        "model": vae.state_dict(),
        "epoch": epoch,
        "history": history,
        "written_by": WRITTEN_BY,
    }
    if local_state is not None:
        state["local_optimizer"] = local_state
    write_metrics(out / METRICS_FILE, history)
    save_checkpoint(out / CHECKPOINT_FILE, state)


def _format_epoch(record: dict[str, Any]) -> str:
    line = f"epoch {record['epoch']}  train ELBO: EM {record['em_train_elbo']:.2f}"
    if "amortized_train_elbo" in record:
        line += f", amortized {record['amortized_train_elbo']:.2f}"
        line += f"  ({record['em_seconds']:.1f} s vs {record['amortized_seconds']:.1f} s)"
    return line


def check_resumable(run_dir: str | Path) -> None:
    """Raise a one-line :class:`ConfigError` if ``run_dir`` was written by :func:`fit_em`.

    Variational-EM runs (and their ``amortized/`` comparison) keep no
    optimizer or RNG state for :func:`pyro_vae.train.resume`; train a new run
    with more epochs instead.
    """
    if (Path(run_dir) / CHECKPOINT_FILE).exists():
        state = load_checkpoint(run_dir)
        if state.get("written_by") == WRITTEN_BY:
            raise ConfigError(
                f"{run_dir} was written by --method variational-em and cannot be resumed; "
                "start a new run with more --epochs"
            )
