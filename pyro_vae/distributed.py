r"""Data-parallel training and sharded evaluation on ``torch.distributed``.

Launch the ordinary command with ``torchrun``; each of the ``W`` processes
(ranks) runs the same code::

    torchrun --standalone --nproc-per-node 2 -m pyro_vae train --epochs 2 --out runs/ddp

:func:`process_group` joins the group that torchrun describes in the
environment (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), on the ``gloo`` backend for the CPU and ``nccl`` for CUDA
(rank ``r`` on ``cuda:LOCAL_RANK``). With ``WORLD_SIZE`` unset or 1 nothing
changes: the single-process code path runs as before.

**Training.** Every rank draws the same permutation and binarization of each
global minibatch :math:`\mathcal B` (the data generator is seeded identically)
and takes its own contiguous slice :math:`\mathcal B_r` (:func:`shard`,
sizes differing by at most one). :class:`DistributedSVI` wraps the ELBO loss
in :class:`torch.nn.parallel.DistributedDataParallel`, which broadcasts rank
0's parameters at the start and averages the gradients over ranks during
``backward``. Pyro scales a subsampled plate by :math:`N/|\mathcal B_r|`, so
rank ``r`` weights its loss by :math:`W |\mathcal B_r| / |\mathcal B|`:

.. math::

    \frac1W \sum_{r=1}^{W} \nabla \Bigl[\frac{W |\mathcal B_r|}{|\mathcal B|}
        \cdot \Bigl(-\frac{N}{|\mathcal B_r|} \sum_{b \in \mathcal B_r}
        \widehat{\mathrm{ELBO}}(x_b)\Bigr)\Bigr]
    = \nabla \Bigl(-\frac{N}{|\mathcal B|} \sum_{b \in \mathcal B}
        \widehat{\mathrm{ELBO}}(x_b)\Bigr),

the single-process gradient of the global minibatch. The estimate is linear
in the data for every objective except free bits (:class:`~pyro_vae.objectives.FreeBits_ELBO`
clamps the KL averaged over a minibatch: under DDP, over each rank's shard).
Each rank draws its own reparameterization noise from a seed derived from
``(seed, rank, epoch, step)``, so a run resumed on as many processes draws
what the uninterrupted one would; with a deterministic guide (``delta``) training equals the single
process run up to the order of floating-point sums. Only rank 0 writes the
run directory and prints.

**Evaluation.** :func:`shard_map` splits data into fixed chunks, runs a
per-datum function on each rank's chunks and gathers the results; each chunk
draws from its own seed ``(seed, chunk start)``, so the numbers do not
depend on the number of processes. :func:`sharded_mean` averages per-datum
means (the epoch metrics) over shards with all-reduce sums.

References:
    Li et al. (2020), "PyTorch Distributed: experiences on accelerating data
    parallel training", VLDB.
"""

from __future__ import annotations

import inspect
import itertools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .errors import ConfigError, PyroVAEWarning, TrainingInterrupted
from .model import VAE

#: Backend of the process group by device type.
BACKENDS = {"cpu": "gloo", "cuda": "nccl"}

#: Counts the process groups :func:`process_group` has created in this process.
_GROUPS_CREATED = itertools.count()

#: What a per-datum function of :func:`shard_map` returns: a tensor, or a
#: tuple or dict of tensors, each with the data along dimension 0.
PerDatum = torch.Tensor | tuple[torch.Tensor, ...] | dict[str, torch.Tensor]


# --- the process group ----------------------------------------------------------


def launched_world_size() -> int:
    """``W`` as torchrun sets it in ``WORLD_SIZE`` (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise ConfigError(
            f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not an integer; launch with torchrun"
        ) from None


def is_distributed() -> bool:
    """Whether this process is in an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """The number of ranks ``W`` (1 outside a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank in ``0..W-1`` (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    """Whether this is rank 0, the process that writes files and prints.

    Outside an initialized group (e.g. after :func:`process_group` has left
    it) the ``RANK`` that torchrun set decides, so a command's last lines are
    printed once.
    """
    if is_distributed():
        return dist.get_rank() == 0
    return os.environ.get("RANK", "0") == "0"


def local_device(device: torch.device) -> torch.device:
    """The device of this rank: ``cuda:LOCAL_RANK`` for CUDA under a process group, else ``device``.

    Raises:
        ConfigError: fewer visible CUDA devices than ranks on this node.
    """
    if device.type != "cuda" or not is_distributed():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if local >= torch.cuda.device_count():
        raise ConfigError(
            f"rank with LOCAL_RANK={local} needs cuda:{local} but only "
            f"{torch.cuda.device_count()} CUDA device(s) are visible; use at most that many "
            "processes per node (--nproc-per-node) or --device cpu"
        )
    return torch.device("cuda", local)


@contextmanager
def process_group(device: str | torch.device) -> Iterator[int]:
    """Join torchrun's process group for the duration of the block, if launched with ``W > 1``.

    The backend is ``gloo`` for a CPU ``device`` and ``nccl`` for CUDA
    (:data:`BACKENDS`). A group that is already initialized (by the caller)
    is used as is and left open; one created here is destroyed on exit.
    Each group created here keys its rendezvous under its own prefix
    (``pyro_vae/<n>``, ``n`` counting the groups this process has created), so
    a process can train more than once (``destroy_process_group`` resets the
    default group's name, and the stale keys of a former group would be read).

    Leaving the block normally, or by :class:`~pyro_vae.errors.TrainingInterrupted`
    (which all ranks raise together), the ranks wait for each other, so the
    files rank 0 wrote are complete when any rank goes on (e.g. to resume).
    Other errors leave at once: a failing rank must not wait for the others
    (torchrun then stops them).

    Args:
        device: The training device (``"cpu"``, ``"cuda"``, ``"cuda:N"``).

    Yields:
        The world size ``W`` (1: no group, the single-process path).

    Raises:
        ConfigError: ``WORLD_SIZE > 1`` without the rest of torchrun's environment.
    """
    if is_distributed() or launched_world_size() <= 1:
        with _synchronized_exit():
            yield world_size()
        return
    kind = torch.device(device).type
    backend = BACKENDS.get(kind)
    if backend is None or not dist.is_available():
        raise ConfigError(f"distributed training needs device cpu or cuda, got {device!r}")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={launched_world_size()} but {', '.join(missing)} not set; "
            "launch with torchrun --nproc-per-node N -m pyro_vae train ..."
        )
    if kind == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    store, rank_, size = next(dist.rendezvous("env://"))
    store = dist.PrefixStore(f"pyro_vae/{next(_GROUPS_CREATED)}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank_, world_size=size)
    try:
        with _synchronized_exit():
            yield dist.get_world_size()
    finally:
        dist.destroy_process_group()


@contextmanager
def _synchronized_exit() -> Iterator[None]:
    """Barrier on leaving normally or by ``TrainingInterrupted`` (see :func:`process_group`)."""
    try:
        yield
    except TrainingInterrupted:
        if is_distributed():
            dist.barrier()
        raise
    if is_distributed():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the others (e.g. a download into a shared cache).

    Rank 0 reaches the barrier even when its block raises, so the others go
    on (and meet the same error) instead of waiting forever.
    """
    if not is_distributed():
        yield
        return
    if not is_main():
        dist.barrier()
    try:
        yield
    finally:
        if is_main():
            dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must live for collectives: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --- shards of a global batch -----------------------------------------------------


def shard_bounds(size: int, part: int | None = None, parts: int | None = None) -> slice:
    """The slice of a global batch of ``size`` items that rank ``part`` of ``parts`` takes.

    Contiguous parts in rank order, as :func:`torch.tensor_split`: the first
    ``size % W`` ranks get :math:`\\lceil size/W \\rceil` items, the others
    :math:`\\lfloor size/W \\rfloor` (possibly none).

    Args:
        size: The global batch size.
        part: The rank; default: this process's.
        parts: ``W``; default: the group's.
    """
    part = rank() if part is None else part
    parts = world_size() if parts is None else parts
    base, extra = divmod(size, parts)
    start = part * base + min(part, extra)
    return slice(start, start + base + (1 if part < extra else 0))


def shard(x: torch.Tensor, part: int | None = None, parts: int | None = None) -> torch.Tensor:
    """Rank ``part``'s contiguous slice of ``x`` along dimension 0 (see :func:`shard_bounds`)."""
    return x[shard_bounds(len(x), part, parts)]


# --- collectives --------------------------------------------------------------------


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The elementwise sum of ``values`` over all ranks (a new tensor; ``values`` itself on 1 rank).

    Args:
        values: The same shape and dtype on every rank.
    """
    if not is_distributed():
        return values
    total = values.detach().to(_comm_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(values.device)


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank; every rank gets the same answer (a collective)."""
    if not is_distributed():
        return flag
    return bool(all_reduce_sum(torch.tensor([float(flag)])).item() > 0)


def gather_per_datum(local: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Concatenate every rank's per-datum tensor in rank order (on every rank).

    Args:
        local: This rank's results, data along dimension 0; the trailing
            shape and dtype are the same on every rank.
        sizes: ``sizes[r]`` = the number of data of rank ``r`` (known to all).

    Returns:
        Shape ``(sum(sizes), *local.shape[1:])``, on ``local``'s device.
    """
    if not is_distributed():
        return local
    if len(local) != sizes[rank()]:
        raise ValueError(f"rank {rank()} holds {len(local)} data, expected {sizes[rank()]}")
    longest = max(sizes)
    padded = local.new_zeros((longest, *local.shape[1:]), device=_comm_device())
    padded[: len(local)] = local
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)]).to(local.device)


# --- data-parallel SVI --------------------------------------------------------------


def step_seed(seed: int, *key: int) -> int:
    """A 63-bit seed from ``seed`` and integer keys, e.g. ``(rank, epoch, step)``.

    Uses :class:`numpy.random.SeedSequence`, so nearby keys give unrelated streams.
    """
    words = np.random.SeedSequence([seed, *key]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) ^ int(words[1])


class DistributedSVI:
    """SVI steps on this rank's shard of each global minibatch, gradients averaged by DDP.

    The ELBO loss, Pyro's own module ``objective(vae.model, vae.guide)``
    (whose parameters are the VAE's), is wrapped in
    :class:`~torch.nn.parallel.DistributedDataParallel`: construction
    broadcasts rank 0's parameters; ``backward`` all-reduces the gradients.
    A rank's loss is weighted by :math:`W |\\mathcal B_r| / |\\mathcal B|` so
    that the average is the single-process gradient of the global batch (see
    the module docstring).

    The DDP wrapper is built at the first step, with ``find_unused_parameters``
    on when the prior has parameters and the latent site is masked out then
    (a KL weight of 0: the first epoch of a KL warm-up, ``beta = 0``, or the
    ``delta`` guide): those parameters get no gradient and keep
    ``grad = None`` on every rank, as in one process (Adam skips them). The
    KL weight only grows after its first epoch, so no parameter goes unused
    later when none did at the first step.

    Args:
        vae: The model (already on ``device``); the optimizer holds its parameters.
        objective: The Pyro ELBO.
        device: This rank's device (see :func:`local_device`).
        seed: The run's seed; rank ``r`` reseeds torch with
            :func:`step_seed` ``(seed, r, epoch, step)`` before each step.
    """

    def __init__(self, vae: VAE, objective: Any, device: torch.device, seed: int) -> None:
        from .objectives import FreeBits_ELBO

        if isinstance(objective, FreeBits_ELBO):
            warnings.warn(
                "free bits under distributed training clamp the KL averaged over each rank's "
                "shard of the minibatch, not over the whole minibatch",
                PyroVAEWarning,
                stacklevel=2,
            )
        self.vae = vae
        self.seed = seed
        self.loss = objective(vae.model, vae.guide)
        self.device = device
        self.module: DistributedDataParallel | None = None

    def _wrap(self, kl_scale: float) -> DistributedDataParallel:
        # only the prior's parameters can go unused: while the latent site is masked out
        # (as the model does at weight 0); the search costs a graph traversal
        masked = kl_scale == 0 or self.vae.posterior.is_point_estimate
        unused = masked and any(p.requires_grad for p in self.vae.prior.parameters())
        parameters = inspect.signature(DistributedDataParallel.__init__).parameters
        # buffers are constants (prior loc/scale, index maps): no broadcast before each forward
        sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters else None
        return DistributedDataParallel(
            self.loss,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused,
            **{sync or "broadcast_buffers": False},
        )

    def step(
        self,
        optimizer: torch.optim.Optimizer,
        x: torch.Tensor,
        index: torch.Tensor | None,
        data_size: int | None,
        position: tuple[int, int],
        stop: bool = False,
        kl_scale: float = 1.0,
        clip_norm: float = 0.0,
    ) -> tuple[float, bool]:
        """One SVI step on the global minibatch ``x`` (the same on every rank).

        The ranks' losses and stop flags are summed by one all-reduce that
        overlaps the backward pass; the update is skipped (on every rank)
        when the global loss is not finite.

        Args:
            optimizer: Over ``vae.parameters()``.
            x: The global minibatch ``(B, *event_shape)``.
            index: Its positions in the training set ``(B,)``.
            data_size: ``N``.
            position: ``(epoch, step)``, which seeds this rank's noise.
            stop: Whether this rank wants to stop (Ctrl-C).
            kl_scale: β, the weight of the KL term.
            clip_norm: Clip the averaged gradient's 2-norm to this (0: never);
                the same on every rank, since DDP averaged the gradients first.

        Returns:
            ``(loss, stop)``: the global loss
            :math:`-\\tfrac{N}{B}\\sum_{b}\\widehat{\\mathrm{ELBO}}(x_b)` (the
            average of the ranks' weighted losses) and whether any rank
            asked to stop; the same on every rank.
        """
        if self.module is None:
            self.module = self._wrap(kl_scale)  # broadcasts rank 0's parameters
        torch.manual_seed(step_seed(self.seed, rank(), *position))
        part = shard_bounds(len(x))
        xs = x[part]
        ids = None if index is None else index[part]
        weight = world_size() * len(xs) / len(x)
        if len(xs) == 0:  # fewer data than ranks: join the gradient all-reduce with zeros
            xs, ids, weight = x[:1], None if index is None else index[:1], 0.0
        loss = self.module(xs, ids, data_size, kl_scale) * weight
        totals = torch.stack([loss.detach(), loss.new_tensor(float(stop))]).to(_comm_device())
        work = dist.all_reduce(totals, op=dist.ReduceOp.SUM, async_op=True)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # DDP all-reduces the gradients here
        work.wait()
        value = float(totals[0]) / world_size()
        if math.isfinite(value):
            if clip_norm > 0:
                params = [p for group in optimizer.param_groups for p in group["params"]]
                torch.nn.utils.clip_grad_norm_(params, clip_norm)
            optimizer.step()
        return value, bool(totals[1] > 0)


# --- sharded evaluation ---------------------------------------------------------------


def sharded_mean(
    evaluate: Callable[[torch.Tensor], Mapping[str, Any]], x: torch.Tensor
) -> dict[str, Any]:
    """Per-datum means of ``x`` computed on shards and combined by all-reduce sums.

    Each rank evaluates its part :math:`x_r` (:func:`shard`); every value
    that is a float or a list of floats is a mean over the data, so

    .. math::

        \\bar v = \\sum_r \\frac{|x_r|}{|x|}\\, \\bar v_r .

    ``None`` values stay ``None`` (they must be ``None`` on every rank). On
    one process this is ``evaluate(x)`` itself.

    Args:
        evaluate: Data -> ``{name: mean}`` (e.g. :func:`pyro_vae.train.evaluate_elbo`).
        x: The whole data set (the same on every rank).

    Returns:
        The global means, the same on every rank.
    """
    if not is_distributed():
        return dict(evaluate(x))
    part = shard(x)
    weight = len(part) / len(x)
    if len(part) == 0:
        part, weight = x[:1], 0.0
    local = dict(evaluate(part))
    keys = sorted(k for k, v in local.items() if v is not None)
    flat = [torch.as_tensor(local[k], dtype=torch.float64).reshape(-1) for k in keys]
    total = all_reduce_sum(torch.cat(flat) * weight) if flat else torch.zeros(0)
    out: dict[str, Any] = dict.fromkeys(local)
    start = 0
    for key, values in zip(keys, flat, strict=True):
        chunk = total[start : start + len(values)]
        start += len(values)
        out[key] = chunk.tolist() if isinstance(local[key], list) else float(chunk[0])
    return out


def chunk_seed(seed: int, start: int) -> int:
    """The seed of the chunk of data that begins at position ``start`` (see :func:`shard_map`)."""
    return step_seed(seed, start)


def shard_map(
    fn: Callable[..., PerDatum],
    *inputs: torch.Tensor,
    chunk_size: int = 100,
    seed: int = 0,
) -> PerDatum:
    """Apply a per-datum function to data split over ranks; gather the results.

    The data (``inputs``, aligned along dimension 0, e.g. ``x`` and an
    ``index``) are cut into fixed chunks ``[s, s + chunk_size)``, the chunks
    dealt to ranks in contiguous blocks, and ``fn(*chunk)`` runs on each
    chunk with torch seeded by :func:`chunk_seed` ``(seed, s)`` (under
    :func:`torch.random.fork_rng`: the caller's random state is untouched).
    Since a chunk's draws depend only on ``(seed, s)``, the result is the
    same for any number of processes (given ``chunk_size``), up to
    floating-point differences between devices.

    Args:
        fn: Chunk(s) -> per-datum results: a tensor, or a tuple or dict of
            tensors, each with the chunk's data along dimension 0.
        *inputs: Tensors of the same length ``N`` (the same on every rank).
        chunk_size: Data per call of ``fn``.
        seed: Seed of the random draws.

    Returns:
        ``fn``'s structure with every tensor of length ``N`` in data order,
        on every rank (rank 0 writes the results).

    Example:
        >>> log_p = shard_map(  # doctest: +SKIP
        ...     lambda x: log_mean_exp(log_importance_weights(vae, x, 1000)), x, seed=0
        ... )
    """
    if not inputs:
        raise ValueError("shard_map needs at least one input tensor")
    n = len(inputs[0])
    if any(len(t) != n for t in inputs):
        raise ValueError(f"inputs of shard_map differ in length: {[len(t) for t in inputs]}")
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    if n == 0:
        raise ConfigError("no data to evaluate")
    starts = list(range(0, n, chunk_size))
    blocks = [shard_bounds(len(starts), r) for r in range(world_size())]
    sizes = [sum(min(chunk_size, n - s) for s in starts[b]) for b in blocks]
    device = inputs[0].device
    devices = [device.index or 0] if device.type == "cuda" else []
    results = []
    with torch.random.fork_rng(devices=devices):
        for start in starts[blocks[rank()]]:
            torch.manual_seed(chunk_seed(seed, start))
            results.append(fn(*(t[start : start + chunk_size] for t in inputs)))
    # a rank with no chunk learns the structure (trailing shapes, dtypes) from rank 0
    template = None
    if results:
        names, first = _flatten(results[0])
        template = (names, [(tuple(t.shape[1:]), t.dtype) for t in first])
    if is_distributed():
        shared = [template]
        dist.broadcast_object_list(shared, src=0)
        template = shared[0]
    assert template is not None
    names, specs = template
    columns = [_flatten(r)[1] for r in results]
    gathered = []
    for i, (shape, dtype) in enumerate(specs):
        parts = [c[i] for c in columns]
        local = torch.cat(parts) if parts else torch.empty((0, *shape), dtype=dtype, device=device)
        gathered.append(gather_per_datum(local, sizes))
    return _rebuild(names, gathered)


def _flatten(out: PerDatum) -> tuple[None | int | list[str], list[torch.Tensor]]:
    """``(structure, tensors)``: ``None`` for a tensor, the length of a tuple, a dict's keys."""
    if isinstance(out, torch.Tensor):
        return None, [out]
    if isinstance(out, tuple):
        return len(out), list(out)
    if isinstance(out, dict):
        return list(out), list(out.values())
    raise TypeError(f"shard_map: fn must return a tensor, tuple or dict, got {type(out).__name__}")


def _rebuild(names: None | int | list[str], tensors: list[torch.Tensor]) -> PerDatum:
    if names is None:
        return tensors[0]
    if isinstance(names, int):
        return tuple(tensors)
    return dict(zip(names, tensors, strict=True))
