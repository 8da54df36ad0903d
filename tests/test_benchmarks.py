"""The log-likelihood table of BENCHMARKS.md is generated from benchmarks/results/*.json."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import nll_table  # noqa: E402

KEYS = {
    "row", "config", "epochs", "best_epoch", "wall_seconds", "device", "threads", "nll",
    "nll_se_data", "nll_se_mc", "elbo", "iwae", "khat_fraction_above_0_7", "versions",
    "command",
}  # fmt: skip


def test_the_table_in_benchmarks_md_is_the_one_the_results_give():
    records = nll_table.read_results(nll_table.RESULTS)
    assert records, "benchmarks/results holds no result"
    assert nll_table.table_in(nll_table.TABLE_FILE) == nll_table.render_table(records)
    for record in records:
        assert KEYS <= set(record), record["row"]
        assert record["row"] in nll_table.ROWS
        assert record["nll"] == pytest.approx(-dict(record["iwae"]).get(
            str(record["num_samples"]), -record["nll"]))  # fmt: skip


def test_every_row_config_loads():
    import pyro_vae

    for row in nll_table.ROWS:
        config = pyro_vae.Config.load(nll_table.row_config(row))
        assert config.data.name == "binarized-mnist"
        assert config.model.latent_dim == 40 and config.train.batch_size == 100
    for path in (nll_table.CONFIGS / nll_table.CANDIDATES).glob("*.toml"):
        assert path.stem in nll_table.ROWS, path  # a candidate is one row's
        config = pyro_vae.Config.load(path)
        assert config.data.name == "binarized-mnist"
        assert config.model.latent_dim == 40 and config.train.batch_size == 100


def test_the_harness_trains_evaluates_writes_and_tabulates(tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "standard.toml").write_text(
        '[model]\nlatent_dim = 2\n[model.encoder]\nname = "mlp"\nhidden = [16]\n'
        '[model.decoder]\nname = "mlp"\nhidden = [16]\n[train]\nepochs = 1\n'
    )  # digits: no valid split, so the last checkpoint is evaluated
    table = tmp_path / "B.md"
    table.write_text(f"# t\n\n{nll_table.START}\nold\n{nll_table.END}\ntail\n")
    argv = [
        "--rows", "standard", "--runs", str(tmp_path / "runs"), "--seed-runs", str(tmp_path),
        "--results", str(tmp_path / "results"), "--table-file", str(table),
        "--configs", str(configs), "--num-samples", "10", "--max-data", "20", "--quiet",
    ]  # fmt: skip
    assert nll_table.main(argv) == 0
    record = json.loads((tmp_path / "results" / "standard.json").read_text())
    assert KEYS <= set(record)
    assert record["epochs"] == 1 and record["evaluated_checkpoint"] == "last"
    assert record["num_data"] == 20 and record["num_samples"] == 10
    assert (
        record["versions"]["trained_with"]["pyro_vae"]
        == record["versions"]["evaluated_with"]["pyro_vae"]
    )
    text = table.read_text()
    assert "old" not in text and text.endswith(f"{nll_table.END}\ntail\n")
    assert "not comparable: 20 test data" in text
    assert "| `vamp` | - |" in text and "not run (`--rows vamp`)" in text  # no record yet
    # a second call resumes the run (nothing to train: already at its epochs) and evaluates again
    assert nll_table.main(argv) == 0
    assert json.loads((tmp_path / "results" / "standard.json").read_text())["epochs"] == 1


def test_a_candidate_trains_apart_and_leaves_the_table_alone(tmp_path, capsys):
    configs = tmp_path / "configs"
    (configs / nll_table.CANDIDATES).mkdir(parents=True)
    (configs / nll_table.CANDIDATES / "vamp.toml").write_text(
        '[model]\nlatent_dim = 2\n[model.encoder]\nname = "mlp"\nhidden = [16]\n'
        '[model.decoder]\nname = "gated-mlp"\nhidden = [16]\n[train]\nepochs = 1\n'
    )
    table = tmp_path / "B.md"
    table.write_text(f"{nll_table.START}\nold\n{nll_table.END}\n")
    common = ["--runs", str(tmp_path / "runs"), "--results", str(tmp_path / "results")]
    common += ["--table-file", str(table), "--configs", str(configs), "--quiet"]
    # refused before any work: a row without a candidate, and --table-only
    for extra in (["--rows", "standard"], ["--table-only"]):
        with pytest.raises(SystemExit) as e:
            nll_table.main([*common, "--candidate", *extra])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert "candidates (" in err and err.endswith("vamp"), err
    assert not (tmp_path / "runs").exists()
    argv = [*common, "--candidate", "--num-samples", "10", "--max-data", "20"]  # rows: all it has
    assert nll_table.main(argv) == 0
    record = json.loads((tmp_path / "runs" / "candidate-results" / "vamp.json").read_text())
    assert record["row"] == "vamp" and record["epochs"] == 1
    assert record["config"].endswith("candidates/vamp.toml")
    assert (tmp_path / "runs" / "candidates" / "vamp" / "checkpoint.pt").exists()
    assert not (tmp_path / "results").exists() and "old" in table.read_text()


def test_promote_makes_an_evaluated_candidate_the_row_without_evaluating_again(tmp_path, capsys):
    rng = np.random.default_rng(0)
    data = tmp_path / "tiny.npz"
    np.savez(data, **{k: (rng.random((n, 4, 4)) < 0.3).astype(np.float32)
                      for k, n in (("train", 60), ("valid", 20), ("test", 20))})  # fmt: skip
    configs, runs, results = tmp_path / "configs", tmp_path / "runs", tmp_path / "results"
    (configs / nll_table.CANDIDATES).mkdir(parents=True)
    candidate = (
        f'[data]\nname = "npz:{data}"\n[model]\nlatent_dim = 2\n[model.encoder]\nname = "mlp"\n'
        'hidden = [8]\n[model.decoder]\nname = "gated-mlp"\nhidden = [8]\n[train]\nepochs = 2\n'
    )
    (configs / nll_table.CANDIDATES / "vamp.toml").write_text(candidate)
    (configs / "vamp.toml").write_text("# the old row\n")
    (runs / "vamp").mkdir(parents=True)  # the old row's run
    results.mkdir()
    (results / "vamp.json").write_text(json.dumps({"row": "vamp", "nll": 99.0}))
    table = tmp_path / "B.md"
    table.write_text(f"{nll_table.START}\nold\n{nll_table.END}\n")
    common = ["--runs", str(runs), "--results", str(results), "--table-file", str(table)]
    common += ["--configs", str(configs), "--quiet"]
    assert nll_table.main([*common, "--promote", "vamp"]) == 2  # nothing trained yet
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no candidate run" in err[0] and "--candidate" in err[0], err
    assert (configs / "vamp.toml").read_text() == "# the old row\n"  # nothing moved
    assert nll_table.main([*common, "--candidate", "--num-samples", "10"]) == 0
    evaluated = json.loads((runs / "candidate-results" / "vamp.json").read_text())
    assert nll_table.main([*common, "--promote", "vamp"]) == 0
    assert (configs / "vamp.toml").read_text() == candidate
    assert not (configs / nll_table.CANDIDATES / "vamp.toml").exists()
    assert (runs / "vamp" / "best.pt").exists() and (runs / "vamp-replaced").is_dir()
    record = json.loads((results / "vamp.json").read_text())
    assert record["config"].endswith("configs/vamp.toml") and record["run_dir"] == str(
        runs / "vamp"
    )
    unchanged = {k: v for k, v in record.items() if k not in ("config", "run_dir")}
    assert unchanged == {k: v for k, v in evaluated.items() if k not in ("config", "run_dir")}
    assert f"| {record['nll']:.2f} |" in table.read_text()
    # a second promotion finds no candidate and moves nothing
    assert nll_table.main([*common, "--promote", "vamp"]) == 2
    assert (runs / "vamp" / "best.pt").exists()
