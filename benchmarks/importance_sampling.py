"""Importance-sampling throughput and memory of pyro_vae.evaluate against hand-written torch.

Trains (or reuses) a 784-400-50 MLP VAE on binarized MNIST, then measures, in
one process and interleaved so that both see the same machine load:

* ``reference``: hand-written batched torch (encoder once, then chunks of
  ``z = mu + sigma * eps`` through the decoder, Bernoulli log-likelihood by
  ``binary_cross_entropy_with_logits``, Gaussian log densities by hand);
* ``log_importance_weights``: the library's per-datum ``[K, B]`` weights plus
  ``logsumexp`` (the IS estimate alone, the like-for-like comparison);
* ``evaluate``: the whole evaluation (weights, IWAE bounds, ESS, arviz k-hat).

Throughput is data points per second over all repeats; ratios are given for
wall-clock and for process CPU time (the second is less sensitive to other
processes on a shared machine). Peak memory
(max RSS of the whole process, torch included) is measured for
``evaluate_run`` in a fresh child process per K.

Usage (2 threads, as in the issue's reference numbers)::

    python benchmarks/importance_sampling.py --data-dir ../shared/datasets
    python benchmarks/importance_sampling.py --data-dir ../shared/datasets --full  # 10k x 5000

The first run trains the model (``--epochs``, default 2) into ``--run-dir``;
later runs reuse it. Not a test: nothing here asserts.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

import pyro_vae
from pyro_vae.evaluate import evaluate, evaluate_run, log_importance_weights, log_mean_exp
from pyro_vae.train import load_data


def train_or_load(
    run_dir: Path, data_dir: str, epochs: int
) -> tuple[pyro_vae.VAE, pyro_vae.Config]:
    if not (run_dir / "checkpoint.pt").exists():
        config = pyro_vae.Config().override(
            {
                "data.name": "binarized-mnist",
                "data.data_dir": data_dir,
                "data.download": False,
                "model.latent_dim": 50,
                "model.encoder.hidden": [400],
                "model.decoder.hidden": [400],
                "train.epochs": epochs,
                "train.batch_size": 100,
            }
        )
        start = time.perf_counter()
        pyro_vae.fit(config, run_dir, log=print)
        print(f"trained {epochs} epochs in {time.perf_counter() - start:.0f} s -> {run_dir}")
    config = pyro_vae.Config.load(run_dir / "config.toml")
    return pyro_vae.load(run_dir), config


@torch.no_grad()
def reference_log_likelihood(
    vae: pyro_vae.VAE, x: torch.Tensor, k_total: int, batch: int, chunk: int
) -> torch.Tensor:
    """Hand-written batched torch: log p(x) per datum by IS with the Gaussian encoder."""
    trunk, loc_head, log_var_head = vae.posterior.trunk, vae.posterior.loc, vae.posterior.log_var
    decoder = vae.likelihood.network
    d = loc_head.out_features
    log_2pi = math.log(2 * math.pi)
    out = []
    for start in range(0, len(x), batch):
        xb = x[start : start + batch]
        h = trunk(xb)
        xb = xb.flatten(1)
        mu, log_var = loc_head(h), log_var_head(h)
        std = torch.exp(0.5 * log_var)
        per_chunk = max(1, chunk // len(xb))
        log_w = []
        for s in range(0, k_total, per_chunk):
            k = min(per_chunk, k_total - s)
            eps = torch.randn(k, *mu.shape)
            z = mu + std * eps
            logits = decoder(z)
            log_px = -F.binary_cross_entropy_with_logits(
                logits, xb.expand_as(logits), reduction="none"
            ).sum(-1)
            log_pz = -0.5 * (z * z).sum(-1) - 0.5 * d * log_2pi
            log_q = -0.5 * (eps * eps).sum(-1) - 0.5 * log_var.sum(-1) - 0.5 * d * log_2pi
            log_w.append(log_px + log_pz - log_q)
        out.append(torch.logsumexp(torch.cat(log_w), 0) - math.log(k_total))
    return torch.cat(out)


def library_log_likelihood(
    vae: pyro_vae.VAE, x: torch.Tensor, k_total: int, batch: int, chunk: int
) -> torch.Tensor:
    out = []
    for start in range(0, len(x), batch):
        log_w = log_importance_weights(vae, x[start : start + batch], k_total, chunk_size=chunk)
        out.append(log_mean_exp(log_w))
    return torch.cat(out)


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def memory_child(run_dir: str, k: int, n: int, batch: int, chunk: int) -> None:
    start = time.perf_counter()
    result = evaluate_run(
        run_dir, num_samples=k, max_data=n, batch_size=batch, chunk_size=chunk, write=False
    )
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    print(
        json.dumps(
            {
                "K": k,
                "num_data": n,
                "peak_rss_mib": peak,
                "seconds": seconds,
                "data_per_second": n / seconds,
                "log_likelihood": result.summary["log_likelihood"],
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=os.environ.get("PYRO_VAE_SHARED_DATA"))
    parser.add_argument("--run-dir", default="runs/bench-binarized-mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--data-1000", type=int, default=200, help="data timed at K=1000")
    parser.add_argument("--data-5000", type=int, default=100, help="data timed at K=5000")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-data", type=int, default=500, help="data in the memory runs")
    parser.add_argument("--full", action="store_true", help="memory run over all 10k test data")
    parser.add_argument("--skip-memory", action="store_true", help="timings only")
    parser.add_argument("--memory-child", nargs=5, metavar=("RUN", "K", "N", "B", "C"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory_child:
        run, k, n, b, c = args.memory_child
        memory_child(run, int(k), int(n), int(b), int(c))
        return
    if args.data_dir is None:
        sys.exit("pass --data-dir (the folder with binarized_mnist.npz)")

    run_dir = Path(args.run_dir)
    vae, config = train_or_load(run_dir, args.data_dir, args.epochs)
    x_all = load_data(config).split("test")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    print(f"chunk {args.chunk_size} samples; model {run_dir}")

    for k, n in ((1000, args.data_1000), (5000, args.data_5000)):
        methods = {
            "reference": lambda xb, seed, k=k: reference_log_likelihood(
                vae, xb, k, args.batch_size, args.chunk_size
            ),
            "log_importance_weights": lambda xb, seed, k=k: library_log_likelihood(
                vae, xb, k, args.batch_size, args.chunk_size
            ),
            "evaluate": lambda xb, seed, k=k: evaluate(
                vae,
                xb,
                num_samples=k,
                batch_size=args.batch_size,
                chunk_size=args.chunk_size,
                seed=seed,
            ).per_datum["log_likelihood"],
        }
        wall = dict.fromkeys(methods, 0.0)
        cpu = dict.fromkeys(methods, 0.0)
        means = {name: [] for name in methods}
        # interleaved batch by batch, the order reversed every round, so that every
        # method sees the same machine load (other processes share the 2 cores)
        names = list(methods)
        for name in names:  # warm up: lazy imports (arviz), allocator, caches
            methods[name](x_all[:10], 0)
        rounds = 0
        for repeat in range(args.repeats):
            for start in range(0, n, args.batch_size):
                xb = x_all[start : min(start + args.batch_size, n)]
                for name in names if rounds % 2 == 0 else names[::-1]:
                    torch.manual_seed(repeat)
                    w0, c0 = time.perf_counter(), time.process_time()
                    values = methods[name](xb, repeat)
                    wall[name] += time.perf_counter() - w0
                    cpu[name] += time.process_time() - c0
                    means[name].append(float(torch.as_tensor(values).mean()))
                rounds += 1
        total = n * args.repeats
        print(f"\nK = {k}, {n} test data x {args.repeats} repeats, interleaved:")
        for name in methods:
            rate = total / wall[name]
            print(
                f"  {name:24s} {rate:8.1f} data/s  wall {wall['reference'] / wall[name]:.3f}x, "
                f"cpu {cpu['reference'] / cpu[name]:.3f}x reference"
            )
        print(
            "  mean log p(x): "
            + ", ".join(f"{name} {sum(v) / len(v):.3f}" for name, v in means.items())
        )

    if args.skip_memory:
        return
    n_memory = len(x_all) if args.full else args.memory_data
    print(f"\npeak memory of evaluate_run in a fresh process ({n_memory} test data):")
    for k in (1000, 5000):
        child = [
            sys.executable,
            __file__,
            "--threads",
            str(args.threads),
            "--memory-child",
            str(run_dir),
            str(k),
            str(n_memory),
            str(args.batch_size),
            str(args.chunk_size),
        ]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        record = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"  K = {k}: peak RSS {record['peak_rss_mib']:.0f} MiB, "
            f"{record['data_per_second']:.1f} data/s, log p(x) {record['log_likelihood']:.3f}"
        )


if __name__ == "__main__":
    main()
