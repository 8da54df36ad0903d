"""Training: the loss goes down, seeds reproduce, resume equals uninterrupted."""

import dataclasses
import json

import pytest
import torch

import pyro_vae
from pyro_vae import Config, NonFiniteLossError, TrainConfig, TrainingInterrupted
from pyro_vae.checkpoint import CHECKPOINT_FILE, load_checkpoint


def tiny(epochs=3, **train):
    model = dataclasses.replace(
        pyro_vae.ModelConfig(latent_dim=4),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [64]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [64]}),
    )
    return Config(model=model, train=TrainConfig(epochs=epochs, batch_size=100, **train))


def strip_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def assert_same_parameters(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key].cpu(), sb[key].cpu()), key


def test_short_run_improves_the_test_elbo_and_writes_the_run(tmp_path):
    result = pyro_vae.fit(tiny(epochs=6), tmp_path / "run")
    first, last = result.history[0], result.history[-1]
    assert last["test_elbo"] > first["test_elbo"]
    assert last["train_elbo"] > first["train_elbo"]
    for record in result.history:
        assert record["test_elbo"] == pytest.approx(
            record["test_reconstruction"] - record["test_kl"]
        )
        assert record["test_kl"] >= 0
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4, 5, 6]
    keys = {"epoch", "train_elbo", "test_elbo", "test_reconstruction", "test_kl", "seconds"}
    assert keys <= set(json.loads(lines[-1]))
    loaded = pyro_vae.load(tmp_path / "run")
    assert_same_parameters(loaded, result.vae)
    x = result.data.split("test")[:5]
    assert loaded.prior().event_shape == (4,)
    q = loaded.posterior(x)
    assert q.batch_shape == (5,) and q.event_shape == (4,)
    assert loaded.likelihood(q.sample()).event_shape == (8, 8)
    saved = Config.load(tmp_path / "run" / "config.toml")
    assert saved.data.binarize == "dynamic"  # "auto" resolved for grayscale digits
    assert saved.model.encoder.options == {"hidden": [64], "activation": "relu"}


@pytest.mark.parametrize("elbo", ["trace", "meanfield"])
def test_same_seed_same_numbers(elbo):
    config = tiny(epochs=2, elbo=elbo, num_particles=2)
    a, b = pyro_vae.fit(config), pyro_vae.fit(config)
    assert strip_time(a.history) == strip_time(b.history)
    assert_same_parameters(a.vae, b.vae)
    c = pyro_vae.fit(dataclasses.replace(config, train=dataclasses.replace(config.train, seed=1)))
    assert strip_time(c.history) != strip_time(a.history)


def test_fit_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    pyro_vae.fit(tiny(epochs=1))
    assert torch.equal(torch.rand(3), expected)


def test_resume_after_ctrl_c_mid_epoch_equals_uninterrupted(tmp_path):
    config = tiny(epochs=3)
    whole = pyro_vae.fit(config, tmp_path / "whole")

    def interrupt(epoch, step, loss):
        if (epoch, step) == (2, 5):
            raise KeyboardInterrupt

    with pytest.raises(TrainingInterrupted, match="resume with: pyro-vae train --resume"):
        pyro_vae.fit(config, tmp_path / "cut", on_step=interrupt)
    state = load_checkpoint(tmp_path / "cut")
    assert (state["epoch"], state["step"]) == (1, 5)
    resumed = pyro_vae.resume(tmp_path / "cut")
    assert_same_parameters(resumed.vae, whole.vae)
    assert strip_time(resumed.history) == strip_time(whole.history)
    assert strip_time(pyro_vae.read_metrics(tmp_path / "cut")) == strip_time(whole.history)


def test_resume_at_an_epoch_boundary_with_more_epochs(tmp_path):
    whole = pyro_vae.fit(tiny(epochs=3))
    pyro_vae.fit(tiny(epochs=2), tmp_path / "run")
    resumed = pyro_vae.resume(tmp_path / "run", epochs=3)
    assert_same_parameters(resumed.vae, whole.vae)
    assert strip_time(resumed.history) == strip_time(whole.history)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    import pyro_vae.train as train

    real = train.build_objective

    class PoisonAfter:
        def __init__(self, objective, calls):
            self.objective, self.calls = objective, calls

        def differentiable_loss(self, *args):
            self.calls -= 1
            loss = self.objective.differentiable_loss(*args)
            return loss * float("nan") if self.calls < 0 else loss

    steps_per_epoch = 15  # 1500 digits / batch 100
    monkeypatch.setattr(
        train, "build_objective", lambda cfg: PoisonAfter(real(cfg), steps_per_epoch + 3)
    )
    with pytest.raises(NonFiniteLossError, match="at epoch 2, step 4"):
        pyro_vae.fit(tiny(epochs=3), tmp_path / "run")
    state = load_checkpoint(tmp_path / "run")
    assert (state["epoch"], state["step"]) == (1, 0)
    for value in state["model"].values():
        assert torch.isfinite(value).all()


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    import pyro_vae.checkpoint as checkpoint

    pyro_vae.fit(tiny(epochs=1), tmp_path / "run")
    before = (tmp_path / "run" / CHECKPOINT_FILE).read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path / "run" / CHECKPOINT_FILE, {"epoch": 99})
    assert (tmp_path / "run" / CHECKPOINT_FILE).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "metrics.jsonl",
    ]


def test_fit_refuses_to_overwrite_a_run(tmp_path):
    pyro_vae.fit(tiny(epochs=1), tmp_path / "run")
    with pytest.raises(pyro_vae.ConfigError, match="already holds a run"):
        pyro_vae.fit(tiny(epochs=1), tmp_path / "run")


def test_fit_trains_every_method_with_the_one_trainer():
    result = pyro_vae.fit(tiny(epochs=1, method="variational-em"))
    assert result.config.model.guide.name == "local"  # the method's own guide
    record = result.history[0]
    assert "train_set_elbo" in record and "test_elbo" not in record  # no q for unseen data
    steps = -(-len(result.data.train) // 100)  # minibatches of 100
    assert record["gradient_steps"] == steps * (5 + 1)  # 5 E-steps and an M-step each
