"""The run report: every section, embedded images that decode, nothing fetched from the network."""

import base64
import dataclasses
import html.parser
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import pyro_vae
from pyro_vae import report
from pyro_vae.cli import main
from pyro_vae.environment import git_commit
from pyro_vae.errors import CheckpointError, DataError

FIGURES = [
    "elbo",
    "elbo-terms",
    "kl-history",
    "prior-samples",
    "reconstructions",
    "interpolations",
    "manifold",
    "latent-scatter",
    "kl-per-dim",
    "iwae",
    "khat",
    "ess",
    "gaps",
    "step-loss",
]


def tiny_config(latent_dim=2, epochs=2, **data):
    model = dataclasses.replace(
        pyro_vae.ModelConfig(latent_dim=latent_dim),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [32]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [32]}),
    )
    return pyro_vae.Config(
        data=pyro_vae.DataConfig(**data),
        model=model,
        train=pyro_vae.TrainConfig(epochs=epochs, batch_size=100),
    )


def write_fake_evaluation(run_dir, n, k_max=64):
    """Made-up but consistent evaluation files: log p(x) >= IWAE_K >= ELBO, ESS in [1, K]."""
    rng = np.random.RandomState(0)
    elbo = rng.normal(-30.0, 3.0, n)
    total_gap = np.abs(rng.normal(1.0, 0.5, n))
    share = rng.uniform(0, 1, n)
    per_datum = {
        "log_likelihood": elbo + total_gap,
        "elbo": elbo,
        "ess": rng.uniform(1, k_max, n),
        "khat": rng.normal(0.4, 0.2, n),
        "approximation_gap": total_gap * share,
        "amortization_gap": total_gap * (1 - share),
    }
    summary = {
        "split": "test",
        "num_data": n,
        "num_samples": k_max,
        "log_likelihood": float(per_datum["log_likelihood"].mean()),
        "log_likelihood_stderr": float(per_datum["log_likelihood"].std(ddof=1) / np.sqrt(n)),
        "elbo": float(elbo.mean()),
        "iwae": {str(k): float(np.mean(elbo + total_gap * (1 - k**-0.5))) for k in (1, 8, k_max)},
        "ess_mean": float(per_datum["ess"].mean()),
        "khat_fraction_above_0_7": float(np.mean(per_datum["khat"] > 0.7)),
        "approximation_gap": float(per_datum["approximation_gap"].mean()),
        "amortization_gap": float(per_datum["amortization_gap"].mean()),
    }
    (run_dir / report.EVALUATION_FILE).write_text(json.dumps(summary))
    np.savez(run_dir / report.PER_DATUM_FILE, **per_datum)
    return summary


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_run):
    """A tiny finished digits run (D = 2, the shared one, copied) with evaluation files."""
    run_dir = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(tiny_run[0], run_dir)
    write_fake_evaluation(run_dir, len(tiny_run[1].data.split("test")))
    return run_dir


@pytest.fixture(scope="module")
def page(run):
    return report.build_report(run)


class _Tags(html.parser.HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self):
        super().__init__()
        self.tags = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def tags(page):
    parser = _Tags()
    parser.feed(page)
    return parser.tags


def section_text(page, key):
    start = page.index(f'<section id="{key}">')
    return page[start : page.index("</section>", start)]


def test_the_report_has_every_section_and_figure(page):
    for key in report.SECTIONS:
        assert f'<section id="{key}">' in page
        assert "How to read this." in section_text(page, key)
    for name in FIGURES:
        assert f'<figure id="fig-{name}">' in page, name
    assert "Not available" not in page and "not drawn" not in page
    assert "No comparison" in section_text(page, "latent")  # drawn with --compare only


def test_the_report_carries_the_config_and_the_final_metrics(page, run):
    config = (run / "config.toml").read_text()
    assert f"<pre>{report.html.escape(config)}</pre>" in page
    last = pyro_vae.read_metrics(run)[-1]
    metrics = section_text(page, "metrics")
    assert f"{last['test_elbo']:.2f}" in metrics and f"{last['test_kl']:.2f}" in metrics
    evaluation = json.loads((run / report.EVALUATION_FILE).read_text())
    assert f"{evaluation['log_likelihood']:.2f}" in metrics
    assert "2 of 2" in metrics  # epochs, and active units of D = 2 (both active after training)


def test_the_metrics_come_first_and_the_config_is_folded(page, run):
    metrics, config = page.index('<section id="metrics">'), page.index('<section id="config">')
    assert metrics < config
    assert list(report.SECTIONS)[0] == "metrics"
    folded = re.search(
        r"<details><summary>Configuration \(config\.toml\)</summary>(.*?)</details>", page, re.S
    )
    assert folded is not None and folded.start() > page.index("</section>", metrics)
    text = (run / "config.toml").read_text()
    assert folded.group(1) == f"<pre>{report.html.escape(text)}</pre>"
    assert page.count("<pre>") == 1  # the config appears folded only


def test_numeric_cells_do_not_wrap(page):
    css = page[page.index("<style>") : page.index("</style>")]
    rule = re.search(r"td\.num\s*\{([^}]*)\}", css)
    assert rule is not None and "white-space: nowrap" in rule.group(1)
    metrics = section_text(page, "metrics")
    assert '<table class="metrics">' in metrics
    value = re.search(r"log-likelihood log p&#770;\(x\)</td><td ([^>]*)>([^<]*)</td>", metrics)
    assert value is not None and value.group(1) == 'class="num"'
    assert "&nbsp;&plusmn;&nbsp;" in value.group(2)  # "-25.22 ± 0.28" stays on one line


def environment_rows(block):
    rows = re.findall(r"<tr><td>([^<]*)</td>((?:<td>[^<]*</td>)+)</tr>", block)
    return {name: re.findall(r"<td>([^<]*)</td>", cells) for name, cells in rows}


def test_the_environment_block_names_versions_device_and_threads(page):
    import pyro

    block = section_text(page, "config")
    assert "trained with (its last session)" in block  # the checkpoint records its session
    env = environment_rows(block)
    for column in (0, 1):  # trained with, report made with: the same machine here
        assert env["pyro-vae"][column] == pyro_vae.__version__
        assert env["torch"][column] == report.html.escape(torch.__version__)
        assert env["pyro"][column] == pyro.__version__
        assert env["device"][column] == "cpu"
        assert int(env["threads"][column]) >= 1


def test_a_checkpoint_without_an_environment_gets_the_report_machine_only(run, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(run, old)
    state = torch.load(old / "checkpoint.pt", weights_only=True)
    del state["environment"]  # as pyro-vae 0.2 wrote it
    torch.save(state, old / "checkpoint.pt")
    block = section_text(report.build_report(old), "config")
    assert "describe the machine that made this report" in block
    assert "train.device = cpu" in block  # what the run itself records
    assert all(len(cells) == 1 for cells in environment_rows(block).values())


def git(cwd, *args):
    return subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_commit_of_a_checkout_and_none_elsewhere(tmp_path, monkeypatch):
    package = tmp_path / "repo" / "pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("x = 1\n")
    assert git_commit(package) is None  # not a git checkout
    git(tmp_path / "repo", "init", "-q")
    assert git_commit(package) is None  # a repository that does not track the package
    git(tmp_path / "repo", "add", ".")
    git(tmp_path / "repo", "commit", "-q", "-m", "first")
    commit = git(tmp_path / "repo", "rev-parse", "--short", "HEAD")
    assert git_commit(package) == commit
    (package / "__init__.py").write_text("x = 2\n")
    assert git_commit(package) == f"{commit} + local changes"

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit(package) is None  # never an error
    assert "git commit" not in report.environment()


def test_the_verdict_measures_the_iwae_rise_up_to_the_k_used():
    ev = {
        "num_samples": 500,
        "log_likelihood": -25.0,
        "iwae": {"1": -26.0, "10": -25.5, "100": -25.2},
        "khat_fraction_above_0_7": 0.0,
    }
    assert "rose by 0.200 nats from K = 100 to K = 500" in report._reliability(ev)


def test_the_active_unit_count_is_the_computed_one(page, run):
    from pyro_vae import plots

    vae = pyro_vae.load(run)
    data = pyro_vae.load_data(pyro_vae.Config.load(run / "config.toml"))
    count = plots.active_units(vae, data.split("test")).count
    assert f"Active units: {count} of 2" in section_text(page, "collapse")


def test_embedded_images_decode(page):
    images = [attrs for tag, attrs in tags(page) if tag == "img"]
    assert len(images) == len(FIGURES)
    for attrs in images:
        prefix = "data:image/png;base64,"
        assert attrs["src"].startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(attrs["src"][len(prefix) :], validate=True)))
        image.load()
        assert image.format == "PNG" and min(image.size) > 100
        assert attrs["alt"]


def test_the_page_makes_no_network_reference(page):
    for tag, attrs in tags(page):
        assert tag not in {"script", "link", "iframe", "object", "embed", "base"}
        for name, value in attrs.items():
            if name == "src":
                assert value.startswith("data:")
            if name == "href":
                assert value.startswith("#")
    text = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    assert not re.search(r"https?:|ftp:|//[a-z]|url\(|@import", text, re.IGNORECASE)


def test_the_evaluation_verdict_reports_the_khat_fraction(page, run):
    evaluation = json.loads((run / report.EVALUATION_FILE).read_text())
    fraction = evaluation["khat_fraction_above_0_7"]
    assert f"{100 * fraction:.1f}% of the data have k-hat above 0.7" in section_text(
        page, "evaluation"
    )


@pytest.mark.parametrize("stage", ["config only", "one epoch, no checkpoint"])
def test_an_unfinished_run_gets_a_report_from_what_exists(run, tmp_path, stage):
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(run / "config.toml", partial)
    if stage != "config only":
        first = (run / "metrics.jsonl").read_text().splitlines()[0]
        (partial / "metrics.jsonl").write_text(first + "\n")
    page = report.build_report(partial)
    for key in report.SECTIONS:
        assert f'<section id="{key}">' in page
    assert "unfinished" in page
    assert "no checkpoint.pt yet" in section_text(page, "generation")
    assert ('<figure id="fig-elbo">' in page) == (stage != "config only")
    evaluation = section_text(page, "evaluation")
    assert "Not evaluated yet" in evaluation and "pyro-vae evaluate" in evaluation


def test_report_errors_are_user_errors(run, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        report.build_report(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="not a run directory"):
        report.build_report(tmp_path)
    with pytest.raises(DataError, match="no split 'valid'"):
        report.build_report(run, split="valid")


def test_non_image_data_skip_the_image_figures(tmp_path):
    rng = np.random.RandomState(0)
    np.savez(tmp_path / "flat.npz", train=rng.normal(size=(200, 5)).astype(np.float32))
    config = tiny_config(epochs=1, name=f"npz:{tmp_path / 'flat.npz'}")
    config = config.override({"model.likelihood.name": "normal"})
    pyro_vae.fit(config, tmp_path / "flat")
    page = report.build_report(tmp_path / "flat")
    assert "not an image" in section_text(page, "generation")
    assert "<img" not in section_text(page, "generation")
    assert '<figure id="fig-latent-scatter">' in page  # the latent space still works
    assert main(["sample", str(tmp_path / "flat")]) == 2


# --- the commands -------------------------------------------------------------------


def test_cli_report_writes_the_page_with_a_comparison(run, tmp_path, capsys):
    out = tmp_path / "page.html"
    assert main(["report", str(run), "--out", str(out), "--compare", str(run)]) == 0
    page = out.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert '<figure id="fig-latent-comparison">' in page
    assert str(out) in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(run), "--compare", str(tmp_path / "nowhere")]) == 2


def test_cli_sample_writes_an_image_grid(run, tmp_path):
    out = tmp_path / "samples.png"
    torch.manual_seed(5)
    expected = torch.rand(2)
    torch.manual_seed(5)
    assert main(["sample", str(run), "-n", "10", "--out", str(out)]) == 0
    assert torch.equal(torch.rand(2), expected)  # the global RNG is left alone
    image = Image.open(out)
    # 10 images of 8x8 in rows of ceil(sqrt(10)) = 4, 2-pixel padding: 3 rows of a 42 x 32
    # grid, each pixel a 7 x 7 block by default (the smallest scale with 256 px across)
    assert image.format == "PNG" and image.size == (7 * (4 * 10 + 2), 7 * (3 * 10 + 2))
    small = tmp_path / "small.png"
    assert main(["sample", str(run), "-n", "10", "--scale", "1", "--out", str(small)]) == 0
    assert Image.open(small).size == (4 * 10 + 2, 3 * 10 + 2)
    again = tmp_path / "again.png"
    assert main(["sample", str(run), "-n", "10", "--out", str(again)]) == 0
    assert again.read_bytes() == out.read_bytes()  # same seed, same picture
    with pytest.raises(SystemExit) as e:
        main(["sample", str(run), "-n", "0"])
    assert e.value.code == 2
