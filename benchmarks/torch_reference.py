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
of epochs, then this loop. Both best-validation models are evaluated by the
same importance-sampling estimator on the same test data with the same
seed, so the per-datum log p(x) pair up (``pyro_vae.paired_difference``).

Usage (through the harness):
    PYRO_VAE_DATA=../shared/datasets python benchmarks/nll_table.py --rows torch-reference
        --epochs 60 [--num-samples 1000] [--max-data N]
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
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


def run_row(args: Any, command: str) -> dict[str, Any]:
    """Train both sides for ``args.epochs`` (default 60), evaluate both, and compare them."""
    from nll_table import ROWS, result_record

    from pyro_vae.checkpoint import load_checkpoint
    from pyro_vae.environment import environment
    from pyro_vae.evaluate import paired_difference
    from pyro_vae.train import load_data

    epochs = args.epochs or 60
    config = pyro_vae.Config.load(args.configs / "standard.toml")
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, epochs=epochs))
    config = pyro_vae.resolve(config)
    prepared = load_data(config)
    data = {s: prepared.split(s).flatten(1) for s in ("train", "valid", "test")}

    reference = initial_model(config)
    initial = to_package(reference.state_dict())

    def same_start(vae: pyro_vae.VAE) -> None:
        vae.load_state_dict({**vae.state_dict(), **initial})

    run = args.runs.expanduser() / "torch-reference-pyro"
    if (run / "checkpoint.pt").exists():
        raise SystemExit(f"{run} exists: move it away to measure the pair again")
    pyro_result = pyro_vae.fit(config, run, initialize=same_start, progress=not args.quiet)
    torch_result = train_torch(reference, data, config.train, epochs)

    k, x = args.num_samples, data["test"]
    if args.max_data:
        x = x[: args.max_data]
    x = x.reshape(-1, 28, 28)

    def evaluate_torch(state: dict[str, torch.Tensor]) -> Any:
        return evaluate_state(run, state, x, config, k, progress=not args.quiet)

    def evaluate_pyro(checkpoint: str) -> Any:
        return pyro_vae.evaluate_run(
            run, checkpoint=checkpoint, num_samples=k, max_data=args.max_data,
            max_seconds=None, progress=not args.quiet,
        )  # fmt: skip

    # the protocol's pair (each side's best validation epoch), then the same epoch on both
    # sides (the last): the second has no selection noise in it
    pyro_eval, torch_eval = evaluate_pyro("best"), evaluate_torch(torch_result["state"])
    paired = paired_difference(pyro_eval, torch_eval)
    last = paired_difference(evaluate_pyro("last"), evaluate_torch(torch_result["last_state"]))
    torch.save(
        {"best": torch_result["state"], "last": torch_result["last_state"]},
        run / "torch-reference-weights.pt",
    )  # the plain loop's weights, beside the pyro-vae run they are paired with
    pyro_seconds = [r["seconds"] for r in pyro_result.history]
    ratio = statistics.median(pyro_seconds) / statistics.median(torch_result["seconds"])

    record = result_record("torch-reference", run, torch_eval.summary | {
        "checkpoint": "best (plain loop)", "checkpoint_epoch": torch_result["best_epoch"],
    }, command, args.configs)  # fmt: skip
    state = load_checkpoint(run)
    record.update(
        {
            "epochs": len(torch_result["seconds"]),
            "best_epoch": torch_result["best_epoch"],
            "wall_seconds": sum(torch_result["seconds"]),
            "threads": torch.get_num_threads(),
            "provenance": "plain PyTorch loop, same initial weights and protocol as the pair",
            "pair": {
                "pyro_vae_run": str(run),
                "pyro_vae_nll": -pyro_eval.summary["log_likelihood"],
                "pyro_vae_best_epoch": (state.get("best") or {}).get("epoch"),
                "difference_pyro_minus_torch": paired["difference"],
                "paired_se": paired["paired_se"],
                "monte_carlo_se": paired["monte_carlo_se"],
                "separate_se": paired["separate_se"],
                "median_epoch_seconds_pyro": statistics.median(pyro_seconds),
                "median_epoch_seconds_torch": statistics.median(torch_result["seconds"]),
                "time_ratio_pyro_over_torch": ratio,
                "last_epoch_difference_pyro_minus_torch": last["difference"],
                "last_epoch_paired_se": last["paired_se"],
            },
            "target": None,
            "published": ROWS["torch-reference"][1],
            "versions": {"trained_with": environment("cpu"), "evaluated_with": environment("cpu")},
        }
    )
    within = abs(paired["difference"]) <= 2 * paired["paired_se"]
    record["verdict"] = (
        f"pyro-vae {'equal' if within else 'not equal'}: Δ {paired['difference']:+.2f} ± "
        f"{paired['paired_se']:.2f} (best epochs), {last['difference']:+.2f} ± "
        f"{last['paired_se']:.2f} (last epoch); time {ratio:.2f}× at {epochs} epochs"
    )
    return record
