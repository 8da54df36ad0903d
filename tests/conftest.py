import os
from pathlib import Path

# two test workers share two cores: one thread each, and the same for every
# process a test starts (notebook kernels, CLI subprocesses, torchrun ranks)
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

# torch and pyro are imported where a test needs them, not here: with -n 2 the
# controller process loads this file too, runs no test, and starts the workers
# once it is loaded (importing torch first would delay them by about 3 s).


def pytest_collection(session: pytest.Session) -> None:
    """In each process that runs tests (not an xdist controller): one torch thread."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "datasets"


@pytest.fixture(autouse=True)
def _clean_pyro_state():
    """Every test starts with an empty param store, validation on, and a fixed seed."""
    import pyro
    import torch

    pyro.clear_param_store()
    pyro.enable_validation(True)
    torch.manual_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture
def shared_datasets() -> Path:
    """The folder with binarized_mnist.npz beside the project; skip when absent."""
    folder = Path(os.environ.get("PYRO_VAE_SHARED_DATA", SHARED_DATA))
    if not (folder / "binarized_mnist.npz").exists():
        pytest.skip(f"binarized_mnist.npz not found in {folder} (shared datasets absent)")
    return folder


def devices() -> list:
    """CPU always; CUDA when available (the CUDA case skips otherwise)."""
    import torch

    return [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available"),
        ),
    ]


def tiny_run_config():
    """The shared tiny run: digits, D = 2, 32-unit MLPs, 2 epochs of minibatches of 100."""
    import dataclasses

    import pyro_vae

    model = dataclasses.replace(
        pyro_vae.ModelConfig(latent_dim=2),
        encoder=pyro_vae.ComponentConfig("mlp", {"hidden": [32]}),
        decoder=pyro_vae.ComponentConfig("mlp", {"hidden": [32]}),
    )
    return pyro_vae.Config(model=model, train=pyro_vae.TrainConfig(epochs=2, batch_size=100))


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """One tiny trained run shared by the test modules: ``(run_dir, TrainResult)``.

    Read-only: a test that writes into a run directory copies it first.
    """
    import torch

    import pyro_vae

    run_dir = tmp_path_factory.mktemp("shared") / "tiny"
    with torch.random.fork_rng():
        result = pyro_vae.fit(tiny_run_config(), run_dir)
    return run_dir, result


@pytest.fixture(scope="module")
def ppca_run(tmp_path_factory):
    """A 2-epoch linear-Gaussian run on ``ppca`` (closed-form log p(x)); one per test module."""
    from test_evaluate import train_ppca

    out = tmp_path_factory.mktemp("runs") / "ppca"
    train_ppca(out)
    return out
