"""The `torch-reference` row: the `standard` network trained by a plain PyTorch loop.

The same model as ``configs/benchmarks/standard.toml`` -- 784-300-300 ReLU
encoder with linear heads for the mean and log-variance of q(z|x), a 40-D
N(0, I) prior, a 40-300-300-784 ReLU decoder of Bernoulli logits -- written as
two ``nn.Sequential`` and a closed-form negative ELBO,

    -ELBO(x) = BCE(decoder(z), x) + β KL(N(μ, σ²) || N(0, I)),  z = μ + σ ε,

trained with the row's optimizer and protocol (Adam, KL warm-up, batch size,
plateau schedule on the validation ELBO, early stopping, best weights kept).
No Pyro anywhere in the loop.

Side by side in one process, from the same initial weights and the same
minibatch order: the package's trainer (``pyro_vae.fit``) for the same number
of epochs, then this loop; R times (``--replicates``, default 3), each
replicate with its own reparameterization-noise seed, shared by its two
sides (common random numbers: the guide's ``rsample`` and the loop's
``randn_like`` draw the same ε, so the two sides of a replicate differ only
in how they compute; the record keeps how far apart their last weights are). Every best-validation
model is evaluated by the same importance-sampling estimator on the same
test data with the same seed, so the per-datum log p(x) pair up
(``pyro_vae.paired_difference``). One pair's paired SE holds evaluation
noise only; two trainings that differ only in their noise land a few tenths
of a nat apart, so the verdict compares the sides' means over R runs with
the SE of the run-to-run spread. Existing replicates (``RUNS/torch-reference-pyro[-noiseR]``
and ``RUNS/torch-reference-torch[-noiseR].pt``) are reused, not retrained.

Usage (through the harness):
    PYRO_VAE_DATA=../shared/datasets python benchmarks/nll_table.py --rows torch-reference
        --epochs 60 [--replicates 3] [--num-samples 1000] [--max-data N]
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import pyro_vae
from pyro_vae.objectives import kl_weight


class TorchVAE(nn.Module):
    """The `standard` row's VAE as plain modules; parameter order matches the package's VAE."""

    def __init__(self, pixels: int = 784, hidden: tuple[int, ...] = (300, 300), latent: int = 40):
        super().__init__()
        widths = [pixels, *hidden]
        layers: list[nn.Module] = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.loc = nn.Linear(hidden[-1], latent)
        self.log_var = nn.Linear(hidden[-1], latent)
        widths = [latent, *hidden]
        layers = []
        for a, b in zip(widths[:-1], widths[1:], strict=True):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.decoder = nn.Sequential(*layers, nn.Linear(hidden[-1], pixels))

    def terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-datum reconstruction log-likelihood and KL, one z each; ``x`` is ``(B, 784)``."""
        h = self.trunk(x)
        mu, log_var = self.loc(h), self.log_var(h)
        z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
        logits = self.decoder(z)
        rec = -F.binary_cross_entropy_with_logits(logits, x, reduction="none").sum(1)
        kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).sum(1)
        return rec, kl


#: TorchVAE parameter -> the package VAE's parameter of the same role.
NAMES = {
    "trunk.0": "posterior.trunk.layers.0",
    "trunk.2": "posterior.trunk.layers.2",
    "loc": "posterior.loc",
    "log_var": "posterior.log_var",
    "decoder.0": "likelihood.network.layers.0",
    "decoder.2": "likelihood.network.layers.2",
    "decoder.4": "likelihood.network.layers.4",
}


def to_package(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A TorchVAE state dict under the package VAE's names (the prior has no parameters)."""
    out = {}
    for key, value in state.items():
        module, leaf = key.rsplit(".", 1)
        out[f"{NAMES[module]}.{leaf}"] = value
    return out


@torch.no_grad()
def elbo(model: TorchVAE, x: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        rec, kl = model.terms(x[i : i + batch])
        total += float((rec - kl).sum())
    return total / len(x)


def train_torch(
    model: TorchVAE, data: dict[str, torch.Tensor], train: Any, epochs: int
) -> dict[str, Any]:
    """The plain loop: the row's protocol; returns per-epoch seconds and the best weights."""
    x, valid = data["train"], data["valid"]
    n, batch = len(x), train.batch_size
    optimizer = torch.optim.Adam(model.parameters(), lr=train.lr)
    schedule = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, mode="max", factor=train.lr_gamma, patience=train.lr_patience,
        min_lr=train.lr_min,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(train.seed)
    best, best_state, seconds, history = -math.inf, None, [], []
    for epoch in range(1, epochs + 1):
        beta = kl_weight(train.beta, train.kl_warmup_epochs, epoch)
        model.train()
        start = time.perf_counter()
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch):
            xb = x[perm[i : i + batch]]
            rec, kl = model.terms(xb)
            loss = -(rec - beta * kl).sum() * (n / len(xb))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        seconds.append(time.perf_counter() - start)
        v = elbo(model, valid)
        history.append({"epoch": epoch, "valid_elbo": v, "lr": optimizer.param_groups[0]["lr"]})
        if v > best:
            best, best_epoch = v, epoch
            best_state = {k: t.clone() for k, t in model.state_dict().items()}
        if epoch > train.kl_warmup_epochs:
            schedule.step(v)
        anchor = max(best_epoch, train.kl_warmup_epochs)
        if train.early_stopping_patience and epoch - anchor >= train.early_stopping_patience:
            break
    last_state = {k: t.clone() for k, t in model.state_dict().items()}
    return {
        "seconds": seconds,
        "best_epoch": best_epoch,
        "state": best_state,
        "last_state": last_state,
        "history": history,
    }


def initial_model(config: Any) -> TorchVAE:
    """The pair's starting point: a TorchVAE built right after seeding with ``train.seed``."""
    torch.manual_seed(config.train.seed)
    return TorchVAE(latent=config.model.latent_dim)


def evaluate_vae(
    vae: pyro_vae.VAE, x: torch.Tensor, config: Any, num_samples: int, progress: bool = False
) -> Any:
    """IS evaluation with the estimator settings of ``config.eval`` (those of ``evaluate_run``).

    Same seed, batch and chunk sizes for every model, so per-datum log p(x) pair up.
    """
    from pyro_vae.evaluate import evaluate

    return evaluate(
        vae, x, num_samples=num_samples, seed=config.eval.seed,
        batch_size=config.eval.batch_size, chunk_size=config.eval.chunk_size, split="test",
        max_seconds=None, progress=progress,
    )  # fmt: skip


def evaluate_state(
    run: Any, state: dict[str, torch.Tensor], x: torch.Tensor, config: Any, num_samples: int,
    progress: bool = False,
) -> Any:  # fmt: skip
    """:func:`evaluate_vae` of a TorchVAE ``state``, loaded into the modules of ``run``."""
    vae = pyro_vae.load(run)
    vae.load_state_dict({**vae.state_dict(), **to_package(state)})
    return evaluate_vae(vae, x, config, num_samples, progress)


def replicate_paths(runs: Path, replicate: int) -> tuple[Path, Path]:
    """Replicate ``r`` of the pair: the pyro-vae run folder and the plain loop's file."""
    suffix = "" if replicate == 0 else f"-noise{replicate}"
    return runs / f"torch-reference-pyro{suffix}", runs / f"torch-reference-torch{suffix}.pt"


def train_replicate(
    config: Any, data: dict[str, torch.Tensor], runs: Path, replicate: int, progress: bool
) -> tuple[Path, dict[str, Any]]:
    """Replicate ``r`` of the pair, trained or (when its files exist) reused.

    Both sides start from :func:`initial_model`'s weights and draw the same
    minibatch order (the generator seeded with ``train.seed``); only the
    reparameterization noise differs between replicates: ``torch.manual_seed(r)``
    right after the weights are set, on both sides.
    """
    run, torch_file = replicate_paths(runs, replicate)
    initial = initial_model(config).state_dict()
    if (run / "best.pt").exists():
        print(f"torch-reference: replicate {replicate}: reusing {run}")
    else:

        def same_start(vae: pyro_vae.VAE) -> None:
            vae.load_state_dict({**vae.state_dict(), **to_package(initial)})
            torch.manual_seed(replicate)  # after fit's own seeding: only the noise changes

        pyro_vae.fit(config, run, initialize=same_start, progress=progress)
    if torch_file.exists():
        print(f"torch-reference: replicate {replicate}: reusing {torch_file}")
        result = torch.load(torch_file, weights_only=True)
    else:
        model = initial_model(config)
        torch.manual_seed(replicate)
        result = train_torch(model, data, config.train, config.train.epochs)
        result["epochs"] = config.train.epochs
        torch.save(result, torch_file)
    return run, result


def run_row(args: Any, command: str) -> dict[str, Any]:
    r"""Train ``args.replicates`` pairs for ``args.epochs`` (default 60), evaluate, compare.

    Every model (R per side) is evaluated by the same importance-sampling
    estimator on the same test data with the same seed. Two comparisons:
    the paired difference of replicate 0 (evaluation noise only: the test
    data and the K draws), and the difference of the two sides' mean
    −log p(x) over R replicates with its SE from the run-to-run spread,
    :math:`\sqrt{s_{pyro}^2/R + s_{torch}^2/R}`, which contains the training
    noise; the verdict reads the second (equal when within 2 SE). The time
    ratio is the median epoch time of the pyro-vae runs over that of the
    plain loop's (training steps only, validation excluded on both sides).
    """
    from nll_table import ROWS, result_record

    from pyro_vae.checkpoint import load_checkpoint, read_run_config
    from pyro_vae.evaluate import paired_difference
    from pyro_vae.train import load_data

    epochs, replicates = args.epochs or 60, args.replicates
    config = pyro_vae.Config.load(args.configs / "standard.toml")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    config = pyro_vae.resolve(config)
    prepared = load_data(config)
    data = {s: prepared.split(s).flatten(1) for s in ("train", "valid", "test")}
    runs = args.runs.expanduser()
    runs.mkdir(parents=True, exist_ok=True)
    x = data["test"][: args.max_data].reshape(-1, 28, 28)
    load_before = os.getloadavg()

    for r in range(replicates):  # refuse before any training: a replicate of other epochs
        run, torch_file = replicate_paths(runs, r)
        trained = (
            read_run_config(run).train.epochs if (run / "best.pt").exists() else epochs,
            torch.load(torch_file, weights_only=True)["epochs"] if torch_file.exists() else epochs,
        )
        if trained != (epochs, epochs):
            raise SystemExit(
                f"replicate {r} was trained for {trained} epochs (pyro-vae, plain loop), not "
                f"{epochs}: pass that --epochs, or move {run} and {torch_file} away"
            )
    pairs, apart = [], []
    for r in range(replicates):
        run, result = train_replicate(config, data, runs, r, progress=not args.quiet)
        pyro_eval = evaluate_vae(pyro_vae.load(run, checkpoint="best"), x, config, args.num_samples)
        torch_eval = evaluate_state(run, result["state"], x, config, args.num_samples)
        pairs.append((run, result, pyro_eval, torch_eval))
        last = pyro_vae.load(run, checkpoint="last").state_dict()
        apart.append(
            max(
                float((last[k] - v).abs().max())
                for k, v in to_package(result["last_state"]).items()
            )
        )
        print(
            f"torch-reference: replicate {r}: -log p(x) pyro-vae "
            f"{-pyro_eval.summary['log_likelihood']:.2f}, plain loop "
            f"{-torch_eval.summary['log_likelihood']:.2f}; last weights apart by {apart[-1]:.3g}"
        )

    run, result, pyro_eval, torch_eval = pairs[0]
    paired = paired_difference(pyro_eval, torch_eval)
    nll_pyro = [-p[2].summary["log_likelihood"] for p in pairs]
    nll_torch = [-p[3].summary["log_likelihood"] for p in pairs]
    difference = statistics.mean(nll_pyro) - statistics.mean(nll_torch)
    se = (
        math.sqrt((statistics.variance(nll_pyro) + statistics.variance(nll_torch)) / replicates)
        if replicates > 1
        else math.nan
    )
    best_pyro = [(load_checkpoint(p[0]).get("best") or {}).get("epoch") for p in pairs]
    pyro_seconds = [r["seconds"] for p in pairs for r in pyro_vae.read_metrics(p[0])]
    torch_seconds = [s for p in pairs for s in p[1]["seconds"]]
    ratio = statistics.median(pyro_seconds) / statistics.median(torch_seconds)

    record = result_record("torch-reference", run, torch_eval.summary | {
        "checkpoint": "best (plain loop)", "checkpoint_epoch": result["best_epoch"],
    }, command, args.configs)  # fmt: skip
    record.update(
        {
            "epochs": len(result["seconds"]),
            "best_epoch": result["best_epoch"],
            "wall_seconds": sum(result["seconds"]),
            "provenance": (
                "plain PyTorch loop (replicate 0), same initial weights, minibatch order "
                "and protocol as its pyro-vae pair"
            ),
            "pair": {
                "pyro_vae_run": str(run),
                "pyro_vae_nll": nll_pyro[0],
                "pyro_vae_best_epoch": best_pyro[0],
                "difference_pyro_minus_torch": paired["difference"],
                "paired_se": paired["paired_se"],
                "monte_carlo_se": paired["monte_carlo_se"],
                "separate_se": paired["separate_se"],
            },
            "replicates": {
                "count": replicates,
                "noise_seeds": list(range(replicates)),
                "nll_pyro_vae": nll_pyro,
                "nll_plain_loop": nll_torch,
                "best_epochs_pyro_vae": best_pyro,
                "best_epochs_plain_loop": [p[1]["best_epoch"] for p in pairs],
                "last_weights_max_abs_difference": apart,
                "nll_difference_pyro_minus_torch": difference,
                "nll_difference_se": se,
                "median_epoch_seconds_pyro": statistics.median(pyro_seconds),
                "median_epoch_seconds_torch": statistics.median(torch_seconds),
                "time_ratio_pyro_over_torch": ratio,
                "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
            },
            "target": None,
            "published": ROWS["torch-reference"][1],
        }
    )
    within = abs(difference) <= 2 * se
    record["verdict"] = (
        f"pyro-vae {'equal' if within else 'not equal'} within training noise: its −log p(x) "
        f"minus the plain loop's {difference:+.2f} ± {se:.2f} nats ({replicates} runs a side); "
        f"time {ratio:.2f}× at {epochs} epochs"
    )
    return record
