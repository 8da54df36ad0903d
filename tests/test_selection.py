"""Model selection and schedules in the one trainer.

``best.pt`` (the best validation ELBO), early stopping, ``eval_every``,
learning-rate schedules, gradient clipping, the gated MLP, and the
``[train]`` keys a resumed run may change.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae import Config, ConfigError, TrainConfig
from pyro_vae.checkpoint import BEST_FILE, load_checkpoint
from pyro_vae.errors import CheckpointError


@pytest.fixture(scope="module")
def npz(tmp_path_factory):
    """Binary data with train, valid and test splits: 300/100/100 vectors of 16 pixels."""
    rng = np.random.default_rng(0)
    p = rng.uniform(0.1, 0.9, 16)
    path = tmp_path_factory.mktemp("data") / "binary.npz"
    splits = {s: (rng.random((n, 16)) < p).astype("float32") for s, n in
              (("train", 300), ("valid", 100), ("test", 100))}  # fmt: skip
    np.savez(path, **splits)
    return path


def config(npz, epochs=6, **train):
    model = dataclasses.replace(
        pyro_vae.ModelConfig(latent_dim=2),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [16]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [16]}),
    )
    settings = {"batch_size": 50, "lr": 0.01, **train}
    return Config(
        data=pyro_vae.DataConfig(name=f"npz:{npz}"),
        model=model,
        train=TrainConfig(epochs=epochs, **settings),
    )


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_best_checkpoint_holds_the_epoch_of_the_highest_valid_elbo(npz, tmp_path):
    result = pyro_vae.fit(config(npz, epochs=8, lr=0.05), tmp_path / "run")
    valid = [r["valid_elbo"] for r in result.history]
    best_epoch = 1 + int(np.argmax(valid))
    assert result.best["epoch"] == best_epoch and result.best["valid_elbo"] == max(valid)
    best = load_checkpoint(tmp_path / "run", checkpoint="best")
    assert best["epoch"] == best_epoch and best["valid_elbo"] == max(valid)
    assert "strategy" not in best  # weights only: not a resume point
    # the weights are those of that epoch: their valid ELBO is the recorded one
    vae = pyro_vae.load(tmp_path / "run", checkpoint="best")
    x = result.data.split("valid")
    from pyro_vae.elbo import evaluate_elbo

    assert evaluate_elbo(vae, x)["elbo"] == pytest.approx(max(valid), abs=0.5)
    evaluation = pyro_vae.evaluate_run(
        tmp_path / "run",
        checkpoint="best",
        num_samples=20,
        max_data=10,
        progress=False,
        write=True,
    )
    assert evaluation.summary["checkpoint"] == "best"
    summary = json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert summary["checkpoint_epoch"] == best_epoch


def test_eval_every_evaluates_every_nth_epoch_and_the_last(npz):
    result = pyro_vae.fit(config(npz, epochs=7, eval_every=3))
    evaluated = [r["epoch"] for r in result.history if "valid_elbo" in r]
    assert evaluated == [3, 6, 7]
    assert [r["epoch"] for r in result.history if "test_elbo" in r] == [3, 6, 7]


def test_early_stopping_stops_patience_epochs_after_the_best_and_resume_knows(npz, tmp_path):
    # lr 0.3 makes the valid ELBO peak early and wander; patience counts from the best
    train = {"lr": 0.3, "early_stopping_patience": 2, "kl_warmup_epochs": 1}
    result = pyro_vae.fit(config(npz, epochs=40, **train), tmp_path / "run")
    assert result.stopped_early is not None
    last = result.history[-1]["epoch"]
    assert last == result.stopped_early < 40
    assert last == max(result.best["epoch"], 1) + 2
    valid = [r["valid_elbo"] for r in result.history]
    assert max(valid[-2:]) <= result.best["valid_elbo"]
    again = pyro_vae.resume(tmp_path / "run")
    assert again.epochs_run == 0 and again.stopped_early == last
    more = pyro_vae.resume(
        tmp_path / "run", changes={"early_stopping_patience": 0}, epochs=last + 2
    )
    assert more.epochs_run == 2 and more.history[-1]["epoch"] == last + 2


def test_exponential_schedule_decays_the_recorded_lr(npz):
    result = pyro_vae.fit(config(npz, epochs=5, lr_schedule="exponential", lr_gamma=0.5))
    assert [r["lr"] for r in result.history] == pytest.approx([0.01 * 0.5**e for e in range(5)])
    floor = pyro_vae.fit(
        config(npz, epochs=5, lr_schedule="exponential", lr_gamma=0.5, lr_min=0.003)
    )
    assert [r["lr"] for r in floor.history] == pytest.approx([0.01, 0.005, 0.003, 0.003, 0.003])


def test_plateau_schedule_decays_only_after_patience_without_improvement(npz):
    # lr 0.3: the valid ELBO stops improving within a few epochs
    result = pyro_vae.fit(
        config(npz, epochs=20, lr=0.3, lr_schedule="plateau", lr_patience=2, lr_gamma=0.1)
    )
    lrs = [r["lr"] for r in result.history]
    valid = [r["valid_elbo"] for r in result.history]
    drop = next(i for i, lr in enumerate(lrs) if lr < 0.3)  # the first epoch at a lower lr
    best = max(range(drop), key=lambda i: valid[i])
    assert drop >= best + 3  # best epoch, then > patience (2) epochs without improvement
    assert lrs[drop] == pytest.approx(0.03)


@pytest.mark.parametrize("schedule", ["exponential", "plateau"])
def test_resume_with_a_schedule_equals_uninterrupted(npz, tmp_path, schedule):
    train = {"lr": 0.3, "lr_schedule": schedule, "lr_patience": 1, "lr_gamma": 0.5}
    whole = pyro_vae.fit(config(npz, epochs=6, **train))
    pyro_vae.fit(config(npz, epochs=3, **train), tmp_path / "run")
    resumed = pyro_vae.resume(tmp_path / "run", epochs=6)
    assert strip_time(resumed.history) == strip_time(whole.history)


def test_a_schedule_added_on_resume_starts_from_the_current_lr(npz, tmp_path):
    pyro_vae.fit(config(npz, epochs=2), tmp_path / "run")
    resumed = pyro_vae.resume(
        tmp_path / "run", epochs=5, changes={"lr_schedule": "exponential", "lr_gamma": 0.5}
    )
    assert [r["lr"] for r in resumed.history] == pytest.approx([0.01, 0.01, 0.01, 0.005, 0.0025])
    saved = Config.load(tmp_path / "run" / "config.toml")
    assert saved.train.lr_schedule == "exponential" and saved.train.epochs == 5


def test_clip_norm_bounds_the_gradient_of_every_step(npz):
    from pyro_vae.build import build_objective, build_vae, resolve
    from pyro_vae.train import SVIStep

    x = torch.from_numpy(np.load(npz)["train"][:50])
    norms = {}
    for clip in (0.0, 0.5):
        torch.manual_seed(0)
        cfg = resolve(config(npz, clip_norm=clip))
        vae = build_vae(cfg.model, (16,), 300)
        step = SVIStep.from_config(vae, build_objective(cfg), cfg.train)
        step.step(x, torch.arange(50), 300, 1.0)
        grads = [p.grad for p in vae.parameters() if p.grad is not None]
        norms[clip] = float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
    assert norms[0.0] > 0.5  # the unclipped gradient is larger than the clip
    assert norms[0.5] == pytest.approx(0.5, rel=1e-4)


def test_no_valid_split_is_refused_before_any_work(tmp_path):
    cfg = dataclasses.replace(Config(), train=TrainConfig(epochs=1, early_stopping_patience=5))
    with pytest.raises(ConfigError, match="no valid split"):
        pyro_vae.fit(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lr_schedule", "cosine", "unknown schedule 'cosine'; valid: none, exponential, plateau"),
        ("lr_gamma", 1.5, r"lr_gamma must be in \(0, 1\]"),
        ("eval_every", 0, "eval_every must be >= 1"),
        ("clip_norm", -1.0, "clip_norm must be finite and >= 0"),
    ],
)
def test_bad_schedule_settings_are_one_line_errors(key, value, message):
    with pytest.raises(ConfigError, match=message):
        Config().override({f"train.{key}": value})


def test_resume_refuses_keys_that_change_what_the_weights_mean(npz, tmp_path):
    pyro_vae.fit(config(npz, epochs=1), tmp_path / "run")
    before = (tmp_path / "run" / "config.toml").read_bytes()
    with pytest.raises(ConfigError, match="train.lr cannot change in a resumed run; resumable:"):
        pyro_vae.resume(tmp_path / "run", epochs=2, changes={"lr": 0.1})
    with pytest.raises(ConfigError, match="lr_gamma must be in"):
        pyro_vae.resume(tmp_path / "run", epochs=2, changes={"lr_gamma": 2.0})
    assert (tmp_path / "run" / "config.toml").read_bytes() == before


def test_cli_resume_with_set_and_best_checkpoint_errors(npz, tmp_path, capsys):
    from pyro_vae.cli import main

    run = tmp_path / "run"
    pyro_vae.fit(config(npz, epochs=1), run)
    code = main(["train", "--resume", str(run), "--set", "model.latent_dim=3"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "--set model.latent_dim cannot change a run being resumed" in err
    code = main(["train", "--resume", str(run), "--epochs", "2", "--quiet",
                 "--set", "train.lr_schedule=exponential"])  # fmt: skip
    assert code == 0 and load_checkpoint(run)["epoch"] == 2
    assert Config.load(run / "config.toml").train.lr_schedule == "exponential"
    (run / BEST_FILE).unlink()
    with pytest.raises(CheckpointError, match="has no best.pt"):
        pyro_vae.load(run, checkpoint="best")


def test_gated_mlp_shapes_and_config_round_trip():
    from pyro_vae.nets import GatedLinear, GatedMLP
    from pyro_vae.registry import NETWORKS

    trunk = GatedMLP((28, 28), None, hidden=[30, 20])
    assert trunk(torch.zeros(3, 5, 28, 28)).shape == (3, 5, 20) and trunk.out_features == 20
    head = GatedMLP((4,), 784, hidden=[30, 30, 30])  # deeper than two layers
    assert head(torch.zeros(7, 4)).shape == (7, 784)
    assert sum(isinstance(m, GatedLinear) for m in head.modules()) == 3
    assert NETWORKS.describe(head) == ("gated-mlp", {"hidden": [30, 30, 30]})
    layer = GatedLinear(3, 2)
    x = torch.randn(5, 3)
    expected = layer.value(x) * torch.sigmoid(layer.gate(x))
    assert torch.allclose(layer(x), expected)
    cfg = Config().override({"model.encoder.name": "gated-mlp", "model.decoder.name": "gated-mlp"})
    assert Config.from_toml(cfg.to_toml()) == cfg
    result = pyro_vae.fit(dataclasses.replace(cfg, train=TrainConfig(epochs=1)))
    assert math.isfinite(result.history[-1]["test_elbo"])
