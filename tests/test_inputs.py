"""Bad input ends in one line and exit 2 with nothing written, or works correctly.

Also: evaluation in bounded memory (streamed weight statistics equal the
full-array ones) and refused up front when it would take absurdly long.
"""

import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import pyro_vae
from pyro_vae.cli import main
from pyro_vae.evaluate import (
    WeightStatistics,
    effective_sample_size,
    evaluate,
    iwae_bounds,
    log_importance_weights,
    log_mean_exp,
    pareto_khat,
)

FAST = ["--epochs", "1", "--latent-dim", "2", "--set", "model.encoder.hidden=[16]", "--quiet"]


def run(argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# --- a loss that is non-finite from the start -------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        pytest.param(lambda rng: rng.normal(size=(200, 8)) * 1e30, id="values-near-1e30"),
        pytest.param(lambda rng: rng.integers(0, 256, size=(200, 64)).astype(np.uint8), id="uint8"),
    ],
)
def test_data_on_a_wild_scale_is_refused_in_one_line_leaving_nothing(tmp_path, capsys, values):
    data = tmp_path / "data.npz"
    x = values(np.random.default_rng(0))
    np.savez(data, train=x.astype(np.float32) if x.dtype != np.uint8 else x)
    out = tmp_path / "runs" / "wild"
    argv = [
        "train",
        "--epochs",
        "1",
        "--quiet",
        "--dataset",
        f"npz:{data}",
        "--likelihood",
        "normal",
    ]
    code, _, err = run([*argv, "--out", str(out)], capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "before any checkpoint" in err and "scale of the data" in err
    assert "Encountered NaN" not in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # the folders this run created are gone


def test_a_nan_after_the_first_checkpoint_keeps_the_run(tmp_path):
    def poison(epoch, step, loss):  # NaN weights after the first step of epoch 2
        if epoch == 2 and step == 1:
            with torch.no_grad():
                for p in result_vae.parameters():
                    p.fill_(math.nan)

    config = pyro_vae.Config().override(
        {"train.epochs": 2, "model.latent_dim": 2, "model.encoder.hidden": [16]}
    )
    result_vae = None

    def keep(vae):
        nonlocal result_vae
        result_vae = vae

    with pytest.raises(pyro_vae.NonFiniteLossError) as info:
        pyro_vae.fit(config, tmp_path / "run", on_step=poison, initialize=keep)
    assert not isinstance(info.value, pyro_vae.UserError)
    assert "last good checkpoint" in str(info.value)
    assert pyro_vae.read_metrics(tmp_path / "run")[-1]["epoch"] == 1


def test_a_batch_larger_than_the_data_trains_full_batch_and_says_so(tmp_path, capsys):
    argv = ["train", *FAST[:-1], "--batch-size", "100000", "--out", str(tmp_path / "r")]
    code, out, _ = run(argv, capsys)
    assert code == 0
    assert "train.batch_size 100000 > 1500 training data: every step uses all 1500" in out
    assert pyro_vae.read_metrics(tmp_path / "r")[0]["gradient_steps"] == 1


def test_ctrl_c_while_the_command_loads_exits_130_quietly():
    process = subprocess.Popen(
        [sys.executable, "-m", "pyro_vae", "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.5)  # torch takes seconds to import: the signal lands mid-import
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err.decode()
    assert b"Traceback" not in err and b"KeyboardInterrupt" not in err
    assert out == b""


def test_importing_the_package_loads_no_torch():
    code = "import sys, pyro_vae; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_help_names_every_objective_and_every_listed_section(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    for name in pyro_vae.OBJECTIVES.names():
        assert name in train_help
    with pytest.raises(SystemExit):
        main(["list", "--help"])
    list_help = " ".join(capsys.readouterr().out.split())
    assert main(["list"]) == 0
    for line in capsys.readouterr().out.splitlines():
        assert line.split(":")[0] in list_help


# --- evaluation: bounded memory, refused when absurd -------------------------------


@pytest.mark.parametrize("chunk", [3, 37, 5003])
def test_streamed_weight_statistics_equal_the_full_array_ones(chunk):
    torch.manual_seed(0)
    k_total, batch, ks = 5003, 7, [1, 10, 100, 1000, 5000]
    log_w = (torch.randn(k_total, batch) * torch.linspace(0.5, 3, batch)).double()
    stats = WeightStatistics(k_total, batch, ks)
    for start in range(0, k_total, chunk):
        stats.update(log_w[start : start + chunk])
    result = stats.result()
    torch.testing.assert_close(result["log_likelihood"], log_mean_exp(log_w))
    torch.testing.assert_close(result["ess"], effective_sample_size(log_w))
    torch.testing.assert_close(result["mean"], log_w.mean(0))
    for k, bound in iwae_bounds(log_w, ks).items():
        torch.testing.assert_close(result[f"iwae_{k}"], bound)
    np.testing.assert_array_equal(result["khat"], pareto_khat(log_w))  # the same tail fit


def test_evaluate_streams_the_same_weights_log_importance_weights_returns(tiny_run):
    _, trained = tiny_run
    vae, x = trained.vae, trained.data.splits["test"][:30]
    result = evaluate(vae, x, num_samples=300, batch_size=30, chunk_size=600, seed=3)
    torch.manual_seed(3)
    log_w = log_importance_weights(vae, x, 300, proposal=vae.posterior(x), chunk_size=600)
    np.testing.assert_allclose(
        result.per_datum["log_likelihood"], log_mean_exp(log_w.double()).numpy(), rtol=1e-6
    )
    np.testing.assert_array_equal(result.per_datum["khat"], pareto_khat(log_w))


def test_an_absurdly_long_evaluation_is_refused_up_front_writing_nothing(
    tiny_run, tmp_path, capsys
):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    argv = ["evaluate", str(run_dir), "--num-samples", "100000000000000", "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1, err
    assert "would take about" in err and "valid K up to" in err
    assert sorted(p.name for p in run_dir.iterdir()) == before


# --- paths, data files, resume -------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parents[1]


def fake_binarized_mnist(folder, n=30, seed=0):
    """A stand-in ``binarized_mnist.npz`` (n images per split) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = {
        s: (rng.random((n, 784)) < 0.3).astype(np.float32) for s in ("train", "valid", "test")
    }
    np.savez(folder / "binarized_mnist.npz", **splits)
    return folder


def test_an_example_config_finds_the_data_from_any_folder(tmp_path, monkeypatch, capsys):
    """cd /tmp && PYRO_VAE_DATA=... pyro-vae train --config <repo>/configs/prior-vamp.toml."""
    data = fake_binarized_mnist(tmp_path / "datasets")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    monkeypatch.setenv("PYRO_VAE_DATA", str(data))
    config = REPO / "configs" / "prior-vamp.toml"
    argv = ["train", "--config", str(config), "--epochs", "1", "--quiet", "--out", "run"]
    argv += ["--set", "model.prior.pseudo_inputs=5", "--set", "train.batch_size=10"]
    code, out, err = run(argv, capsys)
    assert code == 0, err
    assert pyro_vae.Config.load(elsewhere / "run" / "config.toml").data.data_dir == str(data)


def test_data_folder_precedence_flag_then_variable_then_config(tmp_path, monkeypatch, capsys):
    good = fake_binarized_mnist(tmp_path / "good")
    empty = tmp_path / "empty"
    empty.mkdir()
    config = tmp_path / "configs" / "run.toml"
    config.parent.mkdir()
    # a data_dir in a config file is read relative to the file
    config.write_text('[data]\nname = "binarized-mnist"\ndata_dir = "../good"\ndownload = false\n')
    monkeypatch.chdir(empty)
    argv = ["train", "--config", str(config), *FAST]

    def data_dir_of(out, *extra):
        code, _, err = run([*argv, *extra, "--out", str(tmp_path / out)], capsys)
        return code, err

    monkeypatch.delenv("PYRO_VAE_DATA", raising=False)
    assert data_dir_of("config-only") == (0, "")  # the config's folder, relative to the file
    monkeypatch.setenv("PYRO_VAE_DATA", str(empty))  # the variable beats the config
    code, err = data_dir_of("variable")
    assert code == 2 and f"in {empty}" in err
    assert data_dir_of("flag", "--data-dir", str(good)) == (0, "")  # the flag beats both
    monkeypatch.setenv("PYRO_VAE_DATA", str(good))
    code, err = data_dir_of("flag-empty", "--data-dir", str(empty))
    assert code == 2 and f"in {empty}" in err


def test_a_run_on_an_npz_file_works_from_another_folder_and_notices_changed_data(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    x = (np.random.default_rng(0).random((40, 6)) < 0.5).astype(np.float32)
    np.savez("data.npz", train=x, test=x[:10])
    assert run(["train", *FAST, "--dataset", "npz:data.npz", "--out", "run"], capsys)[0] == 0
    other = tmp_path / "other"
    other.mkdir()
    monkeypatch.chdir(other)
    argv = ["evaluate", str(tmp_path / "run"), "--num-samples", "10", "--quiet"]
    code, _, err = run(argv, capsys)
    assert code == 0 and err == ""  # the recorded path is absolute
    np.savez(tmp_path / "data.npz", train=1 - x, test=x[:10])  # the file changes
    code, _, err = run(argv, capsys)
    assert code == 0
    assert err.startswith("pyro-vae evaluate: note: the data of") and err.count("\n") == 1
    code, _, err = run(["train", "--resume", str(tmp_path / "run"), "--epochs", "2"], capsys)
    assert code == 2 and "changed since it was trained" in err and err.count("\n") == 1
    assert pyro_vae.read_metrics(tmp_path / "run")[-1]["epoch"] == 1


def test_resume_refuses_an_edited_config_naming_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(["train", *FAST, "--out", str(out)], capsys)[0] == 0
    path = out / "config.toml"
    original = path.read_text()
    path.write_text(original.replace("lr = 0.001", "lr = 0.01"))
    code, _, err = run(["train", "--resume", str(out), "--epochs", "2"], capsys)
    assert code == 2 and "(train.lr: 0.001 -> 0.01)" in err and err.count("\n") == 1
    assert path.read_text() == original.replace("lr = 0.001", "lr = 0.01")  # nothing rewritten
    path.write_text(original)
    assert run(["train", "--resume", str(out), "--epochs", "2"], capsys)[0] == 0


def test_a_failed_download_leaves_no_folders(tmp_path):
    from pyro_vae.data import _download

    target = tmp_path / "cache" / "pyro-vae" / "binarized_mnist_train.amat"
    with pytest.raises(pyro_vae.DataError, match="download from"):
        _download("binarized-mnist", (tmp_path / "missing.amat").as_uri(), target)
    assert list(tmp_path.iterdir()) == []


def test_report_says_on_stderr_what_a_damaged_checkpoint_leaves_out(tiny_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    (run_dir / "checkpoint.pt").write_bytes(os.urandom(3000))
    code, out, err = run(["report", str(run_dir)], capsys)
    assert code == 0 and "report written" in out
    assert err.startswith("pyro-vae report: note: the report of") and "checkpoint" in err
    assert err.count("\n") == 1


def test_the_meanfield_fallback_is_one_note_line(tmp_path, capsys):
    argv = ["train", *FAST, "--prior", "vamp", "--set", "model.prior.pseudo_inputs=3"]
    code, _, err = run([*argv, "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    assert err.startswith("pyro-vae train: note: elbo 'meanfield': no closed-form KL")
    assert err.count("\n") == 1 and "Warning" not in err


def test_an_em_report_draws_without_warnings(tmp_path):
    import warnings

    config = pyro_vae.Config().override(
        {"train.method": "variational-em", "train.epochs": 1, "model.latent_dim": 2,
         "model.encoder.hidden": [16], "model.decoder.hidden": [16]}
    )  # fmt: skip
    pyro_vae.fit_em(config, tmp_path / "em")
    from pyro_vae.report import write_report

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_report(tmp_path / "em")
    assert [str(w.message) for w in caught] == []
