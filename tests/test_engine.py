"""The engine as users meet it: Pyro's own loops, hand-built VAEs, plugins, old runs.

* Pyro's canonical ``SVI(vae.model, vae.guide, pyro.optim.Adam, Trace_ELBO())``
  trains every parameter, without the global param store, and two VAEs stay
  independent.
* ``VAE(prior, guide, likelihood)`` built by hand trains with
  ``fit(vae, data)`` and saves and loads like a config-built run.
* Every registered name trains with no extra keys.
* A plugin registers a component in one process; later commands in fresh
  processes import it from the run's config.
* Run directories written by pyro-vae 0.1 load, evaluate and resume.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyro
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_vae
from pyro_vae import (
    GUIDES,
    LIKELIHOODS,
    METHODS,
    NETWORKS,
    OBJECTIVES,
    PRIORS,
    VAE,
    ComponentConfig,
    Config,
    ConfigError,
    ModelConfig,
)
from pyro_vae.checkpoint import load_checkpoint
from pyro_vae.cli import main
from pyro_vae.evaluate import evaluate_run
from pyro_vae.guides import MeanFieldGuide
from pyro_vae.likelihoods import BernoulliLikelihood
from pyro_vae.nets import MLP
from pyro_vae.priors import VampPrior
from pyro_vae.registry import Registry

FIXTURES = Path(__file__).parent / "fixtures"
EVENT = (8, 8)


def small_vae(seed):
    torch.manual_seed(seed)
    model = ModelConfig(
        latent_dim=3,
        encoder=ComponentConfig("mlp", {"hidden": [16]}),
        decoder=ComponentConfig("mlp", {"hidden": [16]}),
        prior=ComponentConfig("learned-normal"),
    )
    return pyro_vae.build_vae(pyro_vae.resolve(Config(model=model)).model, EVENT)


def binary(n=32, seed=1):
    return torch.bernoulli(
        torch.full((n, *EVENT), 0.3), generator=torch.Generator().manual_seed(seed)
    )


def snapshot(vae):
    return {k: v.detach().clone() for k, v in vae.named_parameters()}


# --- Pyro's own loops ---------------------------------------------------------------


def test_pyro_canonical_svi_loop_trains_every_parameter_and_two_models_stay_apart():
    a, b = small_vae(0), small_vae(1)
    x = binary()
    a0, b0 = snapshot(a), snapshot(b)
    svi_a = SVI(a.model, a.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi_b = SVI(b.model, b.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi_a.step(x)
    changed = {k for k, v in a.named_parameters() if not torch.equal(v, a0[k])}
    assert changed == set(a0)  # every parameter, prior's included
    assert all(torch.equal(v, b0[k]) for k, v in b.named_parameters())  # b untouched
    assert len(pyro.get_param_store()) == 0  # nothing in Pyro's global store
    svi_b.step(x)
    a1 = snapshot(a)
    assert all(torch.equal(v, a1[k]) for k, v in a.named_parameters())  # a untouched by b
    pyro.clear_param_store()  # must not break a trained model
    svi_a.step(x)
    assert all(not torch.equal(v, a1[k]) for k, v in a.named_parameters())


def test_pyro_elbo_module_drives_torch_optim_over_the_vae_parameters():
    vae, x = small_vae(0), binary()
    loss_fn = Trace_ELBO()(vae.model, vae.guide)
    assert {id(p) for p in loss_fn.parameters()} == {id(p) for p in vae.parameters()}
    before = snapshot(vae)
    optimizer = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    optimizer.zero_grad()
    loss_fn(x).backward()
    optimizer.step()
    assert all(not torch.equal(v, before[k]) for k, v in vae.named_parameters())


def test_beta_is_an_argument_of_the_model_not_a_field():
    vae, x = small_vae(0), binary()
    trace = pyro.poutine.trace(vae.model).get_trace(x, None, None, 0.25)
    assert trace.nodes["z"]["scale"] == 0.25
    assert not hasattr(vae, "kl_scale")


# --- injection by hand ------------------------------------------------------------


def hand_built_vamp():
    torch.manual_seed(0)
    trunk = MLP(EVENT, None, hidden=[16])
    guide = MeanFieldGuide(trunk, 3)
    likelihood = BernoulliLikelihood(MLP((3,), 64, hidden=[16]), EVENT)
    return VAE(VampPrior(3, pseudo_inputs=5), guide, likelihood)


@pytest.mark.parametrize("form", ["tensor", "dict", "dataset"])
def test_a_hand_built_vamp_vae_trains_saves_and_loads(tmp_path, form):
    vae = hand_built_vamp()
    x, test = binary(40), binary(10, seed=2)
    data = {
        "tensor": x,
        "dict": {"train": x, "test": test},
        "dataset": torch.utils.data.TensorDataset(x, torch.zeros(40)),
    }[form]
    config = Config().override({"train.epochs": 2, "train.batch_size": 16})
    before = snapshot(vae)
    result = pyro_vae.fit(vae, data, tmp_path / "run", config=config)
    assert result.vae is vae and len(result.history) == 2
    assert all(not torch.equal(v, before[k]) for k, v in vae.named_parameters())
    assert ("test_elbo" in result.history[0]) == (form == "dict")
    loaded = pyro_vae.load(tmp_path / "run")
    assert isinstance(loaded.prior, VampPrior) and loaded.prior.num_pseudo_inputs == 5
    for (k, v), (k2, v2) in zip(vae.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    saved = Config.load(tmp_path / "run" / "config.toml")
    assert saved.model.prior == ComponentConfig("vamp", {"pseudo_inputs": 5})
    assert saved.model.encoder.options["hidden"] == [16]


def test_a_data_loader_gives_its_data_set_and_batch_size():
    x = binary(40)
    config = Config().override({"train.epochs": 1, "train.batch_size": 16})
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=8)
    by_loader = pyro_vae.fit(hand_built_vamp(), loader, config=config)
    by_tensor = pyro_vae.fit(hand_built_vamp(), x, config=config.override({"train.batch_size": 8}))
    assert by_loader.config.train.batch_size == 8
    assert by_loader.history[0]["gradient_steps"] == 5  # 40 data in minibatches of 8
    assert by_loader.history[0]["train_elbo"] == by_tensor.history[0]["train_elbo"]


def test_fit_refuses_bad_data_in_one_line():
    vae = hand_built_vamp()
    with pytest.raises(pyro_vae.DataError, match="not in {0, 1}"):
        pyro_vae.fit(vae, torch.rand(10, *EVENT))
    with pytest.raises(ConfigError, match="no 'train' split"):
        pyro_vae.fit(vae, {"test": binary(4)})
    with pytest.raises(ConfigError, match="must be a tensor, a dict"):
        pyro_vae.fit(vae, [1, 2, 3])


def test_a_vae_without_a_registered_component_trains_but_is_not_saved(tmp_path):
    class Unregistered(pyro_vae.Prior):
        def __init__(self):
            super().__init__()
            self.latent_dim = 3

        def forward(self):
            return pyro.distributions.Normal(torch.zeros(3), 1.0).to_event(1)

    base = hand_built_vamp()
    vae = VAE(Unregistered(), base.posterior, base.likelihood)
    assert vae.describe() is None
    config = Config().override({"train.epochs": 1})
    assert len(pyro_vae.fit(vae, binary(20), config=config).history) == 1
    with pytest.raises(ConfigError, match="cannot describe itself"):
        pyro_vae.fit(vae, binary(20), tmp_path / "run", config=config)
    assert not (tmp_path / "run").exists()


# --- every name trains with no extra keys -----------------------------------------------


def one_epoch(**overrides):
    base = {
        "model.latent_dim": 2,
        "model.encoder.hidden": [8],
        "model.decoder.hidden": [8],
        "train.epochs": 1,
        "train.batch_size": 500,
    }
    return pyro_vae.fit(Config().override({**base, **overrides}))


ALL_NAMES = (
    [("model.prior.name", n) for n in PRIORS.names()]
    + [("model.guide.name", n) for n in GUIDES.names()]
    + [("model.likelihood.name", n) for n in LIKELIHOODS.names()]
    + [("train.elbo", n) for n in OBJECTIVES.names()]
    + [("train.method", n) for n in METHODS.names()]
)


@pytest.mark.parametrize(("key", "name"), ALL_NAMES, ids=[f"{k}={n}" for k, n in ALL_NAMES])
def test_every_listed_name_trains_with_no_extra_keys(key, name):
    overrides = {key: name}
    if key == "model.likelihood.name" and name.startswith("normal"):
        overrides["data.binarize"] = "none"  # grey levels for a real-valued likelihood
    if key == "model.prior.name" and name == "vamp":
        overrides["model.prior.pseudo_inputs"] = 5  # the default 500 is slow for a unit test
    result = one_epoch(**overrides)
    assert len(result.history) == 1


@pytest.mark.parametrize("name", NETWORKS.names())
def test_every_network_trains_with_no_extra_keys(tmp_path, name):
    npz = tmp_path / "images.npz"
    import numpy as np

    np.savez(npz, train=(np.random.default_rng(0).random((20, 28, 28)) < 0.3).astype("float32"))
    result = pyro_vae.fit(
        Config().override(
            {
                "data.name": f"npz:{npz}",
                "model.encoder.name": name,
                "model.decoder.name": name,
                "train.epochs": 1,
                "train.batch_size": 20,
            }
        )
    )
    assert len(result.history) == 1


# --- registries and plugins ----------------------------------------------------------


def test_registering_the_same_class_again_works_and_another_class_is_refused():
    registry = Registry("thing")

    class A:
        pass

    registry.register("a")(A)
    registry.register("a")(A)  # a notebook cell run twice
    assert registry.get("a") is A
    with pytest.raises(ValueError, match="already registered"):
        registry.register("a")(type("B", (), {}))


def readme_plugin_example():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("<!-- example:plugin -->", 1)[1].split("```python\n", 1)[1]
    return block.split("```", 1)[0]


FRESH_PROCESS = """
import json, sys
import pyro_vae
from pyro_vae.cli import main

assert "my_prior" not in sys.modules
assert main(["evaluate", "run", "--num-samples", "10", "--max-data", "5"]) == 0
assert main(["sample", "run", "-n", "4"]) == 0
prior = pyro_vae.load("run").prior
print(json.dumps({"prior": type(prior).__name__, "scale": prior.scale}))
"""


def test_the_readme_plugin_example_works_in_python_and_across_processes(
    tmp_path, capsys, monkeypatch
):
    """The README's 15 lines register a prior and train with it; saved as my_prior.py,
    the command line trains with --plugin, and a fresh process evaluates, samples from
    and loads the run without being told about the plugin (report loads it the same way)."""
    code = readme_plugin_example()
    assert "PRIORS.register" in code and "pyro_vae.fit(" in code
    assert len(code.strip().splitlines()) <= 15
    (tmp_path / "my_prior.py").write_text(code)  # importing it runs the example's fit
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    common = ["--epochs", "1", "--latent-dim", "2", "--quiet", "--out"]
    args = ["train", "--plugin", "my_prior", "--prior", "laplace"]
    # the command line's main, in this process (a subprocess would spend its seconds
    # importing torch); the plugin, its registration and its import are undone after
    with monkeypatch.context() as undo:
        undo.syspath_prepend(str(tmp_path))
        for table in ("_entries", "_examples"):
            undo.setattr(pyro_vae.PRIORS, table, dict(getattr(pyro_vae.PRIORS, table)))
        run = ["--set", "model.prior.scale=0.5", *common, str(tmp_path / "run")]
        try:
            assert main([*args, *run]) == 0, capsys.readouterr().err
        finally:
            sys.modules.pop("my_prior", None)
    assert "my_prior" not in sys.modules and "laplace" not in pyro_vae.PRIORS
    assert Config.load(tmp_path / "run" / "config.toml").plugins == ("my_prior",)
    fresh = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=300,
    )  # fmt: skip
    assert fresh.returncode == 0, fresh.stderr
    loaded = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert loaded == {"prior": "LaplacePrior", "scale": 0.5}
    assert json.loads((tmp_path / "run" / "evaluation.json").read_text())
    assert (tmp_path / "run" / "samples.png").exists()
    # in this process the plugin is not importable: one line naming it, exit 2
    assert main(["evaluate", str(tmp_path / "run"), "--num-samples", "10"]) == 2
    err = capsys.readouterr().err
    assert "my_prior" in err and len(err.strip().splitlines()) == 1, err
    assert main(["train", "--prior", "laplace", *common, str(tmp_path / "run2")]) == 2
    assert "--plugin MODULE" in capsys.readouterr().err
    assert not (tmp_path / "run2").exists()


# --- runs of earlier versions ------------------------------------------------------------


def test_a_run_of_version_0_1_loads_evaluates_and_resumes(tmp_path):
    run = tmp_path / "old"
    shutil.copytree(FIXTURES / "v0.1-svi", run)
    assert load_checkpoint(run)["format"] == 1  # written by pyro-vae 0.1
    vae = pyro_vae.load(run)
    summary = evaluate_run(run, num_samples=20, max_data=10, write=False).summary
    assert summary["log_likelihood"] < 0
    result = pyro_vae.resume(run, epochs=3)
    assert [r["epoch"] for r in result.history] == [1, 2, 3]
    old, new = vae.state_dict(), result.vae.state_dict()
    assert old.keys() == new.keys() and any(not torch.equal(old[k], new[k]) for k in old)


def test_the_shared_binarized_mnist_run_resumes(tmp_path, shared_datasets):
    source = Path(__file__).resolve().parents[2] / "shared" / "benchmark-runs" / "standard-vae"
    if not (source / "checkpoint.pt").exists():
        pytest.skip(f"{source} absent (shared benchmark runs)")
    run = tmp_path / "standard-vae"
    shutil.copytree(source, run)
    done = len(pyro_vae.read_metrics(run))
    old = torch.load(run / "checkpoint.pt", weights_only=False)  # written mid-epoch
    steps = []

    def stop_soon(epoch, step, loss):
        steps.append((epoch, step))
        if len(steps) == 3:
            raise KeyboardInterrupt

    os.environ.setdefault("PYRO_VAE_DATA", str(shared_datasets))
    with pytest.raises(pyro_vae.TrainingInterrupted):
        pyro_vae.resume(run, epochs=done + 5, on_step=stop_soon)
    # it went on from the step where the old version stopped, and saved in today's format
    assert steps[0] == (old["epoch"] + 1, old["step"] + 1)
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    assert state["format"] == 2 and "strategy" in state
    assert (state["epoch"], state["step"]) == (old["epoch"], old["step"] + 3)


# --- one writer per run directory ----------------------------------------------------

HOLDER = """
import sys, time
from pyro_vae.files import run_lock

with run_lock(sys.argv[1]):
    print("ready", flush=True)
    time.sleep(120)
"""


def test_a_run_directory_has_one_writer_and_a_killed_holder_releases_it(tmp_path, capsys):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        tiny = ["--epochs", "1", "--latent-dim", "2", "--quiet", "--out", str(out)]
        assert main(["train", *tiny]) == 2
        err = capsys.readouterr().err
        assert f"process {holder.pid}" in err and len(err.strip().splitlines()) == 1, err
        assert list(out.iterdir()) == []  # refused before anything was written
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    assert main(["train", *tiny]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "checkpoint.pt",
        "config.toml",
        "metrics.jsonl",
    ]
    capsys.readouterr()
    with pyro_vae.files.run_lock(out):  # evaluate's writes wait for no one: refused at once
        assert main(["evaluate", str(out), "--num-samples", "4", "--max-data", "2"]) == 2
    assert "is in use" in capsys.readouterr().err
    assert not (out / "evaluation.json").exists()


def _train_in_child(argv, cwd, err_path):
    """A forked child: ``pyro-vae ARGV`` in ``cwd``, stderr to a file, exit with its code."""
    import contextlib

    os.chdir(cwd)
    with open(err_path, "w") as err, contextlib.redirect_stderr(err):
        code = main(argv)
    os._exit(code)


def test_two_trainings_started_together_on_one_out(tmp_path):
    """Two trainings on one --out at the same moment (forked: no imports to wait for)."""
    import multiprocessing

    args = ["train", "--epochs", "2", "--latent-dim", "2", "--batch-size", "500", "--quiet"]
    args += ["--set", "model.encoder.hidden=[16]", "--set", "model.decoder.hidden=[16]"]
    args += ["--out", "run"]
    context = multiprocessing.get_context("fork")
    runs = [
        context.Process(target=_train_in_child, args=(args, tmp_path, tmp_path / f"err{i}"))
        for i in range(2)
    ]
    for run in runs:
        run.start()
    for run in runs:
        run.join(timeout=300)
    codes = sorted(run.exitcode for run in runs)
    errors = [(tmp_path / f"err{i}").read_text() for i in range(2)]
    assert codes == [0, 2], errors
    refusal = next(e for e in errors if e.strip())
    assert len(refusal.strip().splitlines()) == 1
    assert "in use" in refusal or "already holds a run" in refusal
    assert len(pyro_vae.load(tmp_path / "run").state_dict()) > 0
    assert len(pyro_vae.read_metrics(tmp_path / "run")) == 2


def test_an_out_that_is_a_file_is_refused_in_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert main(["train", "--epochs", "1", "--out", str(blocker)]) == 2
    err = capsys.readouterr().err
    assert "a file is in the way" in err and len(err.strip().splitlines()) == 1
    assert main(["train", "--epochs", "1", "--out", str(blocker / "below")]) == 2
    assert blocker.read_text() == "not a directory"


# --- small holes of issue 11 closed with the engine ---------------------------------------


def test_resume_updates_the_config_says_when_there_is_nothing_to_do_and_cleans_stale_files(
    tmp_path, capsys
):
    out = tmp_path / "run"
    tiny = ["--latent-dim", "2", "--set", "model.encoder.hidden=[8]", "--set"]
    tiny += ["model.decoder.hidden=[8]", "--quiet"]
    assert main(["train", "--epochs", "1", *tiny, "--out", str(out)]) == 0
    stale = out / ".checkpoint.pt.abc123.tmp"  # what a SIGKILL during a write leaves
    stale.write_bytes(b"partial")
    assert main(["train", "--resume", str(out), "--epochs", "2", "--quiet"]) == 0
    assert not stale.exists()
    assert Config.load(out / "config.toml").train.epochs == 2
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    said = capsys.readouterr().out
    assert "already at epoch 2 of 2" in said and "--epochs larger than 2" in said
    assert len(pyro_vae.read_metrics(out)) == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--seed", "99999999999999999999"], "train.seed = 99999999999999999999 is out of range"),
        (["--seed", "-1"], "train.seed = -1 is out of range"),
    ],
)
def test_out_of_range_seeds_are_one_line(tmp_path, capsys, args, message):
    assert main(["train", *args, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_a_config_that_is_not_utf8_and_a_checkpoint_of_random_bytes_are_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_bytes(b"\xff\xfe[train]\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "r")]) == 2
    assert "not UTF-8" in capsys.readouterr().err
    run = tmp_path / "junk"
    shutil.copytree(FIXTURES / "v0.1-svi", run)
    (run / "checkpoint.pt").write_bytes(bytes(range(256)) * 8)
    assert main(["train", "--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot read checkpoint" in err and "weights_only" not in err
    assert len(err.strip().splitlines()) == 1


def test_report_and_sample_refuse_bad_outputs_before_any_work(tmp_run_copy, capsys):
    run = tmp_run_copy
    assert main(["report", str(run), "--out", str(run.parent)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert main(["report", str(run), "--out", str(run / "missing" / "r.html")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["sample", str(run), "-n", "100000000"]) == 2
    err = capsys.readouterr().err
    assert "valid: 1 to 4096" in err and len(err.strip().splitlines()) == 1
    assert not (run / "report.html").exists() and not (run / "samples.png").exists()


@pytest.fixture
def tmp_run_copy(tmp_path, tiny_run):
    run = tmp_path / "run"
    shutil.copytree(tiny_run[0], run)
    return run
