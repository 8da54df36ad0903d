"""Training by stochastic variational inference, with checkpoints and resume.

Each step minimizes a Pyro ELBO's ``differentiable_loss`` of
``(vae.model, vae.guide)`` on a minibatch, with the data plate scaled to the
full training set, using ``torch.optim.Adam`` on ``vae.parameters()`` (no
global param store). Each epoch records per-datum nats: the running train
ELBO, and the test ELBO with its two parts,
:math:`\\mathbb E_q[\\log p(x|z)]` and :math:`\\mathrm{KL}(q(z|x)\\|p(z))`.
The running train value is the objective's (β-weighted, free-bits clamped,
or the IWAE bound); the test numbers are always the plain ELBO. Each record
also holds ``beta``, the KL weight of that epoch
(:func:`~pyro_vae.objectives.kl_weight`: β after a linear warm-up), and
``kl_estimator`` (:func:`~pyro_vae.objectives.kl_estimator`), which reads
``"monte-carlo (fallback)"`` when ``elbo = "meanfield"`` found no closed-form
KL for the prior and guide.

After every epoch the checkpoint is written atomically; Ctrl-C stops at the
next step boundary, saves a mid-epoch checkpoint and raises
:class:`~pyro_vae.errors.TrainingInterrupted`. :func:`resume` continues and,
on the CPU, ends with the same parameters and metrics as an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pyro
import pyro.infer.util
import torch
from tqdm.auto import tqdm

from . import distributed
from .build import build_objective, build_vae, resolve
from .checkpoint import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    load_checkpoint,
    load_state,
    save_checkpoint,
    write_metrics,
)
from .config import Config
from .data import PreparedData, check_fits, load_dataset, prepare
from .errors import CheckpointError, ConfigError, NonFiniteLossError, TrainingInterrupted
from .model import VAE, kl_per_dim
from .objectives import kl_estimator, kl_weight
from .registry import LIKELIHOODS

#: ``on_step(epoch, step, loss)``: called after every optimizer step.
StepCallback = Callable[[int, int, float], None]


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Args:
        vae: The trained model (on the training device, in eval mode).
        config: The resolved config (binarization resolved too).
        history: One record per epoch, as in ``metrics.jsonl``.
        data: The prepared data.
    """

    vae: VAE
    config: Config
    history: list[dict[str, Any]]
    data: PreparedData


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a :class:`ConfigError` if CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use cpu")
    return device


def load_data(config: Config) -> PreparedData:
    """Load and binarize the data of ``config`` and check they fit its likelihood.

    Raises:
        DataError: data missing, non-finite, or outside the likelihood's support.
    """
    likelihood = config.model.likelihood.name
    support = LIKELIHOODS.get(likelihood).support
    dataset = load_dataset(config.data.name, config.data.data_dir, config.data.download)
    data = prepare(dataset, config.data.binarize, config.data.binarize_seed, support)
    for split, x in data.splits.items():
        check_fits(x, data.event_shape, support, likelihood, f"{data.name} {split}")
    return data


@torch.no_grad()
def evaluate_elbo(vae: VAE, x: torch.Tensor, batch_size: int = 1024) -> dict[str, Any]:
    """Per-datum mean ELBO, reconstruction and KL of ``x`` (one z draw per datum).

    Returns:
        ``{"elbo", "reconstruction", "kl"}`` in nats per datum, with
        ``elbo = reconstruction - kl``, and ``"kl_per_dim"`` (a list of ``D``
        floats, the mean closed-form KL of each latent dimension) where
        :func:`~pyro_vae.model.kl_per_dim` defines it, else ``None``.
    """
    rec_sum = kl_sum = 0.0
    per_dim: torch.Tensor | None = None
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        rec, kl = vae.elbo_terms(batch)
        rec_sum += float(rec.sum())
        kl_sum += float(kl.sum())
        dims = kl_per_dim(vae.posterior(batch), vae.prior())
        if dims is not None:
            per_dim = dims.sum(0) if per_dim is None else per_dim + dims.sum(0)
    rec_mean, kl_mean = rec_sum / len(x), kl_sum / len(x)
    return {
        "elbo": rec_mean - kl_mean,
        "reconstruction": rec_mean,
        "kl": kl_mean,
        "kl_per_dim": None if per_dim is None else (per_dim / len(x)).tolist(),
    }


def svi_step(
    vae: VAE,
    objective: Any,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    index: torch.Tensor | None,
    data_size: int | None,
) -> float:
    """One SVI step: the ELBO loss of the minibatch, its gradient, an optimizer step.

    The loss is :math:`-\\tfrac{N}{B}\\sum_{b} \\widehat{\\mathrm{ELBO}}(x_b)` (the data
    plate scaled to ``data_size``); a non-finite loss skips the update.

    Returns:
        The loss value (a float, NaN or infinite if the loss was).
    """
    loss = objective.differentiable_loss(vae.model, vae.guide, x, index, data_size)
    value = loss.item()
    if math.isfinite(value):
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return value


@contextmanager
def _sigint_flag() -> Iterator[dict[str, bool]]:
    """Turn Ctrl-C into a flag checked between steps (main thread only)."""
    flag = {"set": False}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        flag["set"] = True

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def fit(
    config: Config,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Train a VAE from scratch as ``config`` describes.

    Args:
        config: The run's config; validated and resolved first.
        out_dir: Run directory for ``config.toml``, ``checkpoint.pt`` and
            ``metrics.jsonl``; ``None`` keeps everything in memory.
        progress: Show a tqdm progress bar.
        log: Called with one line per epoch (e.g. ``print``).
        on_step: Called after every optimizer step.

    Raises:
        ConfigError, DataError: before training starts, for bad input.
        NonFiniteLossError: the loss became NaN or infinite.
        TrainingInterrupted: Ctrl-C; a checkpoint was saved first.
    """
    if config.train.method != "svi":
        raise ConfigError(
            f"train.method = {config.train.method!r} is trained by pyro_vae.fit_em "
            "(pyro-vae train --method variational-em); fit trains method 'svi'"
        )
    if out_dir is not None and (Path(out_dir) / CHECKPOINT_FILE).exists():
        raise ConfigError(
            f"{out_dir} already holds a run; use --resume {out_dir} or another --out directory"
        )
    return _Trainer(config, out_dir, None, progress, log, on_step).run()


def resume(
    out_dir: str | Path,
    *,
    epochs: int | None = None,
    device: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Continue the run in ``out_dir`` from its last checkpoint.

    Args:
        out_dir: A run directory written by :func:`fit`.
        epochs: A new total number of epochs (default: the run's own).
        device: Another device to continue on (default: the run's own).
        progress: Show a tqdm progress bar.
        log: Called with one line per epoch.
        on_step: Called after every optimizer step.
    """
    out_dir = Path(out_dir)
    if not (out_dir / CONFIG_FILE).exists():
        raise CheckpointError(f"cannot resume: no {CONFIG_FILE} in {out_dir}")
    config = Config.load(out_dir / CONFIG_FILE)
    changes = {k: v for k, v in (("epochs", epochs), ("device", device)) if v is not None}
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, **changes))
    state = load_checkpoint(out_dir)
    return _Trainer(config, out_dir, state, progress, log, on_step).run()


def _format_epoch(record: dict[str, Any]) -> str:
    beta = f"beta {record['beta']:.3g}  " if record.get("beta", 1.0) != 1.0 else ""
    fallback = record.get("kl_estimator") == "monte-carlo (fallback)"
    return (
        f"epoch {record['epoch']}  test ELBO {record['test_elbo']:.2f}  "
        f"(rec {record['test_reconstruction']:.2f}, KL {record['test_kl']:.2f})  {beta}"
        + ("train KL by Monte Carlo (no closed form)  " if fallback else "")
        + f"{record['seconds']:.1f} s"
    )


class _Trainer:
    """One training run; holds the loop's state so it can be checkpointed."""

    def __init__(
        self,
        config: Config,
        out_dir: str | Path | None,
        state: dict[str, Any] | None,
        progress: bool,
        log: Callable[[str], None] | None,
        on_step: StepCallback | None,
    ) -> None:
        self.config = resolve(config)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state = state
        self.progress = progress
        self.log = log
        self.on_step = on_step

    def run(self) -> TrainResult:
        # [distributed] join torchrun's process group (WORLD_SIZE > 1) for the run
        with distributed.process_group(resolve_device(self.config.train.device)):
            device = distributed.local_device(resolve_device(self.config.train.device))
            cuda = [device.index or 0] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                return self._run()

    def _run(self) -> TrainResult:
        cfg = self.config
        device = distributed.local_device(resolve_device(cfg.train.device))  # [distributed]
        main = distributed.is_main()  # [distributed] only rank 0 writes and prints
        torch.manual_seed(cfg.train.seed)
        with distributed.main_first():  # [distributed] rank 0 downloads first
            data = load_data(cfg)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, binarize=data.binarize))
        vae = build_vae(cfg.model, data.event_shape).to(device)
        optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr)
        objective = build_objective(cfg)
        generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
        train = data.train.to(device)
        evaluation = {s: x.to(device) for s, x in data.splits.items() if s != "train"}

        history: list[dict[str, Any]] = []
        epoch_done, step_done, perm, elbo_sum, seconds = 0, 0, None, 0.0, 0.0
        if self.state is not None:
            s = self.state
            if tuple(s["event_shape"]) != data.event_shape:
                raise CheckpointError(
                    f"checkpoint datum shape {tuple(s['event_shape'])} does not match "
                    f"the data's {data.event_shape}"
                )
            load_state(vae, s["model"], str(self._path(CHECKPOINT_FILE)))
            optimizer.load_state_dict(s["optimizer"])
            torch.set_rng_state(s["rng"]["torch"])
            if device.type == "cuda" and s["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(s["rng"]["cuda"], device)
            if s["rng"]["data_device"] == device.type:
                generator.set_state(s["rng"]["data"])
            epoch_done, step_done = int(s["epoch"]), int(s["step"])
            perm = s["perm"].to(device) if s["perm"] is not None else None
            elbo_sum, seconds, history = float(s["elbo_sum"]), float(s["seconds"]), s["history"]
        elif self.out_dir is not None and main:
            cfg.save(self._path(CONFIG_FILE))
        # [distributed] DDP over this rank's shard of each minibatch; None: one process
        ddp = None
        if distributed.is_distributed():
            ddp = distributed.DistributedSVI(vae, objective, device, cfg.train.seed)

        n, batch = len(train), cfg.train.batch_size
        steps = math.ceil(n / batch)
        total = cfg.train.epochs * steps
        bar = tqdm(
            total=total,
            initial=min(epoch_done * steps + step_done, total),
            disable=not (self.progress and main),
            unit="step",
            dynamic_ncols=True,
        )
        write = (bar.write if self.progress else self.log) if main else None

        def snapshot(epoch: int, step: int) -> dict[str, Any]:
            return {
                "config": cfg.to_dict(),
                "event_shape": list(data.event_shape),
                "model": vae.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "step": step,
                "perm": perm.cpu() if (perm is not None and step > 0) else None,
                "elbo_sum": elbo_sum,
                "seconds": seconds,
                "history": history,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "data": generator.get_state(),
                    "data_device": device.type,
                },
            }

        try:
            validate, first = pyro.infer.util.is_validation_enabled(), True
            with _sigint_flag() as interrupted:
                for epoch in range(epoch_done + 1, cfg.train.epochs + 1):
                    vae.train()
                    vae.kl_scale = kl_weight(cfg.train.beta, cfg.train.kl_warmup_epochs, epoch)
                    start = time.perf_counter()
                    if perm is None:
                        perm = torch.randperm(n, generator=generator, device=device)
                    for step in range(step_done, steps):
                        index = perm[step * batch : (step + 1) * batch]
                        x = train[index]
                        if data.dynamic:
                            x = torch.bernoulli(x, generator=generator)
                        # Validate the first step of a (re)start -- model/guide structure,
                        # distribution arguments -- then run the hot loop without it (the
                        # data were checked against the likelihood's support up front).
                        with pyro.validation_enabled(validate and first):
                            if ddp is None:
                                value = svi_step(vae, objective, optimizer, x, index, n)
                            else:  # [distributed] the global loss; was any rank interrupted
                                value, stop = ddp.step(
                                    optimizer, x, index, n, (epoch, step), interrupted["set"]
                                )
                        first = False
                        if not math.isfinite(value):
                            where = self._path(CHECKPOINT_FILE) if self.out_dir else "none"
                            raise NonFiniteLossError(
                                f"the loss became {value} at epoch {epoch}, step {step + 1}; "
                                f"training stopped (last good checkpoint: {where})"
                            )
                        elbo_sum -= value * len(index) / n
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, elbo=f"{-value / n:.2f}", refresh=False)
                        try:
                            if self.on_step is not None:
                                self.on_step(epoch, step + 1, value)
                        except KeyboardInterrupt:
                            interrupted["set"] = True
                        if (interrupted["set"] if ddp is None else stop) and step + 1 < steps:
                            seconds += time.perf_counter() - start
                            self._interrupt(snapshot(epoch - 1, step + 1), epoch, step + 1)
                    seconds += time.perf_counter() - start
                    record = self._epoch_record(vae, epoch, elbo_sum / n, evaluation, seconds)
                    record["beta"] = vae.kl_scale
                    record["kl_estimator"] = kl_estimator(objective)
                    history.append(record)
                    perm, step_done, elbo_sum, seconds = None, 0, 0.0, 0.0
                    if self.out_dir is not None and main:
                        write_metrics(self._path(METRICS_FILE), history)
                        save_checkpoint(self._path(CHECKPOINT_FILE), snapshot(epoch, 0))
                    if write is not None:
                        write(_format_epoch(record))
                    stop = distributed.any_rank(interrupted["set"])  # [distributed] all or none
                    if stop and epoch < cfg.train.epochs:
                        self._interrupt(None, epoch, 0)
        finally:
            bar.close()
        vae.kl_scale = 1.0  # β is a training setting; the returned model is the plain VAE
        return TrainResult(vae.eval(), cfg, history, data)

    def _epoch_record(
        self,
        vae: VAE,
        epoch: int,
        train_elbo: float,
        evaluation: dict[str, torch.Tensor],
        seconds: float,
    ) -> dict[str, Any]:
        vae.eval()
        record: dict[str, Any] = {"epoch": epoch, "train_elbo": train_elbo}
        for split in ("test", "valid"):
            if split in evaluation:
                # [distributed] each rank evaluates a shard; the means are all-reduced
                terms = distributed.sharded_mean(partial(evaluate_elbo, vae), evaluation[split])
                record[f"{split}_elbo"] = terms["elbo"]
                record[f"{split}_reconstruction"] = terms["reconstruction"]
                record[f"{split}_kl"] = terms["kl"]
                if split == "test" and terms["kl_per_dim"] is not None:
                    record["test_kl_per_dim"] = terms["kl_per_dim"]
        record["seconds"] = seconds
        return record

    def _path(self, name: str) -> Path:
        assert self.out_dir is not None
        return self.out_dir / name

    def _interrupt(self, state: dict[str, Any] | None, epoch: int, step: int) -> None:
        if self.out_dir is None:
            raise TrainingInterrupted(f"interrupted at epoch {epoch}, step {step}", None)
        if state is not None and distributed.is_main():
            save_checkpoint(self._path(CHECKPOINT_FILE), state)
        raise TrainingInterrupted(
            f"interrupted at epoch {epoch}, step {step}; checkpoint saved; "
            f"resume with: pyro-vae train --resume {self.out_dir}",
            str(self.out_dir),
        )
