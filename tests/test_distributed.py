"""Data-parallel training (DDP, 2 CPU processes on gloo) equals one process; sharded evaluation.

One torchrun launch (``python -m torch.distributed.run --standalone
--nproc-per-node 2 tests/test_distributed.py OUT``) runs :func:`_worker` on two
ranks; the tests compute the single-process reference in this process while
it runs and then compare.
"""

from __future__ import annotations

import dataclasses
import math
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch

import pyro_vae
from pyro_vae import ComponentConfig, Config, ModelConfig, TrainConfig, distributed
from pyro_vae.cli import main as cli_main
from pyro_vae.elbo import elbo_terms
from pyro_vae.evaluate import log_importance_weights, log_mean_exp
from pyro_vae.train import SVIStep


def svi_step(vae, objective, optimizer, x, index, data_size):
    """The one-process SVI step strategy with ``optimizer`` in place of its Adam."""
    strategy = SVIStep(vae, objective, lr=1.0)
    strategy.optimizer = optimizer
    return strategy.step(x, index, data_size, 1.0)


WORLD = 2
# 1500 digits / 75 = 20 minibatches per epoch, each split 38 + 37 over two ranks
BATCH = 75
CHUNK = 40  # shard_map chunks: the 297 test digits make 8 chunks (4 per rank, 160 + 137 data)
IS_SAMPLES = 16


def tiny(guide="delta", prior="standard-normal", elbo="trace", seed=0, epochs=2, **train):
    model = dataclasses.replace(
        ModelConfig(latent_dim=4),
        prior=ComponentConfig(prior),
        guide=ComponentConfig(guide),
        encoder=ComponentConfig("mlp", {"hidden": [32]}),
        decoder=ComponentConfig("mlp", {"hidden": [32]}),
    )
    return Config(
        model=model,
        train=TrainConfig(elbo=elbo, epochs=epochs, batch_size=BATCH, lr=3e-3, seed=seed, **train),
    )


#: Deterministic: a point-estimate guide draws no noise, so 1 and 2 processes
#: differ only in the order of floating-point sums. The learned prior gets no
#: gradient (the latent site is masked), which DDP must tolerate. The digits
#: are binarized dynamically: every rank draws the whole global batch.
DELTA = tiny(guide="delta", prior="learned-normal")
#: Noisy: mean-field guide, learned prior, one epoch of KL warm-up (prior unused, then used).
MEAN_FIELD = tiny(guide="mean-field", prior="learned-normal", elbo="meanfield", kl_warmup_epochs=1)


def global_batch(size):
    """A fixed global minibatch of binarized test digits and its positions."""
    x = pyro_vae.load_data(DELTA).split("test")[:size]
    return x, torch.arange(size) * 7


def gradient_of(vae, step, *args):
    """``(step's return, {name: grad})`` of ``step(optimizer, *args)`` at a zero learning rate."""
    optimizer = torch.optim.SGD(vae.parameters(), lr=0.0)
    value = step(optimizer, *args)
    return value, {k: None if p.grad is None else p.grad.clone() for k, p in vae.named_parameters()}


def fresh_vae(config):
    torch.manual_seed(config.train.seed)
    config = pyro_vae.resolve(config)
    return pyro_vae.build_vae(config.model, (8, 8)), pyro_vae.build_objective(config)


def per_datum_elbo(vae):
    def fn(x):
        terms = elbo_terms(vae, x)
        return terms.reconstruction, terms.kl

    return fn


def per_datum_log_likelihood(vae):
    def fn(x):
        log_w = log_importance_weights(vae, x, IS_SAMPLES, chunk_size=64)
        return {"log_likelihood": log_mean_exp(log_w), "elbo": log_w.mean(0)}

    return fn


def evaluations(vae, x):
    """Per-datum evaluations through :func:`distributed.shard_map` (on 1 or 2 processes)."""
    return {
        "order": distributed.shard_map(lambda x: x.flatten(1).sum(1), x, chunk_size=CHUNK),
        "elbo_terms": distributed.shard_map(per_datum_elbo(vae), x, chunk_size=CHUNK, seed=3),
        "importance": distributed.shard_map(
            per_datum_log_likelihood(vae), x, chunk_size=CHUNK, seed=4
        ),
        # one chunk: rank 1 has no data and learns the result's structure from rank 0
        "one_chunk": distributed.shard_map(per_datum_elbo(vae), x[:30], chunk_size=CHUNK, seed=5),
    }


def _worker(out: Path) -> None:
    """Run on each rank by torchrun (see the module docstring)."""
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    delta_toml = out / "delta.toml"
    if rank == 0:
        DELTA.save(delta_toml)
    torch.distributed.init_process_group("gloo")
    torch.distributed.barrier()  # delta.toml exists
    # gradient of uneven (3 + 2) and empty (1 + 0) shards of a global batch
    grads = {}
    for size in (5, 1):
        vae, objective = fresh_vae(DELTA)
        svi = distributed.DistributedSVI(vae, objective, torch.device("cpu"), seed=0)
        x, index = global_batch(size)
        (loss, _), grad = gradient_of(vae, svi.step, x, index, 1500, (1, 0))
        grads[size] = loss, grad
    torch.save(grads, out / f"grads{rank}.pt")
    vae, _ = fresh_vae(MEAN_FIELD)
    torch.save(evaluations(vae, pyro_vae.load_data(DELTA).split("test")), out / f"eval{rank}.pt")
    result = pyro_vae.fit(MEAN_FIELD, out / "meanfield")
    torch.save(result.vae.state_dict(), out / f"meanfield{rank}.pt")
    torch.distributed.destroy_process_group()
    # the command line, as `torchrun ... -m pyro_vae train` runs it; it joins the group itself
    common = ["train", "--config", str(delta_toml), "--quiet"]
    assert cli_main([*common, "--out", str(out / "delta")]) == 0
    assert cli_main([*common, "--epochs", "1", "--out", str(out / "resumed")]) == 0
    assert cli_main(["train", "--resume", str(out / "resumed"), "--epochs", "2", "--quiet"]) == 0

    # Ctrl-C seen by rank 1 alone after step 3: every rank stops after step 4, rank 0 saves
    def interrupt(epoch, step, loss):
        if rank == 1 and (epoch, step) == (1, 3):
            raise KeyboardInterrupt

    try:
        pyro_vae.fit(DELTA, out / "interrupted", on_step=interrupt)
        raise AssertionError("not interrupted")
    except pyro_vae.TrainingInterrupted as e:
        assert "epoch 1, step 4" in str(e)
    pyro_vae.resume(out / "interrupted")


class _Launch:
    """The torchrun launch of :func:`_worker`, started at once, awaited by :meth:`result`."""

    def __init__(self, out: Path) -> None:
        self.out = out
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
        command += ["--nproc-per-node", str(WORLD), __file__, str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: str | None = None

    def result(self) -> Path:
        if self.output is None:
            self.output, _ = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, self.output[-3000:]
        return self.out


@pytest.fixture(scope="module")
def launch(tmp_path_factory):
    run = _Launch(tmp_path_factory.mktemp("ddp"))
    yield run
    if run.process.poll() is None:
        run.process.kill()
        run.process.wait()


def strip_time(history):
    return [{k: v for k, v in record.items() if k != "seconds"} for record in history]


def assert_close_parameters(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


# --- two processes (first: the launch runs while these tests compute their references) ---


def test_noisy_two_process_training_agrees_with_one_in_distribution(launch):
    # Each rank draws its own reparameterization noise, so the 2-process run is one
    # more draw of the training outcome. Tolerance: a 99.8% t prediction interval
    # from single-process runs over 5 seeds (seed moves init, data order and noise,
    # so the interval is wider than the noise alone: the check is conservative).
    values = [
        pyro_vae.fit(
            dataclasses.replace(MEAN_FIELD, train=dataclasses.replace(MEAN_FIELD.train, seed=s))
        ).history[-1]["test_elbo"]
        for s in range(5)
    ]
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    t_999_4 = 7.173  # 0.999 quantile of Student's t with 4 degrees of freedom
    out = launch.result()
    two = pyro_vae.read_metrics(out / "meanfield")
    assert [r["epoch"] for r in two] == [1, 2] and two[0]["beta"] == 0 and two[1]["beta"] == 1
    assert abs(two[-1]["test_elbo"] - mean) <= t_999_4 * sd * math.sqrt(1 + 1 / len(values))
    # DDP kept the ranks' parameters identical
    rank0, rank1 = (torch.load(out / f"meanfield{r}.pt") for r in range(WORLD))
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key


def test_gradient_of_a_global_batch_is_the_single_process_gradient(launch):
    for size in (5, 1):  # shards of 3 + 2, and of 1 + 0 data
        vae, objective = fresh_vae(DELTA)
        x, index = global_batch(size)
        loss, grads = gradient_of(vae, partial(svi_step, vae, objective), x, index, 1500)
        assert any(g is None for g in grads.values())  # the learned prior is unused
        for rank in range(WORLD):
            got_loss, got = torch.load(launch.result() / f"grads{rank}.pt")[size]
            assert got_loss == pytest.approx(loss, rel=1e-6)
            assert got.keys() == grads.keys()
            for key, grad in grads.items():
                if grad is None:
                    assert got[key] is None, key
                else:  # float32 sums in another order: errors ~1e-7 of the largest entry
                    scale = float(grad.abs().max())
                    torch.testing.assert_close(got[key], grad, rtol=1e-5, atol=1e-6 * scale)


def test_two_processes_train_to_the_parameters_of_one(launch):
    one = pyro_vae.fit(DELTA)
    out = launch.result()
    two = pyro_vae.load(out / "delta")
    assert_close_parameters(two.state_dict(), one.vae.state_dict())
    before = fresh_vae(DELTA)[0].state_dict()
    for key, value in one.vae.state_dict().items():  # training moved all but the unused prior
        assert torch.equal(value, before[key]) == key.startswith("prior."), key
    metrics = pyro_vae.read_metrics(out / "delta")
    assert [r["epoch"] for r in metrics] == [1, 2]
    for got, want in zip(metrics, one.history, strict=True):
        for key in ("train_elbo", "test_elbo", "test_reconstruction", "test_kl"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    # resumed under torchrun after epoch 1, or after Ctrl-C mid-epoch: as uninterrupted
    for run in ("resumed", "interrupted"):
        resumed = pyro_vae.load(out / run)
        for key, value in two.state_dict().items():
            assert torch.equal(resumed.state_dict()[key], value), (run, key)
        assert strip_time(pyro_vae.read_metrics(out / run)) == strip_time(metrics)
    # only rank 0 printed the summary; the worker ran three commands
    assert launch.output.count("run saved in") == 3


def test_sharded_evaluation_gives_the_numbers_of_one_process(launch):
    vae, _ = fresh_vae(MEAN_FIELD)
    x = pyro_vae.load_data(DELTA).split("test")
    want = evaluations(vae, x)
    assert torch.equal(want["order"], x.flatten(1).sum(1))
    for rank in range(WORLD):  # gathered on rank 0 (and on every rank)
        got = torch.load(launch.result() / f"eval{rank}.pt")
        assert torch.equal(got["order"], want["order"])  # data order kept
        for a, b in zip(got["elbo_terms"], want["elbo_terms"], strict=True):
            assert a.shape == (len(x),)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
        assert got["importance"].keys() == {"log_likelihood", "elbo"}
        for key, value in want["importance"].items():
            torch.testing.assert_close(got["importance"][key], value, rtol=1e-6, atol=1e-5)
        for a, b in zip(got["one_chunk"], want["one_chunk"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-5)
    log_p, elbo = want["importance"]["log_likelihood"], want["importance"]["elbo"]
    assert bool((log_p >= elbo - 1e-4).all())  # Jensen: log mean w >= mean log w


# --- one process: the helpers reduce to the plain computation -------------------------


@pytest.mark.parametrize("size", range(8))
@pytest.mark.parametrize("parts", [1, 2, 3, 5])
def test_shards_partition_the_batch_like_tensor_split(size, parts):
    x = torch.arange(size)
    pieces = [distributed.shard(x, r, parts) for r in range(parts)]
    expected = torch.tensor_split(x, parts)
    assert all(torch.equal(p, e) for p, e in zip(pieces, expected, strict=True))
    assert torch.equal(torch.cat(pieces), x)


def test_one_process_helpers_are_the_plain_computation():
    assert not distributed.is_distributed() and distributed.world_size() == 1
    assert distributed.is_main() and distributed.any_rank(True) and not distributed.any_rank(False)
    vae, _ = fresh_vae(MEAN_FIELD)
    x = pyro_vae.load_data(DELTA).split("test")[:90]
    state = torch.get_rng_state()
    results = distributed.shard_map(per_datum_elbo(vae), x, chunk_size=CHUNK, seed=3)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random state is untouched
    # each chunk [s, s + CHUNK) draws from its own seed (seed, s)
    expected = []
    for start in range(0, 90, CHUNK):
        torch.manual_seed(distributed.chunk_seed(3, start))
        terms = elbo_terms(vae, x[start : start + CHUNK])
        expected.append((terms.reconstruction, terms.kl))
    for got, want in zip(results, zip(*expected, strict=True), strict=True):
        assert got.shape == (90,)
        assert torch.equal(got, torch.cat(want))
    terms = distributed.sharded_mean(lambda x: pyro_vae.evaluate_elbo(vae, x), x)
    assert set(terms) == {"elbo", "reconstruction", "kl", "kl_per_dim"}


def test_torchrun_environment_without_a_rendezvous_is_a_one_line_error(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    code = cli_main(["train", "--epochs", "1", "--out", str(tmp_path / "run"), "--quiet"])
    em = cli_main(["train", "--method", "variational-em", "--out", str(tmp_path / "em")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == em == 2 and len(err) == 2
    assert "MASTER_ADDR, MASTER_PORT not set; launch with torchrun" in err[0]
    assert "variational-em runs in one process" in err[1]


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
