"""The command line: the main job runs; bad input gets one line and exit code 2."""

import subprocess
import sys

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.cli import main

FAST = ["--epochs", "2", "--latent-dim", "3", "--set", "model.encoder.hidden=[32]", "--quiet"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_train_then_load(tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, _ = run(["train", *FAST, "--out", str(out)], capsys)
    assert code == 0
    assert "run saved in" in stdout
    assert {p.name for p in out.iterdir()} == {"config.toml", "checkpoint.pt", "metrics.jsonl"}
    vae = pyro_vae.load(out)
    assert vae.latent_dim == 3
    assert vae.posterior.trunk.out_features == 32
    config = pyro_vae.Config.load(out / "config.toml")
    assert config.train.epochs == 2 and config.model.latent_dim == 3


def test_train_from_a_config_file_with_overrides(tmp_path, capsys):
    cfg = tmp_path / "run.toml"
    cfg.write_text("[model]\nlatent_dim = 2\n[train]\nepochs = 1\nlr = 0.01\n")
    code, _, err = run(
        [
            "train",
            "--config",
            str(cfg),
            "--set",
            "train.lr=0.002",
            "--out",
            str(tmp_path / "r"),
            "--quiet",
        ],
        capsys,
    )
    assert code == 0, err
    saved = pyro_vae.Config.load(tmp_path / "r" / "config.toml")
    assert saved.model.latent_dim == 2 and saved.train.lr == 0.002


def test_resume_from_the_cli(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert run(["train", *FAST, "--out", out], capsys)[0] == 0
    code, _, err = run(["train", "--resume", out, "--epochs", "3", "--quiet"], capsys)
    assert code == 0, err
    assert [r["epoch"] for r in pyro_vae.read_metrics(out)] == [1, 2, 3]
    code, _, err = run(["train", "--resume", out, "--lr", "0.1"], capsys)
    assert code == 2 and "--lr cannot change a run being resumed" in err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--epochs", "0"], "train.epochs must be >= 1"),
        (["--batch-size", "0"], "train.batch_size must be >= 1"),
        (["--latent-dim", "0"], "model.latent_dim must be >= 1"),
        (["--likelihood", "gaussian"], "unknown likelihood 'gaussian'; valid names: bernoulli"),
        (["--elbo", "kl"], "unknown objective 'kl'; valid names: trace, meanfield"),
        (["--dataset", "cifar"], "unknown dataset 'cifar'; valid names: digits"),
        (["--set", "model.likelihood.sigma=2"], "unknown key 'sigma'"),
        (["--set", "model.latent_dim='two'"], "model.latent_dim: expected int"),
        (["--set", "train.nope=1"], "train: unknown key 'nope'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--epochs", "two"], "invalid int value: 'two'"),
        (["--binarize", "sometimes"], "invalid choice: 'sometimes'"),
        (["--binarize", "none"], "are not in {0, 1}, the support of the 'bernoulli' likelihood"),
        (["--config", "/nonexistent.toml"], "cannot read config file /nonexistent.toml"),
    ],
)
def test_bad_input_gets_one_line_and_exit_code_2(argv, expected, tmp_path, capsys):
    with pytest.raises(SystemExit) if "invalid" in expected else _noop() as info:
        code, _, err = run(["train", *argv, "--out", str(tmp_path / "r"), "--quiet"], capsys)
    if info is not None:
        code, err = info.value.code, capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


class _noop:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_data_with_nan_and_bad_checkpoints(tmp_path, capsys):
    x = np.random.RandomState(0).rand(20, 5)
    x[0, 0] = np.inf
    np.savez(tmp_path / "d.npz", train=x)
    code, _, err = run(
        ["train", "--dataset", f"npz:{tmp_path / 'd.npz'}", "--out", str(tmp_path / "r1")], capsys
    )
    assert code == 2 and "NaN or infinite" in err and err.count("\n") == 1

    code, _, err = run(["train", "--resume", str(tmp_path / "missing")], capsys)
    assert code == 2 and "does not exist" in err

    out = tmp_path / "run"
    assert run(["train", *FAST, "--out", str(out)], capsys)[0] == 0
    (out / "checkpoint.pt").write_bytes(b"not a checkpoint")
    code, _, err = run(["train", "--resume", str(out)], capsys)
    assert code == 2 and "cannot read checkpoint" in err and err.count("\n") == 1
    with pytest.raises(pyro_vae.CheckpointError, match="cannot read checkpoint"):
        pyro_vae.load(out)


def test_mismatched_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *FAST, "--out", str(out)], capsys)[0] == 0
    text = (out / "config.toml").read_text().replace("latent_dim = 3", "latent_dim = 5")
    (out / "config.toml").write_text(text)
    with pytest.raises(pyro_vae.CheckpointError, match="does not match the model"):
        pyro_vae.load(out)
    code, _, err = run(["train", "--resume", str(out), "--epochs", "3"], capsys)
    assert code == 2 and "was edited since its checkpoint (model.latent_dim: 3 -> 5)" in err


def test_cuda_request_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    code, _, err = run(["train", "--device", "cuda", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and "CUDA is not available" in err


def test_python_dash_m_entry_point(capsys):
    # the entry point itself (it loads no torch for --version: a fraction of a second),
    # then the list command in this process
    done = subprocess.run(
        [sys.executable, "-m", "pyro_vae", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("pyro-vae ")
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "likelihoods: bernoulli, normal" in out and "objectives: trace, meanfield" in out
