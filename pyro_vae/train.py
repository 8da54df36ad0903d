"""The one trainer: epochs, steps, checkpoints, resume, metrics; methods plug in as step strategies.

:class:`Trainer` alone owns the loop: the minibatch order, the β schedule
(:func:`~pyro_vae.objectives.kl_weight`: β after a linear warm-up, passed to
the model as ``kl_scale``), progress, Ctrl-C, atomic checkpoints, resume,
the epoch records, the non-finite-loss policy and the data-parallel hooks.
What one step on a minibatch does is a *step strategy* (:class:`StepStrategy`)
looked up by ``train.method`` in :data:`~pyro_vae.registry.METHODS`:

* ``svi`` -- :class:`SVIStep`: one Adam step on every parameter against a
  Pyro ELBO's ``differentiable_loss`` (:class:`DataParallelSVIStep` under
  ``torchrun``, :mod:`pyro_vae.distributed`);
* ``variational-em`` -- :class:`VariationalEMStep` (:mod:`pyro_vae.em`): E-steps on
  per-datum q, then one M-step on the model.

Each epoch records per-datum nats: the running train objective
(``train_elbo``: β-weighted, free-bits clamped, or the IWAE bound), the plain
ELBO with its two parts on the evaluation splits (``test_*``, ``valid_*``
for an amortized guide; ``train_set_*``, the whole training set, for a
per-datum guide), ``test_kl_per_dim`` where closed-form, ``beta``,
``kl_estimator`` (:func:`~pyro_vae.objectives.kl_estimator`),
``gradient_steps`` (cumulative) and ``seconds``.

Each record also keeps ``step_losses``, the loss of every step of the epoch
(nats per datum, the minibatch's negative objective), so the run directory
holds the per-step curve without a file of its own; every
``train.image_every`` epochs (and at the last) the trainer keeps decoded prior
samples from fixed noise in ``snapshots/`` (:func:`read_snapshots`).

Messages (one line per epoch, early stopping, debug details) go to the
``pyro_vae.train`` logger; nothing is printed unless the caller configures
logging (the CLI does) or passes ``log``. Callbacks (:class:`Callback`) see
every epoch record and, optionally, every step.

After every epoch the checkpoint (one layout for every method) is written
atomically; Ctrl-C stops at the next step boundary, saves a mid-epoch
checkpoint and raises :class:`~pyro_vae.errors.TrainingInterrupted`.
:func:`resume` continues and, on the CPU, ends with the same parameters and
metrics as an uninterrupted run, for every method.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import re
import signal
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import pyro
import pyro.infer.util
import torch
from tqdm.auto import tqdm

from . import distributed
from .build import build_objective, build_vae, method_options, resolve
from .checkpoint import (
    BEST_FILE,
    CHECKPOINT_FILE,
    CONFIG_FILE,
    METRICS_FILE,
    load_checkpoint,
    load_state,
    save_checkpoint,
    write_metrics,
)
from .config import ComponentConfig, Config, ModelConfig, TrainConfig
from .data import (
    IN_MEMORY,
    Dataset,
    PreparedData,
    check_fits,
    load_dataset,
    prepare,
    resolve_binarize,
)
from .elbo import evaluate_elbo
from .environment import environment
from .errors import (
    CheckpointError,
    ConfigError,
    NonFiniteLossError,
    NonFiniteStartError,
    TrainingInterrupted,
)
from .files import atomic_write_bytes, remove_stale_temporaries, run_lock
from .model import VAE
from .objectives import kl_estimator, kl_weight
from .registry import LIKELIHOODS, METHODS

logger = logging.getLogger(__name__)

#: ``on_step(epoch, step, loss)``: called after every optimizer step.
StepCallback = Callable[[int, int, float], None]


class Callback(Protocol):
    """What ``fit(..., callbacks=[...])`` calls: the hook for W&B, MLflow and the like.

    Only :meth:`on_epoch_end` is required. The trainer also calls these
    methods where a callback has them (on the writing rank only):

    * ``on_train_begin(trainer)``: before the first step of this session,
      with the :class:`Trainer` (``config``, ``vae``, ``data``, ``out_dir``,
      ``steps_per_epoch``, ``start_step``: steps done before this session);
    * ``on_step_end(step, values)``: after every step; ``step`` counts the
      steps of the whole run from 1, ``values`` holds ``epoch``, ``loss``
      (nats per datum) and ``grad_norm`` (the gradient's global 2-norm before
      clipping) where measured;
    * ``on_train_end(trainer)``: when this session ends, also by an error or
      an interrupt.

    A callback with ``needs_grad_norm = True`` asks the step strategy to
    measure the gradient norm at every step (SVI measures it; it costs a few
    norms per step, so only then).
    """

    def on_epoch_end(self, record: dict[str, Any], vae: VAE) -> None:
        """Called after each epoch with its metrics record (as in ``metrics.jsonl``)."""


@dataclass
class TrainResult:
    """What :func:`fit` returns.

    Args:
        vae: The trained model (on the training device, in eval mode).
        config: The resolved config (binarization resolved too).
        history: One record per epoch, as in ``metrics.jsonl``.
        data: The prepared data.
        epochs_run: Epochs this call trained (0: a resumed run was already done).
        best: ``{"epoch", "valid_elbo"}`` of the best validation ELBO so far
            (the weights in ``best.pt``), or ``None`` without a ``valid`` split.
        stopped_early: The epoch at which early stopping ended the run, else ``None``.
    """

    vae: VAE
    config: Config
    history: list[dict[str, Any]]
    data: PreparedData
    epochs_run: int = 0
    best: dict[str, Any] | None = None
    stopped_early: int | None = None


def resolve_device(name: str) -> torch.device:
    """``torch.device(name)``, or a :class:`ConfigError` if CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device is {name!r} but CUDA is not available; use cpu")
    return device


def load_data(config: Config, fixed: bool = False) -> PreparedData:
    """Load and binarize the data of ``config`` and check they fit its likelihood.

    Args:
        config: The run's config (``[data]`` and the likelihood's support).
        fixed: Binarize once (``static``) where ``[data]`` asks for ``dynamic``
            binarization, for methods whose parameters belong to fixed data.

    Raises:
        DataError: data missing, non-finite, or outside the likelihood's support.
    """
    likelihood = config.model.likelihood.name
    support = LIKELIHOODS.get(likelihood).support
    dataset = load_dataset(
        config.data.name,
        config.data.data_dir,
        config.data.download,
        image_size=config.data.image_size,
        channels=config.data.channels,
    )
    mode = config.data.binarize
    if fixed and resolve_binarize(mode, dataset.splits["train"], support) == "dynamic":
        mode = "static"
    data = prepare(dataset, mode, config.data.binarize_seed, support)
    for split, x in data.splits.items():
        check_fits(x, data.event_shape, support, likelihood, f"{data.name} {split}")
    return data


# --- step strategies ------------------------------------------------------------------


class StepStrategy:
    """How one minibatch updates the model; the :class:`Trainer` owns everything else.

    A strategy is registered by name in :data:`~pyro_vae.registry.METHODS`;
    its ``from_config`` keywords after the context are ``[train]`` keys it takes.

    Class attributes declare what it honours (the trainer refuses the rest
    with one line before any work): ``needs_amortized_guide`` /
    ``needs_local_guide``, ``objectives`` (``None``: any), ``free_bits``.
    """

    needs_local_guide: bool = False
    objectives: tuple[str, ...] | None = None
    free_bits: bool = True
    #: Gradient evaluations per :meth:`step` (for the records).
    gradients_per_step: int = 1
    #: The method's parameters belong to fixed training data: no dynamic binarization.
    fixed_data: bool = False
    #: ``pyro-vae train`` also trains an amortized VAE beside it on the same budget
    #: (:func:`pyro_vae.em.fit_em`), for the comparison the method exists to show.
    compare_with_amortized: bool = False
    #: It clips the gradient norm to ``train.clip_norm``.
    clips_gradients: bool = False
    #: Set by the trainer when a callback wants :attr:`grad_norm` at every step.
    track_grad_norm: bool = False
    #: The last step's global gradient 2-norm before clipping (a 0-dim tensor), or
    #: ``None`` where not measured (a strategy that does not, or nobody asked).
    grad_norm: torch.Tensor | None = None

    @classmethod
    def configure(cls, config: Config) -> Config:
        """The config this method trains, with ``config`` as the user gave it (default: as is)."""
        return config

    @classmethod
    def check(cls, config: Config) -> None:
        """Raise a one-line :class:`ConfigError` for a setting this method cannot honour."""
        method = config.train.method
        if cls.objectives is not None and config.train.elbo not in cls.objectives:
            raise ConfigError(
                f"train.elbo = {config.train.elbo!r} does not apply to method {method!r}; "
                f"valid: {', '.join(cls.objectives)}"
            )
        if not cls.clips_gradients and config.train.clip_norm != 0:
            raise ConfigError(
                f"train.clip_norm does not apply to method {method!r}; use method svi "
                "or clip_norm = 0"
            )
        if not cls.free_bits and config.train.free_bits != 0:
            raise ConfigError(
                f"train.free_bits does not apply to method {method!r} (its E-step maximizes "
                "the plain β-weighted ELBO per datum); use method svi or free_bits = 0"
            )

    def step(self, x: torch.Tensor, index: torch.Tensor, data_size: int, kl_scale: float) -> float:
        """One update on the minibatch ``x`` (positions ``index``); returns the loss.

        A non-finite loss must leave the parameters unchanged (the trainer then stops).
        """
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state to checkpoint."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        raise NotImplementedError


@METHODS.register("svi")
class SVIStep(StepStrategy):
    """Stochastic variational inference: one Adam step on all parameters per minibatch.

    The loss is :math:`-\\tfrac{N}{B}\\sum_{b} \\widehat{\\mathrm{ELBO}}_\\beta(x_b)`, a Pyro
    ELBO's ``differentiable_loss`` of ``(vae.model, vae.guide)`` with the data
    plate scaled to ``N``; a non-finite loss skips the update.

    Args:
        vae: The model.
        objective: A Pyro ELBO.
        lr: Adam's learning rate.
        clip_norm: Clip the gradient's global 2-norm to this before the update (0: never).
    """

    clips_gradients = True

    def __init__(self, vae: VAE, objective: Any, lr: float, clip_norm: float = 0.0) -> None:
        self.vae = vae
        self.objective = objective
        self.optimizer = torch.optim.Adam(vae.parameters(), lr=lr)
        self.clip_norm = clip_norm

    @classmethod
    def from_config(cls, vae: VAE, objective: Any, train: TrainConfig) -> StepStrategy:
        """SVI, or data-parallel SVI in a ``torchrun`` process group."""
        if distributed.is_distributed():
            return DataParallelSVIStep(vae, objective, train.lr, train.seed, train.clip_norm)
        return cls(vae, objective, train.lr, train.clip_norm)

    def step(self, x: torch.Tensor, index: torch.Tensor, data_size: int, kl_scale: float) -> float:
        """One SVI step (see the class docstring)."""
        loss = self.objective.differentiable_loss(
            self.vae.model, self.vae.guide, x, index, data_size, kl_scale
        )
        value = loss.item()
        if math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip_norm > 0:  # returns the norm before clipping: measured for free
                self.grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.vae.parameters(), self.clip_norm
                )
            elif self.track_grad_norm:
                self.grad_norm = total_grad_norm(self.vae.parameters())
            self.optimizer.step()
        return value

    def state_dict(self) -> dict[str, Any]:
        """``{"optimizer": Adam's state}``."""
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore Adam's state."""
        self.optimizer.load_state_dict(state["optimizer"])


class DataParallelSVIStep(SVIStep):
    """:class:`SVIStep` on this rank's shard of each global minibatch, gradients averaged by DDP.

    See :class:`~pyro_vae.distributed.DistributedSVI`. The trainer passes the
    position ``(epoch, step)`` and the Ctrl-C flag through
    :meth:`set_position`; :attr:`stop` tells whether any rank asked to stop.
    """

    def __init__(
        self, vae: VAE, objective: Any, lr: float, seed: int, clip_norm: float = 0.0
    ) -> None:
        super().__init__(vae, objective, lr, clip_norm)
        self.ddp = distributed.DistributedSVI(vae, objective, next(_devices(vae)), seed)
        self.position = (0, 0)
        self.interrupted = False
        self.stop = False

    def set_position(self, epoch: int, step: int, interrupted: bool) -> None:
        """The step about to run and whether this rank was interrupted."""
        self.position, self.interrupted = (epoch, step), interrupted

    def step(self, x: torch.Tensor, index: torch.Tensor, data_size: int, kl_scale: float) -> float:
        """One data-parallel step; the global loss, the same on every rank."""
        value, self.stop = self.ddp.step(
            self.optimizer, x, index, data_size, self.position, self.interrupted, kl_scale,
            self.clip_norm,
        )  # fmt: skip
        return value


def _devices(vae: VAE) -> Iterator[torch.device]:
    for p in vae.parameters():
        yield p.device
    yield torch.device("cpu")


def total_grad_norm(parameters: Iterator[torch.nn.Parameter]) -> torch.Tensor:
    """The global 2-norm of the parameters' gradients (a 0-dim tensor; 0 without any)."""
    norms = [torch.linalg.vector_norm(p.grad) for p in parameters if p.grad is not None]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(norms))


# --- image snapshots ---------------------------------------------------------------------

#: Folder of the run directory with the prior-sample snapshots of ``train.image_every``.
SNAPSHOT_DIR = "snapshots"
#: Prior samples kept per snapshot.
SNAPSHOT_SAMPLES = 10
#: Seed of the snapshots' noise: the same z at every epoch (and in every run on one device).
SNAPSHOT_SEED = 0
_SNAPSHOT_NAME = re.compile(r"samples-(\d+)\.pt")


def images_due(train: TrainConfig, epoch: int) -> bool:
    """Whether ``epoch`` has images: every ``train.image_every`` epochs, and the last (0: none)."""
    every = train.image_every
    return every > 0 and (epoch % every == 0 or epoch == train.epochs)


@torch.no_grad()
def prior_samples(vae: VAE, n: int, seed: int = SNAPSHOT_SEED) -> torch.Tensor:
    """Decode ``n`` draws :math:`z \\sim p(z)` from a fixed seed to the means of :math:`p(x|z)`.

    The global random states (the CPU's and the model's CUDA device's) are
    left as they were, so calling this during training changes nothing.

    Returns:
        ``(n, *event_shape)``, on the CPU.
    """
    device = next(_devices(vae))
    cuda = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.random.default_generator.manual_seed(seed)
        if cuda:
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        return vae.decode(vae.prior().sample((n,))).cpu()


def read_snapshots(
    run_dir: str | os.PathLike[str], last_epoch: int | None = None
) -> list[tuple[int, torch.Tensor]]:
    """The prior-sample snapshots of a run, ``[(epoch, images (n, *event_shape)), ...]`` by epoch.

    Every snapshot decodes the same noise (:data:`SNAPSHOT_SEED`), so the rows
    compare across epochs. Empty for a run trained with ``train.image_every = 0``
    or by a version that kept none.

    Args:
        run_dir: The run directory.
        last_epoch: Leave out snapshots after this epoch (e.g. the last recorded one).

    Raises:
        CheckpointError: a snapshot file cannot be read.
    """
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in sorted(folder.glob("samples-*.pt")):
        match = _SNAPSHOT_NAME.fullmatch(path.name)
        if match is None or (last_epoch is not None and int(match[1]) > last_epoch):
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            found.append((int(state["epoch"]), state["images"].float()))
        except Exception as e:  # damaged: one line, never unpickled as code
            raise CheckpointError(f"cannot read the snapshot {path}: {e}") from None
    return sorted(found, key=lambda item: item[0])


# --- schedules and model selection -------------------------------------------------------


def make_scheduler(train: TrainConfig, strategy: StepStrategy) -> Any:
    r"""The learning-rate schedule ``train.lr_schedule`` over the strategy's optimizer, or ``None``.

    ``exponential``: :math:`\eta_e = \max(\eta_0 \gamma^{e}, \eta_{\min})` after epoch
    ``e``, with :math:`\eta_0` the optimizer's learning rate now; ``plateau``:
    PyTorch's ``ReduceLROnPlateau`` on the validation ELBO (mode ``max``), its
    patience ``lr_patience`` epochs in evaluations.
    """
    if train.lr_schedule == "none":
        return None
    optimizer = getattr(strategy, "optimizer", None)
    if optimizer is None:
        raise ConfigError(
            f"train.lr_schedule does not apply to method {train.method!r} (no optimizer to "
            "schedule); use lr_schedule = 'none'"
        )
    if train.lr_schedule == "exponential":
        floor, gamma = train.lr_min / optimizer.param_groups[0]["lr"], train.lr_gamma
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: max(gamma**e, floor))
    return torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer,
        mode="max",
        factor=train.lr_gamma,
        patience=math.ceil(train.lr_patience / train.eval_every),
        min_lr=train.lr_min,
    )


def step_schedule(scheduler: Any, train: TrainConfig, epoch: int, valid: float | None) -> None:
    """Advance the schedule after ``epoch``; ``plateau`` only on validated epochs after warm-up."""
    if scheduler is None:
        return
    if train.lr_schedule == "exponential":
        scheduler.step()
    elif valid is not None and epoch > train.kl_warmup_epochs:
        scheduler.step(valid)


def _stops_early(
    epoch: int, best: Mapping[str, Any] | None, train: TrainConfig, since: int = 1
) -> bool:
    """Whether ``early_stopping_patience`` epochs passed without a better validation ELBO.

    Epochs are counted from the best one, from the end of the KL warm-up (the
    objective changes until then), or from the epoch selection started
    (``since``: a run of an earlier version resumed), whichever is latest.
    """
    patience = train.early_stopping_patience
    if patience <= 0:
        return False
    anchor = max(best["epoch"] if best is not None else since - 1, train.kl_warmup_epochs)
    return epoch - anchor >= patience


def _early_stop_line(epoch: int, best: Mapping[str, Any] | None, train: TrainConfig) -> str:
    at = f"; best valid ELBO {best['valid_elbo']:.2f} at epoch {best['epoch']}" if best else ""
    return (
        f"early stop at epoch {epoch}: no better validation ELBO for "
        f"{train.early_stopping_patience} epochs{at} (weights in {BEST_FILE})"
    )


def _public(best: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return dict(best) if best is not None else None


def best_state(state: Mapping[str, Any]) -> dict[str, Any]:
    """What ``best.pt`` keeps of a checkpoint: the weights and what loading them needs."""
    keys = ("config", "event_shape", "num_data", "data_sha256", "method", "model", "epoch")
    keys += ("environment",)
    return {**{k: state[k] for k in keys}, "valid_elbo": state["best"]["valid_elbo"]}


# --- the trainer -------------------------------------------------------------------------


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


def _format_epoch(record: dict[str, Any]) -> str:
    beta = f"beta {record['beta']:.3g}  " if record.get("beta", 1.0) != 1.0 else ""
    fallback = record.get("kl_estimator") == "monte-carlo (fallback)"
    split = "test" if "test_elbo" in record else "train_set" if "train_set_elbo" in record else None
    label = {"test": "test ELBO", "train_set": "train-set ELBO"}.get(split or "", "")
    terms = (
        f"{label} {record[f'{split}_elbo']:.2f}  (rec {record[f'{split}_reconstruction']:.2f}, "
        f"KL {record[f'{split}_kl']:.2f})  "
        if split
        else f"train objective {record['train_elbo']:.2f}  "
    )
    return (
        f"epoch {record['epoch']}  {terms}{beta}"
        + ("train KL by Monte Carlo (no closed form)  " if fallback else "")
        + f"{record['seconds']:.1f} s"
    )


class Trainer:
    """One training run of ``vae`` on ``data``; holds the loop's state so it can be checkpointed.

    Args:
        config: The run's resolved config (``train`` drives the loop).
        vae: The model, on the training device.
        data: The prepared data.
        out_dir: Run directory, or ``None`` to keep everything in memory.
        state: A checkpoint to continue from (:func:`resume`).
        progress: Show a tqdm progress bar.
        log: Called with every message (one line per epoch, early stopping), besides
            the ``pyro_vae.train`` logger.
        on_step: Called after every step with ``(epoch, step, loss)``.
        callbacks: Objects with ``on_epoch_end(record, vae)`` and optionally the
            other hooks of :class:`Callback`.
        evaluate_splits: Splits whose ELBO each record holds (default: ``test``
            and ``valid`` for an amortized guide, the training set for a per-datum one).
        config_changed: A resumed run's ``config.toml`` changes (written with the
            next checkpoint).

    While :meth:`run` runs, ``steps_per_epoch`` and ``start_step`` (the steps
    done before this session) tell callbacks where the run is.
    """

    def __init__(
        self,
        config: Config,
        vae: VAE,
        data: PreparedData,
        out_dir: str | Path | None = None,
        state: Mapping[str, Any] | None = None,
        *,
        progress: bool = False,
        log: Callable[[str], None] | None = None,
        on_step: StepCallback | None = None,
        callbacks: Sequence[Callback] = (),
        evaluate_splits: Sequence[str] | None = None,
        config_changed: bool = False,
    ) -> None:
        self.config = config
        self.config_changed = config_changed
        self.vae = vae
        self.data = data
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.state = state
        self.progress = progress
        self.log = log
        self.on_step = on_step
        self.callbacks = list(callbacks)
        if evaluate_splits is None:
            evaluate_splits = ("test", "valid") if vae.posterior.is_amortized else ("train_set",)
        self.evaluate_splits = tuple(evaluate_splits)
        self.steps_per_epoch = 0
        self.start_step = 0

    def _path(self, name: str) -> Path:
        assert self.out_dir is not None
        return self.out_dir / name

    def run(self) -> TrainResult:
        """Train until ``train.epochs``; returns the model in eval mode."""
        cfg, vae, data = self.config, self.vae, self.data
        device = next(_devices(vae))
        main = distributed.is_main()  # [distributed] only rank 0 writes and prints
        objective = build_objective(cfg)
        factory = METHODS.factory(cfg.train.method)
        strategy: StepStrategy = factory(vae, objective, cfg.train, **method_options(cfg.train))
        generator = torch.Generator(device=device).manual_seed(cfg.train.seed)
        needs_valid = cfg.train.lr_schedule == "plateau" or cfg.train.early_stopping_patience
        if needs_valid and "valid" not in data.splits:
            what = (
                "lr_schedule = 'plateau'"
                if cfg.train.lr_schedule == "plateau"
                else ("early_stopping_patience")
            )
            raise ConfigError(
                f"train.{what} selects on the validation ELBO, but {data.name} has no valid "
                f"split (splits: {', '.join(data.splits)}); use a dataset with one"
            )
        scheduler = make_scheduler(cfg.train, strategy)
        optimizer = getattr(strategy, "optimizer", None)
        train = data.train.to(device)
        evaluation = {
            s: (data.splits["train"] if s == "train_set" else data.splits[s]).to(device)
            for s in self.evaluate_splits
            if s == "train_set" or s in data.splits
        }

        history: list[dict[str, Any]] = []
        epoch_done, step_done, perm, elbo_sum, seconds = 0, 0, None, 0.0, 0.0
        step_losses: list[float] = []  # this epoch's, nats per datum
        # the best validation ELBO so far: {"epoch", "valid_elbo", "since"} (since: the
        # first epoch selection saw), and the epoch at which early stopping ended the run
        best: dict[str, Any] | None = None
        best_since, stopped_early = 1, None
        if self.state is not None:
            s = self.state
            if tuple(s["event_shape"]) != data.event_shape:
                raise CheckpointError(
                    f"checkpoint datum shape {tuple(s['event_shape'])} does not match "
                    f"the data's {data.event_shape}"
                )
            load_state(vae, s["model"], str(self._path(CHECKPOINT_FILE)))
            strategy.load_state_dict(s["strategy"])
            torch.set_rng_state(s["rng"]["torch"])
            if device.type == "cuda" and s["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(s["rng"]["cuda"], device)
            if s["rng"]["data_device"] == device.type:
                generator.set_state(s["rng"]["data"])
            epoch_done, step_done = int(s["epoch"]), int(s["step"])
            perm = s["perm"].to(device) if s["perm"] is not None else None
            elbo_sum, seconds, history = float(s["elbo_sum"]), float(s["seconds"]), s["history"]
            # runs of earlier versions kept no step losses: an epoch resumed mid-way
            # from one of them records its remaining steps only
            step_losses = list(s.get("step_losses") or []) if step_done > 0 else []
            saved_schedule = s.get("scheduler") or {}
            if scheduler is not None and saved_schedule.get("name") == cfg.train.lr_schedule:
                scheduler.load_state_dict(saved_schedule["state"])
            elif scheduler is not None:  # a schedule new to this run starts at its current lr
                for group in strategy.optimizer.param_groups:
                    group.pop("initial_lr", None)
                scheduler = make_scheduler(cfg.train, strategy)
            # runs of pyro-vae < 0.3 kept no best.pt: selection starts where they resume
            best = s.get("best")
            if best is None:
                best_since = epoch_done + 1
            if step_done == 0 and _stops_early(epoch_done, best, cfg.train, best_since):
                return TrainResult(
                    vae.eval(), cfg, history, data, 0, _public(best), s.get("stopped_early")
                )
        # config.toml is written with the first checkpoint: a run that fails before
        # it (a NaN at the first steps) leaves nothing behind, a resume that fails
        # before it leaves the run's config as it was
        self._saved = self.state is not None and not self.config_changed

        n, batch = len(train), cfg.train.batch_size
        steps = math.ceil(n / batch)
        self.steps_per_epoch, self.start_step = steps, epoch_done * steps + step_done
        session = environment(str(device))  # recorded with every checkpoint of this session
        total = cfg.train.epochs * steps
        bar = tqdm(
            total=total,
            initial=min(epoch_done * steps + step_done, total),
            disable=not (self.progress and main),
            unit="step",
            dynamic_ncols=True,
        )

        def write(message: str, level: int = logging.INFO) -> None:
            """A message to the logger and to ``log`` (around the bar); rank 0 only."""
            if not main:
                return
            logger.log(level, message)
            if self.log is not None and level >= logging.INFO:
                with tqdm.external_write_mode(nolock=False):
                    self.log(message)

        if self.state is not None:
            write(f"resuming {self.out_dir} at epoch {epoch_done}, step {step_done}", logging.DEBUG)
        write(
            f"training {cfg.train.method} on {device}: {n} data, {steps} steps of {batch} per "
            f"epoch, epochs {epoch_done + 1} to {cfg.train.epochs}",
            logging.DEBUG,
        )
        if batch > n and epoch_done == 0 and step_done == 0:
            write(f"train.batch_size {batch} > {n} training data: every step uses all {n}")
        ddp = strategy if isinstance(strategy, DataParallelSVIStep) else None
        callbacks = self.callbacks if main else []  # [distributed] rank 0 reports
        step_hooks = [c.on_step_end for c in callbacks if hasattr(c, "on_step_end")]
        strategy.track_grad_norm = any(getattr(c, "needs_grad_norm", False) for c in callbacks)
        if self.out_dir is not None and main:
            self._remove_snapshots_after(epoch_done)  # a later epoch's, from a run cut short

        def snapshot(epoch: int, step: int) -> dict[str, Any]:
            return {
                "config": cfg.to_dict(),
                "event_shape": list(data.event_shape),
                "num_data": n,
                "data_sha256": data.fingerprint,
                "method": cfg.train.method,
                "model": vae.state_dict(),
                "strategy": strategy.state_dict(),
                "epoch": epoch,
                "step": step,
                "perm": perm.cpu() if (perm is not None and step > 0) else None,
                "elbo_sum": elbo_sum,
                "seconds": seconds,
                "history": history,
                "step_losses": list(step_losses) if step > 0 else [],
                "best": best,
                "stopped_early": stopped_early,
                "environment": session,
                "scheduler": (
                    {"name": cfg.train.lr_schedule, "state": scheduler.state_dict()}
                    if scheduler is not None
                    else None
                ),
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                    "data": generator.get_state(),
                    "data_device": device.type,
                },
            }

        try:
            for callback in callbacks:
                if hasattr(callback, "on_train_begin"):
                    callback.on_train_begin(self)
            validate, first = pyro.infer.util.is_validation_enabled(), True
            with _sigint_flag() as interrupted, warnings.catch_warnings():
                # a NaN loss is reported by the trainer's own message, not Pyro's warning
                warnings.filterwarnings("ignore", message="Encountered NaN")
                for epoch in range(epoch_done + 1, cfg.train.epochs + 1):
                    vae.train()
                    beta = kl_weight(
                        cfg.train.beta, cfg.train.kl_warmup_epochs, epoch, cfg.train.kl_warmup_start
                    )
                    start = time.perf_counter()
                    if perm is None:
                        perm = torch.randperm(n, generator=generator, device=device)
                    for step in range(step_done, steps):
                        index = perm[step * batch : (step + 1) * batch]
                        x = train[index]
                        if data.dynamic:
                            x = torch.bernoulli(x, generator=generator)
                        if ddp is not None:  # [distributed] where we are; was this rank stopped
                            ddp.set_position(epoch, step, interrupted["set"])
                        # Validate the first step of a (re)start -- model/guide structure,
                        # distribution arguments -- then run the hot loop without it (the
                        # data were checked against the likelihood's support up front).
                        try:
                            with pyro.validation_enabled(validate and first):
                                value = strategy.step(x, index, n, beta)
                        except ValueError as e:  # a distribution got NaN parameters
                            if "found invalid values" not in str(e):
                                raise
                            value = math.nan
                        first = False
                        if not math.isfinite(value):
                            raise self._non_finite(value, epoch, step + 1)
                        elbo_sum -= value * len(index) / n
                        step_losses.append(float(f"{value / n:.6g}"))  # 6 digits: compact JSON
                        bar.update(1)
                        bar.set_postfix(epoch=epoch, elbo=f"{-value / n:.2f}", refresh=False)
                        try:
                            if self.on_step is not None:
                                self.on_step(epoch, step + 1, value)
                            if step_hooks:
                                values = {"epoch": epoch, "loss": value / n}
                                if strategy.grad_norm is not None:
                                    values["grad_norm"] = float(strategy.grad_norm)
                                at = (epoch - 1) * steps + step + 1
                                for hook in step_hooks:
                                    hook(at, values)
                        except KeyboardInterrupt:
                            interrupted["set"] = True
                        stop = interrupted["set"] if ddp is None else ddp.stop
                        if stop and step + 1 < steps:
                            seconds += time.perf_counter() - start
                            self._interrupt(snapshot(epoch - 1, step + 1), epoch, step + 1)
                    seconds += time.perf_counter() - start
                    every = cfg.train.eval_every
                    due = epoch % every == 0 or epoch == cfg.train.epochs
                    record = self._epoch_record(
                        epoch, elbo_sum / n, evaluation if due else {}, seconds
                    )
                    record["beta"] = beta
                    record["kl_estimator"] = kl_estimator(objective)
                    record["gradient_steps"] = epoch * steps * strategy.gradients_per_step
                    if optimizer is not None:  # a plugin's strategy may keep no optimizer
                        record["lr"] = optimizer.param_groups[0]["lr"]
                    record["step_losses"] = step_losses
                    history.append(record)
                    perm, step_done, elbo_sum, seconds, step_losses = None, 0, 0.0, 0.0, []
                    valid = record.get("valid_elbo")
                    improved = valid is not None and (best is None or valid > best["valid_elbo"])
                    if improved:
                        since = best["since"] if best is not None else best_since
                        best = {"epoch": epoch, "valid_elbo": valid, "since": since}
                    step_schedule(scheduler, cfg.train, epoch, valid)
                    if due and _stops_early(epoch, best, cfg.train, best_since):
                        stopped_early = epoch
                    if self.out_dir is not None and main:
                        write_metrics(self._path(METRICS_FILE), history)
                        if images_due(cfg.train, epoch):  # before the checkpoint: a resume
                            self._save_snapshot(epoch)  # drops those after its own epoch
                        if improved:  # before the checkpoint that refers to it
                            save_checkpoint(self._path(BEST_FILE), best_state(snapshot(epoch, 0)))
                        self._save(snapshot(epoch, 0))
                        write(f"epoch {epoch}: checkpoint written to {self.out_dir}", logging.DEBUG)
                    write(_format_epoch(record))
                    for callback in callbacks:
                        callback.on_epoch_end(dict(record), vae)
                    if stopped_early is not None:
                        write(_early_stop_line(epoch, best, cfg.train))
                        break
                    stop = distributed.any_rank(interrupted["set"])  # [distributed] all or none
                    if stop and epoch < cfg.train.epochs:
                        self._interrupt(None, epoch, 0)
        finally:
            bar.close()
            for callback in callbacks:
                if hasattr(callback, "on_train_end"):
                    callback.on_train_end(self)
        last = history[-1]["epoch"] if history else 0
        return TrainResult(
            vae.eval(), cfg, history, data, last - epoch_done, _public(best), stopped_early
        )

    def _save(self, state: dict[str, Any]) -> None:
        """Write the checkpoint, and ``config.toml`` with the run's first one."""
        if not self._saved:
            self.config.save(self._path(CONFIG_FILE))
            self._saved = True
        save_checkpoint(self._path(CHECKPOINT_FILE), state)

    def _save_snapshot(self, epoch: int) -> None:
        """Write ``snapshots/samples-EPOCH.pt``: :func:`prior_samples` of the model now."""
        images = prior_samples(self.vae, SNAPSHOT_SAMPLES, SNAPSHOT_SEED)
        buffer = io.BytesIO()
        torch.save({"epoch": epoch, "seed": SNAPSHOT_SEED, "images": images}, buffer)
        path = self._path(SNAPSHOT_DIR) / f"samples-{epoch:05d}.pt"
        atomic_write_bytes(path, buffer.getvalue())
        logger.debug("epoch %d: %d prior samples written to %s", epoch, SNAPSHOT_SAMPLES, path)

    def _remove_snapshots_after(self, epoch: int) -> None:
        """Delete the snapshots of epochs after ``epoch``: their checkpoint never came."""
        folder = self._path(SNAPSHOT_DIR)
        for path in folder.glob("samples-*.pt"):
            match = _SNAPSHOT_NAME.fullmatch(path.name)
            if match is not None and int(match[1]) > epoch:
                path.unlink(missing_ok=True)

    def _non_finite(self, value: float, epoch: int, step: int) -> NonFiniteLossError:
        """The error for a NaN or infinite loss; before any checkpoint it names the likely cause."""
        where = f"the loss became {value} at epoch {epoch}, step {step}"
        started = (
            self._saved or self.state is not None
            if self.out_dir is not None
            else epoch > 1 or self.state is not None
        )
        if started:
            last = self._path(CHECKPOINT_FILE) if self.out_dir is not None else "none"
            return NonFiniteLossError(f"{where}; training stopped (last good checkpoint: {last})")
        scale = float(self.data.train.abs().max())
        lr = self.config.train.lr
        causes = []
        if scale > 100:
            causes.append(
                f"the scale of the data (values up to {scale:.3g}; scale them to order 1, "
                "e.g. pixels 0-255 divided by 255)"
            )
        if lr > 0.01:
            causes.append(f"the learning rate (lr = {lr:g}; try 1e-3)")
        cause = " or ".join(causes) or (
            f"the scale of the data (values up to {scale:.3g}) or the learning rate (lr = {lr:g})"
        )
        saved = "; nothing was saved" if self.out_dir is not None else ""
        return NonFiniteStartError(f"{where}, before any checkpoint; likely cause: {cause}{saved}")

    def _epoch_record(
        self, epoch: int, train_elbo: float, evaluation: dict[str, torch.Tensor], seconds: float
    ) -> dict[str, Any]:
        self.vae.eval()
        record: dict[str, Any] = {"epoch": epoch, "train_elbo": train_elbo}
        for split, x in evaluation.items():
            # [distributed] each rank evaluates a shard; the means are all-reduced
            # (a per-datum guide evaluates its training data in one piece: x[i] is datum i)
            if split == "train_set":
                terms = evaluate_elbo(self.vae, x)
            else:
                terms = distributed.sharded_mean(partial(evaluate_elbo, self.vae), x)
            record[f"{split}_elbo"] = terms["elbo"]
            record[f"{split}_reconstruction"] = terms["reconstruction"]
            record[f"{split}_kl"] = terms["kl"]
            if split == "test" and terms["kl_per_dim"] is not None:
                record["test_kl_per_dim"] = terms["kl_per_dim"]
        record["seconds"] = seconds
        return record

    def _interrupt(self, state: dict[str, Any] | None, epoch: int, step: int) -> None:
        if self.out_dir is None:
            raise TrainingInterrupted(f"interrupted at epoch {epoch}, step {step}", None)
        if state is not None and distributed.is_main():
            self._save(state)
        raise TrainingInterrupted(
            f"interrupted at epoch {epoch}, step {step}; checkpoint saved; "
            f"resume with: pyro-vae train --resume {self.out_dir}",
            str(self.out_dir),
        )


# --- the public entry points ----------------------------------------------------------------


def _method(config: Config) -> type[StepStrategy]:
    return METHODS.get(config.train.method)


def _check_out_dir(out_dir: str | os.PathLike[str] | None) -> None:
    if out_dir is not None and (Path(out_dir) / CHECKPOINT_FILE).exists():
        raise ConfigError(
            f"{out_dir} already holds a run; use --resume {out_dir} or another --out directory"
        )


@contextmanager
def _run_context(config: Config) -> Iterator[torch.device]:
    """The process group (under torchrun) and a forked RNG, for the whole run."""
    requested = resolve_device(config.train.device)
    with distributed.process_group(requested):  # [distributed] joins torchrun's group
        device = distributed.local_device(requested)
        cuda = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            yield device


def _as_dataset(data: Any) -> Dataset:
    """A tensor, a dict of split tensors or a ``torch.utils.data.Dataset`` as a :class:`Dataset`."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, torch.Tensor):
        splits = {"train": data}
    elif isinstance(data, Mapping):
        splits = dict(data)
    elif isinstance(data, torch.utils.data.Dataset):
        try:
            items = [data[i] for i in range(len(data))]  # type: ignore[arg-type]
        except TypeError:
            raise ConfigError(
                "fit: a torch Dataset must have a length and integer indexing"
            ) from None
        items = [item[0] if isinstance(item, tuple | list) else item for item in items]
        splits = {"train": torch.stack([torch.as_tensor(i) for i in items])}
    else:
        raise ConfigError(
            f"fit: data must be a tensor, a dict of split tensors, a torch Dataset or a "
            f"DataLoader, "
            f"got {type(data).__name__}"
        )
    if "train" not in splits:
        raise ConfigError(f"fit: data has no 'train' split; splits given: {', '.join(splits)}")
    for split, x in splits.items():
        if not isinstance(x, torch.Tensor) or x.dim() < 2:
            raise ConfigError(f"fit: split {split!r} must be a tensor (N, *event_shape)")
        if not torch.isfinite(x).all():
            raise ConfigError(f"fit: split {split!r} has NaN or infinite values")
    return Dataset(IN_MEMORY, {s: x.float() for s, x in splits.items()})


def fit(
    model: Config | VAE,
    data: Any = None,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    config: Config | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: StepCallback | None = None,
    callbacks: Sequence[Callback] = (),
    initialize: Callable[[VAE], None] | None = None,
    evaluate_splits: Sequence[str] | None = None,
) -> TrainResult:
    """Train a VAE from a config (``fit(config, out_dir)``) or built by hand (``fit(vae, data)``).

    Example:
        >>> vae = VAE(StandardNormalPrior(2), guide, likelihood)  # doctest: +SKIP
        >>> config = Config().override({"train.epochs": 5})
        >>> result = fit(vae, x_train, config=config)  # doctest: +SKIP

    Args:
        model: A :class:`~pyro_vae.config.Config` (the model is built from its
            ``[model]`` and the data loaded from its ``[data]``), or a
            :class:`~pyro_vae.model.VAE`, trained in place.
        data: With a VAE: a tensor ``(N, *event_shape)`` (the training set), a
            dict of split tensors (``train`` required; ``test``/``valid``
            are evaluated each epoch), a ``torch.utils.data.Dataset`` or a
            ``DataLoader`` (its data set and batch size; the minibatch order is
            the trainer's own, seeded and resumable, not the loader's sampler);
            the data must fit the likelihood's support. With a config: ``None``
            (for the old form ``fit(config, out_dir)`` it may be the run directory).
        out_dir: Run directory for ``config.toml``, ``checkpoint.pt`` and
            ``metrics.jsonl``; ``None`` keeps everything in memory. A run of a
            hand-built VAE saves the config its components describe, so
            :func:`pyro_vae.load` rebuilds it.
        config: With a VAE: the ``[train]`` (and ``[data]`` binarization)
            settings; its ``[model]`` is replaced by the VAE's own.
        progress: Show a tqdm progress bar.
        log: Called with one line per epoch (e.g. ``print``); the same lines go to
            the ``pyro_vae.train`` logger in any case.
        on_step: Called after every step.
        callbacks: Objects with ``on_epoch_end(record, vae)`` and optionally
            ``on_train_begin``, ``on_step_end``, ``on_train_end`` (see
            :class:`Callback`), e.g. :class:`pyro_vae.tensorboard.TensorBoardCallback`.
        initialize: Called with the freshly built VAE before training (e.g. to copy weights).
        evaluate_splits: Splits evaluated each epoch (see :class:`Trainer`).

    Raises:
        ConfigError, DataError: before training starts, for bad input.
        NonFiniteLossError: the loss became NaN or infinite.
        TrainingInterrupted: Ctrl-C; a checkpoint was saved first.
    """
    hooks: dict[str, Any] = {
        "progress": progress,
        "log": log,
        "on_step": on_step,
        "callbacks": callbacks,
        "evaluate_splits": evaluate_splits,
    }
    if isinstance(model, Config):
        if config is not None:
            raise ConfigError("fit(config, ...): pass the config once, as the first argument")
        if data is not None and out_dir is None and isinstance(data, str | os.PathLike):
            data, out_dir = None, data  # fit(config, out_dir)
        if data is not None:
            raise ConfigError("fit(config, ...) loads its data from [data]; pass a VAE to fit data")
        return _fit_config(model, out_dir, initialize, hooks)
    if not isinstance(model, VAE):
        raise ConfigError(f"fit: expected a Config or a VAE, got {type(model).__name__}")
    if data is None:
        raise ConfigError("fit(vae, data): data missing (a tensor, a dict of splits or a Dataset)")
    return _fit_vae(model, data, out_dir, config or Config(), hooks)


def _writer_lock(out_dir: str | os.PathLike[str] | None) -> AbstractContextManager[Any]:
    """The run directory's lock (:func:`~pyro_vae.files.run_lock`), held by the writing rank."""
    if out_dir is None or not distributed.is_main():
        return nullcontext()
    return run_lock(out_dir)


def _fit_config(
    config: Config,
    out_dir: str | os.PathLike[str] | None,
    initialize: Callable[[VAE], None] | None,
    hooks: dict[str, Any],
) -> TrainResult:
    # the run records absolute data paths: it evaluates and resumes from any folder
    cfg = resolve(dataclasses.replace(config, data=config.data.absolute(Path.cwd())))
    method = _method(cfg)
    method.check(cfg)
    with _writer_lock(out_dir), _run_context(cfg) as device:
        _check_out_dir(out_dir)
        torch.manual_seed(cfg.train.seed)
        with distributed.main_first():  # [distributed] rank 0 downloads first
            cfg = resolve(method.configure(cfg))
            data = load_data(cfg, fixed=method.fixed_data)
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, binarize=data.binarize))
        vae = build_vae(cfg.model, data.event_shape, num_data=len(data.train)).to(device)
        if initialize is not None:
            initialize(vae)
        return Trainer(cfg, vae, data, out_dir, None, **hooks).run()


def _fit_vae(
    vae: VAE,
    data: Any,
    out_dir: str | os.PathLike[str] | None,
    config: Config,
    hooks: dict[str, Any],
) -> TrainResult:
    if isinstance(data, torch.utils.data.DataLoader):
        # its data set and batch size; the trainer keeps its own seeded, resumable order
        if data.batch_size is not None:
            config = config.override({"train.batch_size": data.batch_size})
        data = data.dataset
    dataset = _as_dataset(data)
    support = vae.likelihood.support
    binarize = config.data.binarize if config.data.binarize != "auto" else "none"
    prepared = prepare(dataset, binarize, config.data.binarize_seed, support)
    for split, x in prepared.splits.items():
        check_fits(x, vae.event_shape, support, type(vae.likelihood).__name__, f"data {split}")
    model_config = vae.describe(num_data=len(prepared.train))
    if out_dir is not None and not _rebuilds(model_config, vae, len(prepared.train)):
        raise ConfigError(
            "fit(vae, data, out_dir): a component of this VAE cannot describe itself as a "
            "config (register its class, and its networks'), so the run could not be loaded; "
            "train without out_dir or use registered components"
        )
    cfg = Config(
        data=dataclasses.replace(config.data, name=IN_MEMORY, binarize=prepared.binarize),
        model=model_config if model_config is not None else config.model,
        train=config.train,
        eval=config.eval,
        plugins=config.plugins,
    )
    method = _method(cfg)
    method.check(cfg)
    with _writer_lock(out_dir), _run_context(cfg):
        _check_out_dir(out_dir)
        torch.manual_seed(cfg.train.seed)
        return Trainer(cfg, vae, prepared, out_dir, None, **hooks).run()


def _rebuilds(model: ModelConfig | None, vae: VAE, num_data: int) -> bool:
    """Whether ``model`` builds a VAE with ``vae``'s parameter names and shapes."""
    if model is None:
        return False
    try:
        with torch.random.fork_rng(devices=[]):
            rebuilt = build_vae(resolve(Config(model=model)).model, vae.event_shape, num_data)
    except ConfigError:
        return False
    mine, theirs = vae.state_dict(), rebuilt.state_dict()
    return mine.keys() == theirs.keys() and all(mine[k].shape == theirs[k].shape for k in mine)


#: ``[train]`` keys a resumed run may change: how long and where it trains, how it
#: selects, schedules and clips, and what it shows -- never what the weights or Adam's
#: moments mean.
RESUMABLE_KEYS = (
    "epochs", "device", "eval_every", "early_stopping_patience", "lr_schedule", "lr_gamma",
    "lr_patience", "lr_min", "clip_norm", "image_every",
)  # fmt: skip


def resume(
    out_dir: str | os.PathLike[str],
    *,
    epochs: int | None = None,
    device: str | None = None,
    changes: Mapping[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    on_step: StepCallback | None = None,
    callbacks: Sequence[Callback] = (),
) -> TrainResult:
    """Continue the run in ``out_dir`` from its last checkpoint, whatever its method.

    Args:
        out_dir: A run directory written by :func:`fit` (this version or an earlier one).
        epochs: A new total number of epochs (default: the run's own).
        device: Another device to continue on (default: the run's own).
        changes: Other ``[train]`` keys to change, by name (only :data:`RESUMABLE_KEYS`),
            e.g. ``{"lr_schedule": "plateau"}``; ``config.toml`` records them.
        progress: Show a tqdm progress bar.
        log: Called with one line per epoch (besides the ``pyro_vae.train`` logger).
        on_step: Called after every optimizer step.
        callbacks: As for :func:`fit` (a TensorBoard callback continues the run's curves).
    """
    from .checkpoint import read_run_config

    out_dir = Path(out_dir)
    changes = dict(changes or {})
    fixed = sorted(set(changes) - set(RESUMABLE_KEYS))
    if fixed:
        raise ConfigError(
            f"train.{fixed[0]} cannot change in a resumed run; resumable: "
            f"{', '.join(RESUMABLE_KEYS)}"
        )
    changes.update({k: v for k, v in (("epochs", epochs), ("device", device)) if v is not None})
    saved = read_run_config(out_dir)  # a run directory at all, before anything is locked
    changed = Config.from_dict(
        {**saved.to_dict(), "train": {**saved.to_dict()["train"], **changes}}
    )  # checks the new values in one line before any work
    with _writer_lock(out_dir):
        return _resume(out_dir, changed.train, progress, log, on_step, callbacks)


def _resume(
    out_dir: Path,
    train: TrainConfig,
    progress: bool,
    log: Callable[[str], None] | None,
    on_step: StepCallback | None,
    callbacks: Sequence[Callback],
) -> TrainResult:
    from .checkpoint import read_run_config, upgrade_state

    saved = read_run_config(out_dir)
    config = dataclasses.replace(saved, train=train)
    state = upgrade_state(load_checkpoint(out_dir), out_dir)
    if config.data.name == IN_MEMORY:
        raise CheckpointError(
            f"{out_dir} was trained on in-memory data (fit(vae, data)); resume it from Python "
            "with the same data, or retrain"
        )
    _check_unedited(saved, state, out_dir)
    cfg = resolve(config)
    with _run_context(cfg) as run_device:
        data = load_data(cfg)
        recorded = state.get("data_sha256")
        if recorded and recorded != data.fingerprint:
            raise CheckpointError(
                f"the data of {out_dir} ({cfg.data.name}) changed since it was trained "
                f"(SHA-256 {data.fingerprint[:12]}..., was {recorded[:12]}...); resuming needs "
                "the same data: restore them, or train a new run"
            )
        if distributed.is_main():  # a SIGKILL mid-write leaves them; we hold the lock
            remove_stale_temporaries(out_dir)
            remove_stale_temporaries(out_dir / SNAPSHOT_DIR)
        vae = build_vae(cfg.model, tuple(state["event_shape"]), num_data=state["num_data"])
        trainer = Trainer(
            cfg,
            vae.to(run_device),
            data,
            out_dir,
            state,
            progress=progress,
            log=log,
            on_step=on_step,
            callbacks=callbacks,
            config_changed=config != saved,
        )  # fmt: skip  (config.toml then tells the truth about what resume changed)
        return trainer.run()


def _check_unedited(saved: Config, state: Mapping[str, Any], out_dir: Path) -> None:
    """Refuse a ``config.toml`` edited since the checkpoint (:data:`RESUMABLE_KEYS` aside).

    The checkpoint holds the config it was trained with; resuming cannot apply
    an edit truthfully (Adam keeps its learning rate in its state, the
    weights their shapes), so the changed keys are named instead.
    """
    try:
        trained = _flat(Config.from_dict(state["config"]).to_dict())
    except (KeyError, ConfigError):  # a checkpoint without a readable config: nothing to compare
        return
    now = _flat(saved.to_dict())
    changed = sorted(
        k for k in trained.keys() | now.keys()
        if trained.get(k) != now.get(k) and k.removeprefix("train.") not in RESUMABLE_KEYS
    )  # fmt: skip
    if changed:
        shown = ", ".join(f"{k}: {trained.get(k)!r} -> {now.get(k)!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise CheckpointError(
            f"{out_dir / CONFIG_FILE} was edited since its checkpoint ({shown}{more}); resume "
            "cannot apply edits (only --epochs, --device and --set train.KEY for "
            f"{', '.join(RESUMABLE_KEYS[2:])}): undo them, or train a new run "
            f"with --config {out_dir / CONFIG_FILE}"
        )


def _flat(doc: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = list(value) if isinstance(value, tuple) else value
    return out


def with_guide(config: Config, guide: ComponentConfig) -> Config:
    """A copy of ``config`` with ``[model.guide]`` replaced."""
    return dataclasses.replace(config, model=dataclasses.replace(config.model, guide=guide))
