"""Pyro overhead: the SVI training step against a hand-written PyTorch step.

All steps use the same 784-400-D MLP encoder/decoder (copies of one model),
the same analytic-KL negative ELBO scaled to the full data set, and Adam:
``pyro`` is the trainer's step strategy (:class:`pyro_vae.train.SVIStep`),
``pyro-svi`` is Pyro's own ``SVI(vae.model, vae.guide, pyro.optim.Adam, ...)``.
Steps are interleaved (one of each in turn) so that the shared, noisy machine
slows both alike; we report the median step time of each and the ratio of
medians, with the interquartile range of the per-pair ratios.

Usage:
    python benchmarks/overhead.py [--batch-sizes 128 1024] [--steps 200] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.infer
import pyro.optim
import torch
import torch.nn.functional as F

import pyro_vae
from pyro_vae.train import SVIStep

DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "binarized_mnist.npz"


def load_data(device: str) -> torch.Tensor:
    if DATA.exists():
        x = np.load(DATA)["train"].reshape(-1, 28, 28)
        return torch.as_tensor(x, dtype=torch.float32, device=device)
    print(f"({DATA} absent: using random binary images)")
    g = torch.Generator().manual_seed(0)
    return torch.bernoulli(torch.full((50_000, 28, 28), 0.13), generator=g).to(device)


def make_vae(latent_dim: int, device: str) -> pyro_vae.VAE:
    config = pyro_vae.Config().override(
        {"model.latent_dim": latent_dim, "data.name": "binarized-mnist"}
    )
    return pyro_vae.build_vae(pyro_vae.resolve(config).model, (28, 28)).to(device)


def torch_step(vae, optimizer, x, n):
    """The hand-written reference: the same network, the closed-form negative ELBO."""
    enc = vae.posterior
    h = enc.trunk(x)
    mu, log_var = enc.loc(h), enc.log_var(h)
    z = mu + torch.exp(0.5 * log_var) * torch.randn_like(mu)
    logits = vae.likelihood.network(z)
    rec = -F.binary_cross_entropy_with_logits(logits, x.flatten(1), reduction="none").sum(1)
    kl = 0.5 * (mu.pow(2) + log_var.exp() - log_var - 1).sum(1)
    loss = -(rec - kl).sum() * (n / x.shape[0])
    value = loss.item()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return value


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench(batch: int, steps: int, device: str, latent_dim: int, data: torch.Tensor) -> dict:
    n = len(data)
    ref_vae = make_vae(latent_dim, device)
    pyro_vae_ = copy.deepcopy(ref_vae)
    nov_vae = copy.deepcopy(ref_vae)
    svi_vae = copy.deepcopy(ref_vae)
    opt_ref = torch.optim.Adam(ref_vae.parameters(), lr=1e-3)
    objective = pyro_vae.OBJECTIVES.build("meanfield", {}, "train")
    step_pyro = SVIStep(pyro_vae_, objective, lr=1e-3)
    step_nov = SVIStep(nov_vae, objective, lr=1e-3)
    svi = pyro.infer.SVI(svi_vae.model, svi_vae.guide, pyro.optim.Adam({"lr": 1e-3}), objective)
    g = torch.Generator().manual_seed(0)

    def pyro_default(x, idx):
        return step_pyro.step(x, idx, n, 1.0)

    def pyro_no_validation(x, idx):
        with pyro.validation_enabled(False):
            return step_nov.step(x, idx, n, 1.0)

    def pyro_svi(x, idx):
        with pyro.validation_enabled(False):
            return svi.step(x, idx, n)

    def reference(x, idx):
        return torch_step(ref_vae, opt_ref, x, n)

    runners = {
        "torch": reference,
        "pyro": pyro_default,
        "pyro-novalidate": pyro_no_validation,
        "pyro-svi": pyro_svi,
    }
    times = {k: [] for k in runners}
    for i in range(steps + 10):
        idx = torch.randint(0, n, (batch,), generator=g).to(device)
        x = data[idx]
        order = list(runners.items())
        if i % 2:
            order.reverse()
        for name, run in order:
            sync(device)
            t0 = time.perf_counter()
            run(x, idx)
            sync(device)
            if i >= 10:  # warm-up
                times[name].append(time.perf_counter() - t0)
    out = {"batch": batch}
    ref = np.array(times["torch"])
    out["torch_ms"] = 1000 * statistics.median(ref)
    for name in NAMES:
        t = np.array(times[name])
        ratios = t / ref
        out[f"{name}_ms"] = 1000 * statistics.median(t)
        out[f"{name}_ratio"] = statistics.median(t) / statistics.median(ref)
        out[f"{name}_ratio_iqr"] = tuple(np.percentile(ratios, [25, 75]))
    return out


NAMES = ("pyro", "pyro-novalidate", "pyro-svi")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--latent-dim", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = load_data(args.device)
    print(
        f"device {args.device}, torch threads {torch.get_num_threads()}, "
        f"784-400-{args.latent_dim} MLP, {args.steps} interleaved steps per setup"
    )
    print(f"{'batch':>6} {'torch ms':>9} {'setup':>16} {'ms':>8} {'ratio':>6}  per-step IQR")
    for batch in args.batch_sizes:
        r = bench(batch, args.steps, args.device, args.latent_dim, data)
        for name in NAMES:
            lo, hi = r[f"{name}_ratio_iqr"]
            print(
                f"{batch:>6} {r['torch_ms']:>9.2f} {name:>16} {r[f'{name}_ms']:>8.2f} "
                f"{r[f'{name}_ratio']:>6.2f}  [{lo:.2f}, {hi:.2f}]"
            )


if __name__ == "__main__":
    main()
