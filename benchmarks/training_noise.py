"""How far apart two trainings of the same network land when only the noise differs.

The `torch-reference` row pairs the package's trainer with a plain PyTorch loop
from the same initial weights and the same minibatch order; the two runs still
draw different reparameterization noise, so their test log p(x) differ even if
the two implementations are the same. This script measures that spread: it
trains the plain loop (``torch_reference.train_torch``) twice more from the
pair's initial weights and minibatch order, with two other noise seeds, and
evaluates both, and the pair's pyro-vae run, with the same importance-sampling
estimator (same K, same seed, same test data), so every difference is paired.
With ``--side pyro`` it does the same for the package's trainer: two more
``pyro_vae.fit`` runs from the same weights and order, with other noise.

If the two plain-loop runs differ by about as much as pyro-vae and the plain
loop, the pair's difference is training noise, which the paired SE of one pair
(evaluation noise only) does not contain.

Usage:
    PYRO_VAE_DATA=../shared/datasets python benchmarks/training_noise.py \
        [--runs ~/.cache/pyro-vae/bench] [--noise-seeds 1 2] [--num-samples 1000]

Writes ``benchmarks/results/torch-reference-noise.json`` (``-pyro.json`` for ``--side pyro``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from torch_reference import evaluate_state, evaluate_vae, initial_model, to_package, train_torch

import pyro_vae
from pyro_vae.evaluate import paired_difference
from pyro_vae.train import load_data

ROOT = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=Path("~/.cache/pyro-vae/bench"))
    parser.add_argument("--noise-seeds", type=int, nargs=2, default=[1, 2])
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=int, help="default: the pair's")
    parser.add_argument("--max-data", type=int, help="the first N test data only")
    parser.add_argument("--side", choices=("torch", "pyro"), default="torch")
    parser.add_argument(
        "--out", type=Path, help="default: results/torch-reference-noise[-pyro].json"
    )
    args = parser.parse_args()
    suffix = "" if args.side == "torch" else "-pyro"
    args.out = args.out or ROOT / "results" / f"torch-reference-noise{suffix}.json"
    torch.set_num_threads(args.threads)

    run = args.runs.expanduser() / "torch-reference-pyro"
    if not (run / "best.pt").exists():
        raise SystemExit(f"{run} has no best.pt: run `nll_table.py --rows torch-reference` first")
    config = pyro_vae.resolve(pyro_vae.Config.load(run / "config.toml"))
    epochs = args.epochs or config.train.epochs
    prepared = load_data(config)
    data = {s: prepared.split(s).flatten(1) for s in ("train", "valid", "test")}
    initial = initial_model(config).state_dict()  # the pair's initial weights
    x = data["test"][: args.max_data].reshape(-1, 28, 28)

    def evaluate_best(run_dir: Path) -> pyro_vae.Evaluation:
        """The best checkpoint of a package run, by the plain loop's estimator settings."""
        return evaluate_vae(pyro_vae.load(run_dir, checkpoint="best"), x, config, args.num_samples)

    start = time.perf_counter()
    results, per_seed = {}, {}
    for seed in args.noise_seeds:
        if args.side == "torch":
            model = initial_model(config)  # the pair's initial weights
            torch.manual_seed(seed)  # only the reparameterization noise changes
            trained = train_torch(model, data, config.train, epochs)
            per_seed[seed] = evaluate_state(run, trained["state"], x, config, args.num_samples)
            best_epoch = trained["best_epoch"]
        else:
            replicate = args.runs.expanduser() / f"torch-reference-pyro-noise{seed}"

            def same_start(vae: pyro_vae.VAE, seed: int = seed) -> None:
                vae.load_state_dict({**vae.state_dict(), **to_package(initial)})
                torch.manual_seed(seed)  # after fit's own seeding: only the noise changes

            fit = dataclasses.replace(
                config, train=dataclasses.replace(config.train, epochs=epochs)
            )
            pyro_vae.fit(fit, replicate, initialize=same_start, progress=False)
            per_seed[seed] = evaluate_best(replicate)
            history = pyro_vae.read_metrics(replicate)
            best_epoch = max(history, key=lambda r: r["valid_elbo"])["epoch"]
        name = f"{args.side}_noise_seed_{seed}"
        results[name] = {"nll": -per_seed[seed].summary["log_likelihood"], "best_epoch": best_epoch}
        print(f"{args.side}, noise seed {seed}: {results[name]}")
    pyro = evaluate_best(run)
    results["pyro_vae"] = {"nll": -pyro.summary["log_likelihood"], "run": str(run)}
    a, b = args.noise_seeds
    side = args.side
    pairs = {
        f"{side}_{a}_minus_{side}_{b}": paired_difference(per_seed[a], per_seed[b]),
        f"pyro_minus_{side}_{a}": paired_difference(pyro, per_seed[a]),
        f"pyro_minus_{side}_{b}": paired_difference(pyro, per_seed[b]),
    }
    for name, pair in pairs.items():
        print(f"{name}: {pair['difference']:+.3f} +- {pair['paired_se']:.3f} (paired SE) nats")
    record = {
        "what": "test log p(x) differences (nats, paired over the same test data and draws)",
        "epochs": epochs,
        "num_samples": args.num_samples,
        "num_data": len(data["test"][: args.max_data]),
        "runs": results,
        "differences": pairs,
        "seconds": time.perf_counter() - start,
        "threads": args.threads,
        "command": "python benchmarks/training_noise.py "
        + f"--side {side} --noise-seeds {a} {b} --num-samples {args.num_samples} --epochs {epochs}",
    }
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
